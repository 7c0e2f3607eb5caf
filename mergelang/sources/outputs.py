"""Another block's output used as a model: several merges that build on each other, in one graph.

    model base = "./base"
    model a = "./a"
    model b = "./b"
    model c = "./c"
    model stage1 = output("stage1")
    merge "stage1" from base { "*" => ties(base, [a, b], density = 0.5) }
    merge "final" from base { "*" => slerp(stage1, c, t = 0.3) }

`stage1`'s tensors are not read back from disk: where a rule of `final` uses `stage1`, the
elaborator substitutes the graph `stage1`'s rule builds for the same tensor name, so the
intermediate is computed once, shared by both outputs, and written as `OUTDIR/stage1/` too
(mergekit-multi writes its intermediates likewise). The output model's tensor table is its
block's `merge from` model's (names, shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from mergelang.diagnostics import Diagnostics, Span, did_you_mean, error
from mergelang.io.checkpoint import ModelSource, TensorInfo
from mergelang.lang.intrinsics.registry import Elab, intrinsic
from mergelang.lang.values import Const, Value

if TYPE_CHECKING:
    import torch

    from mergelang.lang.loader import Unit


@dataclass(frozen=True)
class OutputSpec:
    name: str

    def open_model(self, decl: Any, models: dict[str, ModelSource | None], base_dir: Path,
                   diags: Any, pending: set[str]) -> None:
        models[decl.name] = OutputSource(decl.name, self.name, decl.value.span)


class OutputSource(ModelSource):
    """A block's output seen as a model: tensor table of the block's reference model; its tensors
    are never loaded (the elaborator substitutes the block's rules; `block_output` says which)."""

    def __init__(self, label: str, output: str, span: Span):
        self.label = label
        self.output = output
        self.span = span
        self.reference: ModelSource | None = None
        self.block_output: tuple[int, int] | None = None

    @property  # type: ignore[override]
    def folder(self) -> Path | None:
        return self.reference.folder if self.reference is not None else None

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self.reference.tensors() if self.reference is not None else {}

    def load(self, name: str) -> torch.Tensor:  # pragma: no cover - never reached
        raise RuntimeError(f"internal: output `{self.output}` has no stored tensors")

    def input_paths(self) -> list[Path]:
        return []  # its inputs are the other models'

    def config(self) -> dict | None:
        return self.reference.config() if self.reference is not None else None


@intrinsic("output", "name",
           doc="the output of a named merge block, as a model for the rules of other blocks: "
               "model s1 = output(\"stage1\") (computed in the same graph, never read back)")
def _output(el: Elab, a: dict[str, Value], span: Span) -> Value:
    name = a["name"]
    if el.tensor:
        raise el.error("E201", "output(...) declares a model: use it as "
                       "`model NAME = output(\"BLOCK\")`", span)
    if not (isinstance(name, Const) and isinstance(name.value, str)):
        raise el.error("E201", f"output needs a block's output name (a string), got "
                       f"{name.describe()}", span)
    return Const(OutputSpec(name.value))


def link_outputs(unit: Unit, models: dict[str, ModelSource | None], diags: Diagnostics) -> None:
    """Point each `output(...)` model at its block (E316 when no block writes that output) and
    its block's reference model; a chain of references that comes back to itself is E317."""
    where: dict[str, tuple[int, int]] = {}
    for bi, block in enumerate(unit.blocks):
        for oi, out in enumerate(block.outputs):
            where[out] = (bi, oi)
    outs = {k: m for k, m in models.items() if isinstance(m, OutputSource)}
    for key, src in outs.items():
        found = where.get(src.output)
        if found is None:
            diags.add(error("E316", f"model `{key}`: no merge block writes an output named "
                            f"{src.output!r}", src.span,
                            did_you_mean(src.output, where) or
                            'name a block: merge "NAME" from MODEL { ... }'))
            models[key] = None
            continue
        if unit.blocks[found[0]].adapter:
            diags.add(error("E319", f"model `{key}`: {src.output!r} is a LoRA adapter, not a model "
                            "another block can merge", src.span))
            models[key] = None
            continue
        src.block_output = found
        src.reference = models.get(unit.blocks[found[0]].source)
    for key, src in outs.items():  # merge "a" from b_out, merge "b" from a_out: no reference
        seen: set[str] = set()
        m: ModelSource | None = src
        while isinstance(m, OutputSource) and models.get(key) is not None:
            if m.output in seen:
                diags.add(error("E317", f"model `{key}`: the `merge from` models of outputs "
                                f"{', '.join(sorted(seen))} refer to each other in a cycle",
                                src.span, "one of the blocks must merge from a stored model"))
                models[key] = None
                break
            seen.add(m.output)
            m = m.reference
