"""`mergelang run R.mrg -o OUT --report`: what the merge did, measured inside the same streaming
run (docs/inspect.md, "run --report").

The report is the executor's observer (runtime/executor.Observer): the compute loop hands it
each LOAD's value and each output tensor (or row chunk) just before the writer gets it. It keeps
the loads an output needs (the LOAD nodes of the graph above that output that read the same
tensor name, and the reference model's tensor: the base of every task vector) until that output
is computed, then compares them: the values the merge itself has in memory, no second read. The
reference's tensor is read from its source (a view of the page cache) only when the rule does
not load it (e.g. `linear([a, b])`). One numba pass over the base, the output and every input
(report_kernels.merge_fused) gives additive sums, added per tensor, per rule (its source
line), per layer and for the whole output. The report is written into the output folder before
it is moved into place (mergelang_report.json and mergelang_report.html, its SVG drawn without
matplotlib), so the manifest lists it.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergelang.diagnostics import MergelangError, error
from mergelang.tools.inspect_stats import location
from mergelang.tools.inspect_stats import json_safe

if TYPE_CHECKING:
    import torch

REPORT_JSON = "mergelang_report.json"
REPORT_HTML = "mergelang_report.html"
#: outputs waiting to be measured on the report's thread (each holds its loads): the compute
#: thread waits beyond this
PENDING = 1


@dataclass
class RunSums:
    """Additive sums of an output against one input (report_kernels.merge_fused)."""

    numel: int = 0
    sx: float = 0.0
    st: float = 0.0
    so: float = 0.0
    sto: float = 0.0
    dox: float = 0.0
    dtt: float = 0.0
    dist: float = 0.0
    nnz: int = 0
    kept: int = 0
    against: int = 0

    def add(self, o: "RunSums") -> None:
        d, e = self.__dict__, o.__dict__
        for k in RUN_SUMS_FIELDS:
            d[k] += e[k]

    def to_json(self) -> dict[str, Any]:
        def ratio(a: float, b: float) -> float | None:
            return a / b if b else None

        nnz = self.nnz
        return {
            "kept": ratio(self.kept, nnz), "against": ratio(self.against, nnz),
            "dropped": ratio(nnz - self.kept - self.against, nnz),
            "projection": ratio(self.dtt, self.st),
            "cosine_tau": ratio(self.dtt, math.sqrt(self.st) * math.sqrt(self.sto)),
            "cosine": ratio(self.dox, math.sqrt(self.so) * math.sqrt(self.sx)),
            "distance": math.sqrt(self.dist), "rel_distance": ratio(math.sqrt(self.dist), math.sqrt(self.sx)),
            "norm_before": math.sqrt(self.sx), "norm_after": math.sqrt(self.so),
            "tau_norm": math.sqrt(self.st), "tau_norm_after": math.sqrt(self.sto),
            "numel": self.numel, "tau_nonzero": nnz,
        }


#: RunSums' fields, in order (RunSums.add: no dataclasses.fields() per call)
RUN_SUMS_FIELDS = tuple(f.name for f in fields(RunSums))


class MergeReport:
    """The run report of a compiled recipe with one output (`Recipe.run(report=True)`)."""

    def __init__(self, compilation: Any):
        c = compilation
        if c.output_names:
            raise MergelangError(error("E954", "run --report supports recipes with one output; this "
                                       f"one has named outputs ({', '.join(c.output_names)})", None,
                                       "inspect each output folder against the inputs instead: "
                                       "mergelang inspect BASE OUT/NAME ..."))
        self.reference = c.reference
        self.models = c.models
        self.ref = c.models[c.reference]
        self.rules: dict[str, tuple[str, list[str]]] = _plan(c, self.ref)
        self.lock = threading.Lock()
        self.groups: dict[str, dict[str, dict[str, RunSums]]] = {"rules": {}, "layers": {}}
        self.total: dict[str, RunSums] = {}
        self.tensors: dict[str, dict[str, RunSums]] = {}
        self.seconds = 0.0
        self.fp8: set[str] = set()  # outputs written as block-scaled FP8: not measured
        #: loads kept: tensor -> first row of the chunk (None: whole) -> model -> value
        self.held: dict[str, dict[int | None, dict[str, "torch.Tensor"]]] = {}
        self.read_again: dict[str, set[str]] = {}  # tensor -> models read for the report itself
        self._jobs: queue.Queue[Any] = queue.Queue(maxsize=PENDING)
        self._thread: threading.Thread | None = None
        self.failed: BaseException | None = None
        self.inline = False  # measure on the compute thread (set for runs with a memory budget)

    # -- the executor's observer (runtime/executor.Observer): the values the merge has in memory

    def loaded(self, node: Any, value: "torch.Tensor") -> None:
        """Keep a LOAD's value that an output's measurement needs (an input of its rule or the
        reference's tensor) until that output is computed: no second read."""
        a = node.attrs
        name = a["tensor"]
        plan = self.rules.get(name)
        if plan is None or a.get("stored") or (a["model"] != self.reference and a["model"] not in plan[1]):
            return
        rows = a.get("rows")
        with self.lock:
            chunks = self.held.setdefault(name, {})
            chunks.setdefault(None if rows is None else rows[0], {})[a["model"]] = value

    def output(self, node: Any, value: "torch.Tensor") -> None:
        """Measure an output on the report's own thread (the merge goes on meanwhile; at most
        PENDING outputs and the loads they hold wait for it), or here with `inline` (a run with
        a memory budget: no values are held beyond the output being measured)."""
        rows = node.attrs.get("rows")
        name = node.attrs["name"]
        with self.lock:
            held = self.held.get(name, {}).pop(None if rows is None else rows[0], {})
            if rows is None or rows[1] >= rows[2]:  # the tensor's last output: nothing more to keep
                self.held.pop(name, None)
        if name not in self.rules:
            return
        if self.inline:
            self.measure(name, value, None if rows is None else rows[0], held)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="mergelang-report", daemon=True)
            self._thread.start()
        self._jobs.put((name, value, None if rows is None else rows[0], held))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self.failed is None:
                    self.measure(*job)
            except BaseException as exc:  # noqa: BLE001  (raised again by close())
                self.failed = exc
            finally:
                del job
                self._jobs.task_done()
        self._jobs.task_done()

    def close(self, quiet: bool = False) -> None:
        """Wait for the outputs still being measured (and end the report's thread); a
        measurement's error is raised here (unless `quiet`: the run failed already)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        self.held.clear()
        if self.failed is not None and not quiet:
            raise self.failed

    def measure(self, name: str, out: "torch.Tensor", start: int | None,
                held: dict[str, "torch.Tensor"] | None = None) -> None:
        """Add the sums of output `out` (rows from `start`, or whole) against its inputs: the
        values `held` from the merge's own loads, read from the sources only where the merge
        did not load one (e.g. the reference of a rule that does not use it)."""
        plan = self.rules.get(name)
        if plan is None or not out.is_floating_point() or out.numel() == 0:
            return
        if out.element_size() == 1:  # FP8 codes (re-quantized per block): not comparable values
            with self.lock:
                self.fp8.add(name)
            return
        t0 = time.perf_counter()
        rule, inputs = plan
        held = held or {}

        def value(label: str) -> "torch.Tensor":
            t = held.get(label)
            if t is not None and t.shape == out.shape and t.is_floating_point() and t.element_size() > 1:
                return t
            with self.lock:
                self.read_again.setdefault(name, set()).add(label)
            src = self.models[label]
            if start is None:
                return src.load_as(name, None, view=True)
            return src.load_rows(name, None, start, start + out.shape[0], view=True)

        sums = dict(zip(inputs, run_sums(value(self.reference), [value(lab) for lab in inputs], out)))
        self._add(name, rule, sums, time.perf_counter() - t0)

    def _add(self, name: str, rule: str, sums: dict[str, RunSums], seconds: float) -> None:
        layer = location(name)[0]
        with self.lock:
            targets = [self.tensors.setdefault(name, {}), self.groups["rules"].setdefault(rule, {}),
                       self.total]
            if layer is not None:
                targets.append(self.groups["layers"].setdefault(str(layer), {}))
            for target in targets:
                for lab, s in sums.items():
                    target.setdefault(lab, RunSums()).add(s)
            self.seconds += seconds

    def to_json(self) -> dict[str, Any]:
        def conv(d: dict[str, RunSums]) -> dict[str, Any]:
            return {lab: s.to_json() for lab, s in d.items()}

        return {"format": "mergelang-run-report", "version": 1, "reference": self.reference,
                "seconds": self.seconds, "total": conv(self.total),
                "rules": {k: conv(v) for k, v in self.groups["rules"].items()},
                "layers": {k: conv(self.groups["layers"][k])
                           for k in sorted(self.groups["layers"], key=int)},
                "tensors": {k: {"rule": self.rules[k][0], "inputs": conv(v),
                                "read_again": sorted(self.read_again.get(k, ()))}
                            for k, v in self.tensors.items()},
                "not_measured": sorted(n for n in self.rules if n not in self.tensors and n not in self.fp8),
                "fp8_not_measured": sorted(self.fp8)}

    def add_files(self, files: dict[str, Any], html: bool = True) -> dict[str, Any]:
        """CheckpointWriter.finish's arguments with the report files added (the manifest then
        lists them)."""
        import json

        self.close()
        report = self.to_json()
        extra = dict(files.get("extra_files") or {})
        extra[REPORT_JSON] = json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n"
        if html:
            extra[REPORT_HTML] = report_html(report)
        return {**files, "extra_files": extra}


def _plan(c: Any, ref: Any) -> dict[str, tuple[str, list[str]]]:
    """Output tensor -> (its rule, the models whose same-named tensor the rule reads, the
    reference excluded)."""
    import networkx as nx

    from mergelang.ir.ops import Op

    g = c.graph
    ref_table = ref.tensors()
    out: dict[str, tuple[str, list[str]]] = {}
    for nid in g.outputs():
        node = g.node(nid)
        name = node.attrs["name"]
        info = ref_table.get(name)
        if info is None or node.span is None or math.prod(info.shape) == 0:  # no entries: nothing
            continue  # to measure (not "not_measured", which lists what --resume kept)
        labels = []
        for a in nx.ancestors(g, nid):
            n = g.node(a)
            if n.op is Op.LOAD and n.attrs["tensor"] == name and n.attrs["model"] != c.reference:
                src = c.models.get(n.attrs["model"])
                if src is not None and tuple(src.tensors()[name].shape) == tuple(info.shape):
                    labels.append(n.attrs["model"])
        if labels:
            out[name] = (_rule_key(node.span), sorted(set(labels)))
    return out


def _rule_key(span: Any) -> str:
    text = " ".join(span.source.text[span.start:span.end].split())
    return f"{Path(span.source.path).name}:{span.line}: {text[:80]}"


def run_sums(base: "torch.Tensor", xs: list["torch.Tensor"], out: "torch.Tensor") -> list[RunSums]:
    """The sums of `out` against each input, in one pass (parts of the entries on the pool's
    threads for a large tensor). bfloat16 data: float32 partial sums (report_kernels), the
    tensor summed again in float64 where a sum of squares falls outside their range."""
    import numpy as np
    import torch

    from mergelang.tools.inspect_stats import flat, read_dtype
    from mergelang.tools.report_kernels import FLOOR, merge_fused, merge_fused_bf16

    dtype = read_dtype((base, out, *xs))
    b, o = flat(base.cpu(), dtype), flat(out.cpu(), dtype)
    arrs = tuple(flat(x.cpu(), dtype) for x in xs)
    bf = dtype == torch.bfloat16
    tot = _sums(merge_fused_bf16 if bf else merge_fused, b, arrs, o)
    # the seven sums (squares and the signed ⟨o, x⟩, ⟨τo, τ⟩): non-finite or under FLOOR in
    # magnitude, float32 may have lost terms (report_kernels)
    sums = tot[:, :7]
    if bf and not (np.isfinite(sums).all() and (np.abs(sums) >= FLOOR).all()):
        tot = _sums(merge_fused, b, arrs, o)
    return [RunSums(b.size, *(float(v) for v in r[:7]), *(int(v) for v in r[7:])) for r in tot]


def _sums(kernel: Any, b: Any, arrs: tuple, o: Any) -> Any:
    """The (inputs, 10) sums of a report kernel over every entry, in parts on the pool."""
    import numpy as np

    from mergelang.tools.inspect_stats import PARALLEL_MIN, pool, workers

    n = b.size
    parts = max(1, min(workers(), n // PARALLEL_MIN))
    cuts = [n * p // parts for p in range(parts + 1)]
    acc = np.zeros((parts, len(arrs), 10), np.float64)
    jobs = [(b, arrs, o, cuts[p], cuts[p + 1], acc[p]) for p in range(parts)]
    if parts == 1:
        kernel(*jobs[0])
    else:
        list(pool().map(lambda a: kernel(*a), jobs))
    return acc.sum(axis=0)


def report_html(report: dict[str, Any]) -> str:
    """One self-contained page: per rule and input a table; kept fraction and cosine to each
    input by layer (inline SVG plots)."""
    import html
    import json

    def f(v: Any) -> str:
        return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    cols = ("kept", "against", "dropped", "projection", "cosine", "rel_distance", "norm_before", "norm_after")
    parts = []
    for title, groups in (("Whole output", {"all rules": report["total"]}), ("Per rule", report["rules"]),
                          ("Per layer", report["layers"])):
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(lab)}</td>"
                       + "".join(f"<td>{f(s[c])}</td>" for c in cols) + "</tr>"
                       for k, g in groups.items() for lab, s in g.items())
        parts.append(f"<h2>{title}</h2><table><tr><th></th><th>input</th>"
                     + "".join(f"<th>{c}</th>" for c in cols) + f"</tr>{rows}</table>")
    figs = ""
    from mergelang.tools.inspect_plots import line_figure_svg

    layers = list(report["layers"])
    for key, title in (("kept", "Fraction of each input's task vector kept (same sign), by layer"),
                       ("cosine", "Cosine of the output to each input, by layer")):
        inputs = sorted({lab for g in report["layers"].values() for lab in g})
        data = {"layers": [int(x) for x in layers],
                "series": {lab: [report["layers"][k].get(lab, {}).get(key) for k in layers] for lab in inputs}}
        if layers:
            block = json.dumps(json_safe(data), allow_nan=False).replace("</", "<\\/")
            figs += (f'<figure id="fig-{key}"><figcaption>{title}</figcaption>{line_figure_svg(title, data)}'
                     f'<script type="application/json" class="figure-data" data-figure="{key}">'
                     f'{block}</script></figure>')
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>mergelang run report"
            "</title><style>body{font-family:sans-serif;max-width:70em;margin:1em auto}table{border-collapse:"
            "collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body><h1>What the merge did"
            f"</h1><p>Task vectors against <code>{html.escape(report['reference'])}</code>; every number is "
            f"in {REPORT_JSON}.</p>{''.join(parts)}{figs}</body></html>\n")


def reporter_for(c: Any, executor: str, budget: int | None = None) -> "MergeReport":
    """run --report's measurements for compilation `c` (on the compute thread when a memory
    `budget` is set); E954 where it cannot measure."""
    from mergelang.diagnostics import MergelangError, error

    if executor != "local":
        raise MergelangError(error("E954", "run --report measures a local run only", None,
                                   "run without --executor ray, or inspect the output afterwards"))
    report = MergeReport(c)
    report.inline = budget is not None
    return report
