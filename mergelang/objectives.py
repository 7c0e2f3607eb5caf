"""Helpers for `tune` objectives and `learn` losses (`ml.objectives`; search/objectives.py):
`entropy(logits)` (AdaMerging's objective), `forward(module, state, *args)` (a model skeleton
run with merged tensors through torch.func.functional_call), `accuracy(logits, labels)`; and
objectives on data (data/objectives.py): `perplexity(data, config=MODEL_DIR)` and
`lm_eval(tasks, config=MODEL_DIR)`, each returning `f(state) -> float`."""

from mergelang.data.objectives import lm_eval, perplexity
from mergelang.search.objectives import accuracy, entropy, forward

__all__ = ["accuracy", "entropy", "forward", "lm_eval", "perplexity"]
