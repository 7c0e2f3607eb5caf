"""`learn`: fit the params declared `learn` by gradient descent through the merge graph.

The recipe is compiled once with its learnable params as run-time inputs (PARAM nodes). The
plan (unfused: the generated numba loops are not differentiable) is split once into
*constant* nodes — no learnable param above them — and *dynamic* ones. Constant values are
computed once without gradients, and only those a dynamic node reads (the "frontier", e.g. the
task vectors `a - base`) or that are outputs are kept; each step evaluates only the dynamic
nodes with torch autograd, from the frontier and the current param tensors, and hands the loss
`{tensor name: float32 tensor}`. Statistics passes (model-wide statistics) run once first; one
that depends on a learnable param is refused (E906), as are params the compiler must know
(a guard, an `if`, a shape: E906). A param whose gradient stays zero gets W106.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from mergelang.diagnostics import Diagnostic, MergelangError, error, warning
from mergelang.lang.values import ListV, Value
from mergelang.search.program import GraphProgram
from mergelang.search.trials import Compile, split_and_compile

if TYPE_CHECKING:
    import torch

    from mergelang.compiler import Compilation


@dataclass
class Learned:
    """Learned values ({param: number or nested list}), the loss per step, and how to write the
    merge with them."""

    values: dict[str, Any]
    losses: list[float]
    warnings: list[Diagnostic] = field(default_factory=list)
    _recipe: Callable[..., Any] | None = field(default=None, repr=False)

    def recipe(self) -> Any:
        """The recipe compiled with the learned values (a Recipe)."""
        assert self._recipe is not None
        return self._recipe(**self.values)

    def run(self, out_dir: Any, **kw: Any) -> Any:
        """Write the merge with the learned values (Recipe.run's keywords)."""
        r = self.recipe()
        kw.setdefault("origins", {n: f"learn ({len(self.losses)} steps, final loss "
                                     f"{self.losses[-1]:.6g})" if self.losses else "learn"
                                  for n in self.values})
        try:
            return r.run(out_dir, **kw)
        finally:
            r.close()

    def evaluate(self) -> dict[str, Any]:
        r = self.recipe()
        try:
            return r.evaluate()
        finally:
            r.close()


def _as_tensor(v: Value) -> "torch.Tensor":
    import torch

    def py(x: Value) -> Any:
        return [py(i) for i in x.items] if isinstance(x, ListV) else float(x.value)  # type: ignore[union-attr]
    return torch.tensor(py(v), dtype=torch.float32)


def _refuse(compile_: Compile, name: str) -> MergelangError:
    """E906 for a learnable param the compiler must know, with the reason it gave."""
    try:
        compile_((name,), {}).close()
        why = None
    except MergelangError as exc:
        why = exc.diagnostics[0]
    diag = error("E906", f"param `{name}` is declared `learn` but the compiler needs its value (a "
                 "guard, an `if`, a count or a shape reads it), so it cannot be learned",
                 why.span if why is not None else None,
                 "learn coefficients that only scale or mix tensors; tune the others (tune)")
    if why is not None:
        diag = diag.with_note(f"where: {why.message}")
    return MergelangError(diag)


def _batches(batches: Any, steps: int | None) -> Iterable[Any]:
    """The batches to learn from; a data function or an iterator that raises is E907 (when it
    is called, or at the batch it fails on), data that is not iterable E903."""
    data = _user("the data function", batches) if callable(batches) else batches
    try:
        iter(data)
    except TypeError:
        raise MergelangError(error("E903", f"the data is a {type(data).__name__}, not an iterable "
                                   "of batches", None, "give a list of batches, a generator, or a "
                                   "function returning one")) from None
    if steps is not None:
        if hasattr(data, "__len__") and not hasattr(data, "__next__"):
            data = itertools.islice(itertools.cycle(data), steps)
        else:
            data = itertools.islice(data, steps)
    it = iter(data)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (KeyboardInterrupt, MergelangError):
            raise
        except BaseException as exc:  # noqa: BLE001 - the user's code: any failure is theirs
            raise _raised("the data", exc) from None
        yield batch


def _raised(what: str, exc: BaseException) -> MergelangError:
    """E907: the user's loss / data / objective code raised (or tried to exit the process)."""
    how = (f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit)
           else f"raised {type(exc).__name__}: {exc}")
    return MergelangError(error("E907", f"{what} {how}", None,
                                "run it on its own to see the full error; nothing was written"))


