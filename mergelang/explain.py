"""`mergelang explain`: what a compiled recipe will do, as text or as a Graphviz picture.

- `explain_text`: which rule each group of tensors matched (layer numbers collapsed, e.g.
  `model.layers.{0..31}.mlp.up_proj.weight`), the methods each rule calls, bytes read per model and
  written, the plan's estimated peak of live tensor memory and an I/O time estimate.
- `explain_rules_dot`: the user's view as DOT: models -> rules (methods, tensor groups, bytes,
  time estimates) -> outputs; what `--format dot|svg|png` draws.
- `explain_dot`: the optimized graph as DOT (`--ops`); outputs whose subgraphs have the same structure
  (typically the same tensor in every layer) are drawn once, as one cluster labelled with the
  collapsed names and a count.
- `render`: DOT -> svg/png with Graphviz's `dot` program when it is installed.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections import defaultdict
from typing import Any, Iterable

from mergelang.io.architectures import architecture
from mergelang.lang import ast
from mergelang.compiler import Compilation
from mergelang.diagnostics import Diagnostics, MergelangError, error
from mergelang.ir.graph import MergeGraph, postorder
from mergelang.ir.names import template
from mergelang.ir.ops import Op
from mergelang.ir.types import format_bytes
from mergelang.ir.types import is_floating

ASSUMED_IO_BYTES_PER_S = 1e9  # for the time estimate: about one SSD's sequential throughput


# ---------------------------------------------------------------- collapsing names
def ranges(values: Iterable[int]) -> str:
    vs = sorted(set(values))
    parts, i = [], 0
    while i < len(vs):
        j = i
        while j + 1 < len(vs) and vs[j + 1] == vs[j] + 1:
            j += 1
        parts.append(str(vs[i]) if i == j else f"{vs[i]}..{vs[j]}" if j > i + 1 else f"{vs[i]},{vs[j]}")
        i = j + 1
    return ",".join(parts)


def collapse(names: Iterable[str]) -> list[str]:
    """Group names that differ only in their numeric components: `a.{0..31}.b` (in first-seen
    order); a group whose numbers are not a full grid also says how many tensors it has."""
    groups: dict[str, list[tuple[int, ...]]] = {}
    for n in names:
        tpl, nums = template(n)
        groups.setdefault(tpl, []).append(nums)
    out = []
    for tpl, nums in groups.items():
        if not nums[0]:
            out.append(tpl)
            continue
        if len(nums) == 1:
            out.append(tpl.format(*nums[0]))
            continue
        cols = list(zip(*nums))
        text = tpl.format(*("{" + ranges(c) + "}" if len(set(c)) > 1 else str(c[0]) for c in cols))
        grid = 1
        for c in cols:
            grid *= len(set(c))
        out.append(text if grid == len(nums) else f"{text} ({len(nums)} tensors)")
    return out


# ---------------------------------------------------------------- the text summary
def _walk(e: Any, visit: Any) -> None:
    """Call `visit(node)` on every AST node under `e` (spans excluded)."""
    visit(e)
    if dataclasses.is_dataclass(e) and not isinstance(e, type):
        for f in dataclasses.fields(e):
            if f.name != "span":
                _walk(getattr(e, f.name), visit)
    elif isinstance(e, (list, tuple)):
        for i in e:
            _walk(i, visit)


def _calls(e: Any) -> list[str]:
    """The functions an expression calls, in first-seen order."""
    out: list[str] = []
    _walk(e, lambda x: out.append(x.func) if isinstance(x, ast.Call) and x.func not in out else None)
    return out


def rule_assignment(c: Compilation, block: Any = None) -> tuple[dict[int, list[str]], list[str]]:
    """rule index -> output tensor names it produces; and the names copied raw (non-float);
    for `block` (default: the first merge block)."""
    from mergelang.lang.elaborate import ElabContext, Elaborator

    block = block or c.unit.block
    assert block is not None
    el = Elaborator(ElabContext(c.unit.fns, c.models, c.params, Diagnostics()))
    ref = c.models[block.source]
    assert ref is not None
    by_rule: dict[int, list[str]] = defaultdict(list)
    raw: list[str] = []
    for name, info in ref.tensors().items():
        el.state.tensor = name
        rule, _ = el.match(block, name)
        by_rule[rule].append(name)
        if not is_floating(info.dtype):
            raw.append(name)
    return by_rule, raw


def _rules_text(c: Compilation, block: Any, methods: dict[str, int]) -> list[str]:
    """The rules of one merge block, the tensors each produces; counts methods' tensors."""
    by_rule, raw = rule_assignment(c, block)
    k = max(len(block.outputs), 1)
    lines = ["rules (first match wins):"]
    for i, rule in enumerate(block.rules):
        names = by_rule.get(i, [])
        guard = f" if {_one_line(rule.guard.span.text)}" if rule.guard is not None else ""
        lines.append(f"  [{i + 1}] {rule.pattern.span.text}{guard} => {_one_line(rule.expr.span.text)}")
        calls = _calls(rule.expr)
        if calls:
            lines.append(f"      calls: {', '.join(calls)}")
        for fn in calls:
            methods[fn] = methods.get(fn, 0) + len(names) * k
        if not names:
            lines.append("      matches no tensor")
            continue
        lines.append(f"      {len(names)} tensor{'s' if len(names) != 1 else ''}:")
        lines += [f"        {n}" for n in collapse(names)]
    if raw:
        lines.append(f"  copied unchanged (not floating point): {', '.join(collapse(raw))}")
    return lines


