"""Execution: interpret an `ExecutionPlan`, streaming tensors from the input checkpoints to a sink.

Each LOAD reads one tensor (upcast to float32 unless it passes through raw); values are freed
after their last use; each OUTPUT is cast once to its dtype and handed to the sink (the
checkpoint writer, or a dict for in-memory merges).

By default the work is overlapped in three stages (see `pipeline.py`): reader thread(s) prefetch
the plan's LOADs in plan order while the calling thread computes, and a writer thread hands
finished outputs to the sink in output order. The prefetched-but-unconsumed loads plus the
outputs waiting for the writer are capped by a byte budget ("lookahead"): with a
`memory_budget`, it is what the budget leaves above the plan's sequential peak of live bytes, so
live + prefetched + pending bytes stay within the budget whenever the plan's peak does. The
results are bit-identical to the sequential interpreter (`pipelined=False`): the same kernels
run on the same values in the same order; only the reads and writes move to other threads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping, Protocol

import torch

from mergelang.io.checkpoint import ModelSource
from mergelang.diagnostics import MergelangError, error
from mergelang.runtime.buffers import Buffers, LazyStack
from mergelang.runtime.interpret import Interpreter
from mergelang.runtime.loads import read_value, upcast  # noqa: F401  (re-exported)
from mergelang.runtime.kernels import KERNELS, CheckFailed, run_node
from mergelang.ir.ops import Op
from mergelang.passes.pipeline import Target, fusion_enabled, plan_for
from mergelang.passes.plan import ExecutionPlan
from mergelang.passes.params import unset
from mergelang.runtime.stats import unfilled
from mergelang.runtime.workers import run_pool

KERNELS.setdefault(Op.MODEL_STAT, unfilled)  # placeholders: an error if ever run
KERNELS.setdefault(Op.STAT_VALUE, unfilled)
KERNELS.setdefault(Op.PARAM, unset)

Sink = Callable[[str, torch.Tensor], None]

#: lookahead (prefetched + not yet written bytes) when no memory budget is given
DEFAULT_LOOKAHEAD = 1 << 30


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is an error (ValueError)."""
    text = str(name)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(text)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device auto or cpu)")
    return dev


def lookahead_bytes(plan: ExecutionPlan, memory_budget: int | None) -> int:
    """Bytes the pipeline may hold beyond the plan's live values: the budget's headroom above
    the sequential peak (0: no overlap, reads and writes still run one tensor at a time)."""
    if memory_budget is None:
        return DEFAULT_LOOKAHEAD
    return max(0, memory_budget - plan.peak_bytes)


def execute(plan: ExecutionPlan, models: Mapping[str, ModelSource | None], sink: Sink,
            target: Target | torch.device | str = "cpu", progress: Callable[[int], None] | None = None,
            *, memory_budget: int | None = None, pipelined: bool = True, readers: int = 1,
            meter: "PeakMeter | None" = None, observer: "Observer | None" = None) -> None:
    """Run `plan` — a final plan from `passes.pipeline.plan_for`, which this never rewrites —
    calling `sink(name, tensor)` once per output, in output order: `local_executor(...).run`
    for `target` (a Target, or a device resolved here with `memory_budget`: the form tests and
    scripts use).

    Its statistics passes run first (their values are filled into the plan). Row chunks go to a
    sink's `write_rows(name, tensor, start, total)` when it has one, else they are assembled.
    The target's memory budget bounds the prefetched and pending bytes; `meter` records the peak
    of live tensor bytes (computed values + prefetched loads + outputs waiting for the sink);
    `observer` sees the main plan's loads and outputs (`Observer`; not the statistics passes')."""
    if not isinstance(target, Target):
        target = target_for(target, memory_budget)
    local_executor(pipelined, readers, meter, observer).run(plan, models, sink, target, progress)


def local_executor(pipelined: bool = True, readers: int = 1, meter: "PeakMeter | None" = None,
                   observer: "Observer | None" = None) -> "LocalExecutor":
    """The executor of a run on this machine: overlapped (reads, compute and writes in threads)
    unless `pipelined=False`; `observer` sees the main plan's loads and outputs."""
    return (OverlappedExecutor(readers, meter, observer) if pipelined
            else SequentialExecutor(meter, observer))


