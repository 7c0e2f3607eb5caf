"""`mergelang explain` (text summary, DOT picture) and `mergelang run --log-json`."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mergelang.cli import main  # noqa: E402
from mergelang.explain import collapse, ranges  # noqa: E402
from test_mergekit_import import LAYERS, _tensors  # noqa: E402

RECIPE = """model base = "base.safetensors"
model a = "a.safetensors"
model b = "b.safetensors"
merge from base {
    "*norm*" => base
    "model.layers.{i}.self_attn.*" => slerp(a, b, t = i / 3)
    "model.layers.{i}.mlp.*" if i > 100 => a
    "*" => ties(base, [a, b], weights = [1, 1], density = 0.5)
}
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("explain")
    base = _tensors(0)
    save_file(base, str(root / "base.safetensors"))
    save_file(_tensors(1, base), str(root / "a.safetensors"))
    save_file(_tensors(2, base), str(root / "b.safetensors"))
    (root / "r.mrg").write_text(RECIPE)
    return root / "r.mrg"


def _invoke(*args: str, code: int = 0):
    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == code, (res.output, res.exception)
    return res


def test_collapse_layer_numbers():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(32)] + ["lm_head.weight"]
    assert collapse(names) == ["model.layers.{0..31}.mlp.up_proj.weight", "lm_head.weight"]
    assert ranges([0, 1, 2, 5, 7, 8]) == "0..2,5,7,8"
    experts = [f"l.{i}.e.{j}.w" for i in range(2) for j in range(3)]
    assert collapse(experts) == ["l.{0,1}.e.{0..2}.w"]
    assert collapse(["l.0.e.0.w", "l.1.e.1.w"]) == ["l.{0,1}.e.{0,1}.w (2 tensors)"]


def test_explain_text(recipe):
    out = _invoke("explain", str(recipe)).stdout
    assert out.startswith(f"recipe {recipe}: merge from `base`, {5 * LAYERS + 3} output tensors")
    blocks = re.split(r"\n  \[\d\] ", out.split("\nmethods:")[0])
    # rule 1: every norm, layer numbers collapsed
    assert '"*norm*" => base' in blocks[1]
    assert "model.layers.{0..3}.input_layernorm.weight" in blocks[1] and "model.norm.weight" in blocks[1]
    assert "calls: slerp" in blocks[2] and "model.layers.{0..3}.self_attn.q_proj.weight" in blocks[2]
    assert "matches no tensor" in blocks[3]
    assert "calls: ties" in blocks[4] and "lm_head.weight" in blocks[4]
    assert "model.layers.{0..3}.mlp.up_proj.weight" in blocks[4]
    assert "methods: slerp (8 tensors), ties (10 tensors)" in out
    assert re.search(r"reads [\d.]+ KiB: a [\d.]+ KiB, b [\d.]+ KiB, base [\d.]+ KiB", out)
    assert re.search(r"estimated peak memory: [\d.]+ KiB", out)
    assert "estimated time:" in out and "graph:" in out


def test_explain_dot_draws_models_rules_and_outputs(recipe, tmp_path):
    dot = _invoke("explain", str(recipe), "--format", "dot").stdout
    assert dot.startswith("digraph mergelang {") and dot.rstrip().endswith("}")
    assert "subgraph" not in dot  # the user's view, not the op graph
    rules = re.findall(r'(r_\d+_\d+) \[label="([^"]*)"', dot.replace('\\"', "'"))
    assert len(rules) >= 2
    assert all(re.search(r"\d+ tensors, [\d.]+ (B|KiB|MiB|GiB) written", label) for _, label in rules)
    for rid, label in rules:  # every rule is fed by a model and (if it matches) feeds the output
        assert re.search(rf"m_\w+ -> {rid};", dot)
        assert bool(re.search(rf"{rid} -> o_0_OUTDIR;", dot)) == ("matches no tensor" not in label)


