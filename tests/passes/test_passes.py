"""Graph passes: optimized ≡ unoptimized on random tensors, `verify` after every pass, each pass
does its job, and a hypothesis test of random expression recipes against a direct torch
evaluation of the same expression (the evaluator below is written independently of mergelang).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mergelang as ml
from mergelang.runtime.executor import execute
from mergelang.ir.graph import MergeGraph, verify
from mergelang.ir.ops import Op
from mergelang.passes.optimize import PIPELINE, cse, dce, fold_constants, optimize, simplify
from mergelang.passes.plan import lower

SHAPES = {"w": (4, 6), "b": (6,), "n": (5, 3)}


def random_models(n: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {name: {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}
            for name in "abcd"[:n]}


def compile_with(body: str, models: dict[str, dict[str, torch.Tensor]], fns: str = ""):
    decls = "".join(f'model {m} = "<memory>"\n' for m in models)
    return ml.compile(f"{decls}{fns}\nmerge from a {{\n{body}\n}}\n", **models)


def run_graph(graph: MergeGraph, models) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    execute(lower(graph), models, out.__setitem__, "cpu")
    return out


def assert_same(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> None:
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype, k
        assert torch.equal(x[k], y[k]) or (torch.isnan(x[k]) == torch.isnan(y[k])).all() and \
            torch.equal(torch.nan_to_num(x[k]), torch.nan_to_num(y[k])), k


FNS = """
fn scaled_ta(base, xs, lam = 0.5 * 2, k = 3 - 2) {
    let tv = (xs - base) * k
    return base + lam * sum(tv, over = "models") * 1
}
fn twice(x) { return abs(x) * 2 + abs(x) * 2 }
"""

RECIPES = {
    "linear": '"*" => linear([a, b, c], weights = [1, 2, 0.5])',
    "linear_unnormalized": '"*" => linear([a, b], weights = [0.3, 0.7], normalize = false)',
    "task_arithmetic": '"*" => task_arithmetic(a, [b, c], weights = [1, 0.5], lambda = 0.7)',
    "ties": '"*" => ties(a, [b, c, d], weights = [1, 1, 0.5], density = 0.5)',
    "ties_full": '"*" => ties(a, [b, c], density = 1.0, normalize = false)',
    "slerp": '"w" => slerp(a, b, t = 0.3)\n"*" => slerp(b, c, t = 0.7)',
    "passthrough": '"w" => passthrough(a, scale = 2)\n"*" => passthrough(b)',
    "user_fn_constants": '"*" => scaled_ta(a, [b, c])',
    "cse": '"w" => twice(a) + twice(a)\n"*" => (a - b) * (a - b) + abs(a - b)',
    "identities": '"*" => (a * 1 + 0 - 0) / 1 + where(true, b, c) * (2 - 1)',
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_optimized_equals_unoptimized(name: str):
    models = random_models(4, seed=hash(name) % 1000)
    recipe = compile_with(RECIPES[name], models, FNS)
    c = recipe.compilation
    verify(c.graph)
    optimized = optimize(c.graph, check=verify)
    assert len(optimized) <= len(c.graph)
    before = run_graph(c.graph, c.models)
    after = run_graph(optimized, c.models)
    assert_same(before, after)
    assert_same(after, recipe.evaluate())  # the compiler's own optimized plan
    assert set(before) == set(SHAPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_passes_are_pure(name: str):
    """A pass never modifies its input graph (so --emit graph and --emit optimized coexist)."""
    models = random_models(4, seed=1)
    g = compile_with(RECIPES[name], models, FNS).compilation.graph
    snapshot = sorted((nid, repr(node)) for nid, node in g.items())
    for p in PIPELINE:
        p(g)
    assert sorted((nid, repr(node)) for nid, node in g.items()) == snapshot


def _ops(g: MergeGraph) -> list[Op]:
    return [n.op for _, n in g.items()]


def test_fold_makes_constants():
    models = random_models(3, seed=2)
    g = compile_with('"*" => linear([a, b, c], weights = [1, 2, 3])', models).compilation.graph
    all_const = [nid for nid, n in g.items() if n.args and n.op is not Op.ASSERT
                 and all(g.node(a).op is Op.CONST for a in n.args)]
    assert all_const, "the recipe should have foldable nodes"
    folded = fold_constants(g)
    verify(folded)
    for nid in all_const:
        assert folded.node(nid).op is Op.CONST
    assert not [nid for nid, n in folded.items() if n.args and n.op is not Op.ASSERT
                and all(folded.node(a).op is Op.CONST for a in n.args) and n.type.numel <= 64]


def test_cse_merges_duplicates():
    models = random_models(2, seed=3)
    g = compile_with('"*" => abs(a - b) * 2 + abs(a - b) * 2', models).compilation.graph
    n = len(SHAPES)  # one subgraph per output tensor
    assert _ops(g).count(Op.SUB) == 2 * n and _ops(g).count(Op.ABS) == 2 * n
    merged = dce(cse(g))
    verify(merged)
    assert _ops(merged).count(Op.SUB) == n
    assert _ops(merged).count(Op.ABS) == n
    assert _ops(merged).count(Op.MUL) == n
    assert _ops(merged).count(Op.OUTPUT) == len(SHAPES)  # outputs are never merged


def test_cse_keeps_different_attrs_apart():
    models = random_models(2, seed=3)
    g = compile_with('"*" => a * 2 + a * 3 + max(a, over = "tensor") + min(a, over = "tensor")',
                     models).compilation.graph
    merged = dce(cse(g))
    assert _ops(merged).count(Op.MUL) == 2 * len(SHAPES)
    assert _ops(merged).count(Op.REDUCE) == 2 * len(SHAPES)


def test_dce_removes_dead_nodes():
    models = random_models(2, seed=4)
    g = compile_with('"*" => a + b', models).compilation.graph.clone()
    n0 = len(g)
    some_load = next(nid for nid, n in g.items() if n.op is Op.LOAD)
    dead = g.make(Op.ABS, [some_load])
    g.make(Op.NEG if hasattr(Op, "NEG") else Op.ABS, [dead])
    assert len(g) == n0 + 2
    cleaned = dce(g)
    verify(cleaned)
    assert len(cleaned) == n0
    assert dead not in cleaned


def test_simplify_removes_identities():
    models = random_models(2, seed=5)
    g = compile_with('"*" => (a * 1) + (1 * b) + 0 - 0', models).compilation.graph
    assert Op.MUL in _ops(g)
    s = dce(simplify(g))
    verify(s)
    assert Op.MUL not in _ops(s)
    assert _ops(s).count(Op.ADD) == len(SHAPES)  # only a + b remains per tensor
    assert Op.SUB not in _ops(s)


def test_simplify_keeps_type_changing_identities():
    """x * 1 where x is a stack and 1 broadcasts is kept only if the type is unchanged: a scalar
    times a ones-tensor is not replaced by the scalar."""
    models = random_models(2, seed=6)
    c = compile_with('"*" => max(a, over = "tensor") * (b * 0 + 1)', models).compilation
    s = optimize(c.graph, check=verify)
    assert_same(run_graph(c.graph, c.models), run_graph(s, c.models))


# ---------------------------------------------------------------------------------------------
# random expression recipes vs a direct torch evaluation


NUMS = st.sampled_from([0, 1, 2, -1, 3, 0.5, -2.5, 1.25])
MODELS = ("a", "b", "c")
RANK = {"num": 0, "scalar": 1, "full": 2}


def _kind(*kinds: str) -> str:
    return max(kinds, key=RANK.__getitem__)


@st.composite
def exprs(draw, depth: int = 3, tensor: bool = False) -> tuple[Any, str]:
    """(tree, kind): kind is num (compile-time number), scalar (0-d tensor) or full."""
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        if tensor or draw(st.booleans()):
            return ("model", draw(st.sampled_from(MODELS))), "full"
        return ("num", draw(NUMS)), "num"
    choice = draw(st.sampled_from(["bin", "bin", "neg", "abs", "where", "models", "tensor"]))
    sub = lambda t=False: draw(exprs(depth=depth - 1, tensor=t))  # noqa: E731
    if choice == "bin":
        (x, kx), (y, ky) = sub(tensor), sub()
        op = draw(st.sampled_from(["+", "-", "*"]))
        return ("bin", op, x, y), _kind(kx, ky)
    if choice == "neg":
        x, k = sub(tensor)
        return ("neg", x), k
    if choice == "abs":
        x, k = sub(tensor)
        return ("abs", x), k
    if choice == "where":
        (cx, kc), (cy, _) = sub(True), sub()
        (p, kp), (q, kq) = sub(), sub()
        cmp = draw(st.sampled_from([">", "<", ">="]))
        return ("where", cmp, cx, cy, p, q), _kind(kc, kp, kq)
    if choice == "models":
        x, kx = sub(tensor)
        n = draw(st.integers(1, 2))
        items = [x]
        for _ in range(n):
            # list items must all have the same kind (shape) to form a stack
            for _attempt in range(5):
                y, ky = sub()
                if ky == kx:
                    break
            else:
                y = x
            items.append(y)
        kind = draw(st.sampled_from(["sum", "max", "min", "mean"]))
        return ("red", kind, "models", items), kx
    x, _ = sub(True)
    kind = draw(st.sampled_from(["sum", "max", "min", "mean"]))
    return ("red", kind, "tensor", [x]), "scalar"


def render(t: Any) -> str:
    tag = t[0]
    if tag == "model":
        return t[1]
    if tag == "num":
        return repr(t[1])
    if tag == "bin":
        return f"({render(t[2])} {t[1]} {render(t[3])})"
    if tag == "neg":
        return f"(-{render(t[1])})"
    if tag == "abs":
        return f"abs({render(t[1])})"
    if tag == "where":
        _, cmp, cx, cy, p, q = t
        return f"where({render(cx)} {cmp} {render(cy)}, {render(p)}, {render(q)})"
    _, kind, over, items = t
    inner = f"[{', '.join(render(i) for i in items)}]" if over == "models" else render(items[0])
    return f'{kind}({inner}, over = "{over}")'


def torch_eval(t: Any, env: dict[str, torch.Tensor]) -> Any:
    """Plain evaluation: Python floats for numbers, float32 torch tensors otherwise."""
    tag = t[0]
    if tag == "model":
        return env[t[1]]
    if tag == "num":
        return t[1]
    if tag == "bin":
        x, y = torch_eval(t[2], env), torch_eval(t[3], env)
        return {"+": lambda: x + y, "-": lambda: x - y, "*": lambda: x * y}[t[1]]()
    if tag == "neg":
        return -torch_eval(t[1], env)
    if tag == "abs":
        return abs(torch_eval(t[1], env))
    if tag == "where":
        _, cmp, cx, cy, p, q = t
        x, y = torch_eval(cx, env), torch_eval(cy, env)
        cond = {">": x > y, "<": x < y, ">=": x >= y}[cmp]
        pv, qv = torch_eval(p, env), torch_eval(q, env)
        as_t = lambda v: v if isinstance(v, torch.Tensor) else torch.tensor(float(v))  # noqa: E731
        return torch.where(cond, as_t(pv), as_t(qv))
    _, kind, over, items = t
    vals = [torch_eval(i, env) for i in items]
    if over == "models":
        if all(not isinstance(v, torch.Tensor) for v in vals):
            return {"sum": math.fsum, "max": max, "min": min,
                    "mean": lambda v: math.fsum(v) / len(v)}[kind](vals)
        s = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in vals])
        return {"sum": s.sum(0), "max": s.amax(0), "min": s.amin(0), "mean": s.mean(0)}[kind]
    x = vals[0]
    return {"sum": x.sum(), "max": x.amax(), "min": x.amin(), "mean": x.mean()}[kind]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=exprs(depth=3), seed=st.integers(0, 2**16))
def test_random_expressions(tree, seed: int):
    tree, _ = tree
    g = torch.Generator().manual_seed(seed)
    models = {m: {"w": torch.randn(3, 4, generator=g)} for m in MODELS}
    text = f"a + {render(tree)}"
    recipe = ml.compile("".join(f'model {m} = "<memory>"\n' for m in MODELS)
                        + f'merge from a {{\n    "*" => {text}\n}}\n', **models)
    c = recipe.compilation
    unopt = run_graph(c.graph, c.models)["w"]
    opt = run_graph(optimize(c.graph, check=verify), c.models)["w"]
    assert torch.equal(unopt, opt), text
    env = {m: models[m]["w"] for m in MODELS}
    expected = models["a"]["w"] + torch_eval(tree, env)
    torch.testing.assert_close(opt, expected.to(torch.float32), rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"{text}: {m}")
