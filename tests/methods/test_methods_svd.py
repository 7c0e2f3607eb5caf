"""Parity of the SVD-based methods (tsv_merge, iso_c) with float64 references in reference_more.py,
and the linear-algebra primitives (svd, polar, matmul, concat_models)."""

from __future__ import annotations

import pytest
import torch

import mergelang as ml
import reference_more as ref

SHAPES = {"wide": (6, 20), "tall": (24, 5), "sq": (9, 9), "b": (11,), "c": (3, 2, 2), "thin": (2, 7)}


def sd(seed, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def close(out, want, rtol=2e-5, atol=2e-5):
    assert set(out) == set(want)
    for k in want:
        torch.testing.assert_close(out[k], want[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_tsv_merge(n, alpha):
    base = sd(0)
    ms = {f"m{i}": sd(1 + i) for i in range(n)}
    out = ml.merge(f"tsv_merge(base, [{', '.join(ms)}], alpha = {alpha})", base=base, **ms)
    # "thin" (2 x 7) with 3+ models keeps r = 0 triplets: the base itself. The polar factor of
    # the concatenated blocks is ill-conditioned when T r approaches min(m, n): float32 SVD vs the
    # float64 reference differ by up to ~1e-4 relative there
    close(out, {k: ref.tsv_merge(base[k], [m[k] for m in ms.values()], alpha) for k in base},
          rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("lam", [1.0, 0.4])
def test_iso_c(n, lam):
    base = sd(0)
    ms = {f"m{i}": sd(1 + i) for i in range(n)}
    out = ml.merge(f"iso_c(base, [{', '.join(ms)}], lambda = {lam})", base=base, **ms)
    close(out, {k: ref.iso_c(base[k], [m[k] for m in ms.values()], lam) for k in base})


def test_iso_c_spectrum_is_flat():
    base = {k: torch.zeros(s) for k, s in SHAPES.items()}
    a, b = sd(1), sd(2)
    out = ml.merge("iso_c(base, [a, b])", base=base, a=a, b=b)
    s = torch.linalg.svdvals(out["wide"].double())
    assert float(s.max() - s.min()) < 1e-4 * float(s.mean())


def test_linalg_primitives():
    x = sd(3)
    out = ml.merge('matmul(svd(x, "U", k = 2) * svd(x, "S", k = 2), svd(x, "Vh", k = 2))',
                   x={"m": x["wide"]})
    u, s, vh = torch.linalg.svd(x["wide"].double(), full_matrices=False)
    torch.testing.assert_close(out["m"], (u[:, :2] * s[:2] @ vh[:2]).float(), rtol=1e-5, atol=1e-5)
    out = ml.merge("polar(x)", x={"m": x["tall"]})
    q = out["m"].double()
    torch.testing.assert_close(q.T @ q, torch.eye(5, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    with pytest.raises(ml.MergelangError) as info:  # the rule's shape must match the reference
        ml.merge("concat_models([x, y], axis = 1)", x={"m": x["sq"]}, y={"m": 2 * x["sq"]})
    assert "E207" in info.value.codes


def test_svd_on_1d_is_a_type_error():
    with pytest.raises(ml.MergelangError) as info:
        ml.merge('svd(x, "S")', x={"v": torch.randn(5)})
    assert "E201" in info.value.codes


def wudi_ref(base, models):
    taus = ref.task_vectors(base, models)
    if taus[0].dim() != 2:
        return (base.double() + sum(taus) / len(taus)).float()
    taus = [t for t in taus if float(t.norm()) > 0]
    if not taus:
        return base.clone()
    a = sum(t.T @ t / t.norm() ** 2 for t in taus)
    b = sum(t @ t.T @ t / t.norm() ** 2 for t in taus)
    return (base.double() + b @ torch.linalg.pinv(a, hermitian=True)).float()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_wudi(n):
    shapes = {"tall": (12, 5), "sq": (6, 6), "b": (9,)}
    base = sd(0, shapes)
    ms = {f"m{i}": sd(1 + i, shapes) for i in range(n)}
    out = ml.merge(f"wudi(base, [{', '.join(ms)}])", base=base, **ms)
    close(out, {k: wudi_ref(base[k], [m[k] for m in ms.values()]) for k in base},
          rtol=2e-4, atol=2e-4)


def test_wudi_rank_deficient_and_zero_task_vectors():
    # (2 x 7) task vectors from 2 models: A (7 x 7) has rank 4; one model equal to the base
    shapes = {"wide": (2, 7)}
    base, a, b = sd(0, shapes), sd(1, shapes), sd(2, shapes)
    out = ml.merge("wudi(base, [a, b])", base=base, a=a, b=b)
    close(out, {"wide": wudi_ref(base["wide"], [a["wide"], b["wide"]])}, rtol=2e-4, atol=2e-4)
    out = ml.merge("wudi(base, [a, z])", base=base, a=a, z=dict(base))
    close(out, {"wide": wudi_ref(base["wide"], [a["wide"], base["wide"]])}, rtol=2e-4, atol=2e-4)
    # the optimum: the gradient sum_i (X - tau_i) tau_i^T tau_i / ||tau_i||^2 vanishes
    taus = ref.task_vectors(base["wide"], [a["wide"], b["wide"]])
    x = ml.merge("wudi(base, [a, b])", base=base, a=a, b=b)["wide"].double() - base["wide"].double()
    grad = sum((x - t) @ t.T @ t / t.norm() ** 2 for t in taus)
    assert float(grad.abs().max()) < 1e-4


def iso_cts_ref(base, models, frac, lam=1.0):
    """FusionBench's iso_cts in float64 (zero-initialised blocks, as there)."""
    taus = ref.task_vectors(base, models)
    T = len(taus)
    if taus[0].dim() != 2:
        return (base.double() + lam * sum(taus) / T).float()
    k = min(taus[0].shape)
    c = int(k * frac)
    c = k - round((k - c) / T) * T
    u, s, v = torch.linalg.svd(sum(taus), full_matrices=False)
    cu, cs, cv = u[:, :c], s[:c], v[:c, :]
    n = int((k - c) / T)
    U = torch.zeros_like(u)
    S = torch.zeros_like(s)
    V = torch.zeros_like(v)
    for i, w in enumerate(taus):
        ut, st, vt = torch.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
        U[:, i * n:(i + 1) * n] = ut[:, :n]
        S[i * n:(i + 1) * n] = st[:n]
        V[i * n:(i + 1) * n, :] = vt[:n, :]
    U[:, T * n:T * n + c] = cu
    S[T * n:T * n + c] = cs
    V[T * n:T * n + c, :] = cv
    a, _, b = torch.linalg.svd(U, full_matrices=False)
    U = a @ b
    a, _, b = torch.linalg.svd(V, full_matrices=False)
    V = a @ b
    merged = S.mean() * (U @ V)
    return (base.double() + lam * merged).float()


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("frac", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_iso_cts(n, frac):
    shapes = {"wide": (6, 20), "tall": (24, 5), "sq": (9, 9), "b": (11,)}
    base = sd(0, shapes)
    ms = {f"m{i}": sd(1 + i, shapes) for i in range(n)}
    expr = f"iso_cts(base, [{', '.join(ms)}], common_space_fraction = {frac}, lambda = 0.9)"
    if any(min(s) - round((min(s) - int(min(s) * frac)) / n) * n < 0
           for s in shapes.values() if len(s) == 2):
        with pytest.raises(ml.MergelangError) as info:  # FusionBench fails there too
            ml.merge(expr, base=base, **ms)
        assert "E203" in info.value.codes
        return
    out = ml.merge(expr, base=base, **ms)
    close(out, {k: iso_cts_ref(base[k], [m[k] for m in ms.values()], frac, 0.9) for k in base},
          rtol=2e-4, atol=2e-4)


def wudi_adam_ref(base, models, steps=300, lr=1e-5):
    """FusionBench's `wudi_merging` loop, written out: Adam on sum_i ||(X - tau_i) tau_i^T||^2 /
    ||tau_i||^2 from X = sum_i tau_i; other tensors: the mean task vector."""
    taus = torch.stack([m.float() - base.float() for m in models])
    if taus[0].dim() != 2:
        return base + taus.mean(0)
    x = torch.nn.Parameter(taus.sum(0).clone())
    opt = torch.optim.Adam([x], lr=lr, weight_decay=0)
    norms = torch.square(torch.norm(taus.reshape(len(taus), -1), p=2, dim=-1))
    for _ in range(steps):
        product = torch.matmul(x.unsqueeze(0) - taus, taus.transpose(1, 2))
        loss = torch.sum(torch.square(product) / norms.unsqueeze(-1).unsqueeze(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return base + x.detach()


@pytest.mark.parametrize("steps,lr", [(300, 1e-5), (40, 1e-2)])
def test_wudi_adam_matches_the_reference_loop(steps, lr):
    shapes = {"tall": (12, 5), "wide": (3, 10), "b": (9,)}
    base = sd(0, shapes)
    ms = {f"m{i}": sd(1 + i, shapes) for i in range(3)}
    out = ml.merge(f'wudi(base, [{", ".join(ms)}], solver = "adam", steps = {steps}, lr = {lr})',
                   base=base, **ms)
    close(out, {k: wudi_adam_ref(base[k], [m[k] for m in ms.values()], steps, lr) for k in base},
          rtol=1e-5, atol=1e-5)


def test_wudi_solvers_differ_on_a_rank_deficient_down_proj():
    """Two fine-tunes of a wide (rows < cols / 2) matrix: the Adam solver stays far from the
    minimum-norm minimiser (docs/methods.md, wudi)."""
    shapes = {"down_proj": (8, 32)}
    base, a, b = sd(0, shapes), sd(1, shapes), sd(2, shapes)
    closed = ml.merge("wudi(base, [a, b])", base=base, a=a, b=b)["down_proj"] - base["down_proj"]
    adam = ml.merge('wudi(base, [a, b], solver = "adam")', base=base, a=a, b=b)["down_proj"] - base["down_proj"]
    rel = float((adam - closed).norm() / closed.norm())
    assert rel > 0.1, rel


def test_wudi_bad_solver_and_steps():
    x = sd(0, {"w": (3, 3)})
    for expr, code in [('wudi(b, [b, b], solver = "sgd")', "E203"),
                       ('wudi(b, [b, b], solver = "adam", steps = -1)', "E203"),
                       ('wudi(b, [b, b], solver = "adam", lr = 0)', "E203")]:
        with pytest.raises(ml.MergelangError) as info:
            ml.merge(expr, b=x)
        assert code in info.value.codes, (expr, info.value.codes)
