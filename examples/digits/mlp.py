"""A plain digits classifier for the alignment-from-activations demo
(benchmarks/align_activations.py): `DigitsMLP` (64 -> 128 -> 128 -> 10, ReLU; checkpoint names
`layers.{0,1,2}.weight/bias`), the permutation groups of its two hidden layers (`GROUPS`, align's
`groups` strings) and `BATCHES`: the training split's inputs (no labels) in batches of 256, what
`mergelang stats A B --kind correlation --module mlp.py:DigitsMLP --data mlp.py:BATCHES` runs
both models on.
"""

from __future__ import annotations

import torch
from torch import nn

from setting import data

WIDTHS = (64, 128, 128, 10)
#: the hidden units of layer 0 and layer 1: the output rows of one layer, the input columns of the next
GROUPS = ["h0: layers.0.weight@0 layers.0.bias@0 layers.1.weight@1",
          "h1: layers.1.weight@0 layers.1.bias@0 layers.2.weight@1"]


class DigitsMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(WIDTHS, WIDTHS[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


BATCHES = list(data("identity", "train")[0].split(256))