#: below this average size of a read, reads are not overlapped (a thread handoff costs ~0.1 ms)
TINY_READ_BYTES = 64 << 10


def _tiny_reads(plan: ExecutionPlan) -> bool:
    """Many reads of tiny tensors (e.g. 20k one-element tensors): handing each to the compute
    thread costs more than reading it there (measured: 4 s of lock waits for 40k reads)."""
    loads = sum(1 for s in plan.steps if plan.graph.node(s.nid).op is Op.LOAD)
    return loads >= 1000 and plan.read_bytes < loads * TINY_READ_BYTES


class Observer(Protocol):
    """Sees the values of a run as the compute loop has them (run --report,
    tools/merge_report.py): each LOAD node's value (never written into: loads are not reused
    as buffers) and each OUTPUT node's value as handed to the sink. Called on the compute
    thread; it must not modify them."""

    def loaded(self, node, value: torch.Tensor) -> None: ...

    def output(self, node, value: torch.Tensor) -> None: ...


class Executor(Protocol):
    """The run contract every executor implements — sequential, overlapped (below) and Ray
    (distributed/ray_driver.RayExecutor): run the final plan `plan` (from `plan_for(compiled
    plan, target, resumed)`; its statistics passes first) for `target` (device and memory
    budget, resolved once by `target_for`), handing each output to `sink` (a sink with
    `write_rows` receives row chunks), and `progress(bytes)` as outputs are done. `close`
    releases what the executor holds (Ray: its workers). distributed/executors.executor_for
    picks one per run."""

    def run(self, plan: ExecutionPlan, models: Mapping[str, ModelSource | None], sink: Sink,
            target: Target, progress: Callable[[int], None] | None = None) -> None: ...

    def close(self) -> None: ...


