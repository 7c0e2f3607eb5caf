"""Row chunks at run time: reassembling them for sinks that take whole tensors, and counting
progress in whole tensors (the plan pass that makes chunks is `passes/chunking.py`)."""

from __future__ import annotations

import torch

class RowAssembler:
    """Turns row chunks back into whole tensors for a plain `sink(name, tensor)` (in-memory
    results, statistics collectors): chunks are copied into one buffer per output, handed to the
    sink when its last row arrived. Sinks with a `write_rows(name, tensor, start, total)` method
    (the checkpoint writer) receive the chunks themselves."""

    def __init__(self, sink):
        self.sink = sink
        self.rows_sink = getattr(sink, "write_rows", None)
        self.parts: dict[str, tuple[torch.Tensor, int]] = {}

    def __call__(self, name: str, t: torch.Tensor, rows: tuple[int, int, int] | None = None) -> None:
        if rows is None:
            self.sink(name, t)
            return
        a, b, total = rows
        if self.rows_sink is not None:
            self.rows_sink(name, t, a, total)
            return
        buf, done = self.parts.get(name) or (torch.empty((total, *t.shape[1:]), dtype=t.dtype), 0)
        buf[a:b].copy_(t)
        done += b - a
        if done < total:
            self.parts[name] = (buf, done)
            return
        self.parts.pop(name, None)
        self.sink(name, buf)


def tensor_done(nbytes: int, rows: tuple[int, int, int] | None) -> int:
    """The bytes of a whole output once its last row chunk is written (progress counts whole
    tensors); 0 for an earlier chunk."""
    if rows is None:
        return nbytes
    a, b, total = rows
    return nbytes // (b - a) * total if b == total else 0