def _fp8_lines(c: Compilation) -> list[str]:
    """Block-scaled FP8 models: how they are read, and the output's format."""
    from mergelang.ir.types import plural
    from mergelang.sources.fp8 import BlockFp8

    out = []
    for name, m in c.models.items():
        if isinstance(m, BlockFp8):
            dtypes = sorted({m.tensors()[w].dtype for w in m.scales})
            out.append(f"`{name}` is block-scaled FP8 ({', '.join(dtypes)}, {m.block[0]}x{m.block[1]} "
                       f"blocks, {plural(len(m.scales), 'weight')}): read as float values")
    if out:
        fp8_out = any(n.op is Op.BLOCK_QUANT for _, n in c.optimized.items())
        out.append("output: FP8 weights re-quantized per block (amax / max), quantization_config kept"
                   if fp8_out else "output: dequantized weights (no quantization_config)")
    return out


def _input_lines(c: Compilation) -> list[str]:
    """Each model and where it resolved: its folder or file, and for a Hugging Face cache
    snapshot (``hf:ORG/NAME`` or a snapshot folder) the commit it resolved to."""
    from pathlib import Path

    from mergelang.io.inputs import hf_repo_id, hf_revision

    out = ["inputs:"]
    for d in c.unit.models:
        src = c.models.get(d.name)
        folder = getattr(src, "folder", None)
        files = sorted({i.file for i in src.tensors().values() if i.file}) if src is not None else []
        where = str(folder) if folder is not None else (files[0] if len(files) == 1 else
                                                        f"{len(files)} files" if files else "in memory")
        rev = hf_revision(Path(folder)) if folder is not None else None
        hub = f"hf:{hf_repo_id(Path(folder))} at revision {rev}, " if rev else ""
        out.append(f"  {d.name}: {hub}{where}")
    return out


def _one_line(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def explain_text(c: Compilation) -> str:
    plan, g = c.plan, c.optimized
    if c.output_names:
        lines = [f"recipe {c.source.path}: {len(c.output_names)} outputs "
                 f"({', '.join(c.output_names)}; each written to OUTDIR/NAME/), "
                 f"{len(plan.outputs)} output tensors in all, computed in one graph"]
    else:
        lines = [f"recipe {c.source.path}: merge from `{c.reference}`, {len(plan.outputs)} output tensors"]
    lines += _input_lines(c)
    ref = c.models.get(c.reference)
    arch = architecture(ref.config() if ref is not None else None)
    if arch is not None:
        lines.append(f"architecture of `{c.reference}` (config.json): {arch.describe()}")
    lines += _fp8_lines(c)
    methods: dict[str, int] = {}
    for block in c.unit.blocks:
        lines.append("")
        if block.outputs:
            lines.append(f"merge {', '.join(map(repr, block.outputs))} from `{block.source}`:")
        lines += _rules_text(c, block, methods)
    lines.append("")
    lines.append("methods: " + (", ".join(f"{m} ({n} tensors)" for m, n in methods.items()) or "none"))
    lines.append("")
    reads: dict[str, int] = defaultdict(int)
    seen = set()
    for _, n in g.items():
        if n.op is Op.LOAD and (n.attrs["model"], n.attrs["tensor"]) not in seen:
            seen.add((n.attrs["model"], n.attrs["tensor"]))
            reads[n.attrs["model"]] += n.type.with_(dtype=n.attrs["src_dtype"]).nbytes
    lines.append(f"reads {format_bytes(plan.read_bytes)}: " +
                 ", ".join(f"{m} {format_bytes(b)}" for m, b in sorted(reads.items())))
    lines.append(f"writes {format_bytes(plan.write_bytes)} ({_dtypes(g)})")
    lines.append(f"estimated peak memory: {format_bytes(plan.peak_bytes)} of live tensors (float32 compute)")
    extra = 0
    if plan.prepasses:  # model-wide statistics: streaming passes before the merge
        rounds = [max((s.rounds for s in plan.stats if s.level == i), default=1)
                  for i in range(len(plan.prepasses))]
        extra = sum(r * pp.read_bytes for r, pp in zip(rounds, plan.prepasses))
        lines.append(f"model-wide statistics: {len(plan.stats)}, computed by {sum(rounds)} "
                     f"streaming pass(es) before the merge, reading {format_bytes(extra)} more")
    secs = (plan.read_bytes + extra + plan.write_bytes) / ASSUMED_IO_BYTES_PER_S
    lines.append(f"estimated time: about {secs:.1f}s of disk I/O at 1 GB/s, plus compute")
    ops: dict[str, int] = defaultdict(int)
    for _, n in g.items():
        ops[n.op.value] += 1
    lines.append(f"graph: {g.number_of_nodes()} nodes (" +
                 ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])) + ")")
    return "\n".join(lines) + "\n"


