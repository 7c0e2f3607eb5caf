"""Derived model sources: LoRA adapters, stacked layers, resized vocabularies, aligned models.

Importing this package registers the intrinsics that declare them (`lora`, `stack_layers`,
`layer_range`, `align`, `output`, `moe`) in `mergelang.lang.intrinsics`; the compiler imports it.
"""

from mergelang.sources import lora, moe, outputs, stacking, vocab  # noqa: F401  (the members)
from mergelang.sources.align import lang as align_lang  # noqa: F401
