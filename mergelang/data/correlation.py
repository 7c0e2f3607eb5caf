"""`mergelang stats A B --data DATA --kind correlation -o C` (`ml.stats([a, b], data,
kind="correlation")`): cross-correlations of two models' activations on the same inputs, for
`align(b, to = a, by = "activations", stats = c)` (activation matching: ZipIt!, git re-basin's
activation matching, PLeaS).

The permutation groups are `align`'s own (the built-in spec from config.json, or custom group
strings, `groups=` / `--group`). An *activation site* is the input (or output) features of a
linear layer whose weight is a member of a group on that axis:

* a group's sites are the **inputs** of the layers that read its units (a member on the layer's
  input axis: `nn.Linear` weight axis 1, GPT-2 `Conv1D` axis 0), e.g. an MLP's hidden units are
  the input of its down projection (after the nonlinearity), the residual stream is the input of
  q/k/v and gate/up (after the norms) and of lm_head, a head group is the input of the output
  projection; a group no layer reads (GPT-2 / BERT query-key dims) uses the **outputs** of the
  layers that write it (a member on the output axis); a group with neither gets no statistic
  (W147) and `align(by = "activations")` leaves it in place;
* layers that read the same tensor (q/k/v, gate/up: same object in the forward pass) share one
  site, listed once (the first layer names it, the others are its `readers`).

For every site (L features) over the n activation rows (one per real token: padding never
counts; one per example for 2-D activations), with a = model A's and b = model B's features:
mean_a, mean_b, std_a, std_b (population, 1/n) and corr[i, j] = (E[a_i b_j] - mean_a_i mean_b_j)
/ max(std_a_i std_b_j, 1e-7) (ZipIt!'s clamp), accumulated in float64 and saved in float32 as
`WEIGHT:in.corr` (L x L), `WEIGHT:in.mean_a`, ... (`:out.` for output sites). The JSON
(mergelang_stats.json) lists the sites (weight, axis, side, features, readers) and, per group,
its size and sites.

Models: folders loadable by transformers (as `stats --kind gram`), or any torch module with
`module = "FILE.py:NAME"` (`--module`): NAME is an `nn.Module` class or a function returning one,
built with no arguments, whose state dict is each model's checkpoint (strict). With a module the
data must be `FILE.py:BATCHES` whose batches are tensors (the module's one positional input),
tuples (positional inputs) or dicts (keyword inputs); every row of every activation counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from mergelang.data.inputs import (DEFAULT_SEQ_LEN, Counts, Data, batches, fail, forward_errors, load_data,
                                   load_model, user_items)
from mergelang.data.sidecar import Stats, check_out, data_path, say, write_stats
from mergelang.diagnostics import Diagnostic, warning

EPS = 1e-7
PARTS = ("corr", "mean_a", "mean_b", "std_a", "std_b")


CorrelationStats = Stats  # the same record as the gram / fisher statistics


@dataclass
class Site:
    key: str  # WEIGHT:in / WEIGHT:out
    weight: str  # checkpoint name of the layer's weight
    axis: int  # the weight axis that indexes the features
    side: str  # "in" | "out"
    module: str  # module name in the torch model
    features: int
    readers: list[str] = field(default_factory=list)


@dataclass
class Runner:
    """One model to run: the module, state-dict -> checkpoint names, tokenizer (or None)."""

    model: Any
    names: dict[str, str]
    tokenizer: Any = None
    is_module: bool = False


def correlation(models: Any, data: Any, out: Any = None, *, groups: Any = (), module: Any = None,
                max_examples: int | None = None, batch_size: int | None = None,
                seq_len: int = DEFAULT_SEQ_LEN, device: str = "auto", field: str = "text",
                force: bool = False, progress: bool = False,
                log: Callable[[Diagnostic], None] | None = None) -> CorrelationStats:
    """Cross-correlation statistics of `models = [a, b]` on `data` (module docstring)."""
    from mergelang.runtime.executor import resolve_device

    if not isinstance(models, (list, tuple)) or len(models) != 2:
        raise fail("E967", f"kind correlation needs two models [a, b], got {models!r}",
                   "mergelang stats A B --kind correlation (A: the reference of align's `to`)")
    groups = (groups,) if isinstance(groups, str) else tuple(groups or ())
    if not all(isinstance(g, str) for g in groups):
        raise fail("E967", f"groups must be strings \"NAME: PATTERN@AXIS ...\", got {list(groups)!r}")
    for name, v in (("max_examples", max_examples), ("batch_size", batch_size)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise fail("E965", f"{name} must be an integer >= 1, got {v!r}")
    try:
        dev = resolve_device(device)
    except (ValueError, RuntimeError) as exc:
        raise fail("E402", str(exc)) from None
    if out is not None:
        check_out(Path(out), protected(models, data), force)
    spec = spec_of(models, groups, same_names=module is None)
    d = load_data(data, field)
    runners = [load_runner(m, module, dev) for m in models]
    sites, by_group = find_sites(runners[0], spec)
    diags = [say(log, warning("W147", f"group `{g}` has no activation: no linear layer reads or "
                               "writes its units; align(by = \"activations\") leaves it in place",
                               None, "give groups that a linear layer reads (an input axis)"))
             for g, keys in by_group.items() if not keys]
    t0 = time.perf_counter()
    counts = Counts()
    acc = accumulate(runners, sites, d, dev, batch_size or 8, seq_len, max_examples, counts, progress)
    if counts.examples == 0 or not acc or next(iter(acc.values()))["n"] == 0:
        raise fail("E961", f"data {d.source} gave no examples (or no activation rows)")
    tensors, used = finish(acc, sites)
    info = {"format": "mergelang-stats", "kind": "correlation", "models": [str(m) for m in models],
            "data": str(data), "data_sha256": d.digest, "examples": counts.examples,
            "rows": int(next(iter(acc.values()))["n"]),
            "batch_size": None if module is not None or d.batches is not None else batch_size or 8,
            "seq_len": seq_len, "spec": spec.arch, "custom_groups": list(groups),
            "groups": {g.name: {"size": g.size, "sites": [k for k in by_group[g.name] if k in used]}
                       for g in spec.groups},
            "sites": [{"key": s.key, "weight": s.weight, "axis": s.axis, "side": s.side,
                       "features": s.features, "readers": s.readers} for s in sites if s.key in used],
            "normalization": "corr = (E[a b] - mean_a mean_b) / max(std_a std_b, 1e-7) over "
                             "activation rows (real tokens), float64 sums",
            "seconds": round(time.perf_counter() - t0, 3)}
    res = CorrelationStats("correlation", tensors, info, warnings=diags)
    if out is not None:
        res.path = write_stats(res, Path(out), force, protected(models, data))
    return res


# ------------------------------------------------------------------------------ spec and models


def spec_of(models: Any, groups: tuple[str, ...], same_names: bool = True) -> Any:
    """align's spec for model A (custom `groups` or the built-in one); E967 when none fits or
    the two models differ in a spec tensor."""
    from mergelang.errors import CheckpointError
    from mergelang.io.locate import open_model
    from mergelang.sources.align.spec import SpecError, custom_spec, spec_for

    srcs = []
    for m in models:
        try:
            srcs.append(open_model("model", m))
        except CheckpointError as exc:
            raise fail(exc.code, str(exc), exc.help) from None
    try:
        shapes = [{k: tuple(v.shape) for k, v in s.tensors().items()} for s in srcs]
        config = srcs[0].config() or srcs[1].config()
    finally:
        for s in srcs:
            s.close()
    try:
        spec = custom_spec(groups, shapes[0]) if groups else spec_for(config, shapes[0])
    except SpecError as exc:
        raise fail("E967", f"cannot find align's permutation groups for {models[0]}: {exc}",
                   "give the groups as align's `groups` strings (--group / groups=)") from None
    problems = spec.check(shapes[0])
    bad = [t for t in spec.tensors() if shapes[1].get(t) != shapes[0].get(t)]
    if same_names:  # one architecture: no tensor only one model has (--module: its strict load says it)
        bad += sorted(set(shapes[0]) ^ set(shapes[1]))
    if problems or bad:
        why = problems[0] if problems else f"tensor `{bad[0]}` differs between {models[0]} and {models[1]}"
        raise fail("E967", f"correlation statistics: {why}", "two models of the same architecture and size")
    return spec


def load_runner(model: Any, module: Any, dev: Any) -> Runner:
    if module is None:
        lm = load_model(model, dev)
        return Runner(lm.model, lm.names, lm.tokenizer)
    return Runner(build_module(model, module, dev), {}, None, True)


def build_module(model: Any, module: Any, dev: Any) -> Any:
    """The torch module `module` (FILE.py:NAME, a class or a function) with `model`'s weights."""
    import torch

    from mergelang.errors import CheckpointError
    from mergelang.io.locate import open_model
    from mergelang.search.objectives import load_value

    maker = load_value(module, "module") if isinstance(module, str) else module
    try:
        net = maker() if callable(maker) and not isinstance(maker, torch.nn.Module) else maker
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code (sys.exit too): one diagnostic
        why = f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
        raise fail("E969", f"--module {module}: building the module failed: {why}") from None
    if not isinstance(net, torch.nn.Module):
        raise fail("E969", f"--module {module}: gives a {type(net).__name__}, not a torch.nn.Module",
                   "NAME must be an nn.Module class or a function returning a module")
    try:
        src = open_model("model", model)
    except CheckpointError as exc:
        raise fail(exc.code, str(exc), exc.help) from None
    try:
        state = {n: src.load(n) for n in src.tensors()}
    finally:
        src.close()
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError) as exc:
        raise fail("E969", f"--module {module}: the checkpoint {model} does not fit it: "
                   f"{str(exc).splitlines()[0]}", "the module's state dict must be the checkpoint") from None
    return net.to(dev).float().eval()


