"""The statistics of `mergelang inspect` (docs/inspect.md): per tensor, from the base tensor and
each model's tensor, the task vectors τ = model − base and additive sums over them, which add up
exactly to the statistics of a layer, a tensor family, an expert or the whole model.

Precision: τ is the float64 difference of the stored values (exact for float32, bfloat16 and
float16 inputs), and every norm, dot product and energy sum is computed and accumulated in
float64. Counts (zeros, signs) are exact. On the CPU the numba loops of inspect_kernels.py do
it; on CUDA (and as their test reference) `_torch_sums`, the same in torch.

Energy of the top p % entries: k = ceil(p · n) entries with the largest |τ| (ties: any k of
them, the sum is the same); their share of ‖τ‖². Exact: the k largest τ² are selected (on the
CPU by buckets and a radix selection, inspect_kernels.py; in torch by np.partition on the CPU,
a descending sort on CUDA) and summed. A group's share is the sum of its tensors' top-k
energies over the sum of their ‖τ‖²: what a per-tensor trim (TIES / DARE density p) keeps.

Spectrum (`--spectrum`): singular values of each 2-D τ (`torch.linalg.svdvals`, float32; the
costly part, timed in the report): the `k` largest, the stable rank Σσ²/σ₁² and the effective
rank exp(H(p)), p_i = σ_i / Σσ, H the Shannon entropy (Roy & Vetterli, 2007): 1 for a rank-1
τ, min(rows, cols) when all singular values are equal; 0 for τ = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

#: the energy fractions reported (of the entries with the largest |τ|)
FRACTIONS = (0.01, 0.05, 0.10, 0.20)


@dataclass(slots=True)
class ModelSums:
    """Additive statistics of one model's τ over a set of tensors."""

    numel: int = 0
    ss: float = 0.0  # ‖τ‖²
    base_ss: float = 0.0  # ‖base‖²
    max_abs: float = 0.0
    zeros: int = 0  # entries with τ == 0
    energy: list[float] = field(default_factory=lambda: [0.0] * len(FRACTIONS))
    eff_ranks: list[float] = field(default_factory=list)  # one per 2-D tensor (--spectrum)

    def add(self, o: "ModelSums") -> None:
        self.numel += o.numel
        self.ss += o.ss
        self.base_ss += o.base_ss
        if o.max_abs > self.max_abs:
            self.max_abs = o.max_abs
        self.zeros += o.zeros
        e, oe = self.energy, o.energy
        for i in range(len(e)):
            e[i] += oe[i]
        if o.eff_ranks:
            self.eff_ranks += o.eff_ranks

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "norm": math.sqrt(self.ss), "base_norm": math.sqrt(self.base_ss),
            "rel_norm": _ratio(math.sqrt(self.ss), math.sqrt(self.base_ss)),
            # a NaN in τ makes ‖τ‖² NaN: max |τ| is then undefined too (the CPU loops' max skips
            # NaN, torch's does not: null on both)
            "max_abs": None if math.isnan(self.ss) else self.max_abs,
            "zero_frac": _ratio(self.zeros, self.numel),
            "energy": {_key(f): _ratio(e, self.ss) for f, e in zip(FRACTIONS, self.energy)},
        }
        if self.eff_ranks:
            out["mean_effective_rank"] = sum(self.eff_ranks) / len(self.eff_ranks)
        return out


@dataclass(slots=True)
class PairSums:
    """Additive statistics of a pair of task vectors (τi, τj)."""

    dot: float = 0.0
    agree: int = 0  # entries where both are non-zero with the same sign
    both: int = 0  # entries where both are non-zero

    def add(self, o: "PairSums") -> None:
        self.dot += o.dot
        self.agree += o.agree
        self.both += o.both

    def to_json(self, si: ModelSums, sj: ModelSums) -> dict[str, Any]:
        den = math.sqrt(si.ss) * math.sqrt(sj.ss)
        undefined = math.isnan(self.dot)  # a NaN in either τ: its signs are not comparable
        return {"cosine": _ratio(self.dot, den),
                "sign_agreement": None if undefined else _ratio(self.agree, self.both),
                "both_nonzero": self.both}


def _ratio(a: float, b: float) -> float | None:
    """a / b; None (JSON null) when b is 0 (a cosine or share of a zero task vector)."""
    return a / b if b else None


def _key(f: float) -> str:
    return f"{f:g}"