class LocalExecutor:
    """An executor on this machine: the statistics passes (each run like a plan of its own),
    the models' preparation, the kernels' thread pool, then `stream` of the apply plan."""

    def run(self, plan: ExecutionPlan, models: Mapping[str, ModelSource | None], sink: Sink,
            target: Target, progress: Callable[[int], None] | None = None) -> None:
        dev = torch.device(target.device)
        if plan.prepasses:  # model-wide statistics: streaming passes before the merge itself
            from mergelang.runtime.stats import run_stat_passes

            quiet = replace(self, observer=None)  # the observer sees the main plan only
            plan = run_stat_passes(plan, lambda pp, sink: quiet.run(pp, models, sink, target),
                                   target.memory_budget)
        prepare_models(plan, models, dev)
        with run_pool(max(2, torch.get_num_threads())):  # the kernels' threads, for the run
            self.stream(plan, models, sink, dev, target.memory_budget, progress)

    def stream(self, plan: ExecutionPlan, models: Mapping[str, ModelSource | None], sink: Sink,
               dev: torch.device, memory_budget: int | None,
               progress: Callable[[int], None] | None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


@dataclass
class SequentialExecutor(LocalExecutor):
    """One tensor at a time on the calling thread: read, compute, write (the interpreter)."""

    meter: "PeakMeter | None" = None
    observer: "Observer | None" = None

    def stream(self, plan: ExecutionPlan, models: Mapping[str, ModelSource | None], sink: Sink,
               dev: torch.device, memory_budget: int | None,
               progress: Callable[[int], None] | None) -> None:
        _execute_sequential(plan, models, sink, dev, progress, self.meter, self.observer)


@dataclass
class OverlappedExecutor(LocalExecutor):
    """Reads (reader threads), compute (this thread) and writes (a writer thread) overlap within
    the memory budget's headroom (runtime/pipeline.py); plans of many tiny reads run
    sequentially."""

    readers: int = 1
    meter: "PeakMeter | None" = None
    observer: "Observer | None" = None

    def stream(self, plan: ExecutionPlan, models: Mapping[str, ModelSource | None], sink: Sink,
               dev: torch.device, memory_budget: int | None,
               progress: Callable[[int], None] | None) -> None:
        from mergelang.runtime.pipeline import Pipeline

        if _tiny_reads(plan):  # a thread handoff per tensor would cost more than the read
            return SequentialExecutor(self.meter, self.observer).stream(plan, models, sink, dev, memory_budget,
                                                         progress)
        meter = self.meter
        with Pipeline(plan, models, sink, dev, progress, lookahead_bytes(plan, memory_budget),
                      self.readers) as pipe:
            sample = None if meter is None else (lambda live: meter.sample(live + pipe.budget.used))
            compute(plan, pipe.take, pipe.put, dev, sample, self.observer)


def target_for(device: torch.device | str = "cpu", memory_budget: int | None = None) -> Target:
    """The one place a run's device and budget are resolved: the target a plan is made for and
    run on here — the device (`auto` resolved; `cuda` without a GPU is a ValueError), the
    budget, and fusion for CPU targets (off with `MERGELANG_FUSE=0` / `MERGELANG_FAST=0`, or
    when numba cannot set up its runtime helpers: checked only if a plan has something to fuse)."""
    from mergelang.runtime.kernels import cpu_exact as kernels_fast

    dev = resolve_device(device)
    fuse = dev.type == "cpu" and kernels_fast.ENABLED and fusion_enabled()
    return Target(str(dev), memory_budget, fuse, _numba_available)


def _numba_available() -> bool:
    from mergelang.runtime.kernels.numba_codegen import available

    return available()


def run_plan(plan: ExecutionPlan, models: Mapping[str, ModelSource | None], sink: Sink,
             device: torch.device | str = "cpu", **kw) -> None:
    """`execute` of `plan` made final for this machine (`plan_for(plan, target_for(...))`):
    the one-call form for tests and scripts."""
    target = target_for(device, kw.pop("memory_budget", None))
    execute(plan_for(plan, target).plan, models, sink, target, **kw)


class PeakMeter:
    """The peak of live tensor bytes seen by the compute loop (tests, benchmarks)."""

    def __init__(self) -> None:
        self.peak = 0

    def sample(self, live: int) -> None:
        if live > self.peak:
            self.peak = live


def fused_for(plan: ExecutionPlan, dev: torch.device) -> ExecutionPlan:
    """`plan` through the pipeline's fuse pass for device `dev` (tests compare both forms)."""
    from mergelang.passes.pipeline import PassState, fuse

    return fuse(plan, target_for(dev), PassState())


def prepare_models(plan: ExecutionPlan, models: Mapping[str, ModelSource | None],
                   dev: torch.device) -> None:
    """The model-level stage: derived models (align) solve their permutations before streaming."""
    g = plan.graph
    for name in dict.fromkeys(g.node(s.nid).attrs["model"] for s in plan.steps
                              if g.node(s.nid).op is Op.LOAD):
        src = models[name]
        if src is not None:
            src.prepare(dev)


def _nbytes(v: "torch.Tensor | LazyStack") -> int:
    """Bytes a value holds (a lazy stack: the stack it stands for; its parts stay alive in it)."""
    if isinstance(v, LazyStack):
        return sum(p.numel() * p.element_size() for p in v.parts)
    return v.numel() * v.element_size()


def compute(plan: ExecutionPlan, take: Callable[[int], torch.Tensor],
            put: Callable[..., None], dev: torch.device,
            meter: Callable[[int], None] | None = None, observer: "Observer | None" = None) -> None:
    """The compute loop shared by both executors: `take(nid)` gives a LOAD's value on `dev`,
    `put(name, tensor, nbytes, rows)` receives each output (on the CPU; `rows` is
    `(start, stop, total)` for a row chunk, else None). `meter(live_bytes)` is called after
    each step with the bytes of the values held; `observer` (optional) sees each LOAD's value
    and each output just before `put`."""
    StepInterpreter(plan, take, put, dev, meter, observer).run(plan.steps)


class StepInterpreter(Interpreter):
    """The executor's hooks of the plan interpreter (runtime/interpret.py): loads from `take`,
    kernels with buffer reuse (`Buffers`: in-place ops on dead values, lazy stack sums) and
    float64 widening, outputs cast on the device then handed to `put` on the CPU, and the live
    bytes counted for `meter`, loads and outputs shown to `observer`. A failed runtime check
    becomes its diagnostic (E501, ...)."""

    def __init__(self, plan: ExecutionPlan, take: Callable[[int], torch.Tensor],
                 put: Callable[..., None], dev: torch.device,
                 meter: Callable[[int], None] | None = None, observer: "Observer | None" = None):
        super().__init__(plan.graph.node, dev.type)
        self.plan, self.take, self.put, self.dev, self.meter = plan, take, put, dev, meter
        self.observer = observer
        self.live = 0  # bytes of the values held
        self.bufs = Buffers(plan, dev)
        self.on_device = dev.type != "cpu"
        self.kernel_of = run_node if plan.graph.compute_dtype == "float32" else _run_float64

    def load(self, step, node) -> torch.Tensor:
        t = self.take(step.nid)
        self.bufs.stored(step.nid, t, None, [])
        if self.observer is not None:
            self.observer.loaded(node, t)
        live = self.live = self.live + _nbytes(t)
        if self.meter is not None:
            self.meter(live)
        return t

    def run_node(self, step, node, args: list) -> "torch.Tensor | LazyStack":
        try:
            out = self.bufs.run(node, step.nid, args, step.free)
            if out is None:
                out = self.kernel_of(node, args, self.device)
            if self.on_device and out.device != self.dev:  # constants, statistics: made on the CPU
                out = out.to(self.dev)
        except CheckFailed as exc:
            raise _check_error(self.plan, step.nid, node, exc) from None
        if node.op is not _OUTPUT:
            self.bufs.stored(step.nid, out, node.op, args)
            live = self.live = self.live + _nbytes(out)
            if self.meter is not None:
                self.meter(live)
        return out

    def output(self, step, node, out: torch.Tensor) -> None:
        meter = self.meter
        if meter is not None:
            meter(self.live + _nbytes(out))
        self.bufs.pin(out)
        out = out.cpu() if out.device.type != "cpu" else out
        if self.observer is not None:
            self.observer.output(node, out)
        self.put(node.attrs["name"], out, node.type.nbytes, node.attrs.get("rows"))
        if meter is not None:
            meter(self.live)

    def free(self, nid: int, t: "torch.Tensor | LazyStack | None") -> None:
        if t is not None:
            self.live -= _nbytes(t)
        self.bufs.freed(nid, t)


_OUTPUT = Op.OUTPUT


def _check_error(plan: ExecutionPlan, nid: int, node, exc: CheckFailed) -> MergelangError:
    code = getattr(exc, "code", "E501")
    return MergelangError(error(
        code, f"{exc} (tensor `{_output_name(plan, nid)}`)", node.span,
        "the check depends on tensor values, so it could only run now" if code == "E501"
        else "the merge stopped; nothing was written to the output"))


def _run_float64(node, args: list[torch.Tensor], device: str) -> torch.Tensor:
    """`run_node` with compute_dtype float64: constants are made in float64 from their Python
    numbers, and a float value a kernel returns in float32 (masks made numbers, ranks) is
    widened, so every float value of the plan is float64. Outputs are cast as usual."""
    if node.op is Op.CONST and node.type.dtype == "float32":
        return torch.tensor(node.attrs["value"], dtype=torch.float64).reshape(node.type.full_shape)
    out = run_node(node, args, device)
    if node.op is not Op.OUTPUT and out.dtype == torch.float32 and node.type.dtype == "float32":
        return out.double()
    return out


def _execute_sequential(plan: ExecutionPlan, models: Mapping[str, ModelSource | None], sink: Sink,
                        dev: torch.device, progress: Callable[[int], None] | None,
                        meter: PeakMeter | None = None, observer: "Observer | None" = None) -> None:
    from mergelang.runtime.rows import RowAssembler, tensor_done

    emit = RowAssembler(sink)

    def take(nid: int) -> torch.Tensor:
        if dev.type == "cpu":
            return read_value(plan, models, nid)
        return upcast(plan, nid, read_value(plan, models, nid, upcast=False).to(dev))

    def put(name: str, t: torch.Tensor, nbytes: int, rows: tuple[int, int, int] | None = None) -> None:
        emit(name, t, rows)
        done = tensor_done(nbytes, rows)
        if progress is not None and done:
            progress(done)

    compute(plan, take, put, dev, None if meter is None else meter.sample, observer)


def _output_name(plan: ExecutionPlan, nid: int) -> str:
    g = plan.graph
    for out in g.outputs():
        if out == nid or nid in _ancestors(g, out):
            return g.node(out).attrs["name"]
    return "?"


def _ancestors(g, nid: int) -> set[int]:
    import networkx as nx

    return nx.ancestors(g, nid)
