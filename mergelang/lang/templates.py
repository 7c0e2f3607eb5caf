"""Elaboration templates: a rule elaborated once per family of tensors, replayed for the others.

MoE checkpoints have ~90k tensors and most of them are one rule applied to tensors of the same
shapes (`experts.{e}.*`, every layer's projections). Elaborating the rule for each (evaluating
its expression, calling stdlib functions, typing every node) costs ~250 us per tensor. A
template records the graph nodes one elaboration makes (`MergeGraph.make` calls, with their
arguments as positions in the recording, through the elaborator's `recording_view`) and replays them for another tensor of the same family,
with that tensor's name in its LOAD nodes, typed as recorded (same op, attrs and argument types),
built without re-evaluating anything. Nodes of the recording that no load flows into (constants,
their reshapes and arithmetic) are not copied: every replay uses the recording's own node, which
is what common-subexpression elimination would make of the copies — the optimized graph is the
one elaborating each tensor gives, and the passes fold and deduplicate that work once per family.

A family is: the same block and rule, the same captures, and the same shape and dtype of the
tensor in every model. An elaboration is recorded only when it is provably name-independent:
nothing read the tensor's name except the loads of that tensor (`Elaborator.tensor` flags every
other read: layer indices from names, random streams and statistics keyed by the name, sidecar
lookups), no other block's output was read, and it added no diagnostic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from mergelang.ir.graph import Node
from mergelang.ir.ops import Attrs, Op

if TYPE_CHECKING:
    from mergelang.ir.graph import MergeGraph


class Recording:
    """Records an elaborator's `graph.make` and `load` calls: the elaborator's
    `recording_view(rec)` makes them through `rec.view` and `rec.load`."""

    def __init__(self, graph: "MergeGraph"):
        self.graph = graph
        self.view = RecordingGraph(self)  # the graph as the recording elaborator sees it
        #: (op, args spec, attrs, span, the node's type, its id when the family shares it)
        self.calls: list[tuple[Any, tuple[tuple[str, int], ...], Any, Any, Any, int | None]] = []
        self.made: dict[int, int] = {}  # node id -> index of the call that returned it

    def _note(self, op: Any, spec: tuple, attrs: Any, span: Any, nid: int, shared: bool = False) -> int:
        ty = None if op == "load" else self.graph.node(nid).type
        self.calls.append((op, spec, attrs, span, ty, nid if shared else None))
        self.made.setdefault(nid, len(self.calls) - 1)
        return nid

    def make(self, op: Op, args: Any = (), attrs: Attrs | None = None, span: Any = None) -> int:
        args = tuple(args)
        nid = self.graph.make(op, args, attrs, span)
        spec = tuple(("r", self.made[a]) if a in self.made else ("n", a) for a in args)
        # a node of the recording that no load of the tensor flows into (constants, their
        # arithmetic) is the same node (op, args, attrs) for every tensor of the family
        shared = all(k == "n" or self.calls[i][5] is not None for k, i in spec)
        return self._note(op, spec, attrs if attrs is not None else Attrs(), span, nid, shared)

    def load(self, load: Callable[..., int], model: str, tensor: str, span: Any, raw: bool) -> int:
        """A load through `load` (the elaborator's own, whose LOAD node is not recorded)."""
        nid = load(model, tensor, span, raw)
        return self._note("load", (), (model, tensor, raw), span, nid)

    def template(self, name: str, results: list[int]) -> "Template | None":
        """The template of this recording for tensor `name` giving `results`, or None when a
        node other than a LOAD of `name` mentions the name in its attrs."""
        for op, _, attrs, *_ in self.calls:
            if op != "load" and any(v == name for v in attrs.values() if isinstance(v, str)):
                return None
        out = []
        for r in results:
            if r not in self.made:
                return None  # a result made before the recording (e.g. shared): not replayable
            out.append(self.made[r])
        return Template(name, tuple(self.calls), tuple(out))


class Template:
    def __init__(self, name: str, calls: tuple, results: tuple[int, ...]):
        self.name, self.calls, self.results = name, calls, results

    def replay(self, graph: "MergeGraph", name: str,
               load: Callable[..., int]) -> list[int]:
        """The nodes the recorded elaboration gives for tensor `name`; loads go through `load`
        (the elaborator's, which reads each tensor of a model once)."""
        made: list[int] = []
        add = graph.add
        for op, spec, attrs, span, ty, shared in self.calls:
            if shared is not None:  # the recording's own node (what CSE would make of a copy)
                made.append(shared)
            elif op == "load":
                model, tensor, raw = attrs
                made.append(load(model, name if tensor == self.name else tensor, span, raw))
            else:  # typed as recorded: same op, attrs and argument types (the family's key)
                made.append(add(Node(op, tuple(made[i] if kind == "r" else i for kind, i in spec),
                                     attrs, ty, span)))
        return [made[i] for i in self.results]


class RecordingGraph:
    """A recording's view of its graph: `make` is recorded, the rest is the graph's."""

    def __init__(self, rec: Recording):
        self._rec = rec

    def make(self, op: Op, args: Any = (), attrs: Attrs | None = None, span: Any = None) -> int:
        return self._rec.make(op, args, attrs, span)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rec.graph, name)
