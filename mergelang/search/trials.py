"""Compile once, run many: a recipe compiled with some params as run-time inputs, run in memory
with a new value for each (tune's trials, the last step of learn).

`TrialRunner` compiles the recipe once with the searched params as `PARAM` nodes
(passes/params.py), plans it once for the device, and keeps the input tensors it reads in memory
after the first trial (`HeldSource`), so a trial is: fill the params (a few node updates) and
execute the plan. Params the compiler must know (a breadcrumbs density sets a count, a param in a
guard or an `if`) cannot be run-time inputs: they are found once at start-up (compiling with each
param alone) and those trials compile again, cached by those params' values — `static` names them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from mergelang.diagnostics import MergelangError, error
from mergelang.io.checkpoint import ModelSource, WrappedSource

if TYPE_CHECKING:
    import torch

    from mergelang.compiler import Compilation
    from mergelang.lang.ranges import ParamRange

Compile = Callable[[tuple[str, ...], Mapping[str, Any]], "Compilation"]


class DeviceRoom:
    """The bytes of held inputs that may stay on the trial device (a GPU: a share of its free
    memory when the runner starts), and what did not fit (held in host memory instead, copied
    to the device in every trial)."""

    #: share of the GPU's free memory the held inputs may take (the rest: the trial's values)
    SHARE = 0.5

    def __init__(self, device: str, left: int):
        self.device, self.left, self.spilled = device, left, 0

    @classmethod
    def for_device(cls, device: str) -> "DeviceRoom | None":
        import torch

        if not device.startswith("cuda") or not torch.cuda.is_available():
            return None
        return cls(device, int(torch.cuda.mem_get_info(torch.device(device))[0] * cls.SHARE))

    def place(self, t: "torch.Tensor") -> "torch.Tensor":
        nbytes = t.numel() * t.element_size()
        if nbytes <= self.left:
            self.left -= nbytes
            return t.to(self.device)
        self.spilled += nbytes
        return t


class HeldSource(WrappedSource):
    """A model whose float32 tensors are read once and then kept in memory: on the trial
    device while `room` has space (a GPU: no host-to-device copy per trial), else on the host."""

    def __init__(self, inner: ModelSource, room: DeviceRoom | None = None):
        super().__init__(inner)
        self._held: dict[tuple[str, Any], torch.Tensor] = {}
        self.room = room

    def load_as(self, name: str, dtype: Any = None, *, view: bool = False) -> "torch.Tensor":
        key = (name, dtype)
        t = self._held.get(key)
        if t is None:
            t = self.inner.load_as(name, dtype)
            t = self._held[key] = t if self.room is None else self.room.place(t)
        return t if view else t.clone()

    def load_stored(self, name: str, *, view: bool = False) -> "torch.Tensor":
        key = (name, "stored")
        t = self._held.get(key)
        if t is None:
            t = self._held[key] = self.inner.load_stored(name)
        return t if view else t.clone()

    def close(self) -> None:
        self._held.clear()
        self.inner.close()


def fp8_outputs(g: Any) -> dict[str, tuple[str, tuple[int, int]]]:
    """{output name: (its scale output's name, block)} for block-scaled FP8 outputs."""
    from mergelang.ir.ops import Op

    values: dict[int, tuple[str, tuple[int, int]]] = {}  # quantized node -> (name, block)
    scales: dict[int, str] = {}
    for _, n in g.items():
        if n.op is Op.OUTPUT and g.node(n.args[0]).op is Op.BLOCK_QUANT:
            bq = g.node(n.args[0])
            if bq.attrs["part"] == "values":
                values[bq.args[0]] = (n.attrs["name"], tuple(bq.attrs["block"]))
            else:
                scales[bq.args[0]] = n.attrs["name"]
    return {name: (scales[src], block) for src, (name, block) in values.items() if src in scales}


def check_values(values: Mapping[str, Any], ranges: Mapping[str, "ParamRange"]) -> None:
    """E405 for a value outside its param's declared range (each element of a list)."""
    for name, v in values.items():
        rng = ranges.get(name)
        if rng is None:
            continue
        for x in _flat(v):
            if not rng.lo <= x <= rng.hi:
                raise MergelangError(error("E405", f"param `{name}` is given {x:g}, outside its "
                                           f"range {rng.render()}"))


def _flat(v: Any) -> list[float]:
    if isinstance(v, (list, tuple)):
        return [x for i in v for x in _flat(i)]
    return [float(v)]


def split_runtime(compile_: Compile, names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(params that can be run-time inputs, params the compiler must know) among `names`."""
    runtime, static, c = split_and_compile(compile_, names)
    if c is not None:
        c.close()
    return runtime, static


def split_and_compile(compile_: Compile, names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...], Any]:
    """`split_runtime`, and the compilation with the run-time params (open; None when they are
    not all of `names`, as it then needs the static ones' values): the caller's first
    compilation, not made twice."""
    if not names:
        return (), (), None
    try:
        return names, (), compile_(names, {})
    except MergelangError:
        pass
    ok = []
    for n in names:
        try:
            compile_((n,), {}).close()
            ok.append(n)
        except MergelangError:
            pass
    runtime = tuple(ok)
    if runtime:
        compile_(runtime, {}).close()  # together too (each alone compiled)
    return runtime, tuple(n for n in names if n not in ok), None


class TrialRunner:
    """Runs a recipe in memory with given param values; compiled once per distinct value of
    the `static` params (none when every searched param is a run-time input)."""

    def __init__(self, compile_: Compile, names: tuple[str, ...], device: str = "cpu",
                 runtime: tuple[str, ...] | None = None):
        self._compile = compile_
        self.names = names
        self.device = device
        self.target: Any = None  # the device resolved once (runtime/executor.target_for)
        first = None
        if runtime is None:
            runtime, static, first = split_and_compile(compile_, names)
        else:
            static = tuple(n for n in names if n not in runtime)
        self.runtime, self.static = runtime, static
        self._cache: dict[str, tuple[Any, Any, dict[str, ModelSource | None]]] = {}
        self._held: dict[str, HeldSource] = {}
        self._closing: list[Any] = []  # evicted compilations (their files close at the end)
        self._fp8: dict[str, tuple[str, tuple[int, int]]] = {}
        self.room = DeviceRoom.for_device(device)  # inputs resident on a GPU, within its memory
        self._first = first  # the compilation split_and_compile made: the first trial's
        self.compiles = 0

    def _prepared(self, values: Mapping[str, Any]) -> tuple[Any, Any, dict[str, ModelSource | None]]:
        from mergelang.passes.params import ParamFiller
        from mergelang.passes.pipeline import plan_for
        from mergelang.runtime.executor import target_for

        fixed = {n: values[n] for n in self.static}
        key = repr(sorted(fixed.items()))
        got = self._cache.get(key)
        if got is None:
            if len(self._cache) >= 8:  # static params: keep a few compilations, not all
                self._closing.append(self._cache.pop(next(iter(self._cache)))[0])
            c = self._first if self._first is not None else self._compile(self.runtime, fixed)
            self._first = None
            self.compiles += 1
            if self.target is None:
                self.target = target_for(self.device)
            plan = plan_for(c.plan, self.target).plan
            models = {k: self._hold(k, m) for k, m in c.models.items()}
            got = self._cache[key] = (c, ParamFiller(plan), models)
            self._fp8 = fp8_outputs(c.optimized)
        return got

    def _hold(self, name: str, m: ModelSource | None) -> ModelSource | None:
        """One HeldSource per model name across compilations (inputs read once in all)."""
        if m is None or m.block_output is not None:
            return m
        held = self._held.get(name)
        if held is None:
            held = self._held[name] = HeldSource(m, self.room)
        else:  # a recompilation opened the model again: keep the tensors already read
            held.inner = m
        return held

    def compilation(self, values: Mapping[str, Any]) -> "Compilation":
        return self._prepared(values)[0]

    def run(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The merged tensors for `values` ({param: number or nested list}): a state dict, or
        {output name: state dict} for a recipe with named outputs."""
        from mergelang.runtime.executor import execute

        c, filler, models = self._prepared(values)
        check_values({n: values[n] for n in self.runtime}, c.ranges)
        out: dict[str, torch.Tensor] = {}
        spilled = self.room.spilled if self.room is not None else 0
        execute(filler.fill({n: values[n] for n in self.runtime}), models, out.__setitem__,
                self.target, pipelined=False)
        if self.room is not None and self.room.spilled > spilled == 0:
            import warnings

            warnings.warn(f"{self.room.spilled / 2**30:.1f} GiB of the inputs do not fit in the "
                          f"share of GPU memory kept for them ({DeviceRoom.SHARE:.0%} of the free "
                          "memory): they stay in host memory and are copied to the GPU in every trial")
        if self._fp8:  # block-scaled FP8 outputs: the values they stand for, as floats
            from mergelang.sources.fp8 import dequantize

            for name, (scale, block) in self._fp8.items():
                out[name] = dequantize(out[name], out.pop(scale), block)
        if not c.output_names:
            return out
        split: dict[str, dict[str, Any]] = {n: {} for n in c.output_names}
        for key, value in out.items():
            name, _, tensor = key.partition("/")
            split[name][tensor] = value
        return split

    def close(self) -> None:
        if self._first is not None:
            self._closing.append(self._first)
            self._first = None
        for c in [*self._closing, *(c for c, _, _ in self._cache.values())]:
            c.close()
        self._closing.clear()
        self._cache.clear()
        for h in self._held.values():
            h._held.clear()