@dataclass
class Group:
    """The sums of a set of tensors (a layer, a family, an expert, the model)."""

    models: list[ModelSums]
    pairs: dict[tuple[int, int], PairSums]
    tensors: int = 0

    @classmethod
    def empty(cls, n: int) -> "Group":
        return cls([ModelSums() for _ in range(n)],
                   {(i, j): PairSums() for i in range(n) for j in range(i + 1, n)})

    def add(self, o: "Group") -> None:
        self.tensors += o.tensors
        for a, b in zip(self.models, o.models):
            a.add(b)
        for k, p in o.pairs.items():
            self.pairs[k].add(p)

    def to_json(self, labels: Sequence[str]) -> dict[str, Any]:
        return {"tensors": self.tensors, "numel": self.models[0].numel if self.models else 0,
                "models": {labels[i]: m.to_json() for i, m in enumerate(self.models)},
                "pairs": {pair_key(labels[i], labels[j]): p.to_json(self.models[i], self.models[j])
                          for (i, j), p in self.pairs.items()}}


def pair_key(a: str, b: str) -> str:
    return f"{a}~{b}"


def location(name: str) -> tuple[int | None, str, int | None]:
    """(layer, family, expert) of a tensor name: the layer is the first number in the name, the
    family the name after the layer's number with the other numbers as {} (ir/names.family),
    the expert the number after `experts.`: `model.layers.3.mlp.experts.7.down_proj.weight` ->
    (3, `mlp.experts.{}.down_proj.weight`, 7); `lm_head.weight` -> (None, `lm_head.weight`, None).
    By components, not regular expressions (90k names): a number is a component of decimal
    digits in a dotted name, as names.template finds them (tests/tools/test_inspect_many.py)."""
    if "\n" in name:  # `$` in names.template's pattern also matches before a final newline
        return _location_re(name)
    parts = name.split(".")
    if len(parts) < 2:
        return None, name, None
    num = [p.isdecimal() for p in parts]
    expert = None
    for i in range(len(parts) - 2):
        if parts[i] == "experts" and num[i + 1]:
            expert = int(parts[i + 1])
            break
    if not any(num):
        return None, name, expert
    first = num.index(True)
    tpl = ".".join("{}" if d else p for p, d in zip(parts, num))
    head, _, rest = tpl.partition("{}")
    return int(parts[first]), rest.lstrip(".") or tpl, expert


def _location_re(name: str) -> tuple[int | None, str, int | None]:
    import re

    from mergelang.ir.names import template

    tpl, nums = template(name)
    m = re.search(r"(?:^|\.)experts\.(\d+)\.", name)
    expert = int(m.group(1)) if m else None
    if not nums:
        return None, name, expert
    head, _, rest = tpl.partition("{}")
    return nums[0], rest.lstrip(".") or tpl, expert


def tensor_group(base: "torch.Tensor", xs: Sequence["torch.Tensor"], spectrum_k: int | None,
                 device: "torch.device", kernel: str = "auto") -> tuple[Group, list[dict[str, Any]]]:
    """The sums of one tensor (its base and each model's version, any dtype), and with
    `spectrum_k` each model's spectrum of τ (2-D tensors only; else {}). On the CPU the numba
    loops of inspect_kernels.py (`kernel="torch"`: the torch form, as on CUDA)."""
    g = Group.empty(len(xs))
    g.tensors = 1
    if device.type == "cpu" and kernel != "torch" and base.numel():
        _cpu_sums(g, base, xs)
    else:
        _torch_sums(g, base, xs, device)
    spectra: list[dict[str, Any]] = []
    for i, x in enumerate(xs):
        sp: dict[str, Any] = {}
        if spectrum_k and base.dim() == 2 and base.numel():
            import torch

            b = base.to(device=device, dtype=torch.float64)
            sp = spectrum(x.to(device=device, dtype=torch.float64) - b, spectrum_k)
            g.models[i].eff_ranks = [] if sp["effective_rank"] is None else [sp["effective_rank"]]
        spectra.append(sp)
    return g, spectra


def flat(t: "torch.Tensor", dtype: "torch.dtype") -> Any:
    """A 1-D numpy array of `t` in `dtype` (a view when it is one already); bfloat16 as its
    uint16 bit patterns."""
    import torch

    if t.dtype != dtype:
        t = t.to(dtype)
    t = t.reshape(-1)
    return t.view(torch.int16).numpy().view("uint16") if dtype == torch.bfloat16 else t.numpy()


def read_dtype(tensors: Sequence["torch.Tensor"]) -> "torch.dtype":
    """The dtype the CPU loops read these tensors in, one numba specialisation per call:
    all bfloat16 (read as stored), else float64 if any is, else float32 (exact for float16)."""
    import torch

    kinds = {t.dtype for t in tensors}
    return torch.bfloat16 if kinds == {torch.bfloat16} else \
        torch.float64 if torch.float64 in kinds else torch.float32