def layer_axes(mod: Any) -> tuple[int, int] | None:
    """(input axis, output axis) of a layer's weight: nn.Linear (out, in), GPT-2 Conv1D (in, out)."""
    import torch

    if isinstance(mod, torch.nn.Linear):
        return 1, 0
    if type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2:
        return 0, 1
    return None


def find_sites(r: Runner, spec: Any) -> tuple[list[Site], dict[str, list[str]]]:
    """The activation sites and, per group, the keys of its sites (inputs, else outputs)."""
    members = spec.by_tensor()
    layers = []
    for name, mod in r.model.named_modules():
        axes = layer_axes(mod)
        ck = r.names.get(name + ".weight", name + ".weight")
        if axes and ck in members:
            layers.append((name, ck, axes, tuple(mod.weight.shape)))
    sites: dict[str, Site] = {}
    by_group: dict[str, list[str]] = {}
    for g in spec.groups:
        for side, k in (("in", 0), ("out", 1)):
            keys = []
            for name, ck, axes, shape in layers:
                ax = axes[k]
                if any(gg.name == g.name and m.axis % len(shape) == ax for gg, m in members[ck]):
                    key = f"{ck}:{side}"
                    sites.setdefault(key, Site(key, ck, ax, side, name, shape[ax]))
                    keys.append(key)
            if keys:
                by_group[g.name] = keys
                break
        by_group.setdefault(g.name, [])
    return list(sites.values()), by_group


