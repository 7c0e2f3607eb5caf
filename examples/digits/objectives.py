"""Objectives for the digits demo: `val_accuracy` (tune: average validation accuracy over the
tasks) and `entropy_loss` + `batches` (learn: AdaMerging's entropy on unlabeled validation
inputs; the labels are never read)."""

from __future__ import annotations

import torch

import mergelang as ml
from setting import TASKS, Evaluator, data

EVAL: Evaluator | None = None  # run.py sets it per seed; else models/ next to setting.py


def _ev() -> Evaluator:
    global EVAL
    if EVAL is None:
        EVAL = Evaluator()
    return EVAL


def val_accuracy(state: dict[str, torch.Tensor]) -> float:
    return _ev().average(state, "val")


def entropy_loss(state: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(ml.objectives.entropy(_ev().logits(state, t, x)) for t, x in batch.items())


def batches(epochs: int = 30, size: int = 64, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Shuffled minibatches of unlabeled validation inputs: each batch holds `size` inputs of
    every task (tasks see different subsets of the digits, so each cycles on its own)."""
    g = torch.Generator().manual_seed(seed)
    xs = {t: data(t, "val", _ev().seed)[0] for t in TASKS}
    steps = epochs * max(1, max(len(x) for x in xs.values()) // size)
    order = {t: torch.cat([torch.randperm(len(x), generator=g) for _ in range(epochs * 2 + 2)])
             for t, x in xs.items()}
    return [{t: x[order[t][i * size:(i + 1) * size]] for t, x in xs.items()} for i in range(steps)]


def ce_loss(state: dict[str, torch.Tensor], batch: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Cross-entropy on labeled validation batches (supervised learned coefficients)."""
    return sum(torch.nn.functional.cross_entropy(_ev().logits(state, t, x), y) for t, (x, y) in batch.items())


def labeled_batches(epochs: int = 30, size: int = 64, seed: int = 0) -> list[dict[str, tuple]]:
    """Like `batches`, with the labels."""
    g = torch.Generator().manual_seed(seed)
    sets = {t: data(t, "val", _ev().seed) for t in TASKS}
    steps = epochs * max(1, max(len(y) for _, y in sets.values()) // size)
    order = {t: torch.cat([torch.randperm(len(y), generator=g) for _ in range(epochs * 2 + 2)])
             for t, (_, y) in sets.items()}
    return [{t: (x[order[t][i * size:(i + 1) * size]], y[order[t][i * size:(i + 1) * size]])
             for t, (x, y) in sets.items()} for i in range(steps)]