def _cpu_sums(g: Group, base: "torch.Tensor", xs: Sequence["torch.Tensor"]) -> None:
    import torch

    from mergelang.tools.inspect_kernels import SMALL, model_stats, pair_pass
    from mergelang.tools.inspect_select import bracket_stats

    dtype = read_dtype((base, *xs))
    bf = dtype == torch.bfloat16
    b = flat(base, dtype)
    arrs = [flat(x, dtype) for x in xs]
    if b.size <= SMALL:  # one sorting call per model (small tensors: no bucket tables)
        for s, a in zip(g.models, arrs):
            s.numel = b.size
            s.ss, s.base_ss, s.max_abs, s.zeros, s.energy = model_stats(b, a, FRACTIONS, bf)
            s.zeros = int(s.zeros)
        for (i, j), p in g.pairs.items():
            p.dot, p.agree, p.both = pair_pass(b, arrs[i], arrs[j], bf)
            p.agree, p.both = int(p.agree), int(p.both)
        return
    parts = max(1, min(workers(), b.size // PARALLEL_MIN))
    models, pairs = bracket_stats(b, arrs, FRACTIONS, bf, parts,
                                  lambda fn, args: list(pool().map(lambda a: fn(*a), args)))
    for s, (ss, bss, mx, zeros, energy) in zip(g.models, models):
        s.numel, s.ss, s.base_ss, s.max_abs, s.zeros, s.energy = b.size, ss, bss, mx, zeros, energy
    for p, (dot, agree, both) in zip(g.pairs.values(), pairs):
        p.dot, p.agree, p.both = dot, agree, both


#: tensors smaller than this are computed on the calling thread
PARALLEL_MIN = 1 << 16
_POOL: list[Any] = []


def workers() -> int:
    import os

    return max(1, min(8, os.cpu_count() or 1))


def pool() -> Any:
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor

        _POOL.append(ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="mergelang-inspect-cpu"))
    return _POOL[0]


def _torch_sums(g: Group, base: "torch.Tensor", xs: Sequence["torch.Tensor"], device: "torch.device") -> None:
    import torch

    b = base.to(device=device, dtype=torch.float64).reshape(-1)
    n = b.numel()
    base_ss = float(torch.dot(b, b)) if n else 0.0
    taus, signs = [], []
    for i, x in enumerate(xs):
        t = x.to(device=device, dtype=torch.float64).reshape(-1) - b
        s = g.models[i]
        s.numel, s.base_ss = n, base_ss
        if n:
            s.ss = float(torch.dot(t, t))
            s.max_abs = float(t.abs().max())
            s.zeros = n - int(torch.count_nonzero(t))
            s.energy = top_energy(t)
        taus.append(t)
        signs.append(torch.sign(t).to(torch.int8) if len(xs) > 1 else None)
    for (i, j), p in g.pairs.items():
        if not n:
            continue
        p.dot = float(torch.dot(taus[i], taus[j]))
        prod = signs[i] * signs[j]
        p.both = int(torch.count_nonzero(prod))
        p.agree = (p.both + int(prod.sum(dtype=torch.int64))) // 2  # (+1s) = (both + Σ) / 2


def top_energy(t: "torch.Tensor") -> list[float]:
    """For each fraction f in FRACTIONS: the sum of the k = ceil(f·n) largest τ² (float64)."""
    import numpy as np
    import torch

    n = t.numel()
    ks = [min(n, max(1, math.ceil(f * n))) for f in FRACTIONS]
    sq = t * t
    if sq.device.type == "cpu":
        arr = sq.numpy()
        part = np.partition(arr, sorted({n - k for k in ks}))
        return [float(part[n - k:].sum()) for k in ks]
    csum = torch.sort(sq, descending=True).values.cumsum(0)
    return [float(csum[k - 1]) for k in ks]


def spectrum(t: "torch.Tensor", k: int) -> dict[str, Any]:
    """The k largest singular values of 2-D τ, its effective and stable rank."""
    import time

    import torch

    t0 = time.perf_counter()
    if not bool(torch.isfinite(t).all()):  # no SVD of NaN/Inf: the spectrum is unknown (null)
        return {"top": None, "effective_rank": None, "stable_rank": None,
                "seconds": time.perf_counter() - t0, "non_finite": True}
    sv = torch.linalg.svdvals(t.to(torch.float32)).to(torch.float64)
    total = float(sv.sum())
    secs = time.perf_counter() - t0
    if total <= 0:
        return {"top": [0.0] * min(k, sv.numel()), "effective_rank": 0.0, "stable_rank": 0.0,
                "seconds": secs}
    p = sv[sv > 0] / total
    entropy = float(-(p * p.log()).sum())
    return {"top": [float(v) for v in sv[:k]], "effective_rank": math.exp(entropy),
            "stable_rank": float((sv * sv).sum() / (sv[0] * sv[0])), "seconds": secs}


def json_safe(x: Any) -> Any:
    """`x` with every NaN / infinite float as None (JSON null): a report of models holding
    non-finite values stays valid JSON (statistics over them are undefined)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
