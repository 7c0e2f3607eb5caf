"""A hostile pass over `mergelang inspect` (notes/hostileinspect.md): the one-pass brackets of
large tensors (tools/inspect_select.py) on τ built against them (ties at the k-th boundary,
periods of the sampler's block, τ placed at or away from the sampled entries, sparse, two
values, subnormals, the SMALL boundary sizes), float64 task vectors whose products underflow
(a pair's both-non-zero count), and whole reports of small, odd tensors (mixed dtypes, 0-dim,
empty, odd names, per-expert and fused experts, a tensor one model lacks, three models, two
threads at once): every number against a float64 torch computation written here."""

from __future__ import annotations

import gc
import json
import math
import re
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mergelang as ml
from mergelang.tools import inspect_select as sel
from mergelang.tools.inspect_small import batch_sums
from mergelang.tools.inspect_stats import FRACTIONS, flat, tensor_group

FR = (0.01, 0.05, 0.1, 0.2)
NUM = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


def piece(b: torch.Tensor, xs: list[torch.Tensor]) -> tuple[list[dict], list[dict]]:
    """One tensor's (or expert slice's) sums per model and per pair, float64, τ² sorted."""
    b = b.double().reshape(-1)
    n = b.numel()
    taus = [x.double().reshape(-1) - b for x in xs]
    ms = []
    for t in taus:
        sq = torch.sort(t * t, descending=True).values
        ks = [min(n, max(1, math.ceil(f * n))) for f in FR]
        ms.append({"numel": n, "ss": float((t * t).sum()), "bss": float((b * b).sum()),
                       "mx": float(t.abs().max()) if n else 0.0, "zeros": int((t == 0).sum()),
                       "en": [float(sq[:k].sum()) if n else 0.0 for k in ks]})
    ps = []
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            si, sj = torch.sign(taus[i]), torch.sign(taus[j])
            both = (si != 0) & (sj != 0)
            ps.append({"dot": float((taus[i] * taus[j]).sum()), "agree": int((both & (si == sj)).sum()),
                           "both": int(both.sum())})
    return ms, ps


