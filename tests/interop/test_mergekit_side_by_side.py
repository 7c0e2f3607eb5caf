"""mergelang against mergekit itself, side by side on the same float32 Llama-shaped folders.

Each config below is imported with `import-mergekit`'s translator and evaluated by mergelang, and
run by mergekit 0.1.5 through its Python API in a separate venv (tests/interop/mergekit_driver.py).
The mergekit venv is found from $MERGEKIT_PYTHON (its python) or $MERGEKIT (its mergekit-yaml);
without one every test here is skipped. The always-running counterparts of these cases (hand
recipes and independent formulas) are in test_mergekit_import.py and tests/methods/.

Make one with:  python -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit==0.1.5
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import mergelang as ml
from mergelang.interop.mergekit_import import translate

LAYERS, HIDDEN, INTER, VOCAB, HEADS, KV = 4, 64, 96, 48, 4, 2
DRIVER = Path(__file__).with_name("mergekit_driver.py")


def mergekit_python() -> str | None:
    py = os.environ.get("MERGEKIT_PYTHON")
    if not py and os.environ.get("MERGEKIT"):
        py = str(Path(os.environ["MERGEKIT"]).with_name("python"))
    return py if py and Path(py).exists() else None


pytestmark = pytest.mark.skipif(mergekit_python() is None,
                                reason="no mergekit venv ($MERGEKIT_PYTHON or $MERGEKIT)")


def llama_tensors(seed: int, base: dict | None = None, scale: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hd = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV * hd, HIDDEN),
            p + "self_attn.v_proj.weight": (KV * hd, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,)})
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        out[name] = noise if base is None else base[name] + scale * noise
    return out


def write_llama(folder: Path, tensors: dict[str, torch.Tensor], vocab: int = VOCAB) -> str:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
           "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
           "num_key_value_heads": KV, "vocab_size": vocab, "tie_word_embeddings": False,
           "rms_norm_eps": 1e-5, "torch_dtype": "float32", "max_position_embeddings": 128}
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("side")
    base = llama_tensors(0)
    out = {"base": write_llama(root / "base", base)}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        out[name] = write_llama(root / name, llama_tensors(seed, base))
    return out


# name -> (config with {base}/{a}/{b}/{c} placeholders, rtol/atol, kind): "exact" compares
# every tensor; "random" (DARE, DELLA: mergekit draws from torch's global RNG) compares the
# kept fraction and the L1 norm of each tensor's change within a few percent
CASES: dict[str, tuple[str, float, str]] = {
    "slerp_gradient_slices": ("""
slices:
  - sources:
      - {{model: "{base}", layer_range: [0, 4]}}
      - {{model: "{a}", layer_range: [0, 4]}}
