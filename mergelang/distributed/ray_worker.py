"""A Ray worker of a distributed merge: one actor per worker slot, holding the compiled recipe.

Each actor compiles the recipe itself (the same text, overrides and options as the driver; the
models are read from the filesystem the workers share with the driver) and refuses to work when
its plan differs from the driver's (a different file at the same path, a different version).
A unit of work is a set of output names: the actor runs the plan restricted to them and writes
each tensor's bytes at its planned offset in the driver's shard files (the layout is planned up
front), reporting (name, CRC-32C, bytes) for the driver's journal. For a statistics pass, a unit
returns one partial per feed (sum, kept entries or histogram), which the driver reduces in plan
order, so the values are the bits a local run computes.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mergelang.diagnostics import MergelangError, SourceFile


@dataclass(frozen=True)
class RecipeSpec:
    """Everything a worker needs to compile the driver's recipe."""

    source: SourceFile
    base_dir: Path
    overrides: dict[str, Any]
    options: dict[str, Any]
    allow_pickle: bool = False
    follow_symlinks: bool = False
    allow_plugins: bool = False


def spec_for(source: SourceFile, base: Path, overrides: dict[str, Any], used: dict[str, Any],
             options: dict[str, Any], allow_pickle: bool, follow_symlinks: bool,
             allow_plugins: bool) -> RecipeSpec | None:
    """How a worker compiles the driver's recipe; None when an override cannot be given to a
    worker (a state dict). `used`: the overrides as compiled (model paths made absolute:
    workers run in other folders)."""
    if not all(isinstance(v, (str, int, float, bool, list, tuple, type(None), os.PathLike))
               for v in overrides.values()):
        return None
    return RecipeSpec(source, Path(os.path.abspath(base)),
                      {k: used.get(k, str(v) if isinstance(v, os.PathLike) else v)
                       for k, v in overrides.items()}, options, allow_pickle, follow_symlinks,
                      allow_plugins)


def failure_text(e: Exception) -> str:
    """Why an actor cannot work, for the driver: a diagnostic rendered, or the exception."""
    if isinstance(e, MergelangError):
        return e.diagnostics[0].render() if e.diagnostics else str(e)
    return f"{type(e).__name__}: {e}"


def node_name() -> str:
    return f"{socket.gethostname()} ({os.getpid()})"