def empty(nm: int) -> dict:
    return {"tensors": 0, "m": [{"numel": 0, "ss": 0.0, "bss": 0.0, "mx": 0.0, "zeros": 0, "en": [0.0] * 4} for _ in range(nm)],
                "p": [{"dot": 0.0, "agree": 0, "both": 0} for _ in range(nm * (nm - 1) // 2)]}


def add(g: dict, ms: list[dict], ps: list[dict], tensors: int = 1) -> None:
    g["tensors"] += tensors
    for a, o in zip(g["m"], ms):
        for k in ("numel", "ss", "bss", "zeros"):
            a[k] += o[k]
        a["mx"] = max(a["mx"], o["mx"])
        a["en"] = [x + y for x, y in zip(a["en"], o["en"])]
    for a, o in zip(g["p"], ps):
        for k in a:
            a[k] += o[k]


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def as_json(g: dict, labels: list[str]) -> dict:
    out = {"tensors": g["tensors"], "numel": g["m"][0]["numel"], "models": {}, "pairs": {}}
    for lab, m in zip(labels, g["m"]):
        nrm, bn = math.sqrt(m["ss"]), math.sqrt(m["bss"])
        out["models"][lab] = {"norm": nrm, "base_norm": bn, "rel_norm": ratio(nrm, bn), "max_abs": m["mx"],
                                  "zero_frac": ratio(m["zeros"], m["numel"]),
                                  "energy": {f"{f:g}": ratio(e, m["ss"]) for f, e in zip(FR, m["en"])}}
    pairs = [(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels))]
    for (i, j), p in zip(pairs, g["p"]):
        den = math.sqrt(g["m"][i]["ss"]) * math.sqrt(g["m"][j]["ss"])
        out["pairs"][f"{labels[i]}~{labels[j]}"] = {
            "cosine": ratio(p["dot"], den), "sign_agreement": ratio(p["agree"], p["both"]), "both_nonzero": p["both"]}
    return out


def where(name: str) -> tuple[int | None, str, int | None]:
    nums = [int(m.group()) for m in NUM.finditer(name)]
    m = re.search(r"(?:^|\.)experts\.(\d+)\.", name)
    ex = int(m.group(1)) if m else None
    if not nums:
        return None, name, ex
    tpl = NUM.sub("{}", name)
    return nums[0], tpl.partition("{}")[2].lstrip(".") or tpl, ex


def reference(base: dict, models: list[dict], labels: list[str]) -> dict:
    """report.json's total, layers, families, experts and tensors, from docs/inspect.md."""
    nm = len(models)
    total, layers, fams, experts, tensors = empty(nm), {}, {}, {}, {}
    for name, b in base.items():
        if any(name not in m for m in models) or not b.is_floating_point():
            continue
        xs = [m[name] for m in models]
        lay, fam, ex = where(name)
        g, fused = empty(nm), ex is None and b.dim() == 3 and ".experts." in f".{name}." and b.shape[0] > 1
        for e in range(b.shape[0]) if fused else [None]:
            ms, ps = piece(b, xs) if e is None else piece(b[e], [x[e] for x in xs])
            add(g, ms, ps, 0 if fused else 1)
            if (e if fused else ex) is not None:
                add(experts.setdefault(e if fused else ex, empty(nm)), ms, ps)
        g["tensors"] = 1
        for t in [total, fams.setdefault(fam, empty(nm))] + ([layers.setdefault(lay, empty(nm))] if lay is not None else []):
            add(t, g["m"], g["p"])
        tensors[name] = {**as_json(g, labels), "shape": list(b.shape), "layer": lay, "family": fam, "expert": ex}
        if fused:
            tensors[name]["fused_experts"] = b.shape[0]
    return {"total": as_json(total, labels), "layers": {str(k): as_json(v, labels) for k, v in layers.items()},
            "families": {k: as_json(v, labels) for k, v in fams.items()},
            "experts": {str(k): as_json(v, labels) for k, v in experts.items()}, "tensors": tensors}


def compare(got, want, path: str = "") -> list[str]:
    """Every number: counts and None exactly, floats to rel 1e-9 (energies: top-k by a sort)."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return [f"{path}: keys differ"]
        return [e for k in want for e in compare(got[k], want[k], f"{path}/{k}")]
    if isinstance(want, float) and isinstance(got, float):
        return [] if math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-300) else [f"{path}: {got} != {want}"]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


def models_on_disk(tmp_path, base: dict, models: list[dict]) -> tuple[str, list[str]]:
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i, m in enumerate(models):
        paths.append(str(tmp_path / f"ft{i}.safetensors"))
        save_file(m, paths[-1])
    return str(tmp_path / "base.safetensors"), paths


# -- float64 task vectors whose products underflow: both non-zero, yet τa·τb == 0 ----------------

def tiny_f64(n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(n)
    t = torch.randn(n, generator=g, dtype=torch.float64) * 1e-170
    t2 = -3 * t
    t2[::3] *= -1
    t2[::5] = 0
    return torch.zeros(n, dtype=torch.float64), [t, t2, torch.randn(n, generator=g, dtype=torch.float64)]


@pytest.mark.parametrize("n,bracket", [(50, True), (100003, True), (100003, False), (200003, True)])
def test_float64_products_that_underflow_still_count_as_both_nonzero(n, bracket, monkeypatch):
    monkeypatch.setattr(sel, "USE_BRACKET", bracket)
    b, xs = tiny_f64(n)
    g, _ = tensor_group(b, xs, None, torch.device("cpu"))
    _, want = piece(b, xs)
    got = [(p.agree, p.both) for p in g.pairs.values()]
    assert got == [(w["agree"], w["both"]) for w in want]
    assert got[0][1] == n - math.ceil(n / 5)  # τ1 is 0 at every fifth entry, τ0 nowhere


def test_float64_underflow_in_the_batched_small_tensors():
    b, xs = tiny_f64(40)
    group = [[b[:25], *[x[:25] for x in xs]], [b[25:], *[x[25:] for x in xs]]]
    _, _, _, pstats = batch_sums(group, torch.float64, FRACTIONS)
    for t, ts in enumerate(group):
        _, want = piece(ts[0], list(ts[1:]))
        assert [tuple(p[1:]) for p in pstats[t].tolist()] == [(w["agree"], w["both"]) for w in want]


# -- the brackets against τ built to defeat them -------------------------------------------------

def sampled(n: int) -> torch.Tensor:
    """The entries the sampler reads (inspect_select.sample_sq), as a mask."""
    step = sel.sample_step(n)
    i = np.arange(n // step, dtype=np.uint64)
    h = (i * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.from_numpy((i * np.uint64(step) + (h & np.uint64(step - 1))).astype(np.int64))] = True
    return mask


def hostile(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    r = lambda: torch.rand(n, generator=g, dtype=torch.float64)
    t = torch.zeros(n, dtype=torch.float64)
    k = math.ceil(0.01 * n)
    if kind == "boundary_ties":  # the 1 % boundary inside 6 copies, the 5-20 % inside half the entries
        t[:k - 1], t[k - 1:k + 5], t[k + 5:n // 2] = 3.0, 1.0, 0.5
        t = t[torch.randperm(n, generator=g)]
    elif kind.startswith("period"):
        per = int(kind[6:])
        idx = torch.arange(n)
        t = torch.where(idx % per == 5, 7.0, 0.001).double() * (1 + (idx % 3).double())
    elif kind == "at_sampled":  # the sample sees one value, the rest are all different
        t = 0.9 + 0.2 * r()
        t[sampled(n)] = 1.0
    elif kind == "away_from_sampled":  # 1.5 % large entries, none of them sampled
        t = r() * 1e-3
        t[~sampled(n) & (r() < 0.015)] = 5.5
    elif kind == "sparse":
        t[torch.randperm(n, generator=g)[:n // 1000]] = r()[:n // 1000] + 0.5
    elif kind == "two_values":
        t = torch.where(r() < 0.3, 1.0, 0.5).double()
    elif kind == "subnormal":
        t = torch.tensor(1e-45).double() * torch.randint(1, 5, (n,), generator=g).double()
    elif kind == "outlier":
        t = r() * 1e-3
        t[n // 3] = 1e30
    return t * torch.where(r() < 0.5, -1.0, 1.0).double()


KINDS = ["boundary_ties", "period64", "period128", "period4096", "at_sampled", "away_from_sampled",
         "sparse", "two_values", "subnormal", "outlier"]


@pytest.mark.parametrize("n", [16385, 32768, 65537, (1 << 21) + 1])
def test_brackets_are_exact_on_hostile_task_vectors(n):
    g = torch.Generator().manual_seed(n)
    base = torch.zeros(n)
    kinds = KINDS if n < 1 << 20 else ["period64", "at_sampled", "away_from_sampled"]  # step 64
    xs = [(base.double() + hostile(kind, n, g)).float() for kind in kinds]
    models, pairs = sel.bracket_stats(flat(base, torch.float32), [flat(x, torch.float32) for x in xs],
                                      FRACTIONS, False, 2, None)
    want_m = [piece(base, [x])[0][0] for x in xs]
    for kind, (ss, bss, mx, zeros, energy), w in zip(kinds, models, want_m):
        assert (mx, zeros, bss) == (w["mx"], w["zeros"], w["bss"]), kind
        assert ss == pytest.approx(w["ss"], rel=1e-12), kind
        assert energy == pytest.approx(w["en"], rel=1e-12), kind
    _, want_p = piece(base, xs[:2])
    assert pairs[0][1:] == (want_p[0]["agree"], want_p[0]["both"])
    assert pairs[0][0] == pytest.approx(want_p[0]["dot"], rel=1e-12)


# -- whole reports of small, odd tensors -------------------------------------------------------

def odd_checkpoints() -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(7)
    rn = lambda *s: torch.randn(*s, generator=g)
    dts = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    base = {}
    for i, nm in enumerate(f"model.layers.{layer}.{x}" for layer in range(3) for x in
                           ["self_attn.q_proj.weight", "mlp.experts.17.up_proj.weight", "norm.weight"]):
        base[nm] = rn(4, 5).to(dts[i % 4])
    base.update({"scalar": torch.tensor(1.5), "model.layers.1.s": torch.tensor(2.5, dtype=torch.bfloat16),
                 "empty.0.w": torch.zeros(0, 3), "weird..name.5.x": rn(7), "ünïcode.層.3.重み": rn(6),
                 "3.leading": rn(6), "line\nbreak.2.w": rn(3), "model.layers.01.x": rn(5),
                 "model.layers.1.x ": rn(5), "ints": torch.arange(6), "mixed.2.w": rn(9),
                 "model.layers.4.mlp.experts.gate_up_proj": rn(4, 3, 2),
                 "model.layers.4.mlp.experts.down_proj": rn(3, 2, 3).to(torch.bfloat16),
                 "model.layers.4.mlp.experts.5.x": rn(2, 2, 3), "big.7.w": rn(20000).half()})

    def fine_tune(j: int) -> dict:
        m = {k: (v.double() + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype)
             if v.is_floating_point() else v.clone() for k, v in base.items()}
        m["mixed.2.w"] = m["mixed.2.w"].to(torch.bfloat16) if j == 1 else m["mixed.2.w"]
        m["model.layers.2.norm.weight"] = base["model.layers.2.norm.weight"].clone()  # τ = 0
        if j == 2:
            del m["model.layers.0.self_attn.q_proj.weight"]
        return m
    return base, [fine_tune(j) for j in range(3)]


def test_every_number_of_a_report_of_odd_small_tensors(tmp_path):
    base, models = odd_checkpoints()
    b, paths = models_on_disk(tmp_path, base, models)
    ml.inspect(b, paths, tmp_path / "rep", fmt="json")
    got = json.loads((tmp_path / "rep" / "report.json").read_text(encoding="utf-8"))
    want = reference(base, models, ["ft0", "ft1", "ft2"])
    assert [e for key in want for e in compare(got[key], want[key], key)] == []
    assert set(got["skipped"]) == {"ints", "model.layers.0.self_attn.q_proj.weight"}


def test_two_inspects_at_once_and_the_collector_after(tmp_path):
    base, models = odd_checkpoints()
    b, paths = models_on_disk(tmp_path, base, models)
    out: dict[int, object] = {}

    def one(i: int) -> None:
        try:
            out[i] = ml.inspect(b, paths[:2 + i])
        except Exception as exc:  # noqa: BLE001 - any failure is reported by the asserts below
            out[i] = exc

    assert gc.isenabled()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert gc.isenabled()
    for i in range(2):
        want = reference(base, models[:2 + i], ["ft0", "ft1", "ft2"][:2 + i])
        assert isinstance(out[i], dict)
        assert [e for key in want for e in compare(json.loads(json.dumps(out[i][key])), want[key], key)] == []


@pytest.mark.parametrize("n", [12, 40_000])
def test_nan_model_has_null_max_abs_and_sign_agreement(tmp_path, n):
    """A NaN in a model's τ leaves max |τ| and the pair's sign agreement undefined: null in
    report.json on the small-tensor path, the large-tensor path and the aggregates (the CPU
    loops' max skips NaN, torch's does not: both now say null)."""
    import mergelang as ml
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g)
    a, b = base + 0.1 * torch.randn(n, generator=g), base + 0.1 * torch.randn(n, generator=g)
    a[3] = float("nan")
    for lab, t in (("base", base), ("a", a), ("b", b)):
        (tmp_path / lab).mkdir()
        save_file({"model.layers.0.mlp.up_proj.weight": t.reshape(-1, 4).contiguous()},
                  str(tmp_path / lab / "model.safetensors"))
    rep = ml.inspect(str(tmp_path / "base"), [str(tmp_path / "a"), str(tmp_path / "b")])
    for group in (rep["tensors"]["model.layers.0.mlp.up_proj.weight"], rep["layers"]["0"], rep["total"]):
        assert group["models"]["a"]["max_abs"] is None
        assert group["models"]["b"]["max_abs"] == pytest.approx(float((b - base).abs().max()))
        assert group["pairs"]["a~b"]["sign_agreement"] is None