def test_explain_dot_ops_collapses_layers(recipe, tmp_path):
    dot = _invoke("explain", str(recipe), "--format", "dot", "--ops").stdout
    assert dot.startswith("digraph mergelang {") and dot.rstrip().endswith("}")
    clusters = re.findall(r'subgraph cluster_\d+ \{\n    label="((?:[^"\\]|\\.)*)";', dot)
    # one cluster per rule that produces tensors: norms (copies), slerp, ties; the rule that
    # matches nothing has none
    assert len(clusters) == 3
    joined = "\n".join(clusters)
    assert "model.layers.{0..3}.input_layernorm.weight\\nmodel.norm.weight (5 tensors)" in joined
    assert any(c.startswith("[4]") and "mlp.up_proj" in c and "(10 tensors)" in c for c in clusters)
    # slerp: layers 1 and 2 share one picture (t differs: the constant shows the range); the
    # optimizer simplifies t = 0 and t = 1, so layers 0 and 3 are named, not drawn again
    slerp = next(c for c in clusters if c.startswith("[2]"))
    assert "model.layers.{1,2}.self_attn.k_proj.weight\\nmodel.layers.{1,2}.self_attn.q_proj.weight (4 tensors)" in slerp
    assert "also 4 tensors simplified differently (not drawn)" in slerp
    assert "model.layers.{0,3}.self_attn.k_proj.weight" in slerp
    assert "0.3333 .. 0.6667" in dot
    # every edge stays inside its cluster and points at a declared node
    nodes = set(re.findall(r"^    (g\d+_\d+) \[label=", dot, re.M))
    for a, b in re.findall(r"^    (g\d+_\d+) -> (g\d+_\d+);", dot, re.M):
        assert a in nodes and b in nodes and a.split("_")[0] == b.split("_")[0]
    assert dot.count("write float32") == len(clusters)
    out = tmp_path / "g.dot"
    _invoke("explain", str(recipe), "--format", "dot", "--ops", "-o", str(out))
    assert out.read_text() == dot


def test_explain_draws_guards_edges_read_and_clean_numbers(tmp_path):
    """Guards are drawn; a model gets an edge only to rules whose tensors read it; labels show
    0.6, not 0.6000000000000001; each input is named with what it resolved to."""
    base = _tensors(0)
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        save_file(_tensors(seed, base), str(tmp_path / f"{name}.safetensors"))
    (tmp_path / "r.mrg").write_text(
        'model base = "base.safetensors"\nmodel a = "a.safetensors"\nmodel b = "b.safetensors"\n'
        'param use_a = true\n'
        'merge from base {\n    "model.layers.{i}.mlp.*" if i >= 2 => where(use_a, a, base)\n'
        '    "*" => ties(base, [a, b], density = 0.1 * 6)\n}\n')
    recipe = str(tmp_path / "r.mrg")
    dot = _invoke("explain", recipe, "--format", "dot").stdout
    assert '[1] \\"model.layers.{i}.mlp.*\\" if i >= 2' in dot
    # the `where` is decided at compile time: the rule names base but never reads it
    assert "m_a -> r_0_0;" in dot and "m_base -> r_0_0;" not in dot
    assert "m_base -> r_0_1;" in dot
    ops = _invoke("explain", recipe, "--format", "dot", "--ops").stdout
    assert 0.1 * 6 == 0.6000000000000001 and "density=0.6 " in ops and "0.6000000000000001" not in ops
    # line breaks in op labels are DOT's \n, not an escaped backslash
    assert "topk_mask\\ndensity=0.6 over=tensor" in ops and "\\\\n" not in ops
    text = _invoke("explain", recipe).stdout
    assert f"  a: {tmp_path / 'a.safetensors'}" in text


