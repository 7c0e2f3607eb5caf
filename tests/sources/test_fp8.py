"""Block-scaled FP8 checkpoints (DeepSeek-V3 format) in and out, against an independent
dequantize -> merge -> requantize reference written here from the format's definition:
W = q * scale_inv per 128 x 128 block; requantized with scale_inv = block amax / 448 and the
values rounded to nearest even by the float8_e4m3fn cast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelang as ml
from mergelang.diagnostics import MergelangError

B = 128
QCFG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [B, B]}


def ref_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent: per block amax / 448 (0 for an all-zero block), q = w / s cast to e4m3."""
    r, c = w.shape
    rb, cb = -(-r // B), -(-c // B)
    s = torch.zeros(rb, cb)
    q = torch.zeros(r, c)
    for i in range(rb):
        for j in range(cb):
            blk = w[i * B:(i + 1) * B, j * B:(j + 1) * B]
            amax = blk.abs().max()
            s[i, j] = amax / 448.0
            if amax > 0:
                q[i * B:(i + 1) * B, j * B:(j + 1) * B] = (blk / s[i, j]).clamp(-448, 448)
    return q.to(torch.float8_e4m3fn), s


def ref_dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    out = q.to(torch.float32).clone()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * B:(i + 1) * B, j * B:(j + 1) * B] *= s[i, j]
    return out


WEIGHTS = {"model.layers.0.mlp.down_proj.weight": (300, 200), "model.layers.0.self_attn.q_proj.weight": (256, 128)}


def write_fp8(folder: Path, seed: int, scale: float, zero_block: bool = False, config: dict | None = None,
              drop_scale: str | None = None, bad_scale: str | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(64, 128, generator=g).to(torch.bfloat16),
          "model.norm.weight": torch.randn(128, generator=g).to(torch.bfloat16)}
    for name, shape in WEIGHTS.items():
        w = torch.randn(shape, generator=g) * scale
        if zero_block:
            w[:B, :B] = 0
        q, s = ref_quant(w)
        sd[name] = q
        if name != drop_scale:
            sd[name + "_scale_inv"] = s if name != bad_scale else s[:1]
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"))
    cfg = config if config is not None else {"model_type": "deepseek_v3", "torch_dtype": "bfloat16",
                                             "quantization_config": QCFG}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    # scales differ by 10^4: a merge must dequantize each with its own scales
    return write_fp8(tmp_path / "a", 0, 1e-3, zero_block=True), write_fp8(tmp_path / "b", 1, 10.0)


def _recipe(a: Path, b: Path, rule: str = "linear([a, b], weights = [0.7, 0.3])", extra: str = "") -> str:
    return f'model a = "{a}"\nmodel b = "{b}"\n{extra}merge from a {{ "*" => {rule} }}\n'


def test_scales_are_hidden_and_weights_dequantized(pair) -> None:
    a, b = pair
    r = ml.compile(_recipe(a, b, "a"))
    names = {t.name for t in r.outputs}
    assert "model.layers.0.mlp.down_proj.weight_scale_inv" in names  # written with the weight
    raw = load_file(str(a / "model.safetensors"))
    src = r.compilation.models["a"]
    assert "model.layers.0.mlp.down_proj.weight_scale_inv" not in src.tensors()
    got = src.load_as("model.layers.0.mlp.down_proj.weight", torch.float32)
    want = ref_dequant(raw["model.layers.0.mlp.down_proj.weight"], raw["model.layers.0.mlp.down_proj.weight_scale_inv"])
    assert torch.equal(got, want)
    r.close()


def test_linear_merge_requantized_like_the_reference(pair, tmp_path: Path) -> None:
    a, b = pair
    out = ml.compile(_recipe(a, b)).run(tmp_path / "out", device="cpu")
    got = load_file(str(next(out.glob("*.safetensors"))))
    ra, rb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    for name in WEIGHTS:
        merged = 0.7 * ref_dequant(ra[name], ra[name + "_scale_inv"]) + 0.3 * ref_dequant(rb[name], rb[name + "_scale_inv"])
        q, s = ref_quant(merged)
        assert got[name].dtype == torch.float8_e4m3fn
        assert torch.equal(got[name + "_scale_inv"], s)
        assert torch.equal(got[name].view(torch.uint8), q.view(torch.uint8))
    assert got["model.norm.weight"].dtype == torch.bfloat16
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == QCFG


def test_unchanged_weights_keep_their_bytes(pair, tmp_path: Path) -> None:
    """Taking a block-scaled weight unchanged re-quantizes it to the same bytes (its blocks were
    made with the same amax / 448 convention), an all-zero block included."""
    a, b = pair
    out = ml.compile(_recipe(a, b, "a")).run(tmp_path / "out", device="cpu")
    got = load_file(str(next(out.glob("*.safetensors"))))
    raw = load_file(str(a / "model.safetensors"))
    assert set(got) == set(raw)
    for k in raw:
        assert torch.equal(got[k].view(torch.uint8), raw[k].view(torch.uint8)), k


def test_dtype_bfloat16_writes_dequantized_weights(pair, tmp_path: Path) -> None:
    a, b = pair
    out = ml.compile(_recipe(a, b), dtype="bfloat16").run(tmp_path / "out", device="cpu")
    got = load_file(str(next(out.glob("*.safetensors"))))
    ra, rb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    merged = 0.7 * ref_dequant(ra[name], ra[name + "_scale_inv"]) + 0.3 * ref_dequant(rb[name], rb[name + "_scale_inv"])
    assert not any(k.endswith("_scale_inv") for k in got)
    assert torch.equal(got[name], merged.to(torch.bfloat16))
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"


