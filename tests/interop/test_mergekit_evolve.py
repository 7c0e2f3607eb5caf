"""mergekit-evolve configs -> a recipe with ranged params + the `tune` command (interop/mergekit_evolve.py).

The phenotype check: a genotype's values set on the recipe's params give the same tensors as
importing mergekit's own merge config for that genotype (`genotype_merge_config`), written here
by hand (an independent replica of mergekit/evo/genome.py's discrete and smooth cases) and, with
$MERGEKIT_PYTHON, by mergekit's genome code itself (which also gives the genotype's size).
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

import mergelang as ml
from mergelang.cli import main as cli_main
from mergelang.data.objectives import task_entries, weighted_score
from mergelang.diagnostics import MergelangError
from mergelang.interop.mergekit_import import translate

LAYERS, H, I, V = 4, 8, 12, 16


def llama(folder: Path, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (H, H), p + "self_attn.o_proj.weight": (H, H),
                       p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
                       p + "input_layernorm.weight": (H,)})
    folder.mkdir(parents=True)
    save_file({k: torch.randn(s, generator=g) for k, s in shapes.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
        "intermediate_size": I, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
        "num_key_value_heads": 2, "vocab_size": V}))
    return str(folder)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("evolve")
    for k, n in enumerate(["base", "a", "b", "c"]):
        llama(r / n, k)
    return r


def genome_yaml(root: Path, genome: dict, tasks: list | None = None, **top) -> Path:
    cfg = {"genome": {"models": [str(root / m) for m in genome.pop("models", ["a", "b"])],
                      **({"base_model": str(root / genome.pop("base"))} if "base" in genome else {}),
                      **genome},
           "tasks": tasks or [{"name": "mytask", "weight": 1.0}], "apply_chat_template": False, **top}
    p = root / f"evolve_{abs(hash(json.dumps(cfg, sort_keys=True))) % 10**8}.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def imported(path: Path):
    res = translate(path.read_text(), path, path.parent, recipe="r.mrg")
    return res


def searched_scalars(text: str) -> int:
    """How many numbers tune searches: the elements of every ranged param."""
    n = 0
    for line in text.splitlines():
        if line.startswith("param ") and " in [" in line:
            value = line.split("=", 1)[1].split(" in [")[0].strip()
            v = json.loads(value)
            n += len(v) if isinstance(v, list) else 1
    return n


def phenotype(root: Path, method: str, models: list[str], base: str | None, values: dict,
              groups: int, smooth: bool, filters: list[str], normalize: bool) -> str:
    """mergekit's genotype_merge_config, by hand: values[(param, model, filter)] = per-group list."""
    def setting(p: str, m: str, pick) -> object:
        if not filters:
            return pick(values[(p, m, None)])
        return [{"filter": f, "value": pick(values[(p, m, f)])} for f in [*filters, None]]

    params = {p for p, _, _ in values}
    cfg: dict = {"merge_method": method, "parameters": {"normalize": normalize, "int8_mask": True},
                 "dtype": "bfloat16"}
    if base:
        cfg["base_model"] = str(root / base)
    if smooth:
        cfg["models"] = [{"model": str(root / m), "layer_range": [0, LAYERS], "parameters": {
            p: setting(p, m, lambda v: v if len(v) > 1 else v[0]) for p in sorted(params)}} for m in models]
        if base and base not in models:
            cfg["models"].append({"model": str(root / base)})
        return yaml.safe_dump(cfg)
    step = LAYERS // groups
    cfg["slices"] = []
    for s in range(groups):
        lr = [s * step, (s + 1) * step]
        srcs = [{"model": str(root / m), "layer_range": lr,
                 "parameters": {p: setting(p, m, lambda v: v[s]) for p in sorted(params)}} for m in models]
        if base and base not in models:
            srcs.append({"model": str(root / base), "layer_range": lr})
        cfg["slices"].append({"sources": srcs})
    return yaml.safe_dump(cfg)


