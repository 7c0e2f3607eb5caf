"""End-to-end tests: tiny Llama checkpoints -> `mergelang run` -> a Hugging Face folder that
transformers loads and runs.

The models come from examples/make_tiny_models.py (imported from its path), built once per test
module (per xdist worker) into a temporary folder laid out like examples/:

    work/models/{base,math,code}     sharded float32 checkpoints + tokenizer
    work/{ties,linear,slerp}.mrg     the example recipes, copied unchanged (relative model paths)

The CLI is driven both as a real process (`python -m mergelang ...`, with the working directory
elsewhere so relative model paths must resolve against the recipe's folder) and in-process with
click's CliRunner. Merged tensors are checked against the plain-torch formulas in reference.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import reference as ref

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
if str(REPO) not in sys.path:  # mergelang importable without an editable install
    sys.path.insert(0, str(REPO))

SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
INDEX = "model.safetensors.index.json"
N_LAYERS = 4
VOCAB = 128
# mergelang computes in float32, the reference in float64
TOL = dict(rtol=1e-5, atol=1e-6)
NOISE = 0.05


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


def _load_maker():
    spec = importlib.util.spec_from_file_location("make_tiny_models", EXAMPLES / "make_tiny_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with models/{base,math,code} and copies of the example recipes."""
    root = tmp_path_factory.mktemp("work")
    # 5% perturbations (not the examples' 1%), so math and code are far enough apart for slerp to
    # take its spherical branch rather than the near-parallel linear fallback
    paths = _load_maker().make_models(root / "models", seed=0, noise=NOISE)
    assert set(paths) == {"base", "math", "code"}
    for name in ("ties", "linear", "slerp"):
        shutil.copy(EXAMPLES / f"{name}.mrg", root / f"{name}.mrg")
    return root


@pytest.fixture(scope="module")
def models(work) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_folder(work / "models" / name) for name in ("base", "math", "code")}


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / INDEX).read_text())
    tensors: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(folder / fname))
    return tensors


def write_recipe(folder: Path, work: Path, rules: str, *, header: str = "",
                 name: str = "recipe.mrg") -> Path:
    """A recipe in `folder` declaring base/math/code by absolute path."""
    models = "\n".join(f'model {m} = "{work / "models" / m}"' for m in ("base", "math", "code"))
    path = folder / name
    path.write_text(f"{models}\n{header}\nmerge from base {{\n{rules}\n}}\n")
    return path