# -------------------------------------------------------------------------------- accumulation


def model_batches(r: Runner, d: Data, dev: Any, bs: int, seq_len: int, max_examples: int | None,
                  counts: Counts, module: bool) -> Iterator[tuple[tuple, dict, Any, int]]:
    """(args, kwargs, mask or None, examples) per batch."""
    import torch

    if not module:
        for b in batches(d, r.tokenizer, dev, bs, seq_len, max_examples, counts):
            yield (), b.inputs, b.mask, b.size
        return
    if d.batches is None:
        raise fail("E969", f"--module: data {d.source} is text; a torch module needs FILE.py:BATCHES "
                   "(tensors, tuples or dicts of its inputs)")
    import hashlib

    digest = hashlib.sha256()
    for k, b in enumerate(user_items(d.source, d.batches)):
        args, kw = ((b,), {}) if isinstance(b, torch.Tensor) else \
            (tuple(b), {}) if isinstance(b, (tuple, list)) else ((), dict(b)) if isinstance(b, dict) else (None, None)
        if args is None:
            raise fail("E961", f"--data {d.source}: batch {k} is a {type(b).__name__}, not a tensor, tuple or dict")
        first = next((v for v in (*args, *kw.values()) if isinstance(v, torch.Tensor)), None)
        size = first.shape[0] if first is not None and first.dim() else 1
        if max_examples is not None:
            size = min(size, max_examples - counts.examples)
            if size <= 0:
                break
            args = tuple(v[:size] if isinstance(v, torch.Tensor) else v for v in args)
            kw = {n: v[:size] if isinstance(v, torch.Tensor) else v for n, v in kw.items()}
        counts.examples += size
        for v in (*args, *kw.values()):
            if isinstance(v, torch.Tensor):
                digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        move = (lambda v: v.to(dev) if isinstance(v, torch.Tensor) else v)
        yield tuple(move(v) for v in args), {n: move(v) for n, v in kw.items()}, None, size
    d.digest = digest.hexdigest()


def capture(r: Runner, sites: list[Site], args: tuple, kw: dict, mask: Any) -> dict[str, tuple[Any, int]]:
    """{site key: (float64 rows x features, the raw tensor)} from one forward pass."""
    import torch

    mods = dict(r.model.named_modules())
    got: dict[str, tuple[Any, int]] = {}

    def hook_for(s: Site) -> Callable[..., None]:
        def hook(mod: Any, inputs: tuple, output: Any) -> None:
            x = inputs[0] if s.side == "in" else output
            flat = x.detach()
            if mask is not None and flat.shape[:-1] == mask.shape:
                flat = flat[mask]
            got[s.key] = (flat.reshape(-1, flat.shape[-1]).double(), x)  # x kept: ids stay unique
        return hook

    handles = [mods[s.module].register_forward_hook(hook_for(s)) for s in sites]
    try:
        with torch.no_grad(), forward_errors():
            r.model(*args, **kw)
    finally:
        for h in handles:
            h.remove()
    return got


