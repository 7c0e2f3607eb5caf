"""Buffer reuse for the compute loop (CPU): dead inputs become outputs, stacks that are only summed
are never built. Both give bit-identical values to the plain kernels.

- **In-place elementwise ops** (arithmetic, unary float ops, `where`). When an input of a
  float32 elementwise op dies at that step, was made here by an elementwise op, a reduction or
  a stack (never a LOAD: a source may hand out a caller's tensor; never a linear-algebra op: the
  SVD kernel keeps its results for the other parts of one decomposition), shares its storage
  with no other live value or handed-out output, and has the result's shape, the op writes its
  result into that input (`torch.add(a, b, out=a)`, or the bit select of `kernels_fast.where`
  in place): the same arithmetic, no fresh allocation (first-touch page faults dominated these
  memory-bound ops on the development VM).
- **Sum of a stack.** `sum(stack(x0, .., xn-1), over = "models")` whose stack has no other use
  is computed as ((0 + x0) + x1) + ... into one fresh buffer instead of copying the n tensors
  into a stack first. torch reduces the model axis of a small stack in exactly that order
  (checked bit for bit for 1..MAX_LAZY_STACK models by tests/runtime/test_fast_kernels.py), so the
  result is identical, signed zeros included.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch

from mergelang.runtime.kernels import cpu_exact as kernels_fast
from mergelang.ir.graph import Node
from mergelang.ir.ops import Op
from mergelang.ir.types import broadcast_all
from mergelang.passes.plan import ExecutionPlan

#: the most models a stack may have for the lazy sum: up to 4 rows torch sums the model axis
#: sequentially from zero; with 5 it groups rows differently (results differ in the last bit)
MAX_LAZY_STACK = 4

_OUT: dict[Op, Callable[..., torch.Tensor]] = {
    Op.ADD: torch.add, Op.SUB: torch.sub, Op.MUL: torch.mul, Op.DIV: torch.div,
    Op.MINIMUM: torch.minimum, Op.MAXIMUM: torch.maximum, Op.NEG: torch.neg, Op.ABS: torch.abs,
    Op.SQRT: torch.sqrt, Op.EXP: torch.exp, Op.LOG: torch.log, Op.SIN: torch.sin,
    Op.COS: torch.cos, Op.TANH: torch.tanh, Op.FLOOR: torch.floor, Op.SIGN: torch.sign,
}


#: ops whose kernels always return a new tensor (or, here, the donated one): only their values
#: may be written into. Others may return views or tensors a kernel keeps (the SVD cache).
_FRESH = frozenset(_OUT) | {Op.WHERE, Op.LERP, Op.CLAMP, Op.REDUCE, Op.DOT, Op.STACK, Op.FUSED,
                             Op.BLOCK_DEQUANT}


class LazyStack:
    """A STACK whose only use is a sum over models: its parts, not yet copied."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[torch.Tensor]):
        self.parts = parts


class Buffers:
    """Which live values own their storage exclusively (and may be overwritten when they die)."""

    def __init__(self, plan: ExecutionPlan, dev: torch.device):
        self.enabled = dev.type == "cpu" and kernels_fast.ENABLED
        g = plan.graph
        uses: Counter[int] = Counter()
        only_use: dict[int, int] = {}
        for step in plan.steps:
            for a in g.node(step.nid).args:
                uses[a] += 1
                only_use[a] = step.nid
        self.lazy: set[int] = set()  # STACK nids computed lazily
        for step in plan.steps:
            node = g.node(step.nid)
            if (node.op is Op.STACK and uses[step.nid] == 1 and len(node.args) <= MAX_LAZY_STACK
                    and node.type.dtype == "float32"):
                user = g.node(only_use[step.nid])
                if (user.op is Op.REDUCE and user.attrs["kind"] == "sum"
                        and user.attrs["over"] == "models"):
                    self.lazy.add(step.nid)
        self._owned: dict[int, int] = {}  # value nid -> storage key, for kernel-made values
        self._refs: Counter[int] = Counter()  # storage key -> live values (or outputs) using it
        self._donated: int | None = None  # storage the last step wrote into (stays exclusive)

    @staticmethod
    def _key(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    def stored(self, nid: int, t: torch.Tensor | LazyStack, op: Op | None,
               args: list[torch.Tensor]) -> None:
        """Record a new live value computed by `op` (None: read by a LOAD)."""
        made_here = op is not None
        if not self.enabled:
            return
        if isinstance(t, LazyStack):
            for p in t.parts:
                self._refs[self._key(p)] += 1
            return
        key = self._key(t)
        self._refs[key] += 1
        donated, self._donated = self._donated, None
        fresh = made_here and op in _FRESH and (key == donated or all(
            isinstance(a, LazyStack) or self._key(a) != key for a in args))
        if fresh and t.device.type == "cpu" and t.is_contiguous():
            self._owned[nid] = key

    def freed(self, nid: int, t: torch.Tensor | LazyStack | None) -> None:
        if not self.enabled or t is None:
            return
        self._owned.pop(nid, None)
        for p in (t.parts if isinstance(t, LazyStack) else [t]):
            key = self._key(p)
            self._refs[key] -= 1
            if self._refs[key] <= 0:
                del self._refs[key]

    def pin(self, t: torch.Tensor) -> None:
        """`t` went to the sink (maybe the very tensor of a live value): never write into it."""
        if self.enabled:
            key = self._key(t)
            for nid in [n for n, k in self._owned.items() if k == key]:
                del self._owned[nid]

    def run(self, node: Node, nid: int, args: list, free: tuple[int, ...]) -> torch.Tensor | LazyStack | None:
        """The step's value computed with buffer reuse, or None (the caller runs the kernel)."""
        if not self.enabled:
            return None
        if nid in self.lazy:
            return LazyStack(list(args))
        if node.op is Op.REDUCE and args and isinstance(args[0], LazyStack):
            return _sum_parts(args[0].parts)
        fn = _OUT.get(node.op)
        where = node.op is Op.WHERE
        if ((fn is None and not where) or node.type.dtype != "float32"
                or any(a.dtype != torch.float32 for a in (args[1:] if where else args))):
            return None
        shape = tuple(node.type.full_shape)
        for i, a in enumerate(node.args):
            if a not in free or node.args.count(a) != 1 or (where and i == 0):
                continue
            t = args[i]
            key = self._owned.get(a)
            if key is None or self._refs.get(key) != 1 or tuple(t.shape) != shape:
                continue
            if where:
                kernels_fast.where(args[0], args[1], args[2], into=i)
            else:
                fn(*args, out=t)
            self._donated = key
            # a new tensor object on the same storage: caches keyed by object identity (the SVD
            # of kernels_linalg) must not mistake the new value for the dead input
            return t.detach()
        return None


def _sum_parts(parts: list[torch.Tensor]) -> torch.Tensor:
    shape = broadcast_all(*(p.shape for p in parts))
    acc = torch.add(parts[0].expand(shape), 0.0)  # 0 + x0: torch's sum starts from zero
    for p in parts[1:]:
        acc.add_(p)
    return acc
