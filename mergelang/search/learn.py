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
from mergelang.ir.ops import Op
from mergelang.ir.paramexpr import evaluate
from mergelang.lang.values import ListV, Value
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


class GraphProgram:
    """The plan as constant work (done once) and dynamic work (done per step)."""

    def __init__(self, plan: Any, models: Mapping[str, Any], device: str):
        import torch

        from mergelang.runtime.executor import prepare_models
        from mergelang.runtime.loads import read_value

        g = _float_outputs(plan.graph)
        self.graph = g
        order = [s.nid for s in plan.steps if s.nid in g]
        dynamic: set[int] = set()
        from mergelang.passes.params import param_nodes

        refs = set(param_nodes(g)[1])
        self.refs = refs
        for nid in order:
            n = g.node(nid)
            if n.op is Op.PARAM or nid in refs or any(a in dynamic for a in n.args):
                dynamic.add(nid)
        self.dynamic = [nid for nid in order if nid in dynamic]
        needed = {a for nid in self.dynamic for a in g.node(nid).args if a not in dynamic}
        users: dict[int, int] = {}
        for nid in order:
            if nid not in dynamic:
                for a in g.node(nid).args:
                    users[a] = users.get(a, 0) + 1
        self.device = device
        prepare_models(plan, models, torch.device(device))
        vals: dict[int, torch.Tensor] = {}
        self.frontier: dict[int, torch.Tensor] = {}
        self.const_out: dict[str, torch.Tensor] = {}
        self.outputs: list[tuple[int, str]] = []
        from mergelang.runtime.kernels import KERNELS

        with torch.no_grad():
            for nid in order:
                n = g.node(nid)
                if n.op is Op.OUTPUT:
                    self.outputs.append((nid, n.attrs["name"]))
                if nid in dynamic:
                    continue
                if n.op is Op.LOAD:
                    v = read_value(plan, models, nid).to(device)
                elif n.op is Op.OUTPUT:
                    v = vals[n.args[0]].detach()
                    self.const_out[n.attrs["name"]] = v
                else:
                    v = KERNELS[n.op](n, [vals[a] for a in n.args])
                vals[nid] = v
                if nid in needed:
                    self.frontier[nid] = v
                for a in set(n.args):
                    users[a] -= 1
                    if users[a] == 0 and a not in needed:
                        vals.pop(a, None)

    def state(self, params: Mapping[str, "torch.Tensor"], values: Mapping[str, Any]) -> dict[str, "torch.Tensor"]:
        """The merged tensors (float32) for the current param tensors; `values` (plain
        numbers) fill ParamRef attrs, which are not differentiable."""
        from mergelang.ir.graph import Node
        from mergelang.passes.params import sub_attrs
        from mergelang.runtime.kernels import KERNELS

        import torch

        g = self.graph
        vals: dict[int, torch.Tensor] = dict(self.frontier)
        out: dict[str, torch.Tensor] = {}
        for nid in self.dynamic:
            n = g.node(nid)
            if n.op is Op.PARAM:  # its expression over the param tensors (differentiable)
                v = evaluate(n.attrs["expr"], lambda name, path: _at(params[name], path))
                if not isinstance(v, torch.Tensor):  # e.g. clamp(t, 0, 1) with t out of range: a
                    v = torch.tensor(float(v), dtype=torch.float32, device=self.device)  # constant
                vals[nid] = v
                continue
            if nid in self.refs:
                n = Node(n.op, n.args, sub_attrs(n.attrs, values), n.type, n.span)
            args = [vals[a] for a in n.args]
            if n.op is Op.OUTPUT:
                out[n.attrs["name"]] = args[0]
                continue
            vals[nid] = KERNELS[n.op](n, args)
        # the loss gets its own copies of the constant tensors (and of any output that is one of
        # them): a loss that changes `state` in place must not change later steps
        kept = {t.data_ptr() for t in [*self.frontier.values(), *self.const_out.values()]}
        return {name: (out[name] if out[name].data_ptr() not in kept else out[name].clone())
                if name in out else self.const_out[name].clone() for _, name in self.outputs}