def state_of(text: str, folder: Path, name: str, **params) -> dict:
    p = folder / name
    p.write_text(text)
    return ml.compile(str(p), **params).evaluate()


def same(x: dict, y: dict) -> None:
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k].float(), y[k].float(), rtol=0, atol=0, msg=k)


CASES = {  # name -> (genome, groups, smooth)
    "ties_groups_filter": ({"merge_method": "ties", "base": "base", "layer_granularity": 2,
                            "filters": ["mlp"]}, 2, False),
    "linear_smooth": ({"merge_method": "linear", "models": ["a", "b", "c"], "layer_granularity": 1,
                       "smooth": True}, 4, True),
    "task_arithmetic_whole": ({"merge_method": "task_arithmetic", "base": "base",
                               "filters": ["self_attn", "norm"]}, 1, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recipe_equals_the_imported_phenotype(root: Path, case: str) -> None:
    genome, groups, smooth = (dict(CASES[case][0]), *CASES[case][1:])
    models = genome.get("models", ["a", "b"])
    method, base, filters = genome["merge_method"], genome.get("base"), genome.get("filters", [])
    res = imported(genome_yaml(root, dict(genome)))
    assert not res.errors, res.diagnostics
    assert "--objective lm-eval:mytask=acc --trials 100 --sampler cmaes" in res.tune_command
    pnames = ["weight", "density"] if method == "ties" else ["weight"]
    assert searched_scalars(res.text) == groups * len(models) * (len(filters) + 1) * len(pnames)
    g = torch.Generator().manual_seed(7)
    values, sets = {}, {}
    for p in pnames:
        for m in models:
            for f in [*filters, None]:
                v = [round(float(x), 4) for x in torch.rand(groups, generator=g)]
                values[(p, m, f)] = v
                sets["_".join([p, m] + ([f] if f else []))] = v if groups > 1 else v[0]
    normalize = method in ("ties", "linear")
    pheno = phenotype(root, method, models, base, values, groups, smooth, filters, normalize)
    (root / f"{case}_pheno.yml").write_text(pheno)
    ref = imported(root / f"{case}_pheno.yml")
    assert not ref.errors, ref.diagnostics
    same(state_of(res.text, root, f"{case}.mrg", **sets), state_of(ref.text, root, f"{case}_ref.mrg"))


def test_check_and_cli(root: Path, tmp_path: Path) -> None:
    cfg = genome_yaml(root, {"merge_method": "dare_ties", "base": "base", "layer_granularity": 2},
                      tasks=["t1", {"name": "t2", "weight": 0.5, "metric": "acc_norm,none"},
                             {"name": "t3", "metric": "exact_match,strict-match"}],
                      limit=20, num_fewshot=3)
    (root / "tasks").mkdir(exist_ok=True)
    (root / "tasks" / "t1.yaml").write_text("task: t1\ndataset_path: json\n")
    out = tmp_path / "r.mrg"
    r = CliRunner().invoke(cli_main, ["import-mergekit", str(cfg), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert ("--objective 'lm-eval:t1=acc,t2=acc_norm*0.5,t3=exact_match/strict-match' --trials 100 "
            "--sampler cmaes --limit 20 --num-fewshot 3 --lm-eval-include") in r.output
    assert 'rescale = "l1"' in out.read_text()
    r = CliRunner().invoke(cli_main, ["check", str(out)])
    assert r.exit_code == 0, r.output
    again = CliRunner().invoke(cli_main, ["import-mergekit", str(cfg), "-o", str(out)])
    assert again.exit_code != 0 and "E403" in again.output  # the same output guard as any import


def test_lm_eval_weighted_score() -> None:
    entries = task_entries("t1,t2=acc_norm*0.5,t3=exact_match/strict-match*-2")
    assert entries == [("t1", None, 1.0), ("t2", "acc_norm,none", 0.5),
                       ("t3", "exact_match,strict-match", -2.0)]
    out = {"results": {"t1": {"alias": "t1", "acc,none": 0.25, "acc_stderr,none": 0.1},
                       "t2": {"acc,none": 0.9, "acc_norm,none": 0.5},
                       "t3": {"exact_match,strict-match": 0.125}},
           "configs": {"t1": {"metric_list": [{"metric": "acc"}]}}}
    assert weighted_score(out, entries) == pytest.approx((0.25 + 0.5 * 0.5 - 2 * 0.125) / 3)
    for bad in ("t1=", "t1*x", "=acc"):
        with pytest.raises(MergelangError, match="E966"):
            task_entries(bad)


def test_lm_eval_objective_passes_weights_metrics_and_fewshot(tmp_path, monkeypatch) -> None:
    """What the objective asks lm-eval for and how it scores the answer (lm-eval faked; the real
    one is run against the lm_eval CLI in tests/datatools/test_data_objectives.py)."""
    import data_models as dm
    import transformers

    from mergelang.data import objectives as O

    folder = dm.save_llama(tmp_path / "m", 0)
    seen: dict = {}

    class Manager:
        def __init__(self, include_path=None):
            self.all_tasks = ["t1", "t2"]

    class LmEval:
        @staticmethod
        def simple_evaluate(**kw):
            seen.update(kw)
            return {"results": {"t1": {"acc,none": 0.5}, "t2": {"acc,none": 1.0, "acc_norm,none": 0.25}},
                    "configs": {t: {"metric_list": [{"metric": "acc"}]} for t in ("t1", "t2")}}

    monkeypatch.setattr(O, "_lm_eval_modules", lambda: (LmEval, lambda **kw: object(), Manager))
    state = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).state_dict()
    f = O.lm_eval("t1*2,t2=acc_norm", folder, num_fewshot=3)
    assert f(state) == (2 * 0.5 + 0.25) / 2
    assert seen["num_fewshot"] == 3 and seen["tasks"] == ["t1", "t2"]
    seen.clear()
    assert O.lm_eval("t1,t2", folder)(state) == (0.5 + 1.0) / 2  # plain names: the mean, as before
    assert "num_fewshot" not in seen
    with pytest.raises(MergelangError, match="E966"):
        O.lm_eval("t2=f1", folder)(state)  # a metric the task did not report


def test_num_fewshot_needs_a_builtin_objective(root: Path, tmp_path: Path) -> None:
    (tmp_path / "obj.py").write_text("def f(state):\n    return 0.0\n")
    rec = _write(root, 'model a = "a"\nparam w = 0.5 in [0, 1]\nmerge from a { "*" => a * w }\n')
    r = CliRunner().invoke(cli_main, ["tune", str(rec), "--objective", f"{tmp_path / 'obj.py'}:f",
                                      "--trials", "1", "--num-fewshot", "2"])
    assert r.exit_code == 2 and "--num-fewshot" in r.output


@pytest.mark.parametrize("genome,top,code", [
    ({"merge_method": "slerp"}, {}, "W113"),
    ({"merge_method": "ties", "base": "a"}, {}, "W113"),
    ({"merge_method": "linear"}, {"shuffle": True, "random_init": True}, "W112"),
    ({"merge_method": "linear"}, {"apply_chat_template": True}, "W112"),
    ({"merge_method": "della", "base": "base"}, {}, "E711"),
    ({"merge_method": "ties"}, {}, "E711"),
    ({"merge_method": "slerp", "models": ["a", "b", "c"]}, {}, "E711"),
    ({"merge_method": "linear", "layer_granularity": 3}, {}, "E711"),
    ({"merge_method": "linear"}, {"tasks": ["a,b"]}, "E712"),
    ({"merge_method": "linear"}, {"tasks": [{"name": "t", "metric": "acc"}]}, "E712"),
    ({"merge_method": "linear"}, {"limit": 0}, "E712"),
])
def test_codes(root: Path, genome: dict, top: dict, code: str) -> None:
    tasks = top.pop("tasks", None)
    cfg = genome_yaml(root, dict(genome), tasks, **top)
    res = imported(cfg)
    assert code in [d.code for d in res.diagnostics], res.diagnostics
    if code.startswith("W"):
        assert not res.errors
        ml.compile(str(_write(root, res.text)))  # still a recipe that compiles


def _write(root: Path, text: str) -> Path:
    p = root / "w.mrg"
    p.write_text(text)
    return p


def test_slerp_two_models(root: Path) -> None:
    res = imported(genome_yaml(root, {"merge_method": "slerp", "layer_granularity": 2}))
    a = ml.compile(str(_write(root, res.text)), t_a=[0.25, 0.75]).evaluate()
    ref = textwrap.dedent(f"""
        model a = "{root / 'a'}"
        model b = "{root / 'b'}"
        option dtype = "bfloat16"
        merge from a {{
            "model.layers.{{i}}.*" if i < 2 => slerp(a, b, t = 0.25)
            "*embed*" => slerp(a, b, t = 0.25)
            "*" => slerp(a, b, t = 0.75)
        }}""")
    same(a, ml.compile(str(_write(root, ref))).evaluate())


# ------------------------------------------------------------------ mergekit's own genome code
def mergekit_python() -> str | None:
    from test_mergekit_side_by_side import mergekit_python as find

    return find()


GENOME_DRIVER = """
import json, sys, yaml, torch
from mergekit.evo.config import EvolMergeConfiguration
from mergekit.evo.genome import ModelGenome
for path in sys.argv[1:]:
    cfg = EvolMergeConfiguration.model_validate(yaml.safe_load(open(path)))
    g = ModelGenome(cfg.genome)
    x = torch.rand(g.initial_genotype().shape, generator=torch.Generator().manual_seed(3))
    print(json.dumps({"shape": list(x.shape), "genotype": x.tolist(),
                      "config": g.genotype_merge_config(x).to_yaml()}))
"""


@pytest.fixture(scope="module")
def mergekit_genomes(root: Path) -> dict[str, tuple[Path, dict]]:
    """case -> (evolve config, mergekit's genotype shape / random genotype / its merge config),
    from one run of mergekit's genome code."""
    py = mergekit_python()
    if py is None:
        pytest.skip("no mergekit venv ($MERGEKIT_PYTHON or $MERGEKIT)")
    cfgs = {case: genome_yaml(root, dict(CASES[case][0])) for case in sorted(CASES)}
    drv = root / "genome_driver.py"
    drv.write_text(GENOME_DRIVER)
    lines = subprocess.run([py, str(drv), *map(str, cfgs.values())], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    return {case: (cfgs[case], json.loads(line)) for case, line in zip(cfgs, lines)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_side_by_side_with_mergekit_genome(root: Path, mergekit_genomes: dict, case: str) -> None:
    genome, groups, _ = (dict(CASES[case][0]), *CASES[case][1:])
    models = genome.get("models", ["a", "b"])
    filters = genome.get("filters", [])
    cfg, out = mergekit_genomes[case]
    res = imported(cfg)
    shape = out["shape"]  # (groups, models, filters + 1, method params)
    assert shape[:3] == [groups, len(models), len(filters) + 1]
    assert searched_scalars(res.text) == shape[0] * shape[1] * shape[2] * shape[3]
    x = torch.tensor(out["genotype"])
    pnames = ["weight", "density"] if shape[3] == 2 else ["weight"]
    sets = {}
    for k, p in enumerate(pnames):
        for j, m in enumerate(models):
            for s, f in enumerate([*filters, None]):
                v = x[:, j, s, k].abs().clamp(0, 1).tolist()  # what the phenotype uses
                sets["_".join([p, m] + ([f] if f else []))] = v if groups > 1 else v[0]
    (root / f"{case}_mk.yml").write_text(out["config"])
    ref = imported(root / f"{case}_mk.yml")
    assert not ref.errors, ref.diagnostics
    same(state_of(res.text, root, f"{case}_x.mrg", **sets), state_of(ref.text, root, f"{case}_mkref.mrg"))