class MergeWorker:
    """The actor's class (wrapped with `ray.remote` by the driver)."""

    def __init__(self, spec: RecipeSpec, device: str, budget: int | None, plan_digest: str,
                 threads: int = 1):
        import torch

        from mergelang.compiler import compile_recipe
        from mergelang.io.journal import plan_fingerprint
        from mergelang.passes.plan import format_plan

        torch.set_num_threads(max(1, threads))
        self.error: str | None = None
        self.device, self.budget = device, budget
        try:
            if device == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("--device cuda, and this worker has no CUDA device")
            self.c = compile_recipe(spec.source, spec.base_dir, spec.overrides, spec.options,
                                    allow_pickle=spec.allow_pickle,
                                    follow_symlinks=spec.follow_symlinks,
                                    allow_plugins=spec.allow_plugins)
            if plan_fingerprint(format_plan(self.c.plan)) != plan_digest:
                raise RuntimeError("the recipe compiles to a different plan on this worker (its "
                                   "files differ from the driver's at the same paths?)")
        except Exception as e:  # noqa: BLE001 - reported to the driver, named by node
            self.error = failure_text(e)

    def ready(self) -> tuple[str, str | None]:
        return node_name(), self.error

    def _target(self):
        from mergelang.runtime.executor import target_for

        return target_for(self.device, self.budget)

    def stats_unit(self, index: int, feeds: list[str], values: dict[str, Any],
                   bucket: dict[str, Any], limit: int | None) -> dict[str, Any]:
        """Partials of statistics pass `index` over the feeds of this unit: per feed, a
        `StatPartial` of its float sums and kept entries (the driver merges them in plan order,
        as a local run does), and one of the unit's radix-select histograms, added up here
        (exact integers)."""
        from mergelang.passes.pipeline import plan_for
        from mergelang.passes.restrict import restrict_plan
        from mergelang.passes.stats import fill
        from mergelang.runtime.executor import execute
        from mergelang.runtime.stats import StatCollector, StatPartial

        raw = self.c.plan.prepasses[index]
        names = {raw.graph.node(n).attrs["name"] for n in raw.graph.outputs()}
        unit = restrict_plan(fill(raw, values), names - set(feeds))
        target = self._target()
        final = plan_for(unit, target).plan
        col = StatCollector(self.c.plan.stats, limit)
        col.bucket = bucket
        partials: dict[str, StatPartial] = {}
        hist = StatPartial()

        def sink(name: str, t: Any) -> None:
            part = col.partial(name, t)
            hist.add(StatPartial(hist=part.hist))  # integer counts: reduced here, in any order
            partials[name] = StatPartial(part.sums, part.parts)

        execute(final, self.c.models, sink, target)
        return {"feeds": partials, "hist": hist}

    def apply_unit(self, names: list[str], values: dict[str, Any],
                   targets: dict[str, tuple[str, int, int]], nan_mode: str, fsync: bool
                   ) -> tuple[list[tuple[str, int, int]], list[tuple], tuple | None]:
        """Compute the outputs `names` and write them into the shards: (name, crc, bytes) each,
        the NaN warnings (nan_check = "warn"), and (code, message, help) of a diagnostic that
        stopped the unit (E503, E501), else None."""
        from mergelang.io.checked import CheckedSink
        from mergelang.io.inputcheck import InputCheck, checked_inputs
        from mergelang.passes.pipeline import plan_for
        from mergelang.passes.stats import fill
        from mergelang.runtime.executor import execute

        target = self._target()
        plan = fill(replace(self.c.plan, prepasses=(), stats=()), values)
        g = plan.graph
        done = {g.node(n).attrs["name"] for n in g.outputs()} - set(names)
        final = plan_for(plan, target, done).plan
        out = ShardSink(targets)
        diags: list[Any] = []
        spans = {g.node(n).attrs["name"]: g.node(n).span for n in g.outputs()}
        sink = CheckedSink(out.write, nan_mode, lambda msg: None, spans, diags, out.write_rows)
        check = None if nan_mode == "off" else InputCheck(nan_mode, lambda msg: None, {}, diags)
        try:
            execute(final, checked_inputs(self.c.models, check), sink, target)
            out.close(fsync)
        except MergelangError as e:
            d = e.diagnostics[0]
            return [], [], (d.code, d.message, d.help)
        finally:
            out.close(False)
        return out.written, [(d.code, d.message, d.help) for d in diags], None


class ShardSink:
    """Writes tensors at their planned offsets in the driver's shard files."""

    def __init__(self, targets: dict[str, tuple[str, int, int]]):
        self.targets = targets
        self.fds: dict[str, int] = {}
        self.written: list[tuple[str, int, int]] = []
        self.rows: dict[str, int] = {}

    def _fd(self, path: str) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDWR)  # the driver made it: never created here
        return self.fds[path]

    def write(self, name: str, t: Any) -> None:
        from mergelang.io.journal import checksum
        from mergelang.io.writer import bytes_of, pwrite_all

        path, begin, end = self.targets[name]
        data = bytes_of(t.cpu())
        if data.nbytes != end - begin:
            raise RuntimeError(f"internal: {name!r} has {data.nbytes} bytes, planned {end - begin}")
        if data.nbytes:
            pwrite_all(self._fd(path), memoryview(data), begin)
        self.written.append((name, checksum(memoryview(data)), data.nbytes))

    def write_rows(self, name: str, t: Any, start: int, total: int) -> None:
        from mergelang.io.journal import range_crc
        from mergelang.io.writer import bytes_of, pwrite_all

        path, begin, end = self.targets[name]
        data = bytes_of(t.cpu())
        row = (end - begin) // total if total else 0
        fd = self._fd(path)
        if data.nbytes:
            pwrite_all(fd, memoryview(data), begin + start * row)
        self.rows[name] = self.rows.get(name, 0) + int(t.shape[0])
        if self.rows[name] == total:  # every row written: the checksum of the whole range
            self.written.append((name, range_crc(fd, begin, end), end - begin))

    def close(self, fsync: bool) -> None:
        for fd in self.fds.values():
            if fsync:
                os.fsync(fd)
            os.close(fd)
        self.fds.clear()
