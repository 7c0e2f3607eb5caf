"""A plain digits classifier for the alignment-from-activations demo (docs/align.md,
benchmarks/align_activations.py): `DigitsMLP` (64 -> 128 -> 128 -> 10, ReLU; checkpoint names
`layers.{0,1,2}.weight/bias`), the permutation groups of its two hidden layers (`GROUPS`, align's
`groups` strings, as in align_activations.mrg) and `BATCHES`: the training split's inputs (no
labels) in batches of 256, what `mergelang stats A B --kind correlation --module
mlp.py:DigitsMLP --data mlp.py:BATCHES` runs both models on.

    python mlp.py FOLDER SEED [--epochs 30]   # train on the 10 digits from seed SEED, save
    python mlp.py --accuracy FOLDER           # test-split accuracy of a saved (or merged) MLP
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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


def train(seed: int, epochs: int = 30) -> DigitsMLP:
    """Adam (lr 1e-3, batch 64) on the training split; `seed` sets the initialisation and the
    data order."""
    torch.manual_seed(seed)
    model = DigitsMLP()
    x, y = data("identity", "train")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    return model.eval()


def save(model: DigitsMLP, folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "digits-mlp"}) + "\n")
    return folder


def accuracy(state: dict[str, torch.Tensor]) -> float:
    return evaluate(state)[0]


def evaluate(state: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the test split (360 digits)."""
    model = DigitsMLP()
    model.load_state_dict(state)
    x, y = data("identity", "test")
    with torch.no_grad():
        logits = model(x)
    return float((logits.argmax(-1) == y).float().mean()), float(nn.functional.cross_entropy(logits, y))


def load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="train and save a digits MLP, or report its accuracy")
    ap.add_argument("folder", type=Path)
    ap.add_argument("seed", type=int, nargs="?")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--accuracy", action="store_true", help="print FOLDER's test accuracy")
    args = ap.parse_args()
    if args.accuracy:
        print(f"test accuracy of {args.folder}: {accuracy(load(args.folder)):.3f}")
    else:
        torch.set_num_threads(1)
        print(f"wrote {save(train(args.seed, args.epochs), args.folder)}")
