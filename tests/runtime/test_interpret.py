"""The plan interpreter (runtime/interpret.py): values are dropped right after their last user,
the per-node hook runs once per node in step order (and a subclass can take over some ops), and
the results match a straightforward torch computation."""

from __future__ import annotations

import weakref

import torch

import mergelang as ml
from mergelang.ir.graph import MergeGraph
from mergelang.ir.ops import Attrs, Op
from mergelang.ir.types import TType
from mergelang.runtime.interpret import Interpreter, steps_for

MODELS = {m: {"x": torch.randn(4, 3, generator=torch.Generator().manual_seed(i)),
              "y": torch.randn(5, generator=torch.Generator().manual_seed(10 + i))}
          for i, m in enumerate("abc")}


def _plan():
    decls = "".join(f'model {m} = "<memory>"\n' for m in MODELS)
    r = ml.compile(decls + 'merge from a {\n    "*" => linear([a, b, c], weights = [1, 2, 0.5])\n}\n',
                   **MODELS)
    return r, r.compilation.plan


class Watching(Interpreter):
    """Loads fresh copies of the models' tensors and checks, before each node runs, that every
    value whose last user ran already is gone (no reference left anywhere)."""

    def __init__(self, plan, last_user: dict[int, int]):
        super().__init__(plan.graph.node)
        self.plan, self.last_user = plan, last_user
        self.refs: dict[int, weakref.ref] = {}
        self.position = {s.nid: i for i, s in enumerate(plan.steps)}
        self.freed: list[tuple[int, int]] = []  # (value, step position it was freed after)
        self.ran: list[int] = []

    def load(self, step, node):
        t = MODELS[node.attrs["model"]][node.attrs["tensor"]].clone()
        self._watch(step, t)
        return t

    def run_node(self, step, node, args):
        self.ran.append(step.nid)
        out = super().run_node(step, node, args)
        del args
        self._watch(step, out)
        return out

    def _watch(self, step, value) -> None:
        here = self.position[step.nid]
        for nid, ref in self.refs.items():
            if self.last_user.get(nid, len(self.plan.steps)) < here:
                assert ref() is None, f"value %{nid} is still alive at step {here}"
        if step.nid not in self.refs:
            self.refs[step.nid] = weakref.ref(value)

    def output(self, step, node, value):
        self.outputs[node.attrs["name"]] = value.clone()

    def free(self, nid, value):
        self.freed.append((nid, self.position[self.ran[-1]] if self.ran else -1))


def test_values_are_dropped_after_their_last_user() -> None:
    r, plan = _plan()
    try:
        g = plan.graph
        last_user = {}  # computed here from the args, not from the plan's free lists
        for i, s in enumerate(plan.steps):
            for a in g.node(s.nid).args:
                last_user[a] = i
        run = Watching(plan, last_user)
        env = run.run(plan.steps)
        # every value read by a later step was freed exactly once; nothing read is left
        assert sorted(n for n, _ in run.freed) == sorted(last_user)
        assert not set(env) & set(last_user)
        for name in ("x", "y"):
            want = (MODELS["a"][name] + 2 * MODELS["b"][name] + 0.5 * MODELS["c"][name]) / 3.5
            torch.testing.assert_close(run.outputs[name], want, rtol=1e-6, atol=1e-6)
    finally:
        r.close()


def _const(g: MergeGraph, values: list[float]) -> int:
    return g.make(Op.CONST, (), Attrs(value=tuple(values), type=TType((len(values),))))


class NegatingAdds(Interpreter):
    """Runs ADD as a subtraction (its own op handling) and every other op with the kernels,
    counting the calls of the per-node hook."""

    def __init__(self, g: MergeGraph):
        super().__init__(g.node)
        self.calls: list[int] = []

    def run_node(self, step, node, args):
        self.calls.append(step.nid)
        if node.op is Op.ADD:
            return args[0] - args[1]
        return super().run_node(step, node, args)


def test_the_per_node_hook_runs_once_per_node_and_can_take_over_an_op() -> None:
    g = MergeGraph()
    a, b, c = _const(g, [1.0, 2.0, 3.0]), _const(g, [0.5, -1.0, 4.0]), _const(g, [2.0, 2.0, -3.0])
    s = g.make(Op.ADD, (a, b))
    m = g.make(Op.MUL, (s, c))
    n = g.make(Op.NEG, (m,))
    order = [a, b, c, s, m, n]
    steps = steps_for(order, g.node)
    assert [st.free for st in steps] == [(), (), (), (a, b), (s, c), (m,)]
    run = NegatingAdds(g)
    env = run.run(steps)
    assert run.calls == order
    assert set(env) == {n}  # the last value has no user: it stays
    ta, tb, tc = (torch.tensor(v) for v in ([1.0, 2.0, 3.0], [0.5, -1.0, 4.0], [2.0, 2.0, -3.0]))
    assert torch.equal(env[n], -((ta - tb) * tc))
    assert torch.equal(Interpreter(g.node).run(steps)[n], -((ta + tb) * tc))


def test_steps_for_keeps_what_it_is_told_to_keep() -> None:
    g = MergeGraph()
    a, b = _const(g, [1.0]), _const(g, [2.0])
    s = g.make(Op.ADD, (a, b))
    steps = steps_for([a, b, s], g.node, keep=lambda nid: nid != a)
    env = Interpreter(g.node).run(steps)
    assert set(env) == {a, s}
    assert float(env[s]) == 3.0
