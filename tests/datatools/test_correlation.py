"""Alignment from activations: `mergelang stats A B --kind correlation` (data/correlation.py) and
`align(b, to = a, by = "activations", stats = c)` (sources/align/activations.py).

The statistics are compared with an independent plain-torch computation (forward hooks, one
unpadded example at a time, torch's own mean/std); a model B that is an exact permuted copy of A
must be aligned back exactly (the permutations recovered, every tensor equal, so the same
function); bad settings give the coded diagnostics E967-E969 and W147."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mergelang as ml
from mergelang.cli import main as cli_main
from mergelang.diagnostics import MergelangError

transformers = pytest.importorskip("transformers")

import align_helpers as ah  # noqa: E402
import data_models as dm  # noqa: E402

MLP_PY = dm.MLP_SOURCE + '''
def not_a_module():
    return 3

_g = torch.Generator().manual_seed(0)
BATCHES = [torch.randn(16, 6, generator=_g) for _ in range(3)]
'''
GROUPS = dm.GROUPS


def corr_ref(xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """Pearson cross-correlation of the columns of xa and xb (rows: samples), plain torch."""
    xa, xb = xa.double(), xb.double()
    ca, cb = xa - xa.mean(0), xb - xb.mean(0)
    cov = ca.T @ cb / len(xa)
    sa, sb = xa.std(0, unbiased=False), xb.std(0, unbiased=False)
    return cov / (sa[:, None] * sb[None, :]).clamp(min=1e-7)


def hooked_inputs(model, names: list[str], inputs: list[dict]) -> dict[str, torch.Tensor]:
    """The input rows of the named modules over the inputs (one forward each), concatenated."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, i, o, n=n: rows[n].append(i[0].reshape(-1, i[0].shape[-1])))
          for n in names]
    with torch.no_grad():
        for x in inputs:
            model(**x) if isinstance(x, dict) else model(x)
    for h in hs:
        h.remove()
    return {n: torch.cat(v) for n, v in rows.items()}


# --------------------------------------------------------------------------------- a plain MLP


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mlp")
    (root / "mlp.py").write_text(MLP_PY)
    ns: dict = {}
    exec(MLP_PY, ns)  # noqa: S102 - the test's own module
    torch.manual_seed(0)
    a = ns["MLP"]().eval()
    sd = {k: v.detach().clone() for k, v in a.state_dict().items()}
    p0, p1 = torch.randperm(10), torch.randperm(8)
    pb = dict(sd)
    pb["layers.0.weight"], pb["layers.0.bias"] = sd["layers.0.weight"][p0], sd["layers.0.bias"][p0]
    pb["layers.1.weight"], pb["layers.1.bias"] = sd["layers.1.weight"][p1][:, p0], sd["layers.1.bias"][p1]
    pb["layers.2.weight"] = sd["layers.2.weight"][:, p1]
    for name, state in (("a", sd), ("b", pb)):
        (root / name).mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(root / name / "model.safetensors"))
    return {"root": root, "ns": ns, "a": root / "a", "b": root / "b", "perms": (p0, p1),
            "module": f"{root / 'mlp.py'}:MLP", "data": f"{root / 'mlp.py'}:BATCHES"}


