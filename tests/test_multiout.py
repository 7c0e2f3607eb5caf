"""Multi-output recipes: named `merge` blocks, one graph, OUTDIR/NAME folders written atomically,
resume with several outputs, and the diagnostics for bad block names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mergelang as ml
from mergelang.cli import main
from mergelang.diagnostics import MergelangError
from mergelang.io.journal import work_dir_for
from mergelang.io.multiwriter import MultiWriter
from mergelang.io.writer import WriterError
from mergelang.ir.ops import Op

SHAPES = {"embed.weight": (6, 4), "layers.0.weight": (4, 4), "layers.1.weight": (4, 4),
          "norm.weight": (4,)}


def make_sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multi")
    for i, m in enumerate(("base", "a", "b")):
        folder = root / m
        folder.mkdir()
        sd = make_sd(i)
        sd["pos_ids"] = torch.arange(5)
        save_file(sd, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32",
                                                        "who": m}))
        (folder / "tokenizer.json").write_text(json.dumps({"tok": m}))
    return root


RECIPE = """model base = "{root}/base"
model a = "{root}/a"
model b = "{root}/b"
option shard_size = "100B"
merge ["ta", "tb"] from base {{
    "norm*" => base
    "*" => base + [a, b] - base
}}
merge "avg" from a {{
    "*" => linear([a, b])
}}
"""


def recipe_text(root: Path) -> str:
    return RECIPE.format(root=root)


def expected(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    sds = {m: load_file(root / m / "model.safetensors") for m in ("base", "a", "b")}
    base, a, b = sds["base"], sds["a"], sds["b"]
    out: dict[str, dict[str, torch.Tensor]] = {"ta": {}, "tb": {}, "avg": {}}
    for k in base:
        if k == "pos_ids":
            out["ta"][k] = out["tb"][k] = base[k]
            out["avg"][k] = a[k]
            continue
        out["ta"][k] = base[k] if k.startswith("norm") else a[k]
        out["tb"][k] = base[k] if k.startswith("norm") else b[k]
        out["avg"][k] = (a[k] + b[k]) / 2
    return out


def read_output(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(folder / f))
    return out


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_output(a: Path, b: Path) -> None:
    """Every file bit-identical, but for the manifests' input records (each covers what its own
    run read: a resumed run skips the kept tensors) and the model cards (they show the command
    line, e.g. --resume); the output digests in the manifests agree too."""
    got, want = files_of(a), files_of(b)
    for name in [n for n in got if n.endswith("mergelang_manifest.json")]:
        digests = [{k: v for k, v in json.loads(d.pop(name)).get("digests", {}).items()
                    if k != "README.md"} for d in (got, want)]
        assert digests[0] == digests[1]
    for name in [n for n in got if n.endswith("README.md")]:
        got.pop(name), want.pop(name)
    assert got == want


def test_evaluate_gives_a_dict_per_output(models: Path) -> None:
    r = ml.compile(recipe_text(models))
    assert r.output_names == ("ta", "tb", "avg")
    out = r.evaluate()
    want = expected(models)
    assert list(out) == ["ta", "tb", "avg"]
    for name in want:
        assert set(out[name]) == set(want[name])
        for k, w in want[name].items():
            torch.testing.assert_close(out[name][k], w, rtol=1e-6, atol=1e-6)


def test_one_graph_reads_each_input_once(models: Path) -> None:
    plan = ml.compile(recipe_text(models)).compilation.plan
    g = plan.graph
    loads = [(g.node(s.nid).attrs["model"], g.node(s.nid).attrs["tensor"]) for s in plan.steps
             if g.node(s.nid).op is Op.LOAD]
    assert len(loads) == len(set(loads))
    sizes = {"base": 0, "a": 0, "b": 0}
    for m in sizes:
        sizes[m] = sum(t.numel() * t.element_size() for t in load_file(models / m / "model.safetensors").values())
    # every tensor of base and a (a's int tensor is avg's copy), b's float tensors: each once
    assert plan.read_bytes == sizes["base"] + sizes["a"] + sizes["b"] - 5 * 8
    names = [g.node(n).attrs["name"] for n in g.outputs()]
    # the outputs of every block for one tensor name are adjacent
    assert len(names) == 15
    for i in range(0, 15, 3):
        tensor = names[i].partition("/")[2]
        assert names[i:i + 3] == [f"ta/{tensor}", f"tb/{tensor}", f"avg/{tensor}"]


def test_run_writes_one_folder_per_output(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = ml.compile(recipe_text(models))
    assert r.run(out, device="cpu") == out
    assert sorted(p.name for p in out.iterdir()) == ["avg", "mergelang_manifest.json", "ta", "tb"]
    want = expected(models)
    for name in ("ta", "tb", "avg"):
        folder = out / name
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "tokenizer.json", "mergelang_recipe.mrg",
                "model.safetensors.index.json"} <= names
        assert sum(n.endswith(".safetensors") for n in names) > 1  # sharded (100 B shards)
        got = read_output(folder)
        assert set(got) == set(want[name])
        for k, w in want[name].items():
            torch.testing.assert_close(got[k], w, rtol=1e-6, atol=1e-6)
    # config and tokenizer come from each block's own `merge from` model
    assert json.loads((out / "ta" / "config.json").read_text())["who"] == "base"
    assert json.loads((out / "avg" / "tokenizer.json").read_text())["tok"] == "a"
    assert not work_dir_for(out).exists()


def test_failure_in_one_output_leaves_nothing(models: Path, tmp_path: Path) -> None:
    """A NaN in the last output (nan_check error) after the others were written: no OUTDIR."""
    text = recipe_text(models).replace('"*" => linear([a, b])', '"norm*" => a / 0 * 0\n    "*" => a')
    out = tmp_path / "out"
    with pytest.raises(MergelangError) as ei:
        ml.compile(text).run(out, device="cpu")
    assert ei.value.codes == ["E503"]
    assert not out.exists()
    assert work_dir_for(out).is_dir()  # kept for --resume


def interrupt_after(calls: int):
    """A progress callback that raises KeyboardInterrupt on its `calls`-th call (a Ctrl-C)."""
    count = {"n": 0}

    def progress(_: int) -> None:
        count["n"] += 1
        if count["n"] >= calls:
            raise KeyboardInterrupt

    return progress


def test_interrupted_then_resumed_equals_uninterrupted(models: Path, tmp_path: Path) -> None:
    text = recipe_text(models)
    ml.compile(text).run(tmp_path / "reference", device="cpu")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        ml.compile(text).run(out, device="cpu", progress=interrupt_after(7))
    assert not out.exists()
    wdir = work_dir_for(out)
    assert {p.name for p in wdir.iterdir()} >= {".ta.mergelang-work", ".tb.mergelang-work"}
    logs: list[str] = []
    r = ml.compile(text)
    seen = []
    r.run(out, device="cpu", resume=True, log=logs.append, progress=seen.append)
    assert any(m.startswith("resuming:") for m in logs), logs
    assert sum(seen) == r.compilation.plan.write_bytes  # resumed bytes + computed bytes
    assert_same_output(out, tmp_path / "reference")
    assert not wdir.exists()


def test_failed_final_move_then_resume(models: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Every output finished, the last rename fails: the rerun with resume redoes and succeeds."""
    text = recipe_text(models)
    ml.compile(text).run(tmp_path / "reference", device="cpu")
    out = tmp_path / "out"

    def broken(self) -> None:
        raise WriterError("E502", f"cannot move the finished checkpoint to {self.out_dir}: disk full")

    monkeypatch.setattr(MultiWriter, "_move_into_place", broken)
    with pytest.raises(MergelangError) as ei:
        ml.compile(text).run(out, device="cpu")
    assert ei.value.codes == ["E502"] and "--resume" in str(ei.value)
    monkeypatch.undo()
    assert not out.exists()
    assert (work_dir_for(out) / "ta" / "config.json").is_file()  # finished inside the work folder
    ml.compile(text).run(out, device="cpu", resume=True)
    assert_same_output(out, tmp_path / "reference")