def accumulate(runners: list[Runner], sites: list[Site], d: Data, dev: Any, bs: int, seq_len: int,
               max_examples: int | None, counts: Counts, progress: bool) -> dict[str, dict[str, Any]]:
    """Float64 sums per site (n, sa, sb, saa, sbb, sab) over the batches; sites that read the same
    tensor as an earlier one (in the first batch) are merged into it (`readers`)."""
    import sys

    import torch
    from tqdm import tqdm

    module = runners[0].is_module
    acc: dict[str, dict[str, Any]] = {}
    alias: dict[str, str] | None = None
    a, b = runners
    it_b = model_batches(b, d, dev, bs, seq_len, max_examples, Counts(), module) if d.batches is None else None
    with tqdm(unit="ex", desc="correlation", disable=not progress or None, file=sys.stderr) as bar:
        for args, kw, mask, size in model_batches(a, d, dev, bs, seq_len, max_examples, counts, module):
            if it_b is not None:  # B's own tokenizer on the same texts (the same batches)
                _, kw_b, mask_b, _ = next(it_b)
                if mask_b.shape != mask.shape or not torch.equal(kw_b["input_ids"], kw["input_ids"]):
                    raise fail("E967", "the two models tokenise the data differently: "
                               "correlations need the same inputs")
            xa, xb = capture(a, sites, args, kw, mask), capture(b, sites, args, kw, mask)
            if alias is None:
                alias = merge_readers(sites, xa, xb)
            for s in sites:
                if alias.get(s.key, s.key) != s.key or s.key not in xa or s.key not in xb:
                    continue
                add(acc, s.key, xa[s.key][0], xb[s.key][0])
            bar.update(size)
    for s in sites:
        if alias and alias.get(s.key, s.key) != s.key:
            acc.pop(s.key, None)
    return acc


def merge_readers(sites: list[Site], xa: dict, xb: dict) -> dict[str, str]:
    """site key -> the first site reading the same tensor (in both models); fills `readers`."""
    first: dict[tuple, Site] = {}
    alias = {}
    for s in sites:
        if s.side != "in" or s.key not in xa or s.key not in xb:
            continue
        ident = (id(xa[s.key][1]), id(xb[s.key][1]), s.features)
        owner = first.setdefault(ident, s)
        alias[s.key] = owner.key
        if owner is not s:
            owner.readers.append(s.weight)
    return alias


def add(acc: dict[str, dict[str, Any]], key: str, a: Any, b: Any) -> None:
    if a.shape != b.shape:
        raise fail("E967", f"site {key}: activations of shape {list(a.shape)} and {list(b.shape)}")
    s = acc.get(key)
    if s is None:
        z = a.new_zeros(a.shape[1])
        s = acc[key] = {"n": 0, "sa": z.clone(), "sb": z.clone(), "saa": z.clone(), "sbb": z.clone(),
                        "sab": a.new_zeros(a.shape[1], a.shape[1])}
    s["n"] += a.shape[0]
    s["sa"] += a.sum(0)
    s["sb"] += b.sum(0)
    s["saa"] += (a * a).sum(0)
    s["sbb"] += (b * b).sum(0)
    s["sab"] += a.T @ b


def finish(acc: dict[str, dict[str, Any]], sites: list[Site]) -> tuple[dict[str, Any], set[str]]:
    """The saved tensors (float32) per site, and the keys of the sites saved."""
    out: dict[str, Any] = {}
    for key, s in acc.items():
        n = s["n"]
        ma, mb = s["sa"] / n, s["sb"] / n
        sda = (s["saa"] / n - ma * ma).clamp(min=0).sqrt()
        sdb = (s["sbb"] / n - mb * mb).clamp(min=0).sqrt()
        cov = s["sab"] / n - ma[:, None] * mb[None, :]
        corr = cov / (sda[:, None] * sdb[None, :]).clamp(min=EPS)
        if not bool(corr.isfinite().all()):
            raise fail("E970", f"site {key}: the activations are not finite (NaN or inf)",
                       "check the data and the models' weights for NaN / inf values")
        for part, t in zip(PARTS, (corr, ma, mb, sda, sdb)):
            out[f"{key}.{part}"] = t.float().cpu()
    return out, set(acc)


# ---------------------------------------------------------------------------------- writing


def protected(models: Any, data: Any) -> list[Path]:
    """The model folders (and their cache repositories) and the data: never the output. (Not
    `stats.protected`: a `--module` model is a folder without config.json.)"""
    from mergelang.io.inputs import model_root

    paths = [data_path(data)]
    for m in models:
        p = Path(str(m))
        if p.exists():
            folder = p if p.is_dir() else p.parent
            paths += [folder, model_root(folder)]
    return paths
