"""Iso-C, TSV-M, Iso-CTS and OPCM on rank-deficient task vectors (fine-tunes with dead ReLU units:
rows and columns of zeros, low rank). The singular vectors of zero singular values are not
determined (any basis of a null space); mergelang writes 0 there (`determined_svd`), so:

- the rows of dead units stay exactly the base's up to rounding (a full U Vh would put mean(S)
  along an arbitrary null-space direction into them);
- the float32 and float64 (option compute_dtype) runs agree, as do independent float64 numpy
  computations of the same rule (tolerance: numpy's matrix_rank)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mergelang as ml

M, N = 16, 12
DEAD_ROWS, DEAD_COL = [3, 7], 5


def _models(t: int, low_rank: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(10 + t)
    base = torch.randn(M, N, generator=g)
    out = {"base": {"w": base}}
    for i in range(t):
        if low_rank is not None and i == 0:  # a fine-tune of rank `low_rank`
            tau = torch.randn(M, low_rank, generator=g) @ torch.randn(low_rank, N, generator=g) * 0.01
        else:
            tau = torch.randn(M, N, generator=g) * 0.01
        tau[DEAD_ROWS] = 0.0
        tau[:, DEAD_COL] = 0.0
        out[f"m{i}"] = {"w": base + tau}
    return out


def _run(rule: str, models: dict, compute: str = "float32") -> torch.Tensor:
    names = [k for k in models if k != "base"]
    src = "".join(f'model {k} = "x"\n' for k in models)
    src += f'option compute_dtype = "{compute}"\noption dtype = "float64"\n'
    src += 'merge from base { "*" => ' + rule.replace("MODELS", ", ".join(names)) + " }\n"
    return ml.compile(src, **models).evaluate()["w"]


def _tvs(models: dict) -> list[np.ndarray]:
    base = models["base"]["w"].double().numpy()
    return [models[k]["w"].double().numpy() - base for k in models if k != "base"]


def _det(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy's thin SVD restricted to the singular values above matrix_rank's tolerance."""
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    keep = s > s[0] * max(x.shape) * np.finfo(np.float32).eps
    return u[:, keep], s, vh[keep]


def _polar(x: np.ndarray) -> np.ndarray:
    u, _, vh = _det(x)
    return u @ vh


RULES = {
    "iso_c": "iso_c(base, [MODELS])",
    "tsv_merge": "tsv_merge(base, [MODELS])",
    "iso_cts": "iso_cts(base, [MODELS], common_space_fraction = 0.5)",
    "opcm": "opcm(base, [MODELS], alpha = 0.5)",
}


@pytest.mark.parametrize("name", list(RULES))
def test_dead_units_stay_at_the_base_and_precisions_agree(name: str) -> None:
    models = _models(3, low_rank=2)
    base = models["base"]["w"].double()
    out32 = _run(RULES[name], models)
    out64 = _run(RULES[name], models, "float64")
    moved = (out64 - base).abs()
    assert float(moved[DEAD_ROWS].max()) < 1e-6 * float(moved.max())  # nothing written there
    torch.testing.assert_close(out32, out64, rtol=1e-6, atol=1e-5 * float(moved.max()))


def test_iso_c_equals_the_determined_float64_formula() -> None:
    models = _models(2)
    tvs = _tvs(models)
    total = sum(tvs)
    want = models["base"]["w"].double().numpy() + np.mean(np.linalg.svd(total, compute_uv=False)) * _polar(total)
    got = _run(RULES["iso_c"], models, "float64").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_tsv_merge_equals_the_determined_float64_formula() -> None:
    """τ1 has rank 2 < r = 6 triplets kept per model: 4 of its kept singular vectors are not
    determined; written as 0 they drop out of the orthogonalisation."""
    models = _models(2, low_rank=2)
    tvs = _tvs(models)
    r = min(M, N) // len(tvs)
    us, ss, vs = [], [], []
    for t in tvs:
        u, s, vh = np.linalg.svd(t, full_matrices=False)
        keep = s > s[0] * max(t.shape) * np.finfo(np.float32).eps
        us.append((u * keep)[:, :r])
        ss.append(s[:r])
        vs.append((vh * keep[:, None])[:r])
    tau = _polar(np.concatenate(us, axis=1)) @ np.diag(np.concatenate(ss)) @ _polar(np.concatenate(vs, axis=0))
    want = models["base"]["w"].double().numpy() + tau
    got = _run(RULES["tsv_merge"], models, "float64").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
