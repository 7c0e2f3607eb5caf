"""Permutation alignment of models before merging (`align(model, to = ref, ...)`).

`spec` describes which tensor axes share a permutation (built-in specs from config.json),
`solve` finds the permutations (weight matching or optimal transport), `source` applies them on
load, `lang` is the `align` intrinsic of the language. See docs/align.md.
"""

from mergelang.sources.align.solve import METHODS, AlignResult, weight_matching
from mergelang.sources.align.spec import (AlignSpec, Group, Member, SpecError, apply_permutations, invert, random_permutations,
                   spec_for)

__all__ = ["METHODS", "AlignResult", "AlignSpec", "Group", "Member", "SpecError", "apply_permutations",
           "invert", "random_permutations", "spec_for", "weight_matching"]