def test_row_chunks_under_a_memory_budget(pair, tmp_path: Path) -> None:
    a, b = pair
    whole = ml.compile(_recipe(a, b)).run(tmp_path / "whole", device="cpu")
    chunked = ml.compile(_recipe(a, b)).run(tmp_path / "chunked", device="cpu", memory_budget="300KB")
    x, y = (load_file(str(next(p.glob("*.safetensors")))) for p in (whole, chunked))
    assert all(torch.equal(x[k].view(torch.uint8), y[k].view(torch.uint8)) for k in x)


def test_block_rows_read_in_part(pair) -> None:
    a, _ = pair
    r = ml.compile(_recipe(a, a, "a"))
    src = r.compilation.models["a"]
    name = "model.layers.0.mlp.down_proj.weight"
    whole = src.load_as(name, torch.float32)
    for start, stop in [(0, 1), (5, 140), (127, 129), (256, 300), (130, 250)]:
        assert torch.equal(src.load_rows(name, torch.float32, start, stop), whole[start:stop])
    r.close()


def test_fp8_merged_with_bfloat16_warns_W107(pair, tmp_path: Path) -> None:
    from helpers import write_model

    a, _ = pair
    raw = load_file(str(a / "model.safetensors"))
    plain = {k: (ref_dequant(v, raw[k + "_scale_inv"]) if v.dtype == torch.float8_e4m3fn else v.float()).to(torch.bfloat16)
             for k, v in raw.items() if not k.endswith("_scale_inv")}
    write_model(tmp_path / "plain", plain, {"model_type": "deepseek_v3"})
    r = ml.compile(f'model a = "{a}"\nmodel p = "{tmp_path / "plain"}"\nmerge from a {{ "*" => linear([a, p]) }}\n')
    w = [d for d in r.warnings if d.code == "W107"]
    assert w and "block-scaled FP8" in w[0].message and "`a`'s format" in w[0].message
    r.close()


def test_missing_scale_is_E320(tmp_path: Path) -> None:
    a = write_fp8(tmp_path / "a", 0, 1.0, drop_scale="model.layers.0.mlp.down_proj.weight")
    with pytest.raises(MergelangError) as ei:
        ml.compile(_recipe(a, a, "a"))
    d = ei.value.diagnostics[0]
    assert d.code == "E320" and "down_proj.weight_scale_inv" in d.message and d.span.text == f'"{a}"'


def test_scale_of_the_wrong_shape_is_E321(tmp_path: Path) -> None:
    a = write_fp8(tmp_path / "a", 0, 1.0, bad_scale="model.layers.0.mlp.down_proj.weight")
    with pytest.raises(MergelangError) as ei:
        ml.compile(_recipe(a, a, "a"))
    d = ei.value.diagnostics[0]
    assert d.code == "E321" and "[1, 2]" in d.message and "[3, 2]" in d.message


def test_no_block_size_in_config_is_E322(tmp_path: Path) -> None:
    a = write_fp8(tmp_path / "a", 0, 1.0, config={"model_type": "deepseek_v3"})
    with pytest.raises(MergelangError) as ei:
        ml.compile(_recipe(a, a, "a"))
    d = ei.value.diagnostics[0]
    assert d.code == "E322" and "weight_block_size" in d.message and d.span is not None


def test_learn_sees_float_weights_of_an_fp8_merge(pair) -> None:
    """learn's loss gets the merged weights as floats (not FP8 codes and scales), so a
    coefficient is learned on the values; the run then writes FP8 again."""
    a, b = pair
    ra, rb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    wa, wb = ref_dequant(ra[name], ra[name + "_scale_inv"]), ref_dequant(rb[name], rb[name + "_scale_inv"])
    target = wa + 0.25 * (wb - wa)
    r = ml.compile(_recipe(a, b, "a + lam * (b - a)", extra="param lam = 0.5 learn\n"))

    def loss(state, batch):
        assert name + "_scale_inv" not in state and state[name].dtype == torch.float32
        return (state[name] - target).pow(2).mean()
    res = r.learn(loss, range(300), lr=0.02)
    assert res.values["lam"] == pytest.approx(0.25, abs=1e-3)


def test_tune_objective_gets_the_written_weights_as_floats(pair) -> None:
    """A tune trial hands the objective what would be written — re-quantized FP8 — dequantized
    to floats, without the scale tensors."""
    pytest.importorskip("optuna")
    a, b = pair
    name = "model.layers.0.mlp.down_proj.weight"
    seen = {}

    def objective(state):
        seen.update(state)
        return 0.0
    r = ml.compile(_recipe(a, b, "linear([a, b], weights = [w, 1 - w])", extra="param w = 0.7 in [0, 1]\n"))
    r.tune(objective, trials=1, seed=0)
    assert name + "_scale_inv" not in seen and seen[name].dtype == torch.float32
    w = r.tune(lambda s: 0.0, trials=1, seed=0).trials[0].params["w"]
    out = ml.compile(_recipe(a, b, f"linear([a, b], weights = [{w!r}, {1 - w!r}])")).evaluate()
    assert torch.equal(seen[name], ref_dequant(out[name], out[name + "_scale_inv"]))


def test_explain_says_how_fp8_models_are_read_and_written(pair, tmp_path: Path) -> None:
    from mergelang.explain import explain_text

    a, b = pair
    text = explain_text(ml.compile(_recipe(a, b)).compilation)
    assert "`a` is block-scaled FP8 (float8_e4m3fn, 128x128 blocks, 2 weights): read as float values" in text
    assert "output: FP8 weights re-quantized per block" in text
    text = explain_text(ml.compile(_recipe(a, b, extra='option dtype = "bfloat16"\n')).compilation)
    assert "output: dequantized weights (no quantization_config)" in text