def _at(t: Any, path: tuple[int, ...]) -> Any:
    for i in path:
        t = t[i]
    return t


def _float_outputs(graph: Any) -> Any:
    """The graph with block-scaled FP8 outputs (sources/fp8.py) as the float values they
    quantize: a loss sees weights, not FP8 codes and their scale tensors."""
    from mergelang.ir.graph import Node

    quant = [(nid, n) for nid, n in graph.items()
             if n.op is Op.OUTPUT and graph.node(n.args[0]).op is Op.BLOCK_QUANT]
    if not quant:
        return graph
    g = graph.clone()
    dropped = set()
    for nid, n in quant:
        bq = g.node(n.args[0])
        dropped.add(n.args[0])
        if bq.attrs["part"] == "scale_inv":
            g.remove_node(nid)
        else:
            g.set_node(nid, Node(Op.OUTPUT, (bq.args[0],), n.attrs.replace(dtype="float32"),
                                 bq.type, n.span))
    g.remove_nodes_from(dropped)
    return g


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
    if clamp not in ("project", "use"):
        raise MergelangError(error("E902", f"clamp must be project or use, not {clamp!r}"))
    if not names:
        raise MergelangError(error("E901", "nothing to learn: no param is declared `learn`", None,
                                   "declare one, e.g. param lam = [0.3, 0.3] learn"))
    if optimizer not in ("adam", "sgd"):
        raise MergelangError(error("E902", f"optimizer must be adam or sgd, not {optimizer!r}"))
    lr = check_lr(lr)
    runtime, static, cc = split_and_compile(compile_, names)
    if static:
        raise _refuse(compile_, static[0])
    try:
        program = GraphProgram(_statistics_filled(cc, device), cc.models, device)
        params = {n: _as_tensor(c.params[n]).to(device).requires_grad_(True) for n in names}
        ranges = {n: c.ranges[n] for n in names if n in c.ranges}
        opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(list(params.values()), lr=lr)
        losses: list[float] = []
        warns: list[Diagnostic] = []
        moved: dict[str, bool] = {n: False for n in names}
        for step, batch in enumerate(_batches(batches, steps)):
            opt.zero_grad()
            used = params if clamp == "project" else \
                {n: p.clamp(ranges[n].lo, ranges[n].hi) if n in ranges else p for n, p in params.items()}
            values = {n: p.detach().tolist() for n, p in used.items()}
            state = _by_output(program.state(used, values), cc.output_names)
            value = _checked_loss(_user("the loss", loss, state, batch), step)
            if value.requires_grad:
                value.reshape(()).backward()
            for n, p in params.items():
                if p.grad is not None and bool(p.grad.abs().sum() > 0):
                    moved[n] = True
            opt.step()
            bad = [n for n, p in params.items() if not bool(torch.isfinite(p.detach()).all())]
            if bad:
                raise MergelangError(error("E908", f"learnable param `{bad[0]}` became NaN or infinite "
                                           f"at step {step + 1} (its gradient was not finite): "
                                           "learning stopped there", None,
                                           "a smaller --lr may help; nothing was written"))
            with torch.no_grad():
                for n, rng in ranges.items() if clamp == "project" else ():  # stay in the range
                    params[n].clamp_(rng.lo, rng.hi)
            losses.append(float(value.detach()))
            if log is not None:
                log(f"step {step + 1}: loss {losses[-1]:.6g}")
        if not losses:
            raise MergelangError(error("E903", "no batch to learn from: `batches` is empty"))
        spans = {d.name: d.value.span for d in c.unit.params}
        for n, ok in moved.items():
            if not ok:
                warns.append(warning("W106", f"the loss does not depend on learnable param `{n}` "
                                     "(its gradient was zero at every step), so it kept its value",
                                     spans.get(n), "check that the loss uses the tensors this param "
                                     "scales, and that a top-k density is not what it sets"))
        values = {n: (p.clamp(ranges[n].lo, ranges[n].hi) if n in ranges else p).detach().cpu().tolist()
                  for n, p in params.items()}
        return Learned(values, losses, warns, with_params)
    finally:
        cc.close()
