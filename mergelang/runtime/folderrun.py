"""A run into an output folder, between `Recipe.run` (which opens the folder's writer, io/
package.py) and the executor (runtime/executor.Executor: local or Ray, the same call).

`run_into` makes the compiled plan final for the run's `Target` (resumed outputs left out),
reports what it could not fit in the budget and the folder's config warnings, and runs it with
the inputs checked for NaN/Inf and watched for changes. `package_for` gathers what the output
folders hold from a compilation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from mergelang.diagnostics import Diagnostic, MergelangError
from mergelang.io.checked import WriterSink
from mergelang.io.inputcheck import InputCheck, checked_inputs
from mergelang.io.inputwatch import input_stats, inputs_unchanged, install_sigbus
from mergelang.io.package import CardMaker, Package, config_warnings
from mergelang.lang.provenance import recipe_copy, used_params
from mergelang.passes.pipeline import Target, plan_for
from mergelang.runtime.executor import Executor


def package_for(c: Any, outputs: list, out_dir: str | Path, provenance: dict[str, Any] | None,
                card: CardMaker | None) -> Package:
    """The output folders of compilation `c` (`outputs`: its output tensors)."""
    names = c.output_names
    refs = {n: b.source for b in c.unit.blocks for n in b.outputs}
    opts = c.options
    return Package(
        outputs, c.models, c.copies, c.reference, {n: refs[n] for n in names},
        {n for b in c.unit.blocks if b.adapter for n in (b.outputs or ("",))},
        recipe_copy(c), used_params(c), opts.dtype, opts.copy_files, int(opts.shard_size),
        {d.name: d.value.span for d in c.unit.models}, provenance,
        None if provenance is None else recipe_copy(c, provenance["param_origins"]), card,
        Path(os.path.abspath(out_dir)).name)


def output_spans(c: Any) -> dict[str, Any]:
    """Each output tensor's rule (NaN/Inf diagnostics point at it)."""
    g = c.optimized
    return {g.node(n).attrs["name"]: g.node(n).span for n in g.outputs()}


def run_into(c: Any, runner: Executor, sink: WriterSink, target: Target, pkg: Package,
             progress: Callable[[int], None] | None, sizes: dict[str, int]) -> None:
    """Run compilation `c` with `runner` for `target` into `sink` (its writer open)."""
    writer, say = sink.writer, sink.say
    for msg in writer.messages:
        say(msg)
    if writer.resumed and progress is not None:
        progress(sum(sizes[n] for n in writer.resumed))
    planned = plan_for(c.plan, target, writer.resumed)
    from mergelang.passes.chunking import over_budget_summary

    for line in over_budget_summary(list(planned.unchunked), target.memory_budget or 0):
        say(f"warning: {line}")
    for diag in config_warnings(pkg):
        sink.warnings.append(diag)
        say(diag.render())
    install_sigbus()  # a mapped shard truncated meanwhile: E508 and exit 1
    stats = input_stats(c.models)
    check = None if sink.mode == "off" else InputCheck(  # NaN/Inf in the inputs too
        sink.mode, say, {d.name: d.value.span for d in c.unit.models}, sink.warnings)
    runner.run(planned.plan, checked_inputs(c.models, check), sink, target, progress)
    inputs_unchanged(stats)


def kept_error(writer: Any, diag: Diagnostic, more: list[Diagnostic] | None = None) -> MergelangError:
    """The error, with a note when a work folder was kept for --resume."""
    if writer is not None and writer.resumable and writer.tmp_dir.is_dir():
        diag = diag.with_note(f"the finished tensors are kept in {writer.tmp_dir}; rerun with "
                              "--resume (or run(..., resume=True)) to continue")
    return MergelangError([diag, *(more or [])])


def fingerprint_of(c: Any) -> dict[str, str]:
    """What a resumed run must match: the plan's and the inputs' fingerprints (io/journal.py)."""
    from mergelang.io.journal import inputs_fingerprint, plan_fingerprint
    from mergelang.passes.plan import format_plan

    return {"plan": plan_fingerprint(format_plan(c.plan)), "inputs": inputs_fingerprint(c.models)}


def evaluate(c: Any, device: Any = "cpu", pipelined: bool = True) -> dict[str, Any]:
    """Compilation `c` run in memory on `device` (resolved here, once): {tensor name: value},
    or with named outputs {output name: {tensor name: value}}."""
    from mergelang.runtime.executor import execute, target_for

    out: dict[str, Any] = {}
    target = target_for(device)
    execute(plan_for(c.plan, target).plan, c.models, out.__setitem__, target, pipelined=pipelined)
    if not c.output_names:
        return out
    split: dict[str, dict[str, Any]] = {n: {} for n in c.output_names}
    for key, value in out.items():  # "NAME/TENSOR"
        name, _, tensor = key.partition("/")
        split[name][tensor] = value
    return split
