"""What every statistics sidecar shares (gram, fisher: stats.py; correlation: correlation.py;
RegMean++: regmeanpp.py): the result record, the output checks before any work, and the folder
written with the writer and guards of `run`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mergelang.diagnostics import Diagnostic, MergelangError

STATS_FILE = "mergelang_stats.json"


@dataclass
class Stats:
    """The statistics ({checkpoint tensor name: float32 tensor}), what they were computed from
    (`info`, also saved as mergelang_stats.json), and the folder written (None without `out`)."""

    kind: str
    tensors: dict[str, Any]
    info: dict[str, Any]
    path: Path | None = None
    warnings: list[Diagnostic] = field(default_factory=list)


def say(log: Callable[[Diagnostic], None] | None, d: Diagnostic) -> Diagnostic:
    if log is not None:
        log(d)
    return d


def data_path(data: Any) -> Path:
    """The file or folder data is read from (FILE.py for FILE.py:NAME)."""
    text = str(data)
    head, sep, name = text.rpartition(":")
    return Path(head) if sep and head.endswith(".py") else Path(text)


def check_out(out: Path, inputs: list[Path], force: bool) -> None:
    """io/outguard's checks of a sidecar folder `out` against `inputs` (`protected(...)`),
    before any work: E403 / E404 as diagnostics."""
    from mergelang.errors import CodedError, to_diagnostic
    from mergelang.io.outguard import check_output

    try:
        check_output(out, inputs, force)
    except CodedError as exc:
        raise MergelangError(to_diagnostic(exc)) from None


def write_stats(res: Stats, out: Path, force: bool, inputs: list[Path]) -> Path:
    from mergelang.errors import CodedError, to_diagnostic
    from mergelang.io.layout import OutputTensor, plan_shards
    from mergelang.io.writer import CheckpointWriter

    outs = [OutputTensor(n, tuple(t.shape), "float32") for n, t in sorted(res.tensors.items())]
    layout = plan_shards(outs, 5 * 10**9)
    try:
        with CheckpointWriter(out, layout, force=force, protected=inputs) as w:
            for o in outs:
                w.write(o.name, res.tensors[o.name].contiguous())
            return w.finish(extra_files={STATS_FILE: json.dumps(res.info, indent=2) + "\n"},
                            manifest={"stats": res.kind})
    except CodedError as exc:
        raise MergelangError(to_diagnostic(exc)) from None