def test_mlp_statistics_equal_plain_torch_hooks(mlp):
    res = ml.stats([mlp["a"], mlp["b"]], mlp["data"], kind="correlation", module=mlp["module"], groups=GROUPS)
    assert res.info["groups"] == {"h0": {"size": 10, "sites": ["layers.1.weight:in"]},
                                  "h1": {"size": 8, "sites": ["layers.2.weight:in"]}}
    nets = []
    for f in ("a", "b"):
        net = mlp["ns"]["MLP"]().eval()
        net.load_state_dict(load_file(str(mlp[f] / "model.safetensors")))
        nets.append(hooked_inputs(net, ["layers.1", "layers.2"], mlp["ns"]["BATCHES"]))
    for layer in ("layers.1", "layers.2"):
        xa, xb = nets[0][layer], nets[1][layer]
        key = f"{layer}.weight:in"
        torch.testing.assert_close(res.tensors[f"{key}.corr"].double(), corr_ref(xa, xb), atol=1e-5, rtol=0)
        torch.testing.assert_close(res.tensors[f"{key}.mean_b"].double(), xb.double().mean(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(res.tensors[f"{key}.std_a"].double(), xa.double().std(0, unbiased=False),
                                   atol=1e-6, rtol=0)
    assert res.info["rows"] == 48 and res.info["examples"] == 48


def test_mlp_cli_and_recipe_recover_the_permuted_copy(mlp, tmp_path):
    args = ["stats", str(mlp["a"]), str(mlp["b"]), "--kind", "correlation", "--data", mlp["data"],
            "--module", mlp["module"], "-o", str(tmp_path / "c"), "-q"]
    for g in GROUPS:
        args += ["--group", g]
    r = CliRunner().invoke(cli_main, args)
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "c" / "mergelang_stats.json").read_text())
    assert info["kind"] == "correlation" and info["custom_groups"] == GROUPS and len(info["data_sha256"]) == 64
    recipe = tmp_path / "r.mrg"
    recipe.write_text(textwrap.dedent(f'''\
        model a = "{mlp['a']}"
        model b = "{mlp['b']}"
        model c = "{tmp_path / 'c'}"
        param G = {json.dumps(GROUPS)}
        merge from a {{
            "*" => align(b, to = a, by = "activations", stats = c, groups = G)
        }}
        '''))
    r = CliRunner().invoke(cli_main, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0 and "W148" not in r.output, r.output
    out = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))
    a = load_file(str(mlp["a"] / "model.safetensors"))
    assert all(torch.equal(out[k], a[k]) for k in a)
    # the aligned copy is the same function as b (a permutation is a symmetry)
    net_b, net_o = mlp["ns"]["MLP"]().eval(), mlp["ns"]["MLP"]().eval()
    net_b.load_state_dict(load_file(str(mlp["b"] / "model.safetensors")))
    net_o.load_state_dict(out)
    x = torch.randn(5, 6)
    torch.testing.assert_close(net_b(x), net_o(x), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------ transformers models


def test_llama_statistics_equal_hooks_and_padding_never_counts(tmp_path):
    a = dm.save_llama(tmp_path / "a", 0)
    b = dm.save_llama(tmp_path / "b", 1)
    txt = dm.write_texts(tmp_path / "d.txt")
    res = ml.stats([a, b], txt, kind="correlation", batch_size=3)  # padded batches
    readers = {s["key"]: s["readers"] for s in res.info["sites"]}
    assert readers["model.layers.0.self_attn.q_proj.weight:in"] == [
        "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    assert readers["model.layers.1.mlp.gate_proj.weight:in"] == ["model.layers.1.mlp.up_proj.weight"]
    tok = transformers.AutoTokenizer.from_pretrained(str(a))
    inputs = [{"input_ids": torch.tensor([tok(t)["input_ids"]])} for t in dm.TEXTS]  # one unpadded text each
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
             "model.layers.0.self_attn.o_proj", "lm_head"]
    got = [hooked_inputs(transformers.LlamaForCausalLM.from_pretrained(str(f)).eval(), names, inputs)
           for f in (a, b)]
    for n in names:
        torch.testing.assert_close(res.tensors[f"{n}.weight:in.corr"].double(), corr_ref(got[0][n], got[1][n]),
                                   atol=2e-5, rtol=0)
    assert res.info["rows"] == sum(len(x["input_ids"][0]) for x in inputs)


def ids_file(tmp_path: Path) -> str:
    (tmp_path / "ids.py").write_text(
        "import torch\n_g = torch.Generator().manual_seed(0)\n"
        f"BATCHES = [{{'input_ids': torch.randint(3, {ah.VOCAB}, (4, 12), generator=_g)}} for _ in range(3)]\n")
    return f"{tmp_path / 'ids.py'}:BATCHES"


def bert_model():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=ah.VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_permuted_copy_recovered_exactly_gpt2_bert(arch, tmp_path):
    from mergelang.sources.align import invert
    from mergelang.sources.align.activations import activation_matching, used_keys

    m = ah.tiny_model(ah.gpt2_config()) if arch == "gpt2" else bert_model()
    state = ah.state_of(m)
    pstate, perms, spec = ah.permuted_copy(m)
    a = ah.save(m, state, tmp_path / "a")
    b = ah.save(m, pstate, tmp_path / "b")
    res = ml.stats([a, b], ids_file(tmp_path), kind="correlation")
    if arch == "gpt2":  # no layer reads the q/k dims: the c_attn outputs carry them
        assert res.info["groups"]["h.0.qk_dims"]["sites"] == ["transformer.h.0.attn.c_attn.weight:out"]
    r = activation_matching({k: res.tensors[f"{k}.corr"] for k in used_keys(res.info)}, res.info, spec,
                            device="cpu")
    inv = invert(perms)
    assert all(torch.equal(r.perms[g], inv[g]) for g in perms), r.perms


def test_llama_permuted_copy_aligned_back_in_a_recipe(tmp_path):
    m = ah.tiny_model(ah.llama_config())
    state = ah.state_of(m)
    pstate, perms, spec = ah.permuted_copy(m, seed=3)
    a = ah.save(m, dict(state), tmp_path / "a")
    b = ah.save(m, pstate, tmp_path / "b")
    r = CliRunner().invoke(cli_main, ["stats", str(a), str(b), "--kind", "correlation", "--data",
                                      ids_file(tmp_path), "-o", str(tmp_path / "c"), "-q"])
    assert r.exit_code == 0, r.output
    text = (f'model a = "{a}"\nmodel b = "{b}"\nmodel c = "{tmp_path / "c"}"\n'
            'merge from a {\n    "*" => align(b, to = a, by = "activations", stats = c)\n}\n')
    merged = ml.compile(text).evaluate()
    assert set(merged) == set(state) and all(torch.equal(merged[k], state[k]) for k in state)
    torch.testing.assert_close(ah.logits(m, merged), ah.logits(m, pstate), atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------- diagnostics


def codes_of(fn) -> list[str]:
    with pytest.raises(MergelangError) as ei:
        fn()
    return [d.code for d in ei.value.diagnostics]


def test_stats_diagnostics(mlp, tmp_path):
    base = dict(kind="correlation", module=mlp["module"], groups=GROUPS)
    assert codes_of(lambda: ml.stats([mlp["a"]], mlp["data"], **base)) == ["E967"]  # one model
    assert codes_of(lambda: ml.stats([mlp["a"], mlp["b"]], mlp["data"], kind="correlation",
                                     module=mlp["module"])) == ["E967"]  # no config: no built-in spec
    assert codes_of(lambda: ml.stats([mlp["a"], mlp["b"]], mlp["data"], kind="correlation",
                                     module=f"{mlp['root'] / 'mlp.py'}:not_a_module", groups=GROUPS)) == ["E969"]
    (tmp_path / "d.txt").write_text("hello\n")
    assert codes_of(lambda: ml.stats([mlp["a"], mlp["b"]], tmp_path / "d.txt", **base)) == ["E969"]  # text data
    other = tmp_path / "other"
    other.mkdir()
    save_file({"layers.0.weight": torch.zeros(10, 6)}, str(other / "model.safetensors"))
    assert codes_of(lambda: ml.stats([mlp["a"], other], mlp["data"], **base)) == ["E967"]  # models differ
    wide = tmp_path / "wide"
    wide.mkdir()
    sd = load_file(str(mlp["a"] / "model.safetensors"))
    save_file({**sd, "extra": torch.zeros(1)}, str(wide / "model.safetensors"))
    assert codes_of(lambda: ml.stats([mlp["a"], wide], mlp["data"], **base)) == ["E969"]  # not the module's state
    res = ml.stats([mlp["a"], mlp["b"]], mlp["data"], groups=[*GROUPS, "bias_only: layers.0.bias@0"],
                   kind="correlation", module=mlp["module"])
    assert [d.code for d in res.warnings] == ["W147"] and res.info["groups"]["bias_only"]["sites"] == []
    r = CliRunner().invoke(cli_main, ["stats", str(mlp["a"]), "--kind", "correlation", "--data", mlp["data"],
                                      "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "takes 2 models" in r.output


@pytest.fixture(scope="module")
def sidecar(mlp, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("side") / "c"
    ml.stats([mlp["a"], mlp["b"]], mlp["data"], kind="correlation", module=mlp["module"], groups=GROUPS, out=out)
    return out


@pytest.mark.parametrize("call, code, what", [
    ('align(b, to = a, by = "acts", stats = c, groups = G)', "E967", "`by`"),
    ('align(b, to = a, by = "activations", groups = G)', "E967", "needs `stats`"),
    ('align(b, to = a, stats = c, groups = G)', "E967", "only with by"),
    ('align(b, to = a, by = "activations", stats = 3, groups = G)', "E967", "needs `stats`"),
    ('align(b, to = a, method = "ot", reg = 0.1, by = "activations", stats = c, groups = G)', "E967", "soft"),
    ('align(b, to = a, by = "activations", stats = c, groups = [G[0]])', "E968", "groups the model"),
    ('align(b, to = a, by = "activations", stats = c, groups = [G[0], G[1], "h2: layers.2.weight@0"])', "E968",
     "no statistics for the group `h2`"),
    ('align(b, to = a, by = "activations", stats = g, groups = G)', "E968", "not a sidecar"),
    ('align(a, to = b, by = "activations", stats = c, groups = G)', "E968", "must be the reference"),
])
def test_align_diagnostics(mlp, sidecar, tmp_path, call, code, what):
    gram = tmp_path / "g"
    gram.mkdir()
    save_file({"layers.0.weight": torch.zeros(6, 6)}, str(gram / "model.safetensors"))
    recipe = tmp_path / "r.mrg"
    recipe.write_text(f'model a = "{mlp["a"]}"\nmodel b = "{mlp["b"]}"\nmodel c = "{sidecar}"\n'
                      f'model g = "{gram}"\nparam G = {json.dumps(GROUPS)}\n'
                      f'merge from a {{\n    "*" => {call}\n}}\n')
    r = CliRunner().invoke(cli_main, ["check", str(recipe)])
    assert r.exit_code == 1, r.output
    assert f"error[{code}]" in r.output and what in r.output, r.output
    assert "r.mrg:7:12" in r.output, r.output  # file:line:col of the align call


def test_stats_of_other_folders_warn_w148(mlp, sidecar, tmp_path):
    """A sidecar computed for other folders (here: a copy of b) still fits the shapes: W148."""
    import shutil

    b2 = tmp_path / "b2"
    shutil.copytree(mlp["b"], b2)
    recipe = tmp_path / "r.mrg"
    recipe.write_text(f'model a = "{mlp["a"]}"\nmodel b = "{b2}"\nmodel c = "{sidecar}"\n'
                      f'param G = {json.dumps(GROUPS)}\n'
                      f'merge from a {{\n    "*" => align(b, to = a, by = "activations", stats = c, groups = G)\n}}\n')
    r = CliRunner().invoke(cli_main, ["check", str(recipe)])
    assert r.exit_code == 0 and "warning[W148]" in r.output and "r.mrg:6:12" in r.output, r.output


def test_align_md_quotes_the_recorded_digits_run():
    """docs/align.md's digits table is benchmarks/align_activations_results.json, as recorded by
    `python benchmarks/align_activations.py --pairs 5 --json ...`."""
    repo = Path(__file__).resolve().parents[2]
    rec = json.loads((repo / "benchmarks" / "align_activations_results.json").read_text())
    doc = (repo / "docs" / "align.md").read_text()
    names = ("a", "b", "plain", "weights", "activations")
    for label, row in [*((str(r["pair"]), r) for r in rec["rows"]), ("mean", rec["mean"])]:
        cells = " | ".join(f"{row[n] * 100:.1f} % ({row[n + ' loss']:.3f})" for n in names)
        assert f"| {label} | {cells} |" in doc, label
    assert rec["pairs"] == 5 and "no GPU" in rec["machine"]


@pytest.mark.parametrize("name", ["align_experiment_results_activations.json",
                                  "align_experiment_results_order2_activations.json"])
def test_align_md_quotes_the_recorded_llama_runs(name):
    """docs/align.md's tiny-Llama activation tables are the recorded JSON of
    `benchmarks/align_experiment.py --activations`; activation matching is the best merge there."""
    repo = Path(__file__).resolve().parents[2]
    rec = json.loads((repo / "benchmarks" / name).read_text())
    doc = (repo / "docs" / "align.md").read_text()
    for r in rec["pairs"]:
        cells = " | ".join(f"{r[n]:.3f}" for n in ("a", "b", "plain", "aligned", "activations"))
        assert f"| {r['pair']} | {cells} |" in doc
        assert r["activations"] < min(r["plain"], r["aligned"])
