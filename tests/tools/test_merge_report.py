"""`mergelang run --report`: the report's numbers against a float64 computation written here from
the written output and the input files; the report files in the manifest (so --force replaces
the folder); E954."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mergelang as ml
from mergelang.cli import main as cli_main


def models(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    base = {}
    for i in range(2):
        base[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(64, 16, generator=g)
        base[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(16, 16, generator=g)
        base[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(16, generator=g)
    base["lm_head.weight"] = torch.randn(10, 16, generator=g)
    sds = {"base": base}
    for k, lab in enumerate(("a", "b")):
        sd = {}
        for n, t in base.items():
            d = torch.randn(t.shape, generator=g) * 0.1
            d[torch.rand(t.shape, generator=g) < 0.25] = 0
            sd[n] = t + d
        sds[lab] = sd
    for lab, sd in sds.items():
        (root / lab).mkdir()
        save_file(sd, str(root / lab / "model.safetensors"))
    return {lab: {n: t.double() for n, t in sd.items()} for lab, sd in sds.items()}


RECIPE = """model base = "base"
model a = "a"
model b = "b"
merge from base {
    "*norm*" => base
    "*.mlp.*" => ties(base, [a, b], density = 0.4)
    "*" => linear([a, b])
}
"""


def ref(sds: dict, out: dict, names: list[str], lab: str) -> dict:
    b = torch.cat([sds["base"][n].reshape(-1) for n in names])
    x = torch.cat([sds[lab][n].reshape(-1) for n in names])
    o = torch.cat([out[n].double().reshape(-1) for n in names])
    t, to = x - b, o - b
    nz = t != 0
    kept = int((nz & (to != 0) & (torch.sign(to) == torch.sign(t))).sum())
    against = int((nz & (to != 0) & (torch.sign(to) != torch.sign(t))).sum())
    return {"kept": kept / int(nz.sum()), "against": against / int(nz.sum()),
            "dropped": (int(nz.sum()) - kept - against) / int(nz.sum()),
            "projection": float(to @ t) / float(t @ t),
            "cosine_tau": float(to @ t) / float(to.norm() * t.norm()),
            "cosine": float(o @ x) / float(o.norm() * x.norm()),
            "distance": float((o - x).norm()), "rel_distance": float((o - x).norm() / x.norm()),
            "norm_before": float(x.norm()), "norm_after": float(o.norm()),
            "tau_norm": float(t.norm()), "tau_norm_after": float(to.norm()),
            "numel": x.numel(), "tau_nonzero": int(nz.sum())}


def close(got: dict, want: dict, where: str) -> None:
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), f"{where}.{k}"


@pytest.mark.parametrize("budget", [None, "6KB"])
def test_report_numbers(tmp_path, budget):
    sds = models(tmp_path)
    (tmp_path / "r.mrg").write_text(RECIPE)
    out = tmp_path / "out"
    ml.compile(tmp_path / "r.mrg").run(out, device="cpu", report=True, memory_budget=budget)
    merged = load_file(str(out / "model.safetensors")) if (out / "model.safetensors").exists() else \
        {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    rep = json.loads((out / "mergelang_report.json").read_text())
    mlp = [n for n in sds["base"] if ".mlp." in n]
    rest = [n for n in sds["base"] if ".mlp." not in n and "norm" not in n]
    rules = {k.split(": ", 1)[1]: v for k, v in rep["rules"].items()}
    assert set(rules) == {"ties(base, [a, b], density = 0.4)", "linear([a, b])"}
    for lab in ("a", "b"):
        close(rules["ties(base, [a, b], density = 0.4)"][lab], ref(sds, merged, mlp, lab), f"ties {lab}")
        close(rules["linear([a, b])"][lab], ref(sds, merged, rest, lab), f"linear {lab}")
        close(rep["total"][lab], ref(sds, merged, mlp + rest, lab), f"total {lab}")
        layer1 = [n for n in mlp + rest if n.startswith("model.layers.1.")]
        close(rep["layers"]["1"][lab], ref(sds, merged, layer1, lab), f"layer 1 {lab}")
        n = "lm_head.weight"
        close(rep["tensors"][n]["inputs"][lab], ref(sds, merged, [n], lab), n)
    # ties at density 0.4 drops a good part of each task vector; the mean drops none of it
    assert rules["ties(base, [a, b], density = 0.4)"]["a"]["dropped"] > 0.2
    assert rules["linear([a, b])"]["a"]["dropped"] == 0
    assert "model.layers.0.input_layernorm.weight" not in rep["tensors"]  # `=> base`: no inputs
    assert rep["not_measured"] == []
    # measured from the values the merge loaded: only the base of `linear([a, b])` (which does
    # not load it) is read again for the report
    for n in mlp:
        assert rep["tensors"][n]["read_again"] == [], n
    for n in rest:
        assert rep["tensors"][n]["read_again"] == ["base"], n


def test_report_files_are_in_the_manifest_and_force_replaces_them(tmp_path):
    models(tmp_path)
    (tmp_path / "r.mrg").write_text(RECIPE)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli_main, ["run", str(tmp_path / "r.mrg"), "-o", str(out), "--report",
                                        "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    files = json.loads((out / "mergelang_manifest.json").read_text())["files"]
    assert {"mergelang_report.json", "mergelang_report.html"} <= set(files)
    page = (out / "mergelang_report.html").read_text()
    assert "<script src" not in page and "http://" not in page.split("<svg")[0]
    assert 'data-figure="kept"' in page and 'data-figure="cosine"' in page
    res = CliRunner().invoke(cli_main, ["run", str(tmp_path / "r.mrg"), "-o", str(out), "--force",
                                        "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    assert not (out / "mergelang_report.json").exists()


def test_report_refused_where_it_cannot_measure(tmp_path):
    models(tmp_path)
    (tmp_path / "r.mrg").write_text(RECIPE.replace("merge from base {", 'merge ["x", "y"] from base {')
                                    .replace("linear([a, b])", "[a, b]").replace("ties(base, [a, b], density = 0.4)", "[a, b]")
                                    .replace("=> base", "=> [base, base]"))
    with pytest.raises(ml.MergelangError) as e:
        ml.compile(tmp_path / "r.mrg").run(tmp_path / "out", device="cpu", report=True)
    assert e.value.codes == ["E954"] and not (tmp_path / "out").exists()
    (tmp_path / "s.mrg").write_text(RECIPE)
    with pytest.raises(ml.MergelangError) as e:
        ml.compile(tmp_path / "s.mrg").run(tmp_path / "out", device="cpu", report=True, executor="ray")
    assert e.value.codes == ["E954"] and not (tmp_path / "out").exists()


def test_fp8_outputs_are_listed_not_measured(tmp_path):
    """Outputs re-quantized to block-scaled FP8 are codes, not values: listed, not compared;
    with --dtype bfloat16 they are measured."""
    from test_fp8 import WEIGHTS, write_fp8

    a, b = write_fp8(tmp_path / "a", 0, 1.0), write_fp8(tmp_path / "b", 1, 1.0)
    text = f'model a = "{a}"\nmodel b = "{b}"\nmerge from a {{\n    "*" => linear([a, b])\n}}\n'
    ml.compile(text).run(tmp_path / "o1", device="cpu", report=True)
    rep = json.loads((tmp_path / "o1" / "mergelang_report.json").read_text())
    assert rep["fp8_not_measured"] == sorted(WEIGHTS) and not set(WEIGHTS) & set(rep["tensors"])
    ml.compile(text, dtype="bfloat16").run(tmp_path / "o2", device="cpu", report=True)
    rep = json.loads((tmp_path / "o2" / "mergelang_report.json").read_text())
    assert rep["fp8_not_measured"] == [] and set(WEIGHTS) <= set(rep["tensors"])
    assert 0 < rep["tensors"][sorted(WEIGHTS)[0]]["inputs"]["b"]["cosine"] <= 1 + 1e-9
