"""The Python API: `compile` a recipe once, then `run` it (to disk) or `evaluate` it (in memory);
`merge` is the one-liner for state dicts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .compiler import STAGES, Compilation, compile_recipe
from .diagnostics import CompileError, Diagnostic, MergelangError, SourceFile, error
from .execute import execute
from .graph import format_graph
from .ast import dump
from .parser import parse_program
from .plan import format_plan
from .types import parse_bytes
from .writer import CheckpointWriter, OutputTensor, WriterError, plan_shards

RECIPE_FILENAME = "mergelang_recipe.mrg"


def _source(recipe: str | Path) -> tuple[SourceFile, Path]:
    """A path (Path, or a str naming an existing file / ending in .mrg) or recipe text."""
    if isinstance(recipe, Path) or (isinstance(recipe, str) and "\n" not in recipe
                                    and (recipe.endswith(".mrg") or Path(recipe).is_file())):
        path = Path(recipe)
        try:
            return SourceFile.read(path), path.resolve().parent
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise MergelangError(error("E002", f"cannot read recipe {path}: {reason}")) from None
    return SourceFile("<recipe>", str(recipe)), Path.cwd()


class Recipe:
    """A compiled recipe. Compile once (all checks run from headers), run many times."""

    def __init__(self, compilation: Compilation):
        self._c = compilation

    @property
    def warnings(self) -> list[Diagnostic]:
        return list(self._c.warnings)

    @property
    def outputs(self) -> list[OutputTensor]:
        g = self._c.optimized
        return [OutputTensor(g.node(n).attrs["name"], g.node(n).type.shape, g.node(n).attrs["dtype"])
                for n in g.outputs()]

    @property
    def compilation(self) -> Compilation:
        return self._c

    def emit(self, stage: str = "optimized") -> str:
        """The stable text of a compiler stage: ast, graph, optimized or plan."""
        c = self._c
        if stage == "ast":
            return dump(c.unit.program) + "\n"
        if stage == "graph":
            return format_graph(c.graph)
        if stage == "optimized":
            return format_graph(c.optimized)
        if stage == "plan":
            return format_plan(c.plan)
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")

    def evaluate(self, device: str = "cpu", *, pipelined: bool = True) -> dict[str, torch.Tensor]:
        """Run the merge in memory and return the output tensors (for small models and tests)."""
        out: dict[str, torch.Tensor] = {}
        execute(self._c.plan, self._c.models, out.__setitem__, device, pipelined=pipelined)
        return out

    def run(self, out_dir: str | Path, device: str = "auto", force: bool = False,
            progress: Callable[[int], None] | None = None, *, memory_budget: int | str | None = None,
            pipelined: bool = True) -> Path:
        """Merge to an HF folder at `out_dir` (written to a temporary folder, renamed on success).
        `memory_budget` (bytes, or a size like "8GB") caps live + prefetched + pending bytes."""
        budget = parse_bytes(memory_budget) if memory_budget is not None else None
        c = self._c
        layout = plan_shards(self.outputs, int(c.options.shard_size))
        ref = c.models[c.reference]
        folder = getattr(ref, "folder", None) if c.options.copy_files else None
        try:
            with CheckpointWriter(out_dir, layout, force=force) as writer:
                execute(c.plan, c.models, writer.write, device, progress, memory_budget=budget,
                        pipelined=pipelined)
                return writer.finish(config_from=folder, dtype=self.config_dtype(),
                                     recipe_text=c.source.text, recipe_filename=RECIPE_FILENAME)
        except WriterError as exc:
            raise MergelangError(error(exc.code, str(exc), None, exc.help)) from None

    def config_dtype(self) -> str:
        """config.json's dtype: the recipe's `dtype`, else the most common floating output dtype."""
        if self._c.options.dtype:
            return self._c.options.dtype
        sizes: Counter[str] = Counter()
        for t in self.outputs:
            if t.dtype in ("float32", "float16", "bfloat16", "float64"):
                sizes[t.dtype] += t.nbytes
        return sizes.most_common(1)[0][0] if sizes else "float32"

    def close(self) -> None:
        self._c.close()


def compile(recipe: str | Path, *, dtype: str | None = None, shard_size: str | int | None = None,
            **overrides: Any) -> Recipe:
    """Compile a recipe (a path or its text). Keyword arguments override `param`s (values) and
    `model`s (paths, or dicts of tensors); raises `MergelangError` carrying every diagnostic."""
    source, base = _source(recipe)
    options = {"dtype": dtype, "shard_size": shard_size}
    return Recipe(compile_recipe(source, base, overrides, options))


def parse(recipe: str | Path):
    """Parse only (no checks): the AST of a recipe."""
    source, _ = _source(recipe)
    try:
        return parse_program(source)
    except CompileError as exc:
        raise MergelangError(exc.diag) from None


def merge(expr: str, *, dtype: str | None = None, **state_dicts: Mapping[str, torch.Tensor] | Any
          ) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with one recipe expression applied to every tensor, e.g.
    `merge("ties(base, [a, b], density = 0.5)", base=sd0, a=sd1, b=sd2)`. Non-tensor keyword
    values are params. The output follows the names and dtypes of `base` (else the first dict)."""
    models = {k: v for k, v in state_dicts.items() if isinstance(v, Mapping)}
    params = {k: v for k, v in state_dicts.items() if not isinstance(v, Mapping)}
    if not models:
        raise TypeError("merge() needs at least one state dict keyword argument")
    ref = "base" if "base" in models else next(iter(models))
    lines = [f'model {name} = "<memory>"' for name in models]
    lines += [f"param {name} = 0" for name in params]
    lines.append(f"merge from {ref} {{\n    \"*\" => {expr}\n}}")
    source = "\n".join(lines) + "\n"
    recipe = Recipe(compile_recipe(SourceFile("<merge>", source), Path.cwd(),
                                   {**models, **params}, {"dtype": dtype}))
    return recipe.evaluate()