def _user(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, any failure of the user's code (an exception, sys.exit) as E907."""
    try:
        return fn(*args)
    except (KeyboardInterrupt, MergelangError):
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit too: the process is not theirs to end
        raise _raised(what, exc) from None


def check_lr(lr: Any) -> float:
    """E902 unless the learning rate is a finite positive number."""
    import math

    ok = isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr >= 0
    if not ok:
        raise MergelangError(error("E902", f"the learning rate must be a finite number, 0 or more, "
                                   f"not {lr!r}", None, "e.g. --lr 0.01"))
    return float(lr)


def _statistics_filled(cc: "Compilation", device: str) -> Any:
    """The apply plan of `cc` with its model-wide statistics computed (E906 when one depends on
    a learnable param: statistics are not differentiable)."""
    from mergelang.passes.params import runtime_names

    plan = cc.plan
    if any(runtime_names(pp.graph) for pp in plan.prepasses):
        raise MergelangError(error("E906", "a model-wide statistic depends on a learnable param, "
                                   "so it cannot be learned (statistics are not differentiable)"))
    if plan.prepasses:
        from mergelang.runtime.executor import execute, target_for
        from mergelang.runtime.stats import run_stat_passes

        target = target_for(device)
        plan = run_stat_passes(plan, lambda pp, sink: execute(pp, cc.models, sink, target,
                                                              pipelined=False))
    return plan


def _by_output(state: dict[str, Any], names: tuple[str, ...]) -> Any:
    """`{"NAME/TENSOR": x}` -> `{NAME: {TENSOR: x}}` with named outputs; else `state`."""
    if not names:
        return state
    split: dict[str, dict[str, Any]] = {n: {} for n in names}
    for k, v in state.items():
        o, _, t = k.partition("/")
        split[o][t] = v
    return split


def _checked_loss(value: Any, step: int) -> Any:
    """The loss's value: E903 unless a real scalar tensor, E908 when not finite."""
    import torch

    if not (isinstance(value, torch.Tensor) and value.numel() == 1) or value.is_complex():
        what = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) and \
            value.numel() == 1 else type(value).__name__
        raise MergelangError(error("E903", f"the loss returned {what}; it must "
                                   "return a real scalar tensor", None,
                                   "return e.g. ml.objectives.entropy(logits)"))
    if not bool(torch.isfinite(value.detach()).all()):
        raise MergelangError(error("E908", f"the loss is {float(value.detach())} at step "
                                   f"{step + 1}: learning stopped there", None,
                                   "check the loss for a log of 0 or a division by 0; a "
                                   "smaller --lr may help; nothing was written"))
    return value