def _dtypes(g: MergeGraph) -> str:
    counts: dict[str, int] = defaultdict(int)
    for _, n in g.items():
        if n.op is Op.OUTPUT:
            counts[n.attrs["dtype"]] += 1
    return ", ".join(f"{n} {d}" for d, n in sorted(counts.items()))


# ---------------------------------------------------------------- the picture
def num(v: Any) -> str:
    """A number as the user wrote it: a float by the shortest text that rounds to it at 15
    significant digits (0.6, not 0.6000000000000001 from 1 - 0.4); other values as str."""
    if isinstance(v, float) and not isinstance(v, bool):
        if v != v or v in (float("inf"), float("-inf")):
            return str(v)
        return repr(float(f"{v:.15g}"))
    return str(v)


def _node_label(n: Any, out_name: str) -> str:
    if n.op is Op.LOAD:
        t = n.attrs["tensor"]
        return f"load {n.attrs['model']}" + ("" if t == out_name else f"[{template(t)[0]}]")
    if n.op is Op.CONST:
        return num(n.attrs["value"])
    if n.op is Op.OUTPUT:
        return f"write {n.attrs['dtype']}"
    extra = [f"{k}={num(v)}" for k, v in sorted(dict(n.attrs).items()) if k in ("kind", "over", "density")]
    return n.op.value + (f"\n{' '.join(extra)}" if extra else "")


def _subgraph(g: MergeGraph, out: int) -> list[int]:
    """The output's ancestors, depth first in argument order (a canonical order per output)."""
    order: list[int] = []
    postorder(g, out, set(), order.append)
    return order


def _structure(g: MergeGraph, out: int) -> tuple[tuple, list[int]]:
    """A key equal for outputs computed the same way (constants may differ), and the nodes."""
    nodes = _subgraph(g, out)
    local = {nid: i for i, nid in enumerate(nodes)}
    name = g.node(out).attrs["name"]
    sig = tuple(("const" if g.node(nid).op is Op.CONST else _node_label(g.node(nid), name),
                 tuple(local[a] for a in g.node(nid).args)) for nid in nodes)
    return sig, nodes


def _const_label(values: list[Any]) -> str:
    distinct = sorted(set(values), key=repr)
    if len(distinct) == 1:
        return num(distinct[0])
    if all(isinstance(v, (int, float)) for v in distinct):
        return f"{min(distinct):.4g} .. {max(distinct):.4g}\n({len(distinct)} values)"
    return f"{len(distinct)} values"


def _names(e: Any) -> set[str]:
    """The names an expression mentions (models among them)."""
    out: set[str] = set()
    _walk(e, lambda x: out.add(x.id) if isinstance(x, ast.Name) else None)
    return out


def rule_head(rule: Any, width: int = 100) -> str:
    """A rule's pattern and guard, one line: `"model.layers.{i}.mlp.*" if i >= 2`."""
    guard = f" if {rule.guard.span.text}" if rule.guard is not None else ""
    return _one_line(rule.pattern.span.text + guard, width)


