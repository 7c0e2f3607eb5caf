"""Twin-Merging (Lu et al. 2024) against the paper's construction written in plain torch: the
shared model (task arithmetic), each task's exclusive knowledge (task - shared) compressed by a
rank-r SVD, and the static merge for router weights; and the same compression written as a
multi-name adapter block (one PEFT adapter per task) from a stack of deltas."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mergelang as ml
from test_mergekit_side_by_side import llama_tensors, write_llama


def rank_r(x: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def sd(seed, base=None):
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (10, 8), "k": (4, 8)}
    return {k: torch.randn(s, generator=g) if base is None else base[k] + 0.2 * torch.randn(s, generator=g)
            for k, s in shapes.items()}


@pytest.mark.parametrize("weights,rank", [([0.7, 0.3], 2), ([1.0, 0.0], 3), ([0.5, 0.5], 16)])
def test_twin_static_matches_the_construction(weights, rank):
    base = sd(0)
    a, b = sd(1, base), sd(2, base)
    out = ml.merge(f"twin_static(task_arithmetic(base, [a, b], lambda = 0.4), [a, b], "
                   f"weights = {weights}, rank = {rank})", base=base, a=a, b=b)
    for k in base:
        shared = base[k] + 0.4 * ((a[k] - base[k]) + (b[k] - base[k]))
        want = shared + sum(w * rank_r(m[k] - shared, rank) for w, m in zip(weights, (a, b)))
        torch.testing.assert_close(out[k], want, rtol=1e-5, atol=1e-5)


def test_twin_adapters_one_per_task(tmp_path):
    base = llama_tensors(0)
    f = {"base": write_llama(tmp_path / "base", base),
         "a": write_llama(tmp_path / "a", llama_tensors(1, base, 0.05)),
         "b": write_llama(tmp_path / "b", llama_tensors(2, base, 0.05))}
    text = "".join(f'model {n} = "{p}"\n' for n, p in f.items()) + '''model shared = output("shared")
merge "shared" from base { "*" => task_arithmetic(base, [a, b], lambda = 0.5) }
merge adapter ["a_excl", "b_excl"] from base {
    "*proj.weight" => low_rank([a, b] - shared, rank = 4)
    "*"            => none
}
'''
    r = ml.compile(text)
    try:
        r.run(tmp_path / "out")
    finally:
        r.close()
    shared = load_file(str(next((tmp_path / "out" / "shared").glob("*.safetensors"))))
    name = "model.layers.1.self_attn.o_proj"
    for task in ("a", "b"):
        ad = load_file(str(tmp_path / "out" / f"{task}_excl" / "adapter_model.safetensors"))
        ft = load_file(str(tmp_path / task / "model.safetensors"))[name + ".weight"]
        prod = ad[f"base_model.model.{name}.lora_B.weight"] @ ad[f"base_model.model.{name}.lora_A.weight"]
        torch.testing.assert_close(prod, rank_r(ft - shared[name + ".weight"], 4), rtol=1e-4, atol=1e-5)
