"""Elaborating merge blocks: one OUTPUT per tensor of each block's reference model, the rule
that applies to each tensor, and a block's output used as a model by other blocks
(`model s = output("NAME")`, see sources/outputs.py). A mixin of `Elaborator`."""

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


class BlockElaboration:
    """Block-level elaboration (uses the `Elaborator`'s eval, load, make and diagnostics)."""

    # ------------------------------------------------------------------ outputs
    def build(self, *blocks: ast.MergeBlock) -> MergeGraph:
        """One OUTPUT per tensor of each block's reference model, in one graph. With named
        blocks the outputs are named `OUT/TENSOR`, and the outputs of every block for the same
        tensor name are adjacent (so an input tensor is read once for all of them)."""
        self.blocks = blocks
        refs = [self.models.get(b.source) for b in blocks]
        if any(r is None for r in refs):  # a reference model failed to open: already reported
            return self.graph
        tables = [r.tensors() for r in refs]  # type: ignore[union-attr]
        order = 0
        for name in dict.fromkeys(n for t in tables for n in t):
            for bi, (block, table) in enumerate(zip(blocks, tables)):
                if name not in table:
                    continue
                self.tensor = name
                try:
                    order = self._output(bi, block, name, table[name], order)
                except CompileError as exc:
                    self.diags.add(exc.diag, subject=name)
                except Poisoned:
                    pass
        for bi, block in enumerate(blocks):
            for i, rule in enumerate(block.rules):
                if not self.rule_hits.get((bi, i)):
                    self.diags.add(warning("W001", f"rule {rule.pattern.text!r} matches no tensor of "
                                           f"`{block.source}`", rule.pattern.span,
                                           "an earlier rule may match first, or the pattern has a typo"))
        return self.graph

    def _output(self, bi: int, block: ast.MergeBlock, name: str, info: TensorInfo, order: int) -> int:
        """Elaborate tensor `name` for `block`: its OUTPUT node(s); returns the next order."""
        rule, captures = self._match(block, name)
        self.rule_hits[(bi, rule)] = self.rule_hits.get((bi, rule), 0) + 1
        expr = block.rules[rule].expr
        if block.adapter:
            return self._adapter_output(block, name, info, expr, captures, order)
        outs = [f"{o}/{name}" for o in block.outputs] or [name]
        if not is_floating(info.dtype):
            if not (isinstance(expr, ast.Name) and expr.id == block.source):
                self.diags.add(warning("W002", f"{info.dtype} tensor `{name}` is copied from "
                                       f"`{block.source}` unchanged", expr.span,
                                       "merge rules apply to floating-point tensors only"),
                               subject=name)
            nid = self.load(block.source, name, block.source_span, raw=True)
            for out in outs:
                self.graph.make(Op.OUTPUT, [nid], Attrs(name=out, order=order, dtype=info.dtype))
                order += 1
            return order
        nids = self._rule_nodes(bi, name)
        for ty in {self.graph.node(n).type for n in nids}:
            if ty.shape == info.shape:
                continue
            raise CompileError(error(
                "E207", f"the rule gives `{name}` shape {list(ty.shape)}, but `{block.source}` has "
                f"{list(info.shape)}", expr.span,
                "the output follows the names and shapes of the `merge from` model"))
        dtype = self.out_dtype or info.dtype
        scaled = None if self.out_dtype else _block_scale(self.models.get(block.source), name)
        for out, nid in zip(outs, nids):
            if scaled is not None:  # block-scaled FP8 like the reference (sources/fp8.py)
                scale_name, blk, fmax = scaled
                q, s = (self.graph.make(Op.BLOCK_QUANT, [nid], Attrs(block=blk, fmax=fmax, part=p),
                                        expr.span) for p in ("values", "scale_inv"))
                self.graph.make(Op.OUTPUT, [q], Attrs(name=out, order=order, dtype=dtype), expr.span)
                self.graph.make(Op.OUTPUT, [s], Attrs(name=out[: len(out) - len(name)] + scale_name,
                                                      order=order + 1, dtype="float32"), expr.span)
                order += 2
                continue
            self.graph.make(Op.OUTPUT, [nid], Attrs(name=out, order=order, dtype=dtype), expr.span)
            order += 1
        return order

    def _adapter_output(self, block: ast.MergeBlock, name: str, info: TensorInfo, expr: ast.Expr,
                        captures: dict[str, Value], order: int) -> int:
        """A `merge adapter` block's outputs for tensor `name`, per adapter name (a list gives one
        value per name): the LoRA pair of a `low_rank(...)` rule
        (`base_model.model.MODULE.lora_A.weight` / `lora_B.weight`), a full-rank tensor
        (`base_model.model.NAME`, a module to save), or nothing for `none` and non-float tensors."""
        if not is_floating(info.dtype):
            return order
        self.stack = []
        value = self.eval(expr, dict(captures))
        names = block.outputs or ("",)
        items = value.items if isinstance(value, ListV) and not value.scalars else None
        if items is not None and len(items) != len(names):
            raise self.error("E313", f"this rule gives a list of {len(items)} values for "
                             f"{len(names)} adapter{'s' if len(names) != 1 else ''}", expr.span)
        for out, item in zip(names, items if items is not None else [value] * len(names)):
            order = self._adapter_item(out, name, info, item, expr, order)
        return order

    def _adapter_item(self, out: str, name: str, info: TensorInfo, value: Value, expr: ast.Expr,
                      order: int) -> int:
        from mergelang.lang.values import LowRank

        if isinstance(value, Const) and value.value is None:
            return order
        prefix = f"{out}/" if out else ""
        dtype = self.out_dtype or info.dtype
        if isinstance(value, Const) and isinstance(value.value, LowRank):
            lr = value.value
            if not name.endswith(".weight"):
                raise self.error("E319", f"low_rank(...) gives a module's LoRA factors; `{name}` is "
                                 "not a module weight (`.weight`)", expr.span)
            kind, suf = ("lora_embedding", "") if lr.embedding else ("lora", ".weight")
            module = name[: -len(".weight")]
            for part, nid in (("A", lr.a), ("B", lr.b)):
                self.graph.make(Op.OUTPUT, [nid], Attrs(
                    name=f"{prefix}base_model.model.{module}.{kind}_{part}{suf}", order=order,
                    dtype=dtype), expr.span)
                order += 1
            return order
        nid = self.result_node(value, expr.span)
        if self.graph.node(nid).type.shape != info.shape:
            raise self.error("E319", f"in an adapter, a rule gives low_rank(...), none, or the "
                             f"whole tensor `{name}` {list(info.shape)} (a module saved at full "
                             f"rank), not {list(self.graph.node(nid).type.shape)}", expr.span)
        self.graph.make(Op.OUTPUT, [nid], Attrs(name=f"{prefix}base_model.model.{name}", order=order,
                                               dtype=dtype), expr.span)
        return order + 1

    def _rule_nodes(self, bi: int, name: str) -> list[int]:
        """The nodes block `bi`'s rule gives for tensor `name`, one per output (built once: a block
        whose output another block uses as a model shares them). A rule applied to a family of
        same-shaped tensors is elaborated once and replayed for the others (lang/templates.py)."""
        key = (bi, name)
        if key not in self._block_nodes:
            block = self.blocks[bi]
            rule, captures = self._match(block, name)
            family = None if self.recording else self._family(bi, rule, captures, name)
            template = self.templates.get(family) if family is not None else None
            if template is not None:
                self._block_nodes[key] = template.replay(self.graph, name, self.load)
                return self._block_nodes[key]
            expr = block.rules[rule].expr
            saved = self.stack, self._tensor, self.name_read, self.no_template
            self.stack, self.tensor = [], name
            self.name_read = self.no_template = False
            added = self.diags.added
            self._in_progress.add(key)
            rec = Recording(self) if family is not None else None
            try:
                if rec is not None:
                    self.recording = True
                    with rec:
                        value = self.eval(expr, dict(captures))
                        nodes = self._split(value, len(block.outputs), expr.span)
                else:
                    value = self.eval(expr, dict(captures))
                    nodes = self._split(value, len(block.outputs), expr.span)
                self._block_nodes[key] = nodes
                if rec is not None and not (self.name_read or self.no_template) \
                        and self.diags.added == added:
                    template = rec.template(name, nodes)
                    if template is not None:
                        self.templates[family] = template
            finally:
                self.recording = False if rec is not None else self.recording
                self.stack, self._tensor, self.name_read, self.no_template = saved
                self._in_progress.discard(key)
        return self._block_nodes[key]

    def _family(self, bi: int, rule: int, captures: dict[str, Value], name: str) -> Any:
        """The key of the tensors a rule elaborates alike: the block, the rule, its captures and
        the tensor's shape and dtype in every model (None when the captures are not hashable)."""
        used = self._rule_names.get((bi, rule))
        if used is None:  # captures are variables of the rule's expression only (functions see
            used = self._rule_names[(bi, rule)] = ast.names_in(self.blocks[bi].rules[rule].expr)  # args)
        try:
            caps = tuple(sorted((k, v) for k, v in captures.items() if k in used))
            hash(caps)
        except TypeError:
            return None
        shapes = tuple((label, info.shape, info.dtype) for label, m in self.models.items()
                       if m is not None and m.block_output is None
                       and (info := m.tensors().get(name)) is not None)
        return (bi, rule, caps, shapes)

    def _block_value(self, model: str, source: ModelSource, tensor: str, span: Span, raw: bool) -> int:
        """Tensor `tensor` of a block's output used as a model (`model s = output("NAME")`)."""
        self.no_template = True  # another block's output: not part of a family's recording
        bi, oi = source.block_output  # type: ignore[misc]
        info = source.tensors().get(tensor)
        if info is None:
            raise self.error("E302", f"tensor `{tensor}` is missing in model `{model}` (the output "
                             f"of the block merging from `{self.blocks[bi].source}`)", span)
        if not is_floating(info.dtype):  # the block copies these from its reference model
            return self.load(self.blocks[bi].source, tensor, span, raw=True)
        if (bi, tensor) in self._in_progress:
            raise self.error("E317", f"model `{model}` is the output of a block whose rule for "
                             f"`{tensor}` uses `{model}` itself", span,
                             "an output can only use the outputs of other blocks")
        return self._rule_nodes(bi, tensor)[oi]

    def _split(self, value: Value, k: int, span: Span) -> list[int]:
        """A named block with `k` outputs takes one tensor (written to each output), or a list or
        stack of exactly `k` (one per output, in order); the unnamed block (`k` = 0) one tensor."""
        if k and isinstance(value, ListV) and not value.scalars:
            if len(value.items) != k:
                raise self.error("E313", f"this rule gives a list of {len(value.items)} values for "
                                 f"{k} output{'s' if k != 1 else ''}", span,
                                 "a rule of a named block gives one tensor (written to every "
                                 "output of the block), or one per output name (a list or a stack)")
            return [self.result_node(v, span) for v in value.items]
        if k and not isinstance(value, (Const, ListV)):
            nid = self.to_node(value, span)
            models = self.graph.node(nid).type.models
            if models:
                if models != k:
                    raise self.error("E313", f"this rule gives a stack of {models} tensors for "
                                     f"{k} output{'s' if k != 1 else ''}", span,
                                     "a rule of a named block gives one tensor (written to every "
                                     "output of the block), or one per output name (a list or a stack)")
                return [self.make(Op.INDEX, [nid], Attrs(i=i), span) for i in range(k)]
        nid = self.result_node(value, span)
        return [nid] * max(k, 1)

    def _match(self, block: ast.MergeBlock, name: str) -> tuple[int, dict[str, Value]]:
        """The first rule whose pattern (and guard) matches `name`, and its captures (the last
        answer is kept: `_output` and `_rule_nodes` ask for the same tensor in turn)."""
        last = self._last_match
        if last is not None and last[0] is block and last[1] == name:
            return last[2], dict(last[3])
        i, env = self._match_rules(block, name)
        self._last_match = (block, name, i, env)
        return i, dict(env)

    def _match_rules(self, block: ast.MergeBlock, name: str) -> tuple[int, dict[str, Value]]:
        for i, rule in enumerate(block.rules):
            caps = rule.pattern.match(name)
            if caps is None:
                continue
            env: dict[str, Value] = {k: Const(v) for k, v in caps.items()}
            if rule.guard is not None:
                cond = self.eval(rule.guard, env)
                if not (isinstance(cond, Const) and isinstance(cond.value, bool)):
                    raise self.error("E201", f"a rule's `if` guard must be a bool known at compile "
                                     f"time, got {cond.describe()}", rule.guard.span)
                if not cond.value:
                    continue
            return i, env
        raise CompileError(error("E304", f"no rule matches tensor `{name}`", block.source_span,
                                 'add a catch-all rule at the end, e.g. "*" => ' + block.source))

    def result_node(self, value: Value, span: Span) -> int:
        if isinstance(value, Const) and type(value.value).__name__ == "LowRank":
            raise self.error("E319", "low_rank(...) gives LoRA factors, which only a `merge "
                             "adapter` block writes", span,
                             'e.g. merge adapter "a_lora" from base { "*proj.weight" => '
                             'low_rank(a - base, rank = 16)  "*" => none }')
        if isinstance(value, Const):
            raise self.error("E201", f"this rule gives {value.describe()}, not a tensor", span,
                             "a rule must produce a tensor, e.g. `base * 0.5`")
        if isinstance(value, ListV):
            raise self.error("E201", f"this rule gives {value.describe()} values, not one tensor",
                             span, "combine them, e.g. linear([a, b])")
        nid = self.to_node(value, span)
        ty = self.graph.node(nid).type
        if ty.stacked:
            raise self.error("E201", f"this rule gives a stack of {ty.models} tensors, not one",
                             span, 'reduce the model axis, e.g. sum(x, over = "models")')
        return nid


def _block_scale(model: Any, name: str) -> Any:
    """(scale tensor name, block, largest value) when `model`'s checkpoint stores `name` as
    block-scaled FP8 (sources/fp8.BlockFp8; `ModelSource.stored_block_scale`), else None."""
    return None if model is None else model.stored_block_scale(name)

