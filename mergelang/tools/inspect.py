"""`mergelang inspect BASE MODEL... -o REPORT` and `ml.inspect(base, models)`: how far each model
moved from the base, where the models agree, in one streaming pass (docs/inspect.md).

Models are opened as a recipe's models are (compiler.open_models): folders, sharded or single
safetensors files, `hf:` ids (local cache), block-scaled FP8 (seen dequantized), and model
expressions such as `lora("adapter_dir", base = base)`. Every check that headers allow runs
before any tensor is read. Then each base tensor is read once with every model's version (a
reader thread reads ahead within the memory budget), its statistics are computed
(inspect_stats.py) and added to its layer, family, expert and the whole model, and the tensors
are freed. The report folder is written beside its destination and moved into place once
complete (outguard rules: never an input, E404; an existing folder only if it is an earlier
mergelang output and with force, E403).
"""

from __future__ import annotations

import gc
import os
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from mergelang.diagnostics import Diagnostic, Diagnostics, MergelangError, SourceFile, error, warning
from mergelang.tools.inspect_stats import FRACTIONS, Group, location, tensor_group
from mergelang.tools.inspect_totals import Totals

REPORT_FORMAT = "mergelang-inspect"
#: the dtypes inspected (block-scaled FP8 weights are loaded dequantized, other FP8 as float32)
FLOAT = ("float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2")
#: read-ahead when no memory budget is given
DEFAULT_BUDGET = 2 << 30
#: consecutive tensors are read together up to this many bytes (or 256 tensors)
BATCH_BYTES = 1 << 20
_EXPR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\s*\(")


def inspect(base: str | os.PathLike, models: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
            *, fmt: str = "json", spectrum: bool = False, spectrum_k: int = 16,
            memory_budget: int | str | None = None, device: str = "auto", force: bool = False,
            allow_pickle: bool = False, follow_symlinks: bool = False,
            log: Callable[[str], None] | None = None,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Inspect `models` against `base` and return the report (report.json's dict); with `out`,
    also write the report folder (`fmt`: "json", "html" or "png"). A model is a path, an
    `hf:ORG/NAME` id or a model expression over `base` (`lora("dir", base = base)`). Raises
    MergelangError with the diagnostics (warnings are passed to `log`)."""
    from mergelang.ir.types import parse_bytes

    if fmt not in ("json", "html", "png"):
        raise ValueError(f"fmt must be 'json', 'html' or 'png', not {fmt!r}")
    if not models:
        raise MergelangError(error("E950", "inspect needs at least one model besides the base", None,
                                   "e.g. mergelang inspect ./base ./finetuned -o report"))
    budget = parse_bytes(memory_budget) if isinstance(memory_budget, str) else memory_budget
    say = log or (lambda m: None)
    if fmt != "json" and out is not None:
        from mergelang.tools.inspect_plots import require_matplotlib

        require_matplotlib()
    with gc_paused():
        labels, sources = open_inputs(str(base), [str(m) for m in models], allow_pickle, follow_symlinks)
        try:
            folder = None
            if out is not None:
                from mergelang.tools.report_folder import ReportFolder

                inputs = [p for s in sources for p in s.input_paths()]
                folder = ReportFolder(out, force=force, protected=inputs)
            names, skipped, warns = plan_tensors(labels, sources)
            for d in warns:
                say(d.render())
            report = stream(labels, sources, names, spectrum_k if spectrum else None, device, budget,
                            progress)
            report["skipped"] = skipped
            report["inputs"] = {"base": str(base), "models": {lab: str(m) for lab, m in zip(labels[1:], models)}}
            report["warnings"] = [d.render() for d in warns]
            if folder is not None:
                folder.write(report, fmt)
            return report
        finally:
            for s in sources:
                s.close()


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for the call (as it was, after): the report of
    a checkpoint of 90k tensors is millions of dicts and floats, and the collector's passes over
    them (and over the headers' entries) took about half of inspect's time at 90k tiny tensors
    (docs/inspect.md). Objects are still freed by reference counting; cycles wait until after."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def open_inputs(base: str, models: list[str], allow_pickle: bool = False,
                follow: bool = False) -> tuple[list[str], list[Any]]:
    """The labels ("base", then one per model) and opened sources, through the recipe
    compiler's model declarations: a generated recipe declares `model base = ...` and one model
    per argument (paths and ids as overrides, resolved against the current directory; model
    expressions as written). Diagnostics (E301 missing, E303 not a checkpoint, E306 pickle,
    FP8 E320-E322, ...) are raised as MergelangError."""
    from mergelang.compiler import open_models
    from mergelang.lang.elaborate import ElabContext, Elaborator
    from mergelang.lang.loader import load
    from mergelang.sources.fp8 import dequantize_models

    labels = ["base"] + model_labels(models)
    lines, overrides = [], {}
    for label, spec in zip(labels, [base, *models]):
        if label != "base" and _EXPR.match(spec):
            lines.append(f"model {label} = {spec}")
        else:
            lines.append(f'model {label} = "<{label}>"')
            overrides[label] = spec
    lines.append('merge from base { "*" => base }')
    diags = Diagnostics()
    unit = load(SourceFile("<inspect>", "\n".join(lines) + "\n"), Path.cwd(), diags)
    diags.raise_if_errors()
    assert unit is not None
    el = Elaborator(ElabContext(unit.fns, {m.name: None for m in unit.models}, {}, diags))
    opened = open_models(unit, el, overrides, diags, allow_pickle, follow)
    opened = dequantize_models(opened, {d.name: d.value.span for d in unit.models}, diags)
    if diags.has_errors or any(opened.get(label) is None for label in labels):
        for m in opened.values():
            if m is not None:
                m.close()
        if not diags.has_errors:  # pragma: no cover - every failure to open has a diagnostic
            raise MergelangError(error("E303", "a model could not be opened"))
        raise MergelangError([_unplaced(d) for d in diags.items])
    return labels, [opened[label] for label in labels]


def _unplaced(d: Diagnostic) -> Diagnostic:
    """A diagnostic about a model given as a path: without the generated recipe line (the
    message names the path); model expressions keep theirs."""
    import dataclasses

    if d.span is not None and d.span.source.text[d.span.start:d.span.start + 2] == '"<':
        return dataclasses.replace(d, span=None)
    return d


def model_labels(specs: Sequence[str]) -> list[str]:
    """A label per model: its folder or file name made an identifier (`m1`, `m2`, ... for model
    expressions), unique, never `base`."""
    out: list[str] = []
    for i, spec in enumerate(specs, 1):
        if _EXPR.match(spec):
            name = f"m{i}"
        else:
            stem = Path(spec.removeprefix("hf:").split("@")[0].rstrip("/")).name
            stem = stem.removesuffix(".safetensors")
            name = re.sub(r"[^A-Za-z0-9_]", "_", stem).strip("_") or f"m{i}"
            if name[0].isdigit():
                name = f"m_{name}"
        cand, k = name, 2
        while cand in out or cand == "base" or cand in _KEYWORDS:
            cand, k = f"{name}_{k}", k + 1
        out.append(cand)
    return out


_KEYWORDS = {"model", "param", "merge", "from", "fn", "let", "return", "import", "option", "if",
             "else", "for", "in", "true", "false", "none", "and", "or", "not", "learn", "adapter"}


def plan_tensors(labels: list[str], sources: list[Any]) -> tuple[list[str], dict[str, str], list[Diagnostic]]:
    """The base tensors to inspect (floating, present in every model with the base's shape), the
    skipped ones with why, and warnings: W140 (tensors a model lacks), W141 (tensors only a model
    has). A shape that differs from the base's is an error (E951), found from headers."""
    table = sources[0].tensors()
    skipped: dict[str, str] = {}
    mismatched: list[str] = []
    warns: list[Diagnostic] = []
    for label, src in zip(labels[1:], sources[1:]):
        other = src.tensors()
        missing = [n for n in table if n not in other]
        extra = [n for n in other if n not in table]
        for n in missing:
            skipped[n] = f"missing in {label}"
        if missing:
            warns.append(warning("W140", f"model `{label}` lacks {len(missing)} of the base's tensors "
                                 f"({_few(missing)}): they are left out of the report", None,
                                 "the report's `skipped` lists them"))
        if extra:
            warns.append(warning("W141", f"model `{label}` has {len(extra)} tensors the base has not "
                                 f"({_few(extra)}): they are not inspected", None,
                                 "is the base the model these were fine-tuned from?"))
        for n, info in table.items():
            o = other.get(n)
            if o is not None and tuple(o.shape) != tuple(info.shape):
                mismatched.append(f"{n}: {label} {list(o.shape)} vs base {list(info.shape)}")
    if mismatched:
        raise MergelangError(error("E951", f"{len(mismatched)} tensors differ in shape from the base's "
                                   f"({_few(mismatched, 3)})", None,
                                   "inspect compares models of one architecture: are these fine-tunes "
                                   "of the base?"))
    names = []
    for n, info in table.items():
        if n in skipped:
            continue
        if info.dtype not in FLOAT:
            skipped[n] = f"{info.dtype} (not floating point)"
            continue
        names.append(n)
    return names, skipped, warns


def _few(items: Sequence[str], k: int = 5) -> str:
    return ", ".join(items[:k]) + (f" and {len(items) - k} more" if len(items) > k else "")


def stream(labels: list[str], sources: list[Any], names: list[str], spectrum_k: int | None,
           device: str, budget: int | None, progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    """One pass over `names`: read (a thread reading ahead within `budget` bytes), compute,
    aggregate. Returns the report dict without its inputs part."""
    import torch

    from mergelang.runtime.executor import resolve_device
    from mergelang.tools.inspect_small import batch_sums, entries

    try:
        dev = resolve_device(device)
    except ValueError as exc:
        raise MergelangError(error("E952", str(exc), None, "use --device auto or cpu")) from None
    models = labels[1:]
    agg = Totals(len(models))
    per_tensor: dict[str, Any] = {}
    started = time.perf_counter()
    svd_secs = 0.0
    read_secs = 0.0
    cap = budget if budget is not None else DEFAULT_BUDGET
    tables = [s.tensors() for s in sources]
    table = tables[0]
    sizes = {n: sum(t[n].nbytes for t in tables) for n in names}
    done = 0
    for batch, got, secs in read_ahead(sources, batches_of(names, sizes), sizes, cap):
        read_secs += secs
        for run, tensors, dtype in runs(batch, got, dev, spectrum_k):
            wheres = [location(name) for name in run]
            if dtype is not None:  # small tensors of one dtype: one call for the run
                sums = batch_sums(tensors, dtype, FRACTIONS)
                agg.add_rows(*sums, wheres)
                made = [(e, 0) for e in entries(*sums, models, FRACTIONS)]
            else:
                made = []
                for name, ts, where in zip(run, tensors, wheres):
                    entry, g, per_expert, secs_svd = measure_tensor(name, ts, models, spectrum_k, dev,
                                                                    where[2])
                    svd_secs += secs_svd
                    agg.add(g, where, per_expert)
                    made.append((entry, len(per_expert)))
            del tensors
            for name, where, (entry, fused) in zip(run, wheres, made):
                entry.update(shape=list(table[name].shape), layer=where[0], family=where[1],
                             expert=where[2])
                if fused:
                    entry["fused_experts"] = fused
                per_tensor[name] = entry
                done += 1
                if progress is not None:
                    progress(done, len(names))
        del got
    secs = time.perf_counter() - started
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {
        "format": REPORT_FORMAT, "version": 1, "base": labels[0], "models": models,
        "pairs": [[models[i], models[j]] for i in range(len(models)) for j in range(i + 1, len(models))],
        "energy_fractions": list(FRACTIONS), "spectrum": {"top_k": spectrum_k} if spectrum_k else None,
        "device": str(dev),
        "timing": {"seconds": secs, "read_seconds": read_secs, "svd_seconds": svd_secs if spectrum_k else None},
        **agg.to_json(models), "tensors": per_tensor,
    }


def measure_tensor(name: str, tensors: list[Any], models: list[str], spectrum_k: int | None,
                   dev: Any, expert: int | None) -> tuple[dict[str, Any], Group, list[Group], float]:
    """One tensor's entry (its numbers and spectra), its sums, the sums of each expert slice of
    a fused [E, ...] tensor (else []), and the seconds of its SVDs (`expert`: the expert number
    in its name, if any)."""
    per_expert: list[Group] = []
    if expert is None and fused_experts(name, tensors[0]):  # [E, ...]: each expert's slice
        parts = [tensor_group(tensors[0][e], [t[e] for t in tensors[1:]], spectrum_k, dev)
                 for e in range(tensors[0].shape[0])]
        per_expert = [p[0] for p in parts]
        g = Group.empty(len(models))
        for pe in per_expert:
            g.add(pe)
        g.tensors = 1
        spectra = [{"experts": [p[1][i] for p in parts]} if spectrum_k else {}
                   for i in range(len(models))]
        svd = sum(sp.get("seconds", 0.0) for p in parts for sp in p[1]) if spectrum_k else 0.0
    else:
        g, spectra = tensor_group(tensors[0], tensors[1:], spectrum_k, dev)
        svd = sum(sp.get("seconds", 0.0) for sp in spectra) if spectrum_k else 0.0
    entry = g.to_json(models)
    if spectrum_k:
        for lab, sp in zip(models, spectra):
            if sp:
                entry["models"][lab]["spectrum"] = sp
    return entry, g, per_expert, svd


def runs(batch: list[str], got: list[list[Any]], dev: Any, spectrum_k: int | None
         ) -> Iterator[tuple[list[str], list[list[Any]], Any]]:
    """The batch as runs of consecutive tensors (names, tensors, dtype): small tensors whose
    versions share a dtype, one run per dtype change, computed together (inspect_small.py;
    dtype: the one they are read in), else one tensor at a time (dtype None: large, empty,
    mixed dtypes, fused experts, --spectrum, CUDA)."""
    from mergelang.tools.inspect_small import batch_dtype

    start = 0
    while start < len(batch):
        d = None
        if dev.type == "cpu" and not spectrum_k and not fused_experts(batch[start], got[start][0]):
            d = batch_dtype(got[start])
        end = start + 1
        while d is not None and end < len(batch) and not fused_experts(batch[end], got[end][0]) \
                and batch_dtype(got[end]) == d and got[end][0].dtype == got[start][0].dtype:
            end += 1
        yield batch[start:end], got[start:end], d
        start = end


def batches_of(names: list[str], sizes: dict[str, int]) -> list[list[str]]:
    """Small tensors are read in batches (one read-ahead task per batch, not per tensor)."""
    batches: list[list[str]] = []
    filled = 0
    for n in names:
        if not batches or len(batches[-1]) >= 256 or filled >= BATCH_BYTES:
            batches.append([])
            filled = 0
        batches[-1].append(n)
        filled += sizes[n]
    return batches


#: below this average size of a tensor (all models), reads stay on the computing thread
TINY_READ_BYTES = 64 << 10


def read_ahead(sources: list[Any], batches: list[list[str]], sizes: dict[str, int], cap: int) -> Any:
    """(batch, its tensors of every source, read seconds) in order, a thread reading ahead
    while at most `cap` bytes are read and not yet consumed (always at least one batch)."""
    def read(batch: list[str]) -> tuple[list[list[Any]], float]:
        t0 = time.perf_counter()
        return [[s.load_as(n, None, view=True) for s in sources] for n in batch], time.perf_counter() - t0

    total = sum(batch_bytes(b, sizes) for b in batches)
    n = sum(len(b) for b in batches)
    if n >= 1000 and total < n * TINY_READ_BYTES:  # tiny tensors: a reader thread only contends
        for batch in batches:                       # for the GIL (as the executor's _tiny_reads)
            got, secs = read(batch)
            yield batch, got, secs
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelang-inspect") as pool:
        pending: deque = deque()
        ahead = 0  # bytes read ahead (submitted, not yet done with)
        nxt = 0
        for batch in batches:
            while nxt < len(batches) and (not pending or ahead + batch_bytes(batches[nxt], sizes) <= cap):
                pending.append(pool.submit(read, batches[nxt]))
                ahead += batch_bytes(batches[nxt], sizes)
                nxt += 1
            got, secs = pending.popleft().result()
            yield batch, got, secs
            ahead -= batch_bytes(batch, sizes)


def batch_bytes(batch: list[str], sizes: dict[str, int]) -> int:
    return sum(sizes[n] for n in batch)


def fused_experts(name: str, t: Any) -> bool:
    """A tensor holding every expert of a layer along axis 0 (`...mlp.experts.gate_up_proj`
    [E, 2I, H], `...experts.down_proj` [E, H, I], as transformers writes MoE models now)."""
    return t.dim() == 3 and ".experts." in f".{name}." and t.shape[0] > 1
