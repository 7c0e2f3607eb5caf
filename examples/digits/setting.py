"""A small multi-task setting from scikit-learn's digits (installs offline), for the search and
learned-merging demo (run.py).

* Data: the 1797 8x8 digits, split once (seeded) into train 60% / validation 20% / test 20%.
* Tasks: six questions about the same digits (`TASKS`, `task_labels`): `low` tells 0-4 apart,
  `high` 5-9 (5 classes each), `parity` even from odd, `mod3` the digit modulo 3, `ge5` whether it
  is at least 5, `loops` whether it is drawn with a closed loop (0, 6, 8, 9).
* Models: an MLP backbone (`layers.{0,1,2}.weight/bias`, 64 -> 128 -> 128 -> 64, unit-norm
  features as CLIP's image embeddings) with one classification head per task (in
  `heads.safetensors`, kept apart: only backbones are merged, as in task arithmetic and
  AdaMerging with per-task heads).
* The base is "pretrained" briefly on 100 of the digits (the 10-class task). Each task's head is
  a linear probe on the base's features, then frozen (as CLIP's zero-shot heads in the merging literature) while
  the task fine-tunes the backbone from the base. Everything is seeded; a build takes seconds.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

HERE = Path(__file__).resolve().parent
TASKS = ("low", "high", "parity", "mod3", "ge5", "loops")
CLASSES = {"low": 5, "high": 5, "parity": 2, "mod3": 3, "ge5": 2, "loops": 2, "identity": 10}
WIDTHS = (64, 128, 128, 64)


def task_labels(x: np.ndarray, y: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """The task's inputs and labels: `low` tells digits 0-4 apart, `high` digits 5-9, `parity`
    even from odd, `mod3` the digit modulo 3, `ge5` digits >= 5, `loops` digits drawn with a
    closed loop; `identity` is the 10-class pretraining task."""
    if task == "low":
        keep = y < 5
        return x[keep], y[keep]
    if task == "high":
        keep = y >= 5
        return x[keep], y[keep] - 5
    if task == "parity":
        return x, y % 2
    if task == "mod3":
        return x, y % 3
    if task == "ge5":
        return x, (y >= 5).astype(y.dtype)
    if task == "loops":  # digits drawn with a closed loop
        return x, np.isin(y, (0, 6, 8, 9)).astype(y.dtype)
    if task == "identity":
        return x, y
    raise ValueError(task)


@functools.lru_cache(maxsize=None)
def splits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The seeded split (computed once per seed: loading the data set is the slow part)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.random.default_rng(seed).permutation(len(d.target))
    n = len(idx)
    cut = {"train": idx[: int(0.6 * n)], "val": idx[int(0.6 * n): int(0.8 * n)], "test": idx[int(0.8 * n):]}
    return {k: ((d.data[v] / 16.0).astype(np.float32), d.target[v]) for k, v in cut.items()}


def data(task: str, split: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = task_labels(*splits(seed)[split], task)
    return torch.tensor(x), torch.tensor(y)


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(WIDTHS, WIDTHS[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        # unit-norm features, as CLIP's image embeddings: a head sees directions only
        return nn.functional.normalize(self.layers[-1](x), dim=-1)


def _train(params: list, loss_fn, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
           seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(loss_fn(x[batch]), y[batch]).backward()
            opt.step()


def _save(folder: Path, backbone: Backbone) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in backbone.state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "digits-mlp",
                                                     "widths": list(WIDTHS)}) + "\n")


def build(root: Path = HERE / "models", seed: int = 0, pretrain_epochs: int = 3,
          pretrain_samples: int = 100,
          probe_epochs: int = 2, finetune_epochs: tuple[int, ...] = (2, 4, 8, 16, 8, 4),
          finetune_lr: tuple[float, ...] = (1e-3,) * 6) -> Path:
    """Write root/base, root/<task> (backbones) and root/heads.safetensors.

    As with CLIP and its zero-shot heads in the merging literature, each task's head is fixed
    before fine-tuning: a linear probe on the base's features; fine-tuning then trains only the
    backbone. The base is pretrained briefly on 100 digits (10 classes); the six tasks fine-tune
    for 2, 4, 8, 16, 8 and 4 epochs, so their task vectors differ in size (as fine-tunes from different
    sources do) and one coefficient for all is not the best choice."""
    with one_thread():
        return _build(root, seed, pretrain_epochs, pretrain_samples, probe_epochs, finetune_epochs,
                      finetune_lr)


@contextlib.contextmanager
def one_thread():
    """torch on one thread meanwhile: the models are tiny, and more intra-op threads only fight
    for the cores (a training step measured 10x slower with 2 threads on a loaded 2-core VM)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _build(root: Path, seed: int, pretrain_epochs: int, pretrain_samples: int, probe_epochs: int,
           finetune_epochs: tuple[int, ...], finetune_lr: tuple[float, ...]) -> Path:
    torch.manual_seed(seed)
    base, head0 = Backbone(), nn.Linear(WIDTHS[-1], 10)
    x, y = data("identity", "train", seed)
    x, y = x[:pretrain_samples], y[:pretrain_samples]
    _train([*base.parameters(), *head0.parameters()], lambda v: head0(base(v)), x, y,
           pretrain_epochs, 1e-3, seed)
    _save(root / "base", base)
    heads = {}
    for i, task in enumerate(TASKS):
        torch.manual_seed(seed + 1 + i)
        head = nn.Linear(WIDTHS[-1], CLASSES[task])
        x, y = data(task, "train", seed)
        with torch.no_grad():
            feats = base(x)
        _train(list(head.parameters()), head, feats, y, probe_epochs, 1e-2, seed + 1 + i)
        bb = Backbone()
        bb.load_state_dict(base.state_dict())
        head.requires_grad_(False)
        _train(list(bb.parameters()), lambda v: head(bb(v)), x, y, finetune_epochs[i],
               finetune_lr[i], seed + 1 + i)
        _save(root / task, bb)
        heads[f"{task}.weight"] = head.weight.detach().contiguous()
        heads[f"{task}.bias"] = head.bias.detach().contiguous()
    save_file(heads, str(root / "heads.safetensors"))
    return root


class Evaluator:
    """Accuracy of a merged backbone with each task's own head, per split."""

    def __init__(self, root: Path = HERE / "models", seed: int = 0):
        self.seed = seed
        self.heads = load_file(str(root / "heads.safetensors"))
        self.skeleton = Backbone()
        self.sets = {(t, s): data(t, s, seed) for t in TASKS for s in ("val", "test")}

    def logits(self, state: dict[str, torch.Tensor], task: str, x: torch.Tensor) -> torch.Tensor:
        from mergelang.objectives import forward

        feats = forward(self.skeleton, state, x)
        return feats @ self.heads[f"{task}.weight"].T + self.heads[f"{task}.bias"]

    def accuracy(self, state: dict[str, torch.Tensor], task: str, split: str = "test") -> float:
        x, y = self.sets[(task, split)]
        with torch.no_grad():
            return float((self.logits(state, task, x).argmax(-1) == y).float().mean())

    def average(self, state: dict[str, torch.Tensor], split: str = "test") -> float:
        return sum(self.accuracy(state, t, split) for t in TASKS) / len(TASKS)


if __name__ == "__main__":  # python examples/digits/setting.py: the models the recipes name
    # (examples/digits/models/, seed 0): the setup step before running the recipes with the CLI
    print(f"wrote {build()}")