def learn_recipe(c: "Compilation", compile_: Compile, with_params: Callable[..., Any],
                 loss: Callable[..., Any], batches: Any, *, steps: int | None = None,
                 lr: float = 1e-2, optimizer: str = "adam", device: str = "cpu",
                 log: Callable[[str], None] | None = None, clamp: str = "project") -> Learned:
    """`clamp` keeps a param with a declared range in it: "project" clamps the param itself after
    each step; "use" clamps only the value the merge uses (the AdaMerging paper's code and
    FusionBench's `clamp_weights`), the raw param moves freely and the result is its clamp."""
    import torch

    names = c.learnable
    _check_options(names, optimizer, clamp)
    lr = check_lr(lr)
    runtime, static, cc = split_and_compile(compile_, names)
    if static:
        raise _refuse(compile_, static[0])
    try:
        program = GraphProgram(_statistics_filled(cc, device), cc.models, device)
        params = {n: _as_tensor(c.params[n]).to(device).requires_grad_(True) for n in names}
        ranges = {n: c.ranges[n] for n in names if n in c.ranges}
        opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(list(params.values()), lr=lr)
        descent = Descent(program, params, ranges, opt, clamp, cc.output_names)
        for step, batch in enumerate(_batches(batches, steps)):
            descent.step(step, batch, loss)
            if log is not None:
                log(f"step {step + 1}: loss {descent.losses[-1]:.6g}")
        if not descent.losses:
            raise MergelangError(error("E903", "no batch to learn from: `batches` is empty"))
        values = {n: (p.clamp(ranges[n].lo, ranges[n].hi) if n in ranges else p).detach().cpu().tolist()
                  for n, p in params.items()}
        return Learned(values, descent.losses, _unmoved(c, descent.moved), with_params)
    finally:
        cc.close()


def _check_options(names: Any, optimizer: str, clamp: str) -> None:
    """E902 for an unknown clamp or optimizer, E901 when nothing is declared `learn`."""
    if clamp not in ("project", "use"):
        raise MergelangError(error("E902", f"clamp must be project or use, not {clamp!r}"))
    if not names:
        raise MergelangError(error("E901", "nothing to learn: no param is declared `learn`", None,
                                   "declare one, e.g. param lam = [0.3, 0.3] learn"))
    if optimizer not in ("adam", "sgd"):
        raise MergelangError(error("E902", f"optimizer must be adam or sgd, not {optimizer!r}"))


@dataclass
class Descent:
    """Gradient descent on the params: one `step` per batch; the losses, and which params'
    gradients were ever nonzero."""

    program: GraphProgram
    params: dict[str, "torch.Tensor"]
    ranges: dict[str, Any]
    opt: Any
    clamp: str
    output_names: Any
    losses: list[float] = field(default_factory=list)
    moved: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.moved = {n: False for n in self.params}

    def step(self, step: int, batch: Any, loss: Callable[..., Any]) -> None:
        import torch

        params, ranges = self.params, self.ranges
        self.opt.zero_grad()
        used = params if self.clamp == "project" else \
            {n: p.clamp(ranges[n].lo, ranges[n].hi) if n in ranges else p for n, p in params.items()}
        values = {n: p.detach().tolist() for n, p in used.items()}
        state = _by_output(self.program.state(used, values), self.output_names)
        value = _checked_loss(_user("the loss", loss, state, batch), step)
        if value.requires_grad:
            value.reshape(()).backward()
        for n, p in params.items():
            if p.grad is not None and bool(p.grad.abs().sum() > 0):
                self.moved[n] = True
        self.opt.step()
        bad = [n for n, p in params.items() if not bool(torch.isfinite(p.detach()).all())]
        if bad:
            raise MergelangError(error("E908", f"learnable param `{bad[0]}` became NaN or infinite "
                                       f"at step {step + 1} (its gradient was not finite): "
                                       "learning stopped there", None,
                                       "a smaller --lr may help; nothing was written"))
        with torch.no_grad():
            for n, rng in ranges.items() if self.clamp == "project" else ():  # stay in the range
                params[n].clamp_(rng.lo, rng.hi)
        self.losses.append(float(value.detach()))


def _unmoved(c: "Compilation", moved: Mapping[str, bool]) -> list[Diagnostic]:
    """W106 for each learnable param whose gradient was zero at every step."""
    spans = {d.name: d.value.span for d in c.unit.params}
    return [warning("W106", f"the loss does not depend on learnable param `{n}` "
                    "(its gradient was zero at every step), so it kept its value",
                    spans.get(n), "check that the loss uses the tensors this param "
                    "scales, and that a top-k density is not what it sets")
            for n, ok in moved.items() if not ok]
