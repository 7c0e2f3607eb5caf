"""Many small tensors in one call (`mergelang inspect` on checkpoints of tens of thousands of
tiny tensors, e.g. DeepSeek-V3's 90k experts): the base and every model's versions of a batch
of tensors are concatenated (one torch op per model and batch, not one per tensor), and one
numba call runs, for each tensor's slice, the very loops a single small tensor takes
(inspect_kernels' `small_pass` and `pair_pass`, called from compiled code: no dispatch per
tensor). The numbers are those of the per-tensor calls, bit for bit (tests/tools/test_inspect_many.py).
Numba's cache keys a compiled function on its own file only: a change to the loops it calls
(inspect_kernels.py) needs a change here too, or the cached `batch_pass` keeps the old loops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from numba import njit

from mergelang.tools.inspect_kernels import JIT, SMALL, pair_pass, small_pass

if TYPE_CHECKING:
    import torch


@njit(**JIT)
def batch_pass(b, xs, bf, offs, ks, mstats, energy, pstats):  # noqa: ANN001, ANN201
    """For each tensor t (entries offs[t]:offs[t+1] of the base `b` and of every model in the
    tuple `xs`): per model j, mstats[t, j] = (‖τ‖², ‖base‖², max |τ|, zeros) and energy[t, j]
    the sums of its ks[t] largest τ²; per pair p (i < j order) pstats[t, p] = (⟨τi, τj⟩,
    agree, both)."""
    nm = len(xs)
    for t in range(offs.size - 1):
        lo, hi = offs[t], offs[t + 1]
        bt = b[lo:hi]
        kt = ks[t]
        for j in range(nm):
            ss, bss, mx, zeros, en = small_pass(bt, xs[j][lo:hi], bf, kt)
            mstats[t, j, 0] = ss
            mstats[t, j, 1] = bss
            mstats[t, j, 2] = mx
            mstats[t, j, 3] = zeros
            energy[t, j, :] = en
        p = 0
        for j in range(nm):
            for l in range(j + 1, nm):
                dot, agree, both = pair_pass(bt, xs[j][lo:hi], xs[l][lo:hi], bf)
                pstats[t, p, 0] = dot
                pstats[t, p, 1] = agree
                pstats[t, p, 2] = both
                p += 1


def batch_dtype(tensors: Sequence["torch.Tensor"]) -> "torch.dtype | None":
    """The dtype a small tensor (base and models) is read in when all its versions share one
    stored dtype (bfloat16 as stored; float64; anything else float32, as `_cpu_sums` does);
    None when they differ (it goes alone) or it is empty or not small."""
    import torch

    d = tensors[0].dtype
    n = tensors[0].numel()
    if not 0 < n <= SMALL or any(t.dtype != d for t in tensors):
        return None
    return d if d in (torch.bfloat16, torch.float64) else torch.float32


def batch_sums(group: Sequence[Sequence["torch.Tensor"]], dtype: "torch.dtype",
               fractions: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sums of tensors `group` (each: base, then every model's version; all of one stored
    dtype, read as `dtype`): numel [T] (int64), mstats [T, models, 4], energy [T, models,
    fractions] and pstats [T, pairs, 3] (float64; counts exact)."""
    import torch

    nm = len(group[0]) - 1
    sizes = np.fromiter((ts[0].numel() for ts in group), np.int64, len(group))
    offs = np.zeros(len(group) + 1, np.int64)
    np.cumsum(sizes, out=offs[1:])
    cols = [_flat_cat([ts[k] for ts in group], dtype) for k in range(nm + 1)]
    # k = ceil(f·n) in float64 as math.ceil(f * n) computes it, clipped to [1, n]
    ks = np.empty((len(group), len(fractions)), np.int64)
    for f, frac in enumerate(fractions):
        ks[:, f] = np.minimum(sizes, np.maximum(1, np.ceil(frac * sizes.astype(np.float64))))
    mstats = np.empty((len(group), nm, 4), np.float64)
    energy = np.empty((len(group), nm, len(fractions)), np.float64)
    pstats = np.empty((len(group), max(1, nm * (nm - 1) // 2), 3), np.float64)
    batch_pass(cols[0], tuple(cols[1:]), dtype == torch.bfloat16, offs, ks, mstats, energy, pstats)
    return sizes, mstats, energy, pstats[:, :nm * (nm - 1) // 2]


def _flat_cat(ts: list["torch.Tensor"], dtype: "torch.dtype") -> np.ndarray:
    """The tensors flattened and concatenated, in `dtype`, as numpy (bfloat16 as uint16 bits)."""
    import torch

    try:  # along axis 0: the flattened tensors one after the other (no reshape per tensor)
        cat = torch.cat(ts).reshape(-1) if ts[0].dim() else torch.stack(ts)
    except RuntimeError:  # other trailing shapes
        cat = torch.cat([t.reshape(-1) for t in ts])
    if cat.dtype != dtype:
        cat = cat.to(dtype)
    return cat.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else cat.numpy()


def entries(numel: np.ndarray, mstats: np.ndarray, energy: np.ndarray, pstats: np.ndarray,
            labels: Sequence[str], fractions: Sequence[float]) -> list[dict[str, Any]]:
    """Each tensor's report entry ({"tensors", "numel", "models", "pairs"}) from batch_sums'
    arrays: the dicts inspect_stats' Group.to_json makes, the same floats (IEEE sqrt and
    division, vectorised), None where a ratio's denominator is 0."""
    nm = len(labels)
    ss, bss = mstats[..., 0], mstats[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        norm, bnorm = np.sqrt(ss), np.sqrt(bss)
        rel = _none_where(norm / bnorm, bnorm == 0)
        zf = mstats[..., 3] / numel[:, None]
        en = [_none_where(energy[..., f] / ss, ss == 0) for f in range(len(fractions))]
        pairs = [(i, j) for i in range(nm) for j in range(i + 1, nm)]
        cos, agr = [], []
        for p, (i, j) in enumerate(pairs):
            den = norm[:, i] * norm[:, j]
            cos.append(_none_where(pstats[:, p, 0] / den, den == 0))
            agr.append(_none_where(pstats[:, p, 1] / pstats[:, p, 2],
                                   (pstats[:, p, 2] == 0) | np.isnan(pstats[:, p, 0])))
    # a NaN in τ: max |τ| and sign agreement undefined (null), as in Group.to_json
    mx_l = _none_where(mstats[..., 2], np.isnan(ss))
    norm_l, bnorm_l, zf_l = norm.tolist(), bnorm.tolist(), zf.tolist()
    both_l = pstats[..., 2].astype(np.int64).tolist()
    keys = [f"{f:g}" for f in fractions]
    pkeys = [f"{labels[i]}~{labels[j]}" for i, j in pairs]
    out = []
    for t, n in enumerate(numel.tolist()):
        models = {lab: {"norm": norm_l[t][j], "base_norm": bnorm_l[t][j], "rel_norm": rel[t][j],
                        "max_abs": mx_l[t][j], "zero_frac": zf_l[t][j],
                        "energy": {k: e[t][j] for k, e in zip(keys, en)}}
                  for j, lab in enumerate(labels)}
        out.append({"tensors": 1, "numel": n, "models": models,
                    "pairs": {k: {"cosine": cos[p][t], "sign_agreement": agr[p][t],
                                  "both_nonzero": both_l[t][p]} for p, k in enumerate(pkeys)}})
    return out


def _none_where(v: np.ndarray, undefined: np.ndarray) -> list:
    """v as nested lists of floats, None where `undefined`."""
    out = v.astype(object)
    out[undefined] = None
    return out.tolist()