merge_method: slerp
base_model: "{base}"
parameters:
  t:
    - {{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}
    - {{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}}
    - value: 0.5
dtype: float32
""", 1e-5, "exact"),
    "ties_gradients": ("""
models:
  - model: "{a}"
    parameters: {{density: [1, 0.7, 0.1], weight: 1.0}}
  - model: "{b}"
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: "{base}"
parameters: {{normalize: true, int8_mask: true}}
dtype: float32
""", 1e-5, "exact"),
    "breadcrumbs_ties_gradient": ("""
models:
  - model: "{a}"
    parameters: {{density: 0.6, gamma: 0.05, weight: [0.2, 0.8]}}
  - model: "{b}"
    parameters: {{density: 0.8, gamma: 0.01, weight: 0.5}}
merge_method: breadcrumbs_ties
base_model: "{base}"
dtype: float32
""", 1e-5, "exact"),
    "task_arithmetic_lambda": ("""
models:
  - {{model: "{a}", parameters: {{weight: 0.7}}}}
  - {{model: "{b}", parameters: {{weight: [0.1, 0.9]}}}}
merge_method: task_arithmetic
base_model: "{base}"
parameters: {{lambda: 0.8}}
dtype: float32
""", 1e-5, "exact"),
    "linear_soup": ("""
models:
  - {{model: "{a}", parameters: {{weight: 1.0}}}}
  - {{model: "{b}", parameters: {{weight: 2.0}}}}
  - {{model: "{c}", parameters: {{weight: 0.5}}}}
merge_method: linear
dtype: float32
""", 1e-6, "exact"),
    "passthrough_frankenmerge": ("""
slices:
  - sources: [{{model: "{a}", layer_range: [0, 3]}}]
  - sources: [{{model: "{b}", layer_range: [1, 4]}}]
merge_method: passthrough
dtype: float32
""", 0.0, "exact"),
    "model_stock_slices": ("""
slices:
  - sources:
      - {{model: "{a}", layer_range: [0, 4], parameters: {{weight: 0.3}}}}
      - {{model: "{b}", layer_range: [0, 4], parameters: {{weight: 0.7}}}}
      - {{model: "{c}", layer_range: [0, 4]}}
      - {{model: "{base}", layer_range: [0, 4]}}
merge_method: model_stock
base_model: "{base}"
dtype: float32
""", 1e-5, "exact"),
    "sce_weights_ignored": ("""
models:
  - {{model: "{a}", parameters: {{weight: 0.3}}}}
  - {{model: "{b}", parameters: {{weight: 0.7}}}}
  - {{model: "{c}"}}
merge_method: sce
base_model: "{base}"
parameters: {{select_topk: 0.5, normalize: true}}
dtype: float32
""", 1e-5, "exact"),
    "karcher_base_included": ("""
models:
  - {{model: "{a}", parameters: {{weight: 0.9}}}}
  - {{model: "{b}", parameters: {{weight: 0.1}}}}
merge_method: karcher
base_model: "{base}"
parameters:
  max_iter: 50
  tol: 1e-10
dtype: float32
""", 1e-4, "exact"),
    "nuslerp_gradient": ("""
models:
  - {{model: "{a}", parameters: {{weight: [0.2, 0.8]}}}}
  - {{model: "{b}", parameters: {{weight: 0.5}}}}
merge_method: nuslerp
base_model: "{base}"
parameters: {{nuslerp_flatten: false}}
dtype: float32
""", 1e-4, "exact"),
    "multislerp": ("""
models:
  - {{model: "{a}", parameters: {{weight: 1.0}}}}
  - {{model: "{b}", parameters: {{weight: 0.5}}}}
  - {{model: "{c}", parameters: {{weight: 0.25}}}}
merge_method: multislerp
base_model: "{base}"
dtype: float32
""", 1e-4, "exact"),
    "nearswap": ("""
models:
  - {{model: "{base}"}}
  - {{model: "{a}"}}
merge_method: nearswap
base_model: "{base}"
parameters: {{t: 0.2}}
dtype: float32
""", 1e-5, "exact"),
    "ram": ("""
models:
  - {{model: "{a}"}}
  - {{model: "{b}"}}
merge_method: ram
base_model: "{base}"
parameters: {{epsilon: 0.2}}
dtype: float32
""", 1e-6, "exact"),
    "ramplus_tl": ("""
models:
  - {{model: "{a}"}}
  - {{model: "{b}"}}
  - {{model: "{c}"}}
merge_method: ramplus_tl
base_model: "{base}"
parameters: {{epsilon: 0.3, r: 0.4, alpha: 0.5}}
dtype: float32
""", 1e-5, "exact"),
    "arcee_fusion": ("""
models:
  - {{model: "{a}"}}
merge_method: arcee_fusion
base_model: "{base}"
dtype: float32
""", 1e-5, "exact"),
    "multi_staged": ("""
name: stage-1
models:
  - {{model: "{a}", parameters: {{weight: 1.0, density: 0.5}}}}
  - {{model: "{b}", parameters: {{weight: 1.0, density: [0.3, 0.7]}}}}
merge_method: ties
base_model: "{base}"
dtype: float32
---
name: stage-2
models:
  - {{model: "{c}", parameters: {{weight: 0.5}}}}
  - {{model: "{base}", parameters: {{weight: 0.5}}}}
merge_method: linear
dtype: float32
---
models:
  - model: stage-1
  - model: stage-2
merge_method: slerp
base_model: stage-1
parameters:
  t: [0.1, 0.9]
dtype: float32
""", 1e-5, "multi"),
    "dare_ties_per_model_density": ("""
models:
  - {{model: "{a}", parameters: {{density: 0.3, weight: 1.0}}}}
  - {{model: "{b}", parameters: {{density: 0.8, weight: 0.5}}}}
merge_method: dare_ties
base_model: "{base}"
dtype: float32
""", 0.0, "random"),
    "della_per_model_epsilon": ("""
models:
  - {{model: "{a}", parameters: {{density: 0.5, epsilon: 0.1, weight: 1.0}}}}
  - {{model: "{b}", parameters: {{density: 0.5, epsilon: 0.3, weight: 1.0}}}}
merge_method: della
base_model: "{base}"
parameters: {{lambda: 1.0}}
dtype: float32
""", 0.0, "random"),
}


@pytest.fixture(scope="module")
def mergekit_outputs(folders, tmp_path_factory) -> dict[str, Path | str]:
    """Every case run by mergekit in one process (its import costs seconds)."""
    root = tmp_path_factory.mktemp("mk_out")
    jobs = []
    for name, (text, _, _) in CASES.items():
        cfg = root / f"{name}.yml"
        cfg.write_text(text.format(**folders))
        jobs.append([str(cfg), str(root / name), "multi" if "\n---\n" in text else "yaml"])
    return run_driver(jobs, root)


def run_driver(jobs: list[list[str]], root: Path) -> dict[str, Path | str]:
    """Run mergekit_driver.py on `jobs` ([config, out_dir, kind] each) in the mergekit venv, in
    one process: output folder name -> its Path, or the error mergekit reported."""
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([mergekit_python(), str(DRIVER), str(root / "jobs.json")],
                          capture_output=True, text=True, timeout=900)
    results: dict[str, Path | str] = {}
    for line in proc.stdout.splitlines():
        status, rest = line.split(" ", 1)
        out = rest.split(":", 1)[0] if status == "error" else rest
        results[Path(out).name] = Path(out) if status == "ok" else rest
    for _, out, _ in jobs:
        results.setdefault(Path(out).name, f"mergekit did not report: {proc.stderr[-2000:]}")
    return results


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def mergelang_side(text: str, folders: dict[str, str]) -> dict[str, torch.Tensor]:
    docs = [d for d in yaml.safe_load_all(text.format(**folders)) if d]
    res = translate(docs[0] if len(docs) == 1 else docs)
    assert not res.errors, [d.render() for d in res.errors]
    r = ml.compile(res.text)
    try:
        return r.evaluate()
    finally:
        r.close()


@pytest.mark.parametrize("name", list(CASES))
def test_side_by_side(name, folders, mergekit_outputs):
    text, tol, kind = CASES[name]
    mk = mergekit_outputs[name]
    assert isinstance(mk, Path), f"mergekit failed: {mk}"
    theirs = read_folder(mk)
    ours = mergelang_side(text, folders)
    if kind == "multi":  # the final merge, then each intermediate against mergekit's
        assert set(ours) == {"stage-1", "stage-2", "final"}
        for out in ours:
            want = theirs if out == "final" else read_folder(Path(f"{mk}_int") / out)
            compare(ours[out], want, tol, "exact", {})
        return
    base = load_file(str(Path(folders["base"]) / "model.safetensors"))
    compare(ours, theirs, tol, kind, base)


def compare(ours: dict, theirs: dict, tol: float, kind: str, base: dict) -> None:
    assert ours.keys() == theirs.keys() and len(theirs) >= 3 + 9 * LAYERS
    for k in theirs:
        o, t = ours[k], theirs[k].to(torch.float32)
        assert o.shape == t.shape, k
        if kind == "exact":
            torch.testing.assert_close(o, t, rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")
        elif o.numel() >= 1024:  # statistics of the random drop, on tensors big enough to say
            do, dt = o - base[k], t - base[k]
            kept_o, kept_t = (do != 0).float().mean(), (dt != 0).float().mean()
            assert abs(kept_o - kept_t) < 0.05, (k, kept_o, kept_t)
            assert abs(do.abs().sum() / dt.abs().sum() - 1) < 0.1, k



# ---- tokenizer settings: models whose vocabularies differ (tests/sources/tokenizer_models.py)

TOKENIZER_CASES = {
    "base": "tokenizer_source: base",
    "model": 'tokenizer_source: "{a}"',
    "union_padded": "tokenizer: {{source: union, pad_to_multiple_of: 8}}\nchat_template: auto",
}


@pytest.fixture(scope="module")
def tokenizer_runs(tmp_path_factory):
    from tokenizer_models import make_models

    root = tmp_path_factory.mktemp("tok_side")
    m = make_models(root / "models")
    jobs = []
    for name, setting in TOKENIZER_CASES.items():
        text = (f'models:\n  - {{model: "{m["base"]}", parameters: {{weight: 1.0}}}}\n'
                f'  - {{model: "{m["a"]}", parameters: {{weight: 1.0}}}}\n'
                f'  - {{model: "{m["b"]}", parameters: {{weight: 1.0}}}}\n'
                f'merge_method: linear\nbase_model: "{m["base"]}"\ndtype: float32\n'
                + setting.format(**m) + "\n")
        (root / f"{name}.yml").write_text(text)
        jobs.append([str(root / f"{name}.yml"), str(root / f"mk_{name}"), "yaml"])
    results = run_driver(jobs, root)
    assert all(isinstance(r, Path) for r in results.values()), results
    return root


@pytest.mark.parametrize("name", list(TOKENIZER_CASES))
def test_tokenizer_side_by_side(name, tokenizer_runs, tmp_path):
    from tokenizers import Tokenizer

    root = tokenizer_runs
    res = translate(yaml.safe_load((root / f"{name}.yml").read_text()))
    assert not res.errors, [d.render() for d in res.errors]
    r = ml.compile(res.text)
    try:
        r.run(tmp_path / "out")
    finally:
        r.close()
    mk, ours = root / f"mk_{name}", tmp_path / "out"
    vm = Tokenizer.from_file(str(mk / "tokenizer.json")).get_vocab(with_added_tokens=True)
    vo = Tokenizer.from_file(str(ours / "tokenizer.json")).get_vocab(with_added_tokens=True)
    # mergekit's union appends new tokens in the order of a hash map (it changes from run to
    # run): the same tokens, compared row by row by token
    assert set(vm) == set(vo)
    if not name.startswith("union"):
        assert vm == vo
    theirs, got = read_folder(mk), read_folder(ours)
    assert theirs.keys() == got.keys()
    for k in theirs:
        t, o = theirs[k], got[k]
        assert t.shape == o.shape, k
        if t.shape[0] in (len(vm), -(-len(vm) // 8) * 8) and "layers" not in k and t.dim() == 2:
            for tok in vm:
                torch.testing.assert_close(o[vo[tok]], t[vm[tok]], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(o[len(vm):], t[len(vm):], rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(o, t, rtol=1e-6, atol=1e-6)
    assert json.loads((mk / "config.json").read_text())["vocab_size"] == \
        json.loads((ours / "config.json").read_text())["vocab_size"]
    assert chat_template(mk) == chat_template(ours)


def chat_template(folder: Path) -> str | None:
    """The template transformers loads: chat_template.jinja, else tokenizer_config.json's."""
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    return json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
