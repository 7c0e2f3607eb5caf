"""Elaborating merge blocks: one OUTPUT per tensor of each block's reference model, the rule
that applies to each tensor, and a block's output used as a model by other blocks
(`model s = output("NAME")`, see sources/outputs.py): functions of an `Elaborator`
(lang/elaborate.py), whose block-level state is a `BlockState`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mergelang.diagnostics import CompileError, error, warning
from mergelang.io.checkpoint import ModelSource, TensorInfo
from mergelang.ir.graph import MergeGraph
from mergelang.ir.ops import Attrs, Op
from mergelang.ir.types import is_floating
from mergelang.lang import ast
from mergelang.lang.values import Const, ListV, Poisoned, Value
from mergelang.lang.templates import Recording

if TYPE_CHECKING:
    from mergelang.diagnostics import Span


class BlockState:
    """Block-level elaboration state of one compilation (shared by an elaborator's views)."""

    def __init__(self) -> None:
        self.blocks: tuple[ast.MergeBlock, ...] = ()
        self.nodes: dict[tuple[int, str], list[int]] = {}  # (block, tensor) -> its nodes
        self.in_progress: set[tuple[int, str]] = set()
        self.rule_hits: dict[tuple[int, int], int] = {}
        #: elaboration templates (lang/templates.py): family key -> Template
        self.templates: dict[Any, Any] = {}
        self.rule_names: dict[tuple[int, int], frozenset[str]] = {}
        self.last_match: Any = None  # match_rule's last answer


def build_blocks(el: Any, blocks: tuple[ast.MergeBlock, ...]) -> MergeGraph:
    """One OUTPUT per tensor of each block's reference model, in one graph. With named
    blocks the outputs are named `OUT/TENSOR`, and the outputs of every block for the same
    tensor name are adjacent (so an input tensor is read once for all of them)."""
    el.block_state.blocks = blocks
    refs = [el.models.get(b.source) for b in blocks]
    if any(r is None for r in refs):  # a reference model failed to open: already reported
        return el.graph
    tables = [r.tensors() for r in refs]  # type: ignore[union-attr]
    order = 0
    for name in dict.fromkeys(n for t in tables for n in t):
        for bi, (block, table) in enumerate(zip(blocks, tables)):
            if name not in table:
                continue
            el.state.tensor = name
            try:
                order = _output(el, bi, block, name, table[name], order)
            except CompileError as exc:
                el.diags.add(exc.diag, subject=name)
            except Poisoned:
                pass
    for bi, block in enumerate(blocks):
        for i, rule in enumerate(block.rules):
            if not el.block_state.rule_hits.get((bi, i)):
                el.diags.add(warning("W001", f"rule {rule.pattern.text!r} matches no tensor of "
                                     f"`{block.source}`", rule.pattern.span,
                                     "an earlier rule may match first, or the pattern has a typo"))
    return el.graph


def _output(el: Any, bi: int, block: ast.MergeBlock, name: str, info: TensorInfo, order: int) -> int:
    """Elaborate tensor `name` for `block`: its OUTPUT node(s); returns the next order."""
    rule, captures = match_rule(el, block, name)
    el.block_state.rule_hits[(bi, rule)] = el.block_state.rule_hits.get((bi, rule), 0) + 1
    expr = block.rules[rule].expr
    if block.adapter:
        return _adapter_output(el, block, name, info, expr, captures, order)
    outs = [f"{o}/{name}" for o in block.outputs] or [name]
    if not is_floating(info.dtype):
        if not (isinstance(expr, ast.Name) and expr.id == block.source):
            el.diags.add(warning("W002", f"{info.dtype} tensor `{name}` is copied from "
                                 f"`{block.source}` unchanged", expr.span,
                                 "merge rules apply to floating-point tensors only"),
                         subject=name)
        nid = el.load(block.source, name, block.source_span, raw=True)
        for out in outs:
            el.graph.make(Op.OUTPUT, [nid], Attrs(name=out, order=order, dtype=info.dtype))
            order += 1
        return order
    nids = _rule_nodes(el, bi, name)
    for ty in {el.graph.node(n).type for n in nids}:
        if ty.shape == info.shape:
            continue
        raise CompileError(error(
            "E207", f"the rule gives `{name}` shape {list(ty.shape)}, but `{block.source}` has "
            f"{list(info.shape)}", expr.span,
            "the output follows the names and shapes of the `merge from` model"))
    dtype = el.out_dtype or info.dtype
    scaled = None if el.out_dtype else _block_scale(el.models.get(block.source), name)
    for out, nid in zip(outs, nids):
        if scaled is not None:  # block-scaled FP8 like the reference (sources/fp8.py)
            scale_name, blk, fmax = scaled
            q, s = (el.graph.make(Op.BLOCK_QUANT, [nid], Attrs(block=blk, fmax=fmax, part=p),
                                  expr.span) for p in ("values", "scale_inv"))
            el.graph.make(Op.OUTPUT, [q], Attrs(name=out, order=order, dtype=dtype), expr.span)
            el.graph.make(Op.OUTPUT, [s], Attrs(name=out[: len(out) - len(name)] + scale_name,
                                                order=order + 1, dtype="float32"), expr.span)
            order += 2
            continue
        el.graph.make(Op.OUTPUT, [nid], Attrs(name=out, order=order, dtype=dtype), expr.span)
        order += 1
    return order


def _adapter_output(el: Any, block: ast.MergeBlock, name: str, info: TensorInfo, expr: ast.Expr,
                    captures: dict[str, Value], order: int) -> int:
    """A `merge adapter` block's outputs for tensor `name`, per adapter name (a list gives one
    value per name): the LoRA pair of a `low_rank(...)` rule
    (`base_model.model.MODULE.lora_A.weight` / `lora_B.weight`), a full-rank tensor
    (`base_model.model.NAME`, a module to save), or nothing for `none` and non-float tensors."""
    if not is_floating(info.dtype):
        return order
    el.state.stack = []
    value = el.eval(expr, dict(captures))
    names = block.outputs or ("",)
    items = value.items if isinstance(value, ListV) and not value.scalars else None
    if items is not None and len(items) != len(names):
        raise el.error("E313", f"this rule gives a list of {len(items)} values for "
                       f"{len(names)} adapter{'s' if len(names) != 1 else ''}", expr.span)
    for out, item in zip(names, items if items is not None else [value] * len(names)):
        order = _adapter_item(el, out, name, info, item, expr, order)
    return order


def _adapter_item(el: Any, out: str, name: str, info: TensorInfo, value: Value, expr: ast.Expr,
                  order: int) -> int:
    from mergelang.lang.values import LowRank

    if isinstance(value, Const) and value.value is None:
        return order
    prefix = f"{out}/" if out else ""
    dtype = el.out_dtype or info.dtype
    if isinstance(value, Const) and isinstance(value.value, LowRank):
        lr = value.value
        if not name.endswith(".weight"):
            raise el.error("E319", f"low_rank(...) gives a module's LoRA factors; `{name}` is "
                           "not a module weight (`.weight`)", expr.span)
        kind, suf = ("lora_embedding", "") if lr.embedding else ("lora", ".weight")
        module = name[: -len(".weight")]
        for part, nid in (("A", lr.a), ("B", lr.b)):
            el.graph.make(Op.OUTPUT, [nid], Attrs(
                name=f"{prefix}base_model.model.{module}.{kind}_{part}{suf}", order=order,
                dtype=dtype), expr.span)
            order += 1
        return order
    nid = result_node(el, value, expr.span)
    if el.graph.node(nid).type.shape != info.shape:
        raise el.error("E319", f"in an adapter, a rule gives low_rank(...), none, or the "
                       f"whole tensor `{name}` {list(info.shape)} (a module saved at full "
                       f"rank), not {list(el.graph.node(nid).type.shape)}", expr.span)
    el.graph.make(Op.OUTPUT, [nid], Attrs(name=f"{prefix}base_model.model.{name}", order=order,
                                          dtype=dtype), expr.span)
    return order + 1


def _rule_nodes(el: Any, bi: int, name: str) -> list[int]:
    """The nodes block `bi`'s rule gives for tensor `name`, one per output (built once: a block
    whose output another block uses as a model shares them). A rule applied to a family of
    same-shaped tensors is elaborated once and replayed for the others (lang/templates.py)."""
    key = (bi, name)
    if key not in el.block_state.nodes:
        block = el.block_state.blocks[bi]
        rule, captures = match_rule(el, block, name)
        family = None if el.state.recording else BlockElaboration._family(el, bi, rule, captures, name)
        template = el.block_state.templates.get(family) if family is not None else None
        if template is not None:
            el.block_state.nodes[key] = template.replay(el.graph, name, el.load)
            return el.block_state.nodes[key]
        expr = block.rules[rule].expr
        st = el.state
        saved = st.stack, st.tensor, st.name_read, st.no_template
        st.stack, st.tensor = [], name
        st.name_read = st.no_template = False
        added = el.diags.added
        el.block_state.in_progress.add(key)
        rec = Recording(el.graph) if family is not None else None
        ev = el.recording_view(rec) if rec is not None else el  # records graph.make and load
        try:
            if rec is not None:
                st.recording = True
            value = ev.eval(expr, dict(captures))
            nodes = _split(ev, value, len(block.outputs), expr.span)
            el.block_state.nodes[key] = nodes
            if rec is not None and not (st.name_read or st.no_template) and el.diags.added == added:
                template = rec.template(name, nodes)
                if template is not None:
                    el.block_state.templates[family] = template
        finally:
            st.recording = False if rec is not None else st.recording
            st.stack, st.tensor, st.name_read, st.no_template = saved
            el.block_state.in_progress.discard(key)
    return el.block_state.nodes[key]


def family_key(el: Any, bi: int, rule: int, captures: dict[str, Value], name: str) -> Any:
    """The key of the tensors a rule elaborates alike: the block, the rule, its captures and
    the tensor's shape and dtype in every model (None when the captures are not hashable)."""
    used = el.block_state.rule_names.get((bi, rule))
    if used is None:  # captures are variables of the rule's expression only (functions see
        used = el.block_state.rule_names[(bi, rule)] = ast.names_in(el.block_state.blocks[bi].rules[rule].expr)  # args)
    try:
        caps = tuple(sorted((k, v) for k, v in captures.items() if k in used))
        hash(caps)
    except TypeError:
        return None
    shapes = tuple((label, info.shape, info.dtype) for label, m in el.models.items()
                   if m is not None and m.block_output is None
                   and (info := m.tensors().get(name)) is not None)
    return (bi, rule, caps, shapes)


class BlockElaboration:
    """Not a mixin: the one replaceable policy of block elaboration. `_family` keys the tensors
    one template serves (`family_key`); tests replace it to elaborate every tensor on its own."""

    _family = family_key


def block_value(el: Any, model: str, source: ModelSource, tensor: str, span: Span, raw: bool) -> int:
    """Tensor `tensor` of a block's output used as a model (`model s = output("NAME")`)."""
    el.state.no_template = True  # another block's output: not part of a family's recording
    bi, oi = source.block_output  # type: ignore[misc]
    info = source.tensors().get(tensor)
    if info is None:
        raise el.error("E302", f"tensor `{tensor}` is missing in model `{model}` (the output "
                       f"of the block merging from `{el.block_state.blocks[bi].source}`)", span)
    if not is_floating(info.dtype):  # the block copies these from its reference model
        return el.load(el.block_state.blocks[bi].source, tensor, span, raw=True)
    if (bi, tensor) in el.block_state.in_progress:
        raise el.error("E317", f"model `{model}` is the output of a block whose rule for "
                       f"`{tensor}` uses `{model}` itself", span,
                       "an output can only use the outputs of other blocks")
    return _rule_nodes(el, bi, tensor)[oi]


def _split(el: Any, value: Value, k: int, span: Span) -> list[int]:
    """A named block with `k` outputs takes one tensor (written to each output), or a list or
    stack of exactly `k` (one per output, in order); the unnamed block (`k` = 0) one tensor."""
    if k and isinstance(value, ListV) and not value.scalars:
        if len(value.items) != k:
            raise el.error("E313", f"this rule gives a list of {len(value.items)} values for "
                           f"{k} output{'s' if k != 1 else ''}", span,
                           "a rule of a named block gives one tensor (written to every "
                           "output of the block), or one per output name (a list or a stack)")
        return [result_node(el, v, span) for v in value.items]
    if k and not isinstance(value, (Const, ListV)):
        nid = el.to_node(value, span)
        models = el.graph.node(nid).type.models
        if models:
            if models != k:
                raise el.error("E313", f"this rule gives a stack of {models} tensors for "
                               f"{k} output{'s' if k != 1 else ''}", span,
                               "a rule of a named block gives one tensor (written to every "
                               "output of the block), or one per output name (a list or a stack)")
            return [el.make(Op.INDEX, [nid], Attrs(i=i), span) for i in range(k)]
    nid = result_node(el, value, span)
    return [nid] * max(k, 1)


def match_rule(el: Any, block: ast.MergeBlock, name: str) -> tuple[int, dict[str, Value]]:
    """The first rule whose pattern (and guard) matches `name`, and its captures (the last
    answer is kept: `_output` and `_rule_nodes` ask for the same tensor in turn)."""
    last = el.block_state.last_match
    if last is not None and last[0] is block and last[1] == name:
        return last[2], dict(last[3])
    i, env = _match_rules(el, block, name)
    el.block_state.last_match = (block, name, i, env)
    return i, dict(env)


def _match_rules(el: Any, block: ast.MergeBlock, name: str) -> tuple[int, dict[str, Value]]:
    for i, rule in enumerate(block.rules):
        caps = rule.pattern.match(name)
        if caps is None:
            continue
        env: dict[str, Value] = {k: Const(v) for k, v in caps.items()}
        if rule.guard is not None:
            cond = el.eval(rule.guard, env)
            if not (isinstance(cond, Const) and isinstance(cond.value, bool)):
                raise el.error("E201", f"a rule's `if` guard must be a bool known at compile "
                               f"time, got {cond.describe()}", rule.guard.span)
            if not cond.value:
                continue
        return i, env
    raise CompileError(error("E304", f"no rule matches tensor `{name}`", block.source_span,
                             'add a catch-all rule at the end, e.g. "*" => ' + block.source))


def result_node(el: Any, value: Value, span: Span) -> int:
    if isinstance(value, Const) and type(value.value).__name__ == "LowRank":
        raise el.error("E319", "low_rank(...) gives LoRA factors, which only a `merge "
                       "adapter` block writes", span,
                       'e.g. merge adapter "a_lora" from base { "*proj.weight" => '
                       'low_rank(a - base, rank = 16)  "*" => none }')
    if isinstance(value, Const):
        raise el.error("E201", f"this rule gives {value.describe()}, not a tensor", span,
                       "a rule must produce a tensor, e.g. `base * 0.5`")
    if isinstance(value, ListV):
        raise el.error("E201", f"this rule gives {value.describe()} values, not one tensor",
                       span, "combine them, e.g. linear([a, b])")
    nid = el.to_node(value, span)
    ty = el.graph.node(nid).type
    if ty.stacked:
        raise el.error("E201", f"this rule gives a stack of {ty.models} tensors, not one",
                       span, 'reduce the model axis, e.g. sum(x, over = "models")')
    return nid


def _block_scale(model: Any, name: str) -> Any:
    """(scale tensor name, block, largest value) when `model`'s checkpoint stores `name` as
    block-scaled FP8 (sources/fp8.BlockFp8; `ModelSource.stored_block_scale`), else None."""
    return None if model is None else model.stored_block_scale(name)

