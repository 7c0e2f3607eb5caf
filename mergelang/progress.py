"""Progress reporting for `mergelang run`: a tqdm bar over output bytes (throughput, ETA), or with
`--log-json` one JSON object per line on stderr (machine-readable), or nothing with `--quiet`.

JSON events (each line one object, keys stable):
    {"event": "start", "tensors": N, "bytes": B, "read_bytes": R, "peak_bytes": P}
    {"event": "tensor", "index": k, "name": ..., "dtype": ..., "bytes": b, "done_bytes": d,
     "elapsed": seconds}
    {"event": "done", "tensors": N, "bytes": B, "elapsed": seconds, "output": path}
Compile warnings come first, as {"event": "diagnostic", "severity": "warning", "code": ...,
"message": ..., "location": "file:line:col" or null, "help": ...}. Errors are still rendered as
text (the exit code is 1).

The executor reports each output tensor once, in plan order, so the k-th report is the k-th
OUTPUT step of the plan: names come from the plan, the executor needs no change.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from contextlib import contextmanager
from typing import IO, Callable, Iterator

from mergelang.diagnostics import Diagnostic
from mergelang.ir.names import family as name_family
from mergelang.ir.ops import Op
from mergelang.passes.plan import ExecutionPlan


def diagnostic_event(d: Diagnostic) -> str:
    return json.dumps({"event": "diagnostic", "severity": d.severity.value, "code": d.code,
                       "message": d.message, "location": d.span.location() if d.span else None,
                       "help": d.help})


def output_steps(plan: ExecutionPlan) -> list[tuple[str, str, int]]:
    """(name, dtype, bytes) of each output, in the order the executor writes them."""
    g = plan.graph
    out = []
    for step in plan.steps:
        n = g.node(step.nid)
        if n.op is Op.OUTPUT:
            out.append((n.attrs["name"], n.attrs["dtype"], n.type.nbytes))
    return out


class JsonLog:
    def __init__(self, plan: ExecutionPlan, stream: IO[str] | None = None):
        self.stream = stream or sys.stderr
        self.outputs = output_steps(plan)
        self.total = sum(b for _, _, b in self.outputs)
        self.start = time.perf_counter()
        self.k = 0
        self.done_bytes = 0
        self.emit(event="start", tensors=len(self.outputs), bytes=self.total,
                  read_bytes=plan.read_bytes, peak_bytes=plan.peak_bytes)

    def emit(self, **fields) -> None:
        self.stream.write(json.dumps(fields, sort_keys=False) + "\n")
        self.stream.flush()

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.start, 6)

    def update(self, nbytes: int) -> None:
        name, dtype, _ = self.outputs[self.k] if self.k < len(self.outputs) else ("?", "?", 0)
        self.done_bytes += nbytes
        self.emit(event="tensor", index=self.k, name=name, dtype=dtype, bytes=nbytes,
                  done_bytes=self.done_bytes, elapsed=self.elapsed())
        self.k += 1

    def finish(self, output: str) -> None:
        self.emit(event="done", tensors=self.k, bytes=self.done_bytes, elapsed=self.elapsed(),
                  output=output)


@contextmanager
def reporter(plan: ExecutionPlan, quiet: bool, log_json: bool
             ) -> Iterator[tuple[Callable[[int], None], Callable[[str], None]]]:
    """Yields (update(nbytes), finish(output_path))."""
    if log_json:
        log = JsonLog(plan)
        yield log.update, log.finish
        return
    from tqdm import tqdm

    # leave=True: the finished bar stays on screen (100%, the time taken). A ticker redraws the
    # bar twice a second, so a long first step (a whole-tensor selection, a statistics pass)
    # shows the elapsed time moving instead of a frozen 0%.
    with tqdm(total=plan.write_bytes, unit="B", unit_scale=True, unit_divisor=1024,
              desc="merging", disable=quiet or None, file=sys.stderr, leave=True) as bar:
        stop = threading.Event()
        ticker = None
        if not bar.disable:
            def tick() -> None:
                while not stop.wait(0.5):
                    bar.refresh()

            ticker = threading.Thread(target=tick, name="mergelang-progress", daemon=True)
            ticker.start()
        try:
            yield (bar.update if bar.disable else _family_postfix(plan, bar)), lambda _path: None
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()


def _family_postfix(plan: ExecutionPlan, bar) -> Callable[[int], None]:
    """bar.update that also shows the family of the tensor being written, its numbers as `{}`
    (`model.layers.{}.mlp.experts.{}.up_proj.weight`): one label per family, not per tensor
    (the label changes only when the family does)."""
    names = [n for n, _, _ in output_steps(plan)] if hasattr(plan, "steps") else []
    state = {"k": 0, "family": None}

    def update(nbytes: int) -> None:
        k = state["k"]
        if k < len(names):
            family = name_family(names[k])
            if family != state["family"]:
                state["family"] = family
                bar.set_postfix_str(family if len(family) <= 60 else "..." + family[-57:], refresh=False)
        state["k"] = k + 1
        bar.update(nbytes)
    return update