def rule_reads(c: Compilation, block: Any, names: list[str], rule: Any) -> list[str]:
    """The models whose tensors a rule's outputs read (LOADs in the optimized graph: a model
    the rule names but never reads, e.g. folded away, gets no edge); for a rule that matches no
    tensor, the models its expression names."""
    if not names:
        return sorted(_names(rule.expr) & set(c.models))
    g = c.optimized
    outs = {g.node(o).attrs["name"]: o for o in g.outputs()}
    full = [f"{o}/{n}" for o in block.outputs for n in names] if block.outputs else names
    seen: set[int] = set()
    models: set[str] = set()
    for n in full:
        if n in outs:
            postorder(g, outs[n], seen, lambda nid: models.add(g.node(nid).attrs["model"])
                      if g.node(nid).op is Op.LOAD else None)
    return sorted(m for m in models if m in c.models)


def explain_rules_dot(c: Compilation) -> str:
    """The user's view as DOT: models -> rules (pattern, methods, the tensor groups they produce,
    bytes written, an I/O time estimate) -> outputs. `explain_dot` draws the op-level graph."""
    g = c.optimized
    written = {g.node(o).attrs["name"]: g.node(o).type.nbytes for o in g.outputs()}
    lines = ["digraph mergelang {", "  rankdir=LR;", '  node [shape=box, fontname="Helvetica", fontsize=10];',
             '  graph [fontname="Helvetica", fontsize=11];']
    for name, src in c.models.items():
        size = sum(i.nbytes for i in src.tensors().values()) if src is not None else 0
        lines.append(f'  m_{name} [label="{_esc(name)}\\n{format_bytes(size)}", shape=ellipse];')
    for b, block in enumerate(c.unit.blocks):
        by_rule, _ = rule_assignment(c, block)
        outs = block.outputs or ("OUTDIR",)
        for o in outs:
            lines.append(f'  o_{b}_{re.sub(r"[^A-Za-z0-9_]", "_", o)} [label="{_esc(o)}", '
                         'style=filled, fillcolor="#e8f0fe"];')
        for i, rule in enumerate(block.rules):
            names = by_rule.get(i, [])
            nbytes = sum(written.get(n, 0) for n in names) if not block.outputs else \
                sum(written.get(f"{o}/{n}", 0) for o in block.outputs for n in names)
            groups = collapse(names)
            shown = "\\n".join(_esc(x) for x in groups[:4]) + (f"\\n... {len(groups) - 4} more groups"
                                                                if len(groups) > 4 else "")
            calls = ", ".join(_calls(rule.expr)) or "copy"
            secs = nbytes / ASSUMED_IO_BYTES_PER_S
            label = (f"[{i + 1}] {_esc(rule_head(rule, 60))}\\n{_esc(calls)}\\n"
                     f"{len(names)} tensors, {format_bytes(nbytes)} written, "
                     f"{'<0.01' if secs < 0.01 else f'~{secs:.2f}'} s of I/O at 1 GB/s"
                     + (f"\\n{shown}" if names else "\\nmatches no tensor"))
            rid = f"r_{b}_{i}"
            lines.append(f'  {rid} [label="{label}"{", style=dashed" if not names else ""}];')
            for m in rule_reads(c, block, names, rule):
                lines.append(f"  m_{m} -> {rid};")
            if names:
                for o in outs:
                    lines.append(f'  {rid} -> o_{b}_{re.sub(r"[^A-Za-z0-9_]", "_", o)};')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _rule_of(c: Compilation) -> dict[str, tuple[int, int]]:
    """Output tensor name (as in the graph) -> (block index, rule index) that produced it."""
    out: dict[str, tuple[int, int]] = {}
    for b, block in enumerate(c.unit.blocks):
        by_rule, _ = rule_assignment(c, block)
        for i, names in by_rule.items():
            for n in names:
                for full in ([f"{o}/{n}" for o in block.outputs] if block.outputs else [n]):
                    out[full] = (b, i)
    return out