def test_explain_svg(recipe, tmp_path, monkeypatch):
    out = tmp_path / "g.svg"
    if shutil.which("dot") is None:
        res = _invoke("explain", str(recipe), "--format", "svg", "-o", str(out), code=1)
        assert "E707" in res.output
        return
    _invoke("explain", str(recipe), "--format", "svg", "-o", str(out))
    assert "<svg" in out.read_text()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    res = _invoke("explain", str(recipe), "--format", "png", "-o", str(tmp_path / "g.png"), code=1)
    assert "E707" in res.output and "graphviz" in res.output.lower()


def test_run_log_json(recipe, tmp_path):
    out = tmp_path / "merged"
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out), "--log-json"])
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    events = [json.loads(line) for line in res.stderr.splitlines() if line.strip()]
    assert events[0]["event"] == "diagnostic" and events[0]["code"] == "W001"  # the i > 100 rule
    assert events[0]["location"].endswith("r.mrg:7:5")
    start, tensors, done = events[1], events[2:-1], events[-1]
    assert start["event"] == "start" and start["tensors"] == 5 * LAYERS + 3
    assert [e["event"] for e in tensors] == ["tensor"] * start["tensors"]
    assert [e["index"] for e in tensors] == list(range(start["tensors"]))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert {e["name"] for e in tensors} == set(index["weight_map"])
    assert tensors[-1]["done_bytes"] == start["bytes"] == sum(e["bytes"] for e in tensors)
    assert all(e["elapsed"] >= 0 for e in tensors)
    assert done["event"] == "done" and done["bytes"] == start["bytes"]
    assert done["output"] == str(out.resolve()) or Path(done["output"]) == out


def test_explain_html_needs_no_graphviz_and_parses(recipe, tmp_path, monkeypatch):
    """--format html: one self-contained page (inline SVG; no script, no link elsewhere), drawn
    without Graphviz; every node and edge of the DOT is drawn, labels escaped, no boxes overlap."""
    import xml.etree.ElementTree as ET

    monkeypatch.setattr(shutil, "which", lambda name: None)  # no `dot` anywhere
    odd = tmp_path / "odd.mrg"
    odd.write_text(recipe.read_text().replace('"*norm*" => base', '"*norm*" => base\n    "x<&>\\"y*" => a')
                   .replace('"base.safetensors"', json.dumps(str(recipe.parent / "base.safetensors")))
                   .replace('"a.safetensors"', json.dumps(str(recipe.parent / "a.safetensors")))
                   .replace('"b.safetensors"', json.dumps(str(recipe.parent / "b.safetensors"))))
    ns = "{http://www.w3.org/2000/svg}"
    for ops in ([], ["--ops"]):
        out = tmp_path / f"g{len(ops)}.html"
        _invoke("explain", str(odd), "--format", "html", "-o", str(out), *ops)
        page = out.read_text()
        assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
        assert "<script" not in page and "src=" not in page and "<link" not in page
        assert re.findall(r"https?://[^\s\"']+", page) == ["http://www.w3.org/2000/svg"]
        svg = ET.fromstring(page[page.index("<svg"):page.index("</svg>") + 6])
        dot = _invoke("explain", str(odd), "--format", "dot", *ops).stdout
        declared = re.findall(r"^\s+(\w+) \[label=", dot, re.M)
        drawn = [g for g in svg.iter(f"{ns}g") if g.get("class") == "node"]
        assert sorted(g.get("id") for g in drawn) == sorted(f"n-{d}" for d in declared)
        assert len([p for p in svg.iter(f"{ns}path") if p.get("class") == "edge"]) == dot.count(" -> ")
        boxes = []
        for g in drawn:
            shape = next(iter(g), None)
            if shape is not None and shape.tag == f"{ns}rect":
                boxes.append(tuple(float(shape.get(k)) for k in ("x", "y", "width", "height")))
        for i, (x, y, w, h) in enumerate(boxes):
            for (x2, y2, w2, h2) in boxes[i + 1:]:
                assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y, "boxes overlap"
        if not ops:
            texts = ["".join(t.itertext()) for t in svg.iter(f"{ns}text")]
            assert any('"x<&>\\"y*"' in t for t in texts), texts
