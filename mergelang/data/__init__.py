"""Merging with data: statistics computed from forward passes (`mergelang stats`, `ml.stats`:
Gram matrices for `regmean`, diagonal Fisher for `fisher`), and objectives on data for `tune`
(`ml.objectives.perplexity`, `ml.objectives.lm_eval`). Built on transformers/torch; imported only
when used (`import mergelang` stays light)."""