def explain_dot(c: Compilation) -> str:
    """The optimized graph as DOT, one cluster per rule: the rule's tensors are drawn once, by
    the structure most of them share (the same op graph, constants aside: the constant's label
    shows its range); tensors the optimizer simplified differently (e.g. slerp at t = 0) are
    named in the cluster's label, not drawn again. Four layers or four hundred: one cluster."""
    g = c.optimized
    rule_of = _rule_of(c)
    rules: dict[Any, dict[tuple, list[tuple[int, list[int]]]]] = {}
    for out in g.outputs():
        sig, nodes = _structure(g, out)
        key = rule_of.get(g.node(out).attrs["name"], ("?", sig))
        rules.setdefault(key, {}).setdefault(sig, []).append((out, nodes))
    lines = ["digraph mergelang {", "  rankdir=LR;", '  node [shape=box, fontname="Helvetica", fontsize=10];',
             '  graph [fontname="Helvetica", fontsize=11];']
    ordered = sorted(rules.items(), key=lambda kv: kv[0] if isinstance(kv[0][0], int) else (1 << 30, 0))
    for k, (key, variants) in enumerate(ordered):
        sig, members = max(variants.items(), key=lambda kv: len(kv[1]))
        names = collapse(g.node(o).attrs["name"] for o, _ in members)
        label = "\\n".join(_esc(x) for x in names[:6]) + \
            (f"\\n... ({len(names) - 6} more groups)" if len(names) > 6 else "")
        if isinstance(key[0], int):
            block = c.unit.blocks[key[0]]
            head = f"[{key[1] + 1}] {rule_head(block.rules[key[1]], 60)}"
            label = f"{_esc(head)}\\n{label}"
        count = f" ({len(members)} tensors)" if len(members) > 1 else ""
        others = [o for s, ms in variants.items() if s != sig for o, _ in ms]
        if others:
            shown = collapse(g.node(o).attrs["name"] for o in others)
            more = ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")
            count += f"\\nalso {len(others)} tensors simplified differently (not drawn): {_esc(more)}"
        lines.append(f"  subgraph cluster_{k} {{")
        lines.append(f'    label="{label}{count}";')
        for i, (text, args) in enumerate(sig):
            if text == "const":
                text = _const_label([g.node(nodes[i]).attrs["value"] for _, nodes in members])
            if text.startswith("load"):
                shape = ", shape=ellipse"
            elif text.startswith("write"):
                shape = ', style=filled, fillcolor="#e8f0fe"'
            elif not args:
                shape = ", shape=plaintext"  # a constant
            else:
                shape = ""
            lines.append(f'    g{k}_{i} [label="{_esc(text)}"{shape}];')
            for a in args:
                lines.append(f"    g{k}_{a} -> g{k}_{i};")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _esc(text: str) -> str:
    """Text for a DOT label: backslashes and quotes escaped, line breaks as DOT's `\\n`."""
    return "\\n".join(x.replace("\\", "\\\\").replace('"', '\\"') for x in text.splitlines())


def render(dot_text: str, fmt: str) -> bytes:
    """Render DOT with Graphviz (`dot -Tsvg|png`); E707 when `dot` is not installed."""
    exe = shutil.which("dot")
    if exe is None:
        raise MergelangError(error("E707", f"cannot render {fmt}: Graphviz's `dot` program is not "
                                   "installed", None, "install Graphviz (e.g. apt install graphviz), "
                                   "or use --format html (drawn without Graphviz), or write DOT with --format dot "
                                   "and render it elsewhere"))
    proc = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode(), capture_output=True,
                          timeout=120)
    if proc.returncode != 0:
        raise MergelangError(error("E707", f"dot failed: {proc.stderr.decode(errors='replace').strip()}"))
    return proc.stdout


def emit_text(c: Compilation, stage: str, memory_budget: int | str | None = None) -> str:
    """`Recipe.emit`: the stable text of a compiler stage (ast, graph, optimized or plan; with a
    `memory_budget`: the plan split into row chunks for it, as a run executes it)."""
    from mergelang.compiler import EMIT_STAGES
    from mergelang.ir.graph import format_graph
    from mergelang.ir.types import parse_bytes
    from mergelang.passes.plan import format_plan

    if stage == "ast":
        return ast.dump(c.unit.program) + "\n"
    if stage == "graph":
        return format_graph(c.graph)
    if stage == "optimized":
        return format_graph(c.optimized)
    if stage == "plan":
        names = c.output_names
        head = (f"# outputs: {', '.join(names)} (each written to OUTDIR/NAME/; "
                "tensors named NAME/TENSOR below)\n" if names else "")
        from mergelang.passes.pipeline import Target, plan_for

        budget = parse_bytes(memory_budget) if memory_budget is not None else None
        return head + format_plan(plan_for(c.plan, Target.cpu(budget)).plan)
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(EMIT_STAGES)}")
