"""Helpers for `tune` objectives and `learn` losses (`ml.objectives`; search/objectives.py):
`entropy(logits)` (AdaMerging's objective), `forward(module, state, *args)` (a model skeleton
run with merged tensors through torch.func.functional_call), `accuracy(logits, labels)`."""

from mergelang.search.objectives import accuracy, entropy, forward

__all__ = ["accuracy", "entropy", "forward"]
