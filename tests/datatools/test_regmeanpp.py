"""RegMean++ statistics (`ml.regmeanpp`, `stats --kind gram-plusplus`) against a straightforward
plain-torch re-implementation of FusionBench's RegMeanAlgorithmPlusPlus on tiny Llamas: copies of
transformers modules, the merged model built layer by layer (mean embeddings, candidate i's layer
l swapped into the merged model, FusionBench's running-average hook, its inverse-based merge),
one unpadded example at a time."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mergelang as ml
from mergelang.cli import main as cli_main
from mergelang.diagnostics import MergelangError

transformers = pytest.importorskip("transformers")

import data_models as dm  # noqa: E402

ALPHA = 0.6


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rmpp")
    a = dm.save_llama(root / "a", 0, num_hidden_layers=3)
    b = dm.save_llama(root / "b", 1, base=a, scale=0.3, num_hidden_layers=3)
    c = dm.save_llama(root / "c", 2, base=a, scale=0.3, num_hidden_layers=3)
    return {"root": root, "a": a, "b": b, "c": c, "txt": dm.write_texts(root / "d.txt", TEXTS)}


TEXTS = dm.TEXTS


@pytest.fixture(scope="module")
def pp(models) -> list:
    return ml.regmeanpp([models["a"], models["b"], models["c"]], models["txt"], alpha=ALPHA,
                        device="cpu")


def load(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def hooked_grams(model, modules: dict[str, torch.nn.Module], examples: list) -> dict[str, torch.Tensor]:
    """FusionBench's hook: a running average of X^T X / rows over the batches."""
    out: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook_for(name):
        def hook(module, inp, o):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])
            if name not in out:
                out[name], rows[name] = x.T @ x / x.shape[0], x.shape[0]
            else:
                out[name] = (out[name] * rows[name] + x.T @ x) / (rows[name] + x.shape[0])
                rows[name] += x.shape[0]
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    with torch.no_grad():
        for ids in examples:
            model(input_ids=ids)
    for h in handles:
        h.remove()
    return out


def fusionbench_merge(ws: list[torch.Tensor], gs: list[torch.Tensor], ratio: float) -> torch.Tensor:
    red = []
    for g in gs:
        diag = torch.diag(torch.ones(g.shape[0]) - ratio)
        red.append(g * (diag + torch.zeros_like(diag).fill_(ratio)))
    return (torch.inverse(sum(red)) @ sum(g @ w.T for g, w in zip(red, ws))).T


def reference(folders: list[Path], texts: list[str], ratio: float):
    cands = [load(f) for f in folders]
    merged = copy.deepcopy(cands[0])
    with torch.no_grad():
        merged.model.embed_tokens.weight.copy_(
            torch.stack([c.model.embed_tokens.weight for c in cands]).mean(0))
    examples = [dm.encode(folders[0], t) for t in texts]
    n = len(merged.model.layers)
    grams: list[dict[str, torch.Tensor]] = [{} for _ in cands]
    for layer in range(n + 1):
        per_model = []
        for i, c in enumerate(cands):
            hybrid = copy.deepcopy(merged)
            if layer < n:
                hybrid.model.layers[layer] = copy.deepcopy(c.model.layers[layer])
                prefix, target = f"model.layers.{layer}.", hybrid.model.layers[layer]
            else:
                hybrid.model.norm, hybrid.lm_head = copy.deepcopy(c.model.norm), copy.deepcopy(c.lm_head)
                prefix, target = "", torch.nn.ModuleDict({"lm_head": hybrid.lm_head})
            lins = {prefix + k: m for k, m in target.named_modules() if isinstance(m, torch.nn.Linear)}
            g = hooked_grams(hybrid, lins, examples)
            grams[i].update({k + ".weight": v for k, v in g.items()})
            per_model.append(g)
        if layer == n:
            break
        new = {}
        for name, _ in merged.model.layers[layer].named_parameters():
            ws = [dict(c.model.layers[layer].named_parameters())[name].detach() for c in cands]
            key = f"model.layers.{layer}.{name[:-len('.weight')]}"
            new[name] = fusionbench_merge(ws, [g[key] for g in per_model], ratio) \
                if key in per_model[0] else torch.stack(ws).mean(0)
        merged.model.layers[layer].load_state_dict(new)
    return grams, merged


def test_grams_and_merge_equal_the_reference(models, pp):
    folders = [models["a"], models["b"], models["c"]]
    got = pp
    want, merged = reference(folders, TEXTS, ALPHA)
    for st, ref in zip(got, want):
        assert set(st.tensors) == set(ref)
        for k in ref:
            torch.testing.assert_close(st.tensors[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    plain = ml.stats(models["b"], models["txt"], kind="gram", device="cpu").tensors
    assert not torch.allclose(plain["model.layers.2.self_attn.q_proj.weight"],
                              got[1].tensors["model.layers.2.self_attn.q_proj.weight"], atol=1e-4)
    # the regmean recipe with these Grams computes the merged layers
    sds = [{k: v.detach() for k, v in load(f).state_dict().items()} for f in folders]
    out = ml.merge("regmean([a, b, c], [ga, gb, gc], alpha = 0.6)", a=sds[0], b=sds[1], c=sds[2],
                   ga=got[0].tensors, gb=got[1].tensors, gc=got[2].tensors)
    for k, v in merged.model.layers.state_dict().items():
        torch.testing.assert_close(out["model.layers." + k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_cli_writes_one_sidecar_per_model(models, pp, tmp_path):
    outs = [tmp_path / "ga", tmp_path / "gb", tmp_path / "gc"]
    r = CliRunner().invoke(cli_main, ["stats", str(models["a"]), str(models["b"]), str(models["c"]),
                                      "--data", str(models["txt"]),
                                      "--kind", "gram-plusplus", "--alpha", "0.6",
                                      *[x for o in outs for x in ("-o", str(o))], "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    want = pp
    from safetensors.torch import load_file

    for o, st in zip(outs, want):
        files = sorted(o.glob("*.safetensors"))
        got = {k: v for f in files for k, v in load_file(str(f)).items()}
        assert set(got) == set(st.tensors)
        for k in got:
            torch.testing.assert_close(got[k], st.tensors[k], rtol=0, atol=0)


def test_bad_settings_are_e965(models, tmp_path):
    for kw in ({"alpha": 1.5}, {"batch_size": 0}):
        with pytest.raises(MergelangError, match="E965"):
            ml.regmeanpp([models["a"], models["b"]], models["txt"], device="cpu", **kw)
    with pytest.raises(MergelangError, match="E965"):
        ml.regmeanpp([models["a"]], models["txt"], device="cpu")
    with pytest.raises(MergelangError, match="E965"):
        ml.regmeanpp([models["a"], models["b"]], models["txt"], out=[tmp_path / "x"], device="cpu")
    r = CliRunner().invoke(cli_main, ["stats", str(models["a"]), "--data", str(models["txt"]),
                                      "--kind", "gram-plusplus", "-o", str(tmp_path / "y")])
    assert r.exit_code == 2 and "MODEL MODEL" in r.output
