"""`mergelang inspect` / `ml.inspect`: every number against a straightforward float64 torch
computation written here (concatenate, sort, norm), the report folder (json, html, png), the
output rules and the diagnostics."""

from __future__ import annotations

import json
import math
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import mergelang as ml
from mergelang.cli import main as cli_main

FR = (0.01, 0.05, 0.10, 0.20)


def synthetic(root: Path, n_models: int = 3, dtype=torch.float32) -> dict[str, dict[str, torch.Tensor]]:
    """base + models m0..: 3 layers (q_proj, mlp.down_proj, a norm), 2 experts per layer, an
    embedding and an int tensor; some entries equal to the base (τ = 0), one model equal to the
    base in a whole tensor."""
    g = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(20, 8, generator=g),
                                     "model.position_ids": torch.arange(6)}
    for i in range(3):
        p = f"model.layers.{i}."
        base[p + "self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g)
        base[p + "mlp.down_proj.weight"] = torch.randn(8, 12, generator=g)
        base[p + "input_layernorm.weight"] = torch.randn(8, generator=g)
        for e in range(2):
            base[p + f"mlp.experts.{e}.up_proj.weight"] = torch.randn(6, 8, generator=g)
    sds = {"base": base}
    for k in range(n_models):
        sd = {}
        for name, t in base.items():
            if not t.is_floating_point():
                sd[name] = t.clone()
                continue
            d = torch.randn(t.shape, generator=g) * (0.05 * (k + 1))
            d[torch.rand(t.shape, generator=g) < 0.3] = 0  # exact zeros of τ
            sd[name] = t + d
        if k == 1:
            sd["model.layers.1.input_layernorm.weight"] = base["model.layers.1.input_layernorm.weight"].clone()
        sds[f"m{k}"] = sd
    for label, sd in sds.items():
        (root / label).mkdir(parents=True)
        save_file({n: t.to(dtype) if t.is_floating_point() else t for n, t in sd.items()},
                  str(root / label / "model.safetensors"))
    # what was stored, as float64
    return {lab: {n: (t.to(dtype).double() if t.is_floating_point() else t) for n, t in sd.items()}
            for lab, sd in sds.items()}


# ------------------------------------------------------------------------- the reference

def ref_group(sds: dict, labels: list[str], names: list[str]) -> dict:
    """The statistics of a set of tensors, from their task vectors concatenated."""
    b = torch.cat([sds["base"][n].reshape(-1) for n in names])
    taus = {lab: torch.cat([(sds[lab][n] - sds["base"][n]).reshape(-1) for n in names]) for lab in labels}
    out: dict = {"models": {}, "pairs": {}}
    for lab, t in taus.items():
        energy = {}
        ss = float((t * t).sum())
        for f in FR:
            top = 0.0
            for n in names:  # per-tensor trim: the k largest τ² of each tensor
                tt = (sds[lab][n] - sds["base"][n]).reshape(-1)
                k = max(1, math.ceil(f * tt.numel()))
                top += float(torch.sort(tt * tt, descending=True).values[:k].sum())
            energy[f"{f:g}"] = top / ss if ss else None
        norm = float(t.norm())
        out["models"][lab] = {"norm": norm, "base_norm": float(b.norm()),
                              "rel_norm": norm / float(b.norm()), "max_abs": float(t.abs().max()),
                              "zero_frac": float((t == 0).double().mean()), "energy": energy}
    for i, a in enumerate(labels):
        for c in labels[i + 1:]:
            ta, tc = taus[a], taus[c]
            both = (ta != 0) & (tc != 0)
            den = float(ta.norm() * tc.norm())
            out["pairs"][f"{a}~{c}"] = {
                "cosine": float(ta @ tc) / den if den else None,
                "sign_agreement": float((torch.sign(ta[both]) == torch.sign(tc[both])).double().mean())
                if both.any() else None,
                "both_nonzero": int(both.sum())}
    return out


def close(got, want, path="") -> None:
    if isinstance(want, dict):
        for k, v in want.items():
            close(got[k], v, f"{path}.{k}")
    elif want is None or isinstance(want, int) and not isinstance(want, bool):
        assert got == want, path
    else:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    return root, synthetic(root)


def floats(sds: dict) -> list[str]:
    return [n for n, t in sds["base"].items() if t.is_floating_point()]


def test_numbers_equal_a_straightforward_computation(models):
    root, sds = models
    labels = ["m0", "m1", "m2"]
    r = ml.inspect(root / "base", [root / lab for lab in labels], device="cpu")
    names = floats(sds)
    assert list(r["tensors"]) == sorted(names) or set(r["tensors"]) == set(names)
    assert r["skipped"] == {"model.position_ids": "int64 (not floating point)"}
    for n in names:
        close(r["tensors"][n], ref_group(sds, labels, [n]), n)
    close(r["total"], ref_group(sds, labels, names), "total")
    for i in range(3):
        in_layer = [n for n in names if n.startswith(f"model.layers.{i}.")]
        close(r["layers"][str(i)], ref_group(sds, labels, in_layer), f"layer {i}")
    fam = [n for n in names if n.endswith("mlp.down_proj.weight")]
    close(r["families"]["mlp.down_proj.weight"], ref_group(sds, labels, fam), "family")
    for e in range(2):
        ex = [n for n in names if f".experts.{e}." in n]
        close(r["experts"][str(e)], ref_group(sds, labels, ex), f"expert {e}")
    assert r["families"]["mlp.experts.{}.up_proj.weight"]["tensors"] == 6
    # a model equal to the base in a tensor: τ = 0, its ratios undefined (null), not NaN
    zero = r["tensors"]["model.layers.1.input_layernorm.weight"]
    assert zero["models"]["m1"]["norm"] == 0 and zero["models"]["m1"]["zero_frac"] == 1
    assert zero["pairs"]["m0~m1"]["cosine"] is None and zero["models"]["m1"]["energy"]["0.2"] is None


def test_spectrum_and_tiny_budget(models):
    root, sds = models
    r = ml.inspect(str(root / "base"), [str(root / "m0")], spectrum=True, spectrum_k=3,
                   memory_budget=64, device="cpu")
    n = "model.layers.2.mlp.down_proj.weight"
    tau = sds["m0"][n] - sds["base"][n]
    sv = torch.linalg.svdvals(tau)
    p = sv / sv.sum()
    sp = r["tensors"][n]["models"]["m0"]["spectrum"]
    assert sp["top"] == pytest.approx(sv[:3].tolist(), rel=1e-5)
    assert sp["effective_rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-5)
    assert sp["stable_rank"] == pytest.approx(float((sv ** 2).sum() / sv[0] ** 2), rel=1e-5)
    assert "spectrum" not in r["tensors"]["model.layers.2.input_layernorm.weight"]["models"]["m0"]
    assert r["timing"]["svd_seconds"] > 0
    ranks = [r["tensors"][x]["models"]["m0"]["spectrum"]["effective_rank"] for x in r["tensors"]
             if x.startswith("model.layers.0.") and "spectrum" in r["tensors"][x]["models"]["m0"]]
    assert r["layers"]["0"]["models"]["m0"]["mean_effective_rank"] == pytest.approx(sum(ranks) / len(ranks))
    # the 64-byte budget reads one tensor at a time: the same numbers
    full = ml.inspect(root / "base", [root / "m0"], device="cpu")
    assert full["total"] == {**r["total"], "models": {"m0": {k: v for k, v in r["total"]["models"]["m0"].items()
                                                             if k != "mean_effective_rank"}}}


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.figures, self.data, self.urls, self.scripts, self.svgs = [], {}, [], [], 0
        self._script = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href", "xlink:href", "data"):
            if a.get(k):
                self.urls.append(a[k])
        if tag == "figure":
            self.figures.append(a["id"].removeprefix("fig-"))
        if tag == "svg":
            self.svgs += 1
        if tag == "script":
            self.scripts.append(a)
            self._script = a.get("data-figure")
        if tag == "link":
            self.urls.append(a.get("href", "link"))

    def handle_data(self, data):
        if self._script:
            self.data[self._script] = json.loads(data)

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None


def test_cli_html_report_is_self_contained_and_has_every_figures_data(models, tmp_path):
    root, sds = models
    out = tmp_path / "rep"
    res = CliRunner().invoke(cli_main, ["inspect", str(root / "base"), str(root / "m0"), str(root / "m1"),
                                        "-o", str(out), "--spectrum", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "mergelang_manifest.json").read_text())
    assert set(manifest["files"]) == {"report.json", "report.html", "mergelang_manifest.json"}
    page = _Page()
    page.feed((out / "report.html").read_text())
    # nothing is fetched: the only URLs are inline data (the heatmaps' pixels inside their SVG)
    # and references within the page (SVG markers, `#id`)
    assert any(u.startswith("data:image/png;base64,") for u in page.urls)
    assert all(u.startswith(("data:image/png;base64,", "#")) for u in page.urls)
    assert "http://" not in "".join(page.urls) and "https://" not in "".join(page.urls)
    assert all(s.get("type") == "application/json" and "src" not in s for s in page.scripts)
    assert set(page.figures) == {"cosine_by_layer", "norms_by_depth", "sign_agreement_by_layer",
                                 "energy_curves", "effective_rank_by_layer"}
    assert page.svgs >= len(page.figures) and set(page.data) == set(page.figures)
    cos = page.data["cosine_by_layer"]
    assert cos["layers"] == [0, 1, 2] and cos["pairs"] == ["m0~m1"]
    assert cos["values"][0] == [report["layers"][str(i)]["pairs"]["m0~m1"]["cosine"] for i in range(3)]
    sa = page.data["sign_agreement_by_layer"]["values"][0]
    assert sa == [report["layers"][str(i)]["pairs"]["m0~m1"]["sign_agreement"] for i in range(3)]
    en = page.data["energy_curves"]["series"]["m1"]
    assert en == [0.0, *report["total"]["models"]["m1"]["energy"].values()]
    # norms by depth per family: layer 1's down_proj of m0 from the tensor itself
    nd = page.data["norms_by_depth"]["series"]["m0: mlp.down_proj.weight"]
    t = report["tensors"]["model.layers.1.mlp.down_proj.weight"]["models"]["m0"]
    assert nd[1] == pytest.approx(t["rel_norm"])
    # the API returns the same numbers as report.json (timings aside)
    api = ml.inspect(root / "base", [root / "m0", root / "m1"], device="cpu", spectrum=True)
    assert api["total"]["pairs"] == report["total"]["pairs"]
    assert api["layers"]["2"]["models"]["m0"]["norm"] == report["layers"]["2"]["models"]["m0"]["norm"]


def test_png_and_force(models, tmp_path):
    root, _ = models
    out = tmp_path / "rep"
    args = ["inspect", str(root / "base"), str(root / "m2"), "-o", str(out), "--format", "png", "-q"]
    assert CliRunner().invoke(cli_main, args).exit_code == 0
    files = json.loads((out / "mergelang_manifest.json").read_text())["files"]
    assert set(files) == {"report.json", "norms_by_depth.png", "energy_curves.png", "mergelang_manifest.json"}
    assert (out / "energy_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(cli_main, args)
    assert res.exit_code == 1 and "E403" in res.output
    res = CliRunner().invoke(cli_main, [*args[:-3], "--format", "json", "--force"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["mergelang_manifest.json", "report.json"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    res = CliRunner().invoke(cli_main, [*args[:4], str(other), "--force"])
    assert res.exit_code == 1 and "E403" in res.output and (other / "notes.txt").exists()
    res = CliRunner().invoke(cli_main, [*args[:4], str(root / "m2" / "rep")])
    assert res.exit_code == 1 and "E404" in res.output and not (root / "m2" / "rep").exists()


def test_lora_adapter_as_a_model(tmp_path):
    base = {"model.layers.0.self_attn.q_proj.weight": torch.randn(6, 4), "model.norm.weight": torch.ones(4)}
    save_file(base, str(tmp_path / "base.safetensors"))
    ad = tmp_path / "adapter"
    ad.mkdir()
    a, b = torch.randn(2, 4), torch.randn(6, 2)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b},
              str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "peft_type": "LORA"}))
    r = ml.inspect(tmp_path / "base.safetensors", [f'lora("{ad}", base = base)'], device="cpu",
                   spectrum=True)
    assert r["models"] == ["m1"]
    q = r["tensors"]["model.layers.0.self_attn.q_proj.weight"]["models"]["m1"]
    want = (b @ a).double() * 2.0  # alpha / r
    assert q["norm"] == pytest.approx(float(want.norm()), rel=1e-6)
    assert q["spectrum"]["effective_rank"] <= 2.0 + 1e-6  # a rank-2 update
    assert r["tensors"]["model.norm.weight"]["models"]["m1"]["norm"] == 0


def test_bad_inputs_are_coded_diagnostics(tmp_path, monkeypatch):
    save_file({"w": torch.randn(3, 2), "v": torch.randn(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.randn(2, 3), "v": torch.randn(2)}, str(tmp_path / "t.safetensors"))
    save_file({"w": torch.randn(3, 2), "extra": torch.randn(2)}, str(tmp_path / "m.safetensors"))
    (tmp_path / "x.txt").write_text("not a checkpoint")
    a = str(tmp_path / "a.safetensors")

    def cli(*args):
        return CliRunner().invoke(cli_main, ["inspect", a, *args, "-o", str(tmp_path / "o"), "--format", "json"])

    res = cli(str(tmp_path / "t.safetensors"))
    assert res.exit_code == 1 and "E951" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()
    res = cli(str(tmp_path / "nope"))
    assert res.exit_code == 1 and "E301" in res.output
    res = cli(str(tmp_path / "x.txt"))
    assert res.exit_code == 1 and "E303" in res.output
    res = cli(str(tmp_path / "m.safetensors"))
    assert res.exit_code == 0 and "W140" in res.output and "W141" in res.output
    assert json.loads((tmp_path / "o" / "report.json").read_text())["skipped"] == {"v": "missing in m"}
    with pytest.raises(ml.MergelangError) as e:
        ml.inspect(a, [])
    assert e.value.codes == ["E950"]
    if not torch.cuda.is_available():
        with pytest.raises(ml.MergelangError) as e:
            ml.inspect(a, [a], device="cuda")
        assert e.value.codes == ["E952"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ml.MergelangError) as e:
        ml.inspect(a, [a], tmp_path / "o2", fmt="html")
    assert e.value.codes == ["E953"] and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_loops_equal_the_torch_form(dtype):
    """The numba loops (CPU) and the torch form (CUDA's) agree, for every stored dtype, on
    quantised task vectors (many equal |τ|: the energy selection's hard case) and empty ones."""
    from mergelang.tools.inspect_stats import tensor_group

    g = torch.Generator().manual_seed(3)
    cpu = torch.device("cpu")
    labels = ["x", "y", "z"]
    # small (one sorting call), fused (two passes), fused in two parts of the entries
    for shape in ((60, 70), (300, 70), (400, 330)):
        base = torch.randn(*shape, generator=g).to(dtype)
        xs = [(base.float() + 0.01 * torch.randn(*shape, generator=g)).to(dtype) for _ in range(3)]
        a, _ = tensor_group(base, xs, None, cpu)
        b, _ = tensor_group(base, xs, None, cpu, kernel="torch")
        close(a.to_json(labels), b.to_json(labels))
        assert a.models[0].energy != [0.0] * 4 and a.pairs[(0, 1)].both > 0
    e, _ = tensor_group(torch.zeros(0, 4, dtype=dtype), [torch.zeros(0, 4, dtype=dtype)] * 2, 4, cpu)
    assert e.to_json(["x", "y"])["models"]["x"]["norm"] == 0 and e.models[0].numel == 0


def test_fp8_and_hf_id_inputs(tmp_path, monkeypatch):
    """Block-scaled FP8 models are seen dequantized; `hf:` ids come from the local cache."""
    from test_fp8 import ref_dequant, write_fp8
    from test_safety import make_hf_cache

    a, b = write_fp8(tmp_path / "a", 0, 1.0), write_fp8(tmp_path / "b", 1, 1.0)
    r = ml.inspect(a, [b], device="cpu")
    n = "model.layers.0.mlp.down_proj.weight"
    from safetensors.torch import load_file

    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    wa = ref_dequant(sa[n], sa[n + "_scale_inv"]).double()
    wb = ref_dequant(sb[n], sb[n + "_scale_inv"]).double()
    assert r["tensors"][n]["models"]["b"]["norm"] == pytest.approx(float((wb - wa).norm()), rel=1e-9)
    assert not any(k.endswith("_scale_inv") for k in r["tensors"])  # scales are not tensors here
    hub = tmp_path / "hub"
    snap = make_hf_cache(hub, "org/base", 0)
    make_hf_cache(hub, "org/tuned", 1)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    r = ml.inspect(snap, ["hf:org/tuned"], device="cpu")
    w0 = load_file(str(snap / "model.safetensors"))["w"].double()
    w1 = load_file(str(hub / "models--org--tuned" / "snapshots" / ("0123abcd" * 5) / "model.safetensors"))["w"]
    assert r["models"] == ["tuned"]
    assert r["tensors"]["w"]["models"]["tuned"]["norm"] == pytest.approx(float((w1.double() - w0).norm()), rel=1e-9)
    res = CliRunner().invoke(cli_main, ["inspect", str(snap), "hf:org/tuned", "-o",
                                        str(hub / "models--org--tuned" / "report"), "--format", "json"])
    assert res.exit_code == 1 and "E404" in res.output  # never inside the cache repository


def test_fused_experts_are_grouped_per_expert(tmp_path):
    """`mlp.experts.down_proj` [E, H, I] (transformers' fused layout): each expert's slice is
    measured as a tensor; the experts groups and the tensor's entry follow from the slices."""
    g = torch.Generator().manual_seed(5)
    name = "model.layers.0.mlp.experts.down_proj"
    base = {name: torch.randn(3, 8, 6, generator=g), "model.layers.0.mlp.gate.weight": torch.randn(3, 8, generator=g)}
    sds = {"base": base}
    for lab in ("p", "q"):
        sd = {}
        for n, t in base.items():
            d = torch.randn(t.shape, generator=g) * 0.1
            d[torch.rand(t.shape, generator=g) < 0.3] = 0
            sd[n] = t + d
        sds[lab] = sd
    for lab, sd in sds.items():
        (tmp_path / lab).mkdir()
        save_file(sd, str(tmp_path / lab / "model.safetensors"))
    r = ml.inspect(tmp_path / "base", [tmp_path / "p", tmp_path / "q"], device="cpu", spectrum=True, spectrum_k=2)
    # the slices as tensors of their own
    sliced = {lab: {f"e{e}": sd[name][e].double() for e in range(3)} for lab, sd in sds.items()}
    for e in range(3):
        close(r["experts"][str(e)], ref_group(sliced, ["p", "q"], [f"e{e}"]), f"expert {e}")
    entry = r["tensors"][name]
    assert entry["fused_experts"] == 3 and entry["tensors"] == 1
    close(entry, ref_group(sliced, ["p", "q"], ["e0", "e1", "e2"]), "tensor")
    sv = torch.linalg.svdvals(sliced["q"]["e1"] - sliced["base"]["e1"])
    assert entry["models"]["q"]["spectrum"]["experts"][1]["top"] == pytest.approx(sv[:2].tolist(), rel=1e-5)
    assert "fused_experts" not in r["tensors"]["model.layers.0.mlp.gate.weight"]


def test_read_ahead_inline_for_many_tiny_tensors_gives_the_same_batches():
    """>= 1000 tiny tensors are read on the computing thread (no GIL contention with a reader
    thread); larger ones through the reader thread: the same batches and tensors either way."""
    from mergelang.tools.inspect import batches_of, read_ahead

    class Fake:
        def __init__(self, k):
            self.k = k

        def load_as(self, name, dtype, view=False):
            return torch.full((2,), float(int(name[1:]) * 10 + self.k))

    for n, size in ((1200, 16), (1200, 1 << 20), (10, 16)):  # inline; thread (big); thread (few)
        names = [f"t{i}" for i in range(n)]
        sizes = {x: size for x in names}
        got = [(b, [[t.tolist() for t in ts] for ts in tensors])
               for b, tensors, _ in read_ahead([Fake(1), Fake(2)], batches_of(names, sizes), sizes, 1 << 40)]
        assert [x for b, _ in got for x in b] == names
        assert all(ts == [[int(x[1:]) * 10 + 1.0] * 2, [int(x[1:]) * 10 + 2.0] * 2]
                   for b, tensors in got for x, ts in zip(b, tensors))