def run_module(*args, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m mergelang ARGS` in a fresh process; stdout and stderr captured as text."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "mergelang", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def cli(*args, expect: int = 0):
    """In-process `mergelang ARGS` via CliRunner; asserts the exit code."""
    from mergelang.cli import main  # imported here: a broken CLI fails these tests, not collection

    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exit_code != expect:
        import traceback

        tb = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        pytest.fail(f"mergelang {' '.join(map(str, args))}: exit {result.exit_code}, "
                    f"expected {expect}\n--- output\n{result.output}\n{tb}")
    return result


def check_folder(out: Path, base: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 ) -> dict[str, torch.Tensor]:
    """The output is a complete sharded HF folder; returns its tensors."""
    assert (out / "config.json").is_file()
    assert (out / INDEX).is_file()
    index = json.loads((out / INDEX).read_text())
    weight_map = index["weight_map"]
    assert set(weight_map) == set(base), "output tensor names differ from the base model's"

    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards, "no shards written"
    totals = set()
    for i, fname in enumerate(shards, start=1):
        m = SHARD_RE.fullmatch(fname)
        assert m, f"unexpected shard name {fname}"
        assert int(m.group(1)) == i
        totals.add(int(m.group(2)))
    assert totals == {len(shards)}, f"shard names disagree on the count: {shards}"
    assert set(weight_map.values()) == set(shards)
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name], "temporary files left"

    tensors = load_folder(out)
    for name, t in tensors.items():
        assert weight_map[name] and t.shape == base[name].shape, name
        assert t.dtype == dtype, f"{name}: {t.dtype}, expected {dtype}"

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    cfg_dtype = config.get("dtype", config.get("torch_dtype"))
    if cfg_dtype is not None:
        assert cfg_dtype == str(dtype).removeprefix("torch."), f"config.json says {cfg_dtype}"
    return tensors


def check_loads(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, VOCAB)
    assert torch.isfinite(logits.float()).all()


def close(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    torch.testing.assert_close(actual.float(), expected.float(), **TOL, msg=lambda m: f"{name}: {m}")


def is_norm(name: str) -> bool:
    return "norm" in name


def attn_layer(name: str) -> int | None:
    m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\..*", name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# the example recipes


def test_tiny_models_are_sharded_and_distinct(work, models):
    for name in ("base", "math", "code"):
        folder = work / "models" / name
        assert (folder / INDEX).is_file() and (folder / "config.json").is_file()
        assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    base, math, code = models["base"], models["math"], models["code"]
    w = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(base[w], math[w]) and not torch.equal(math[w], code[w])
    rel = (math[w] - base[w]).std() / base[w].std()
    assert 0.5 * NOISE < rel < 2 * NOISE
    # far enough apart that slerp is really spherical on the attention weights
    q = "model.layers.0.self_attn.q_proj.weight"
    cos = torch.nn.functional.cosine_similarity(math[q].flatten().double(),
                                                code[q].flatten().double(), dim=0)
    assert cos < ref.SLERP_DOT_THRESHOLD
    assert not torch.allclose(ref.slerp(math[q], code[q], 0.5), ref.linear([math[q], code[q]]),
                              **TOL)


def test_ties_example_subprocess(work, models, tmp_path):
    out = tmp_path / "merged-ties"
    # cwd is not the recipe's folder: "models/base" must resolve against the recipe
    proc = run_module("run", work / "ties.mrg", "-o", out, "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr

    tensors = check_folder(out, models["base"])
    base, math, code = models["base"], models["math"], models["code"]
    for name, t in tensors.items():
        if is_norm(name):
            assert torch.equal(t, base[name]), name
        elif (i := attn_layer(name)) is not None:
            close(t, ref.slerp(math[name], code[name], i / 3), name)
        else:
            close(t, ref.ties(base[name], [math[name], code[name]], [1, 1], density=0.5), name)
    # layer 0 is pure `math`, the last layer pure `code` (t = 0 and t = 1)
    q = "model.layers.{}.self_attn.q_proj.weight"
    close(tensors[q.format(0)], math[q.format(0)], "t=0")
    close(tensors[q.format(N_LAYERS - 1)], code[q.format(N_LAYERS - 1)], "t=1")
    # config and tokenizer come from the `merge from` model
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == N_LAYERS
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (work / "models" / "base" / f).read_bytes(), f
    check_loads(out)


def test_linear_example_cli_runner(work, models, tmp_path):
    out = tmp_path / "merged-linear"
    cli("run", work / "linear.mrg", "-o", out)
    tensors = check_folder(out, models["base"])
    for name, t in tensors.items():
        close(t, ref.linear([models[m][name] for m in ("base", "math", "code")], [1, 1, 1]), name)
    check_loads(out)


def test_slerp_example_cli_runner(work, models, tmp_path):
    out = tmp_path / "merged-slerp"
    cli("run", work / "slerp.mrg", "-o", out, "--device", "cpu")
    tensors = check_folder(out, models["base"])
    base, math, code = models["base"], models["math"], models["code"]
    for name, t in tensors.items():
        if is_norm(name):
            assert torch.equal(t, base[name]), name
        else:
            i = attn_layer(name)
            close(t, ref.slerp(math[name], code[name], 0.5 if i is None else i / 3), name)
    check_loads(out)


# ---------------------------------------------------------------------------------------------
# check / compile / usage


@pytest.mark.parametrize("recipe", ["ties", "linear", "slerp"])
def test_check_good_recipe(work, recipe):
    result = cli("check", work / f"{recipe}.mrg")
    assert "Traceback" not in result.output


@pytest.mark.parametrize("emit", ["ast", "graph", "optimized", "plan"])
def test_compile_emit(work, emit):
    result = cli("compile", work / "ties.mrg", "--emit", emit)
    assert result.output.strip()


def test_usage_errors_exit_2(work, tmp_path):
    cli("run", work / "ties.mrg", expect=2)  # no -o
    cli("run", work / "ties.mrg", "-o", tmp_path / "x", "--device", "tpu", expect=2)
    cli("frobnicate", expect=2)


# ---------------------------------------------------------------------------------------------
# diagnostics


def _typo_recipe(work: Path, tmp_path: Path) -> Path:
    recipe = tmp_path / "typo.mrg"
    recipe.write_text((work / "ties.mrg").read_text().replace('"models/code"', '"models/cdoe"'))
    return recipe


def test_typo_model_path_is_E301_run(work, tmp_path):
    # a real process, so an uncaught exception would really print a Traceback
    out = tmp_path / "out"
    proc = run_module("run", _typo_recipe(work, tmp_path), "-o", out, cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "E301" in text
    assert "Traceback" not in text
    assert not out.exists() or not any(out.iterdir())


def test_typo_model_path_is_E301_check(work, tmp_path):
    result = cli("check", _typo_recipe(work, tmp_path), expect=1)
    assert "E301" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not a crash


def test_existing_output_needs_force(work, models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = cli("run", work / "linear.mrg", "-o", out, expect=1)
    assert "E403" in result.output
    assert "Traceback" not in result.output
    assert (out / "keep.txt").read_text() == "precious"
    assert not list(out.glob("*.safetensors"))

    # --force replaces only an earlier mergelang output: this folder is not one
    result = cli("run", work / "linear.mrg", "-o", out, "--force", expect=1)
    assert "E403" in result.output and "by hand" in result.output
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    cli("run", work / "linear.mrg", "-o", out)  # an empty folder is fine
    check_folder(out, models["base"])
    result = cli("run", work / "linear.mrg", "-o", out, expect=1)
    assert "E403" in result.output and "--force" in result.output
    cli("run", work / "linear.mrg", "-o", out, "--force")  # its own earlier output: replaced
    check_folder(out, models["base"])


# ---------------------------------------------------------------------------------------------
# parameters, dtypes, passthrough


def test_set_overrides_param(work, models, tmp_path):
    default, low = tmp_path / "default", tmp_path / "low"
    cli("run", work / "ties.mrg", "-o", default)
    cli("run", work / "ties.mrg", "-o", low, "--set", "density=0.3")
    a, b = load_folder(default), load_folder(low)
    mlp = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(a[mlp], b[mlp]), "--set density=0.3 did not change the output"
    base, math, code = models["base"], models["math"], models["code"]
    close(b[mlp], ref.ties(base[mlp], [math[mlp], code[mlp]], [1, 1], density=0.3), mlp)
    # tensors the parameter does not reach are unchanged
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(a[q], b[q])
    assert torch.equal(a["model.norm.weight"], b["model.norm.weight"])


def test_output_dtype_option(work, models, tmp_path):
    recipe = write_recipe(tmp_path, work, '"*" => linear([base, math, code], weights = [1, 1, 1])',
                          header='option dtype = "bfloat16"')
    out = tmp_path / "bf16"
    cli("run", recipe, "-o", out)
    tensors = check_folder(out, models["base"], dtype=torch.bfloat16)
    name = "model.layers.2.mlp.gate_proj.weight"
    expected = ref.linear([models[m][name] for m in ("base", "math", "code")]).to(torch.bfloat16)
    torch.testing.assert_close(tensors[name], expected, rtol=1e-2, atol=1e-4)
    check_loads(out)


def test_passthrough_is_bit_exact(work, models, tmp_path):
    recipe = write_recipe(tmp_path, work, '"*" => base')
    out = tmp_path / "copy"
    cli("run", recipe, "-o", out)
    tensors = check_folder(out, models["base"])
    base = models["base"]
    assert set(tensors) == set(base)
    for name, t in tensors.items():
        assert t.dtype == base[name].dtype and torch.equal(t, base[name]), name
    check_loads(out)


def test_cli_collects_cycles_less_often(work):
    """The CLI raises the collector's thresholds for its one-graph, long-lived-objects process
    (a measured start-up and streaming cost); CPython's default gen-0 threshold is 700."""
    import gc

    before = gc.get_threshold()
    try:
        cli("check", work / "ties.mrg")
        assert gc.get_threshold()[0] >= 50_000
    finally:
        gc.set_threshold(*before)


def test_fast_exit_flushes_and_runs_atexit_handlers(work, tmp_path):
    """The console entry skips the interpreter's teardown after a successful command, but stdout
    (a pipe here) is flushed, atexit handlers run, and failures still exit with their code."""
    script = ("import atexit, sys\n"
              "from mergelang.cli import entry\n"
              "atexit.register(lambda: print('atexit handler ran'))\n"
              "sys.argv = ['mergelang'] + sys.argv[1:]\n"
              "entry()\n"
              "print('not reached: entry() exits')\n")
    ok = subprocess.run([sys.executable, "-c", script, "methods"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "ties(base, models" in ok.stdout and ok.stdout.rstrip().endswith("atexit handler ran")
    assert "not reached" not in ok.stdout
    bad = subprocess.run([sys.executable, "-c", script, "check", str(tmp_path / "missing.mrg")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "E002" in bad.stderr
    assert "atexit handler ran" in bad.stdout  # the ordinary exit path


def test_moe_example_writes_a_mixtral(work, tmp_path):
    """examples/moe.mrg: a Mixtral from the tiny Llamas, loaded and run by transformers."""
    transformers = pytest.importorskip("transformers")
    shutil.copy(EXAMPLES / "moe.mrg", work / "moe.mrg")
    out = tmp_path / "moe"
    cli("run", work / "moe.mrg", "-o", out, "--device", "cpu")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 2
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_twin_adapters_and_widen_examples(work, models, tmp_path):
    """examples/twin_adapters.mrg (a shared model + per-task adapters whose products are the
    rank-8 SVD of task - shared) and examples/widen.mrg run on the tiny Llamas."""
    for name in ("twin_adapters", "widen"):
        shutil.copy(EXAMPLES / f"{name}.mrg", work / f"{name}.mrg")
    out = tmp_path / "twin"
    cli("run", work / "twin_adapters.mrg", "-o", out, "--device", "cpu")
    shared = load_folder(out / "shared")
    ad = load_file(out / "math" / "adapter_model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    a = ad[f"base_model.model.{name[:-7]}.lora_A.weight"].double()
    b = ad[f"base_model.model.{name[:-7]}.lora_B.weight"].double()
    u, s, vh = torch.linalg.svd(models["math"][name].double() - shared[name].double(), full_matrices=False)
    assert torch.allclose(b @ a, (u[:, :8] * s[:8]) @ vh[:8], atol=1e-4)
    cli("run", work / "widen.mrg", "-o", tmp_path / "widen", "--device", "cpu")
    assert load_folder(tmp_path / "widen").keys() == models["base"].keys()


def test_towers_example_merges_differently_named_layers(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    two = {f"{t}.layers.{i}.{w}": torch.randn(4, 4, generator=g)
           for t in ("vision", "text") for i in range(2) for w in ("attn.weight", "mlp.weight")}
    one = {f"layers.{i}.{w}": torch.zeros(4, 4) for i in range(2) for w in ("attn.weight", "mlp.weight")}
    one["head.weight"] = torch.ones(3, 4)
    for name, sd in (("two_towers", two), ("one_tower", one)):
        (tmp_path / "models" / name).mkdir(parents=True)
        save_file(sd, str(tmp_path / "models" / name / "model.safetensors"))
    shutil.copy(EXAMPLES / "towers.mrg", tmp_path / "towers.mrg")
    out = tmp_path / "out"
    cli("run", tmp_path / "towers.mrg", "-o", out, "--device", "cpu")
    got = load_file(next(out.glob("*.safetensors")))
    for i in range(2):
        for w in ("attn.weight", "mlp.weight"):
            want = (two[f"vision.layers.{i}.{w}"] + two[f"text.layers.{i}.{w}"]) / 2
            assert torch.allclose(got[f"layers.{i}.{w}"], want)
    assert torch.equal(got["head.weight"], one["head.weight"])