def test_resume_from_a_single_output_work_folder_starts_clean(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    wdir = work_dir_for(out)
    wdir.mkdir()
    (wdir / ".mergelang-work").touch()  # as every work folder mergelang makes
    (wdir / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    ml.compile(recipe_text(models)).run(out, device="cpu", resume=True)
    assert sorted(p.name for p in out.iterdir()) == ["avg", "mergelang_manifest.json", "ta", "tb"]


def test_existing_output_needs_force(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(MergelangError) as ei:
        ml.compile(recipe_text(models)).run(out, device="cpu")
    assert ei.value.codes == ["E403"]
    with pytest.raises(MergelangError) as ei:  # not a mergelang output: --force does not help
        ml.compile(recipe_text(models)).run(out, device="cpu", force=True)
    assert ei.value.codes == ["E403"] and (out / "old.txt").exists()
    (out / "old.txt").unlink()
    ml.compile(recipe_text(models)).run(out, device="cpu")
    with pytest.raises(MergelangError) as ei:  # an earlier output: only with force
        ml.compile(recipe_text(models)).run(out, device="cpu")
    assert ei.value.codes == ["E403"]
    ml.compile(recipe_text(models)).run(out, device="cpu", force=True)
    assert sorted(p.name for p in out.iterdir()) == ["avg", "mergelang_manifest.json", "ta", "tb"]


def test_cli_run_emit_plan_and_explain(models: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.mrg"
    recipe.write_text(recipe_text(models))
    runner = CliRunner()
    res = runner.invoke(main, ["run", str(recipe), "-o", str(tmp_path / "o"), "-q", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["avg", "mergelang_manifest.json", "ta", "tb"]
    res = runner.invoke(main, ["compile", str(recipe), "--emit", "plan"])
    assert res.exit_code == 0, res.output
    assert "\n# outputs: ta, tb, avg" in res.output
    assert "write 'tb/layers.0.weight'" in res.output
    res = runner.invoke(main, ["check", str(recipe)])
    assert res.exit_code == 0 and "15 output tensors in 3 outputs (ta, tb, avg)" in res.output, res.output
    res = runner.invoke(main, ["explain", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "3 outputs (ta, tb, avg" in res.output and "merge 'avg' from `a`:" in res.output


def test_ml_merge_with_outputs() -> None:
    base, a, b = make_sd(0), make_sd(1), make_sd(2)
    out = ml.merge("[a, b] * w", outputs=["x", "y"], base=base, a=a, b=b, w=2.0)
    assert list(out) == ["x", "y"]
    torch.testing.assert_close(out["y"]["norm.weight"], 2 * b["norm.weight"])


# ------------------------------------------------------------------ diagnostics

HEAD = 'model base = "x"\nmodel a = "x"\n'


def codes(src: str) -> list[str]:
    with pytest.raises(MergelangError) as ei:
        ml.compile(HEAD + src, base=make_sd(0), a=make_sd(1))
    assert "Traceback" not in str(ei.value)
    return ei.value.codes


def test_e310_duplicate_output_names() -> None:
    assert codes('merge "x" from base { "*" => a }\nmerge "x" from base { "*" => base }') == ["E310"]
    assert codes('merge ["x", "y", "x"] from base { "*" => [a, a, a] * 1 }') == ["E310"]


def test_e311_unnamed_block_mixed_with_named() -> None:
    assert codes('merge from base { "*" => a }\nmerge "x" from base { "*" => base }') == ["E311"]
    assert codes('merge "x" from base { "*" => a }\nmerge from base { "*" => base }') == ["E311"]


@pytest.mark.parametrize("name", ["a/b", "..", ".", ".hidden", "", "a\\\\b", "x y", "/abs"])
def test_e312_bad_output_names(name: str) -> None:
    assert codes(f'merge "{name}" from base {{ "*" => a }}') == ["E312"]


def test_e313_stack_size_differs_from_output_count() -> None:
    assert codes('merge ["x", "y", "z"] from base { "*" => [a, base] * 1 }') == ["E313"]
    assert codes('merge "x" from base { "*" => [a, base] * 1 }') == ["E313"]


def test_two_unnamed_blocks_are_still_e106() -> None:
    assert codes('merge from base { "*" => a }\nmerge from base { "*" => base }') == ["E106"]


def test_unknown_model_in_a_second_block() -> None:
    assert codes('merge "x" from base { "*" => a }\nmerge "y" from nope { "*" => a }') == ["E101"]


def test_parse_named_blocks_ast() -> None:
    prog = ml.parse('merge ["x", "y",] from base { "*" => a }\nmerge "z" from a { "*" => a }')
    from mergelang.lang import ast

    blocks = prog.of(ast.MergeBlock)
    assert [b.outputs for b in blocks] == [("x", "y"), ("z",)]
    assert "outputs=('x', 'y')" in ast.dump(prog)


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    """A real `mergelang run` process with two outputs, SIGKILLed once both journals have
    entries, then `--resume`: every byte equals an uninterrupted run."""
    import random
    import signal
    import time

    from test_resume import finish, journal_entries, make_models, run_cli

    make_models(tmp_path, n=16)
    (tmp_path / "r.mrg").write_text('''model a = "models/a"
model b = "models/b"
option shard_size = "1KB"
merge ["x", "y"] from a {
    "*" => [a * 0.75 + b * 0.25, a - b]
}
''')
    ml.compile(tmp_path / "r.mrg").run(tmp_path / "reference", device="cpu")
    out = tmp_path / "out"
    wdir = work_dir_for(out)
    proc = run_cli("run", tmp_path / "r.mrg", "-o", out, "-q", env_extra={"MERGELANG_TEST_DELAY": "0.1"})
    want = random.Random().randint(1, 6)  # a random point, once both journals have entries
    deadline = time.monotonic() + 120
    while min(journal_entries(wdir / f".{n}.mergelang-work") for n in "xy") < want:
        assert proc.poll() is None, f"the merge ended before the kill: {proc.communicate()}"
        assert time.monotonic() < deadline, "the journals did not grow"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()
    code, err = finish(run_cli("run", tmp_path / "r.mrg", "-o", out, "--resume"))
    assert code == 0, err
    assert "Traceback" not in err and "resuming:" in err
    assert_same_output(out, tmp_path / "reference")
    assert not wdir.exists()


def test_a_list_of_tensors_gives_one_per_output() -> None:
    base, a = make_sd(0), make_sd(1)
    src = HEAD + 'merge ["x", "y"] from base { "*" => [a * 2, base] }'
    out = ml.compile(src, base=base, a=a).evaluate()
    torch.testing.assert_close(out["x"]["embed.weight"], 2 * a["embed.weight"])
    assert torch.equal(out["y"]["norm.weight"], base["norm.weight"])
    assert codes('merge ["x", "y"] from base { "*" => [a, base, a] }') == ["E313"]


def test_single_output_resume_ignores_a_multi_output_work_folder(models: Path, tmp_path: Path) -> None:
    """A work folder left by an interrupted multi-output run, then a single-output recipe with
    --resume on the same OUTDIR: the old outputs' folders must not end up in OUTDIR."""
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        ml.compile(recipe_text(models)).run(out, device="cpu", progress=interrupt_after(5))
    single = HEAD.replace('"x"', f'"{models}/base"', 1).replace('"x"', f'"{models}/a"', 1)
    logs: list[str] = []
    ml.compile(single + 'merge from base { "*" => base }').run(out, device="cpu", resume=True,
                                                              log=logs.append)
    assert any("no journal" in m for m in logs), logs
    assert not any(p.is_dir() for p in out.iterdir())
    assert (out / "model.safetensors.index.json").is_file()


def test_equal_statistics_of_two_blocks_are_computed_once() -> None:
    base, a = make_sd(0), make_sd(1)
    same = HEAD + 'merge "x" from base { "*" => base * model_sum(a) }\nmerge "y" from base { "*" => a * model_sum(a) }'
    r = ml.compile(same, base=base, a=a)
    assert len(r.compilation.plan.stats) == 1
    total = sum(float(v.double().sum()) for v in a.values())
    out = r.evaluate()
    for k in SHAPES:
        torch.testing.assert_close(out["x"][k], base[k] * total, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["y"][k], a[k] * total, rtol=1e-5, atol=1e-5)
    other = same.replace("a * model_sum(a)", "a * model_sum(a * 2)")
    assert len(ml.compile(other, base=base, a=a).compilation.plan.stats) == 2


def test_statistics_over_different_tensors_stay_apart() -> None:
    """Two rules with the same expression route different tensors: two statistics, as before."""
    base, a = make_sd(0), make_sd(1)
    src = HEAD + 'merge from base {\n  "layers.*" => base * model_sum(a)\n  "*" => base * model_sum(a)\n}'
    r = ml.compile(src, base=base, a=a)
    assert len(r.compilation.plan.stats) == 2
    out = r.evaluate()
    layers = sum(float(a[k].double().sum()) for k in SHAPES if k.startswith("layers."))
    rest = sum(float(a[k].double().sum()) for k in SHAPES if not k.startswith("layers."))
    torch.testing.assert_close(out["layers.0.weight"], base["layers.0.weight"] * layers, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["norm.weight"], base["norm.weight"] * rest, rtol=1e-5, atol=1e-5)


def test_example_recipe_runs_on_the_tiny_models(tmp_path: Path) -> None:
    """examples/emr.mrg on examples/make_tiny_models.py's checkpoints, checked against EMR in
    plain torch (test_methods_emr's reference) for the non-norm tensors."""
    import importlib.util
    import shutil

    from test_methods_emr import reference_emr

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_tiny_models", repo / "examples" / "make_tiny_models.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    maker.make_models(tmp_path / "models", seed=0)
    shutil.copy(repo / "examples" / "emr.mrg", tmp_path / "emr.mrg")
    out = ml.compile(tmp_path / "emr.mrg").run(tmp_path / "merged", device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["avg", "code", "math", "mergelang_manifest.json"]
    sds = {m: read_output(tmp_path / "models" / m) for m in ("base", "math", "code")}
    floats = [k for k, v in sds["base"].items() if v.is_floating_point() and "norm" not in k]
    want = reference_emr({k: sds["base"][k].float() for k in floats},
                         [{k: sds[m][k].float() for k in floats} for m in ("math", "code")])
    for name, w in zip(("math", "code"), want):
        got = read_output(out / name)
        for k in floats:
            torch.testing.assert_close(got[k].float(), w[k].to(got[k].dtype).float(), rtol=1e-2, atol=1e-3)
        for k in sds["base"]:
            if "norm" in k:
                assert torch.equal(got[k], sds["base"][k])


def test_every_tensor_of_a_list_is_shape_checked() -> None:
    assert set(codes('merge ["x", "y"] from base { "*" => [a, sum(a, over = "rows")] }')) == {"E207"}


def test_a_folder_named_like_the_work_folder_is_never_emptied(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    theirs = work_dir_for(out)
    theirs.mkdir()
    (theirs / "keep.txt").write_text("x")
    with pytest.raises(MergelangError) as ei:
        ml.compile(recipe_text(models)).run(out, device="cpu")
    assert ei.value.codes == ["E505"] and (theirs / "keep.txt").read_text() == "x"
