"""Every path a command writes goes through the output guard (io/outguard.py).

The test enumerates the CLI's commands and their options (click introspection): every option or
argument that takes a string or a path must be classified here as one the command READS, one it
WRITES, or one that is not a path (OTHER). A new option that is not classified fails
`test_every_path_option_is_classified`; a new writing option needs a case in `WRITES`, which
runs the command with that option aimed (a) at an input (E404, `--force` given where the
command has it) and (b) at a foreign file or folder (E403, no `--force`), and checks that both
are refused with their code and left byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Callable

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from helpers import TARGET_OBJECTIVE, write_model
from mergelang.cli import main

pytest.importorskip("optuna")

# (command, param name) -> what it is
READS = {("run", "recipe"), ("check", "recipe"), ("compile", "recipe"), ("explain", "recipe"),
         ("tune", "recipe"), ("tune", "objective"), ("learn", "recipe"), ("learn", "loss"),
         ("learn", "data"), ("extract-lora", "base"), ("extract-lora", "finetuned"),
         ("import-mergekit", "config"), ("rmm", "adapters"), ("rmm-rebuild", "folder"),
         ("stats", "model"), ("stats", "data"), ("stats", "module"), ("tune", "lm_eval_include"),
         ("inspect", "base"), ("inspect", "models"),
         ("verify", "out")}  # verify reads the output folder it checks
OTHER = {("run", "sets"), ("run", "memory_budget"), ("run", "dtype"), ("run", "shard_size"),
         ("run", "ray_address"), ("check", "sets"), ("compile", "sets"), ("compile", "memory_budget"),
         ("explain", "sets"), ("tune", "study_name"), ("tune", "ray_address"), ("tune", "sets"),
         ("learn", "sets"), ("tune", "params"), ("extract-lora", "include"), ("extract-lora", "exclude"),
         ("extract-lora", "save_modules"), ("import-mergekit", "layer_prefix"), ("rmm", "names"),
         ("rmm-rebuild", "task"), ("stats", "field"), ("stats", "memory_budget"), ("stats", "groups"),
         ("inspect", "memory_budget")}

Argv = Callable[[Path, str], list[str]]  # (project root, the path under test) -> argv


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"l.weight": torch.randn(8, 8, generator=g), "l.bias": torch.randn(8, generator=g)}


def _adapter(folder: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    m = "base_model.model.layers.0.q_proj"
    folder.mkdir(parents=True)
    save_file({f"{m}.lora_A.weight": torch.randn(2, 8, generator=g),
               f"{m}.lora_B.weight": torch.randn(8, 2, generator=g)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}))
    return folder


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("guard")
    for i, name in enumerate(("base", "a", "b")):
        write_model(root / name, _sd(i), {"model_type": "test"})
    head = 'model base = "base"\nmodel a = "a"\nmodel b = "b"\n'
    body = 'merge from base { "*" => task_arithmetic(base, [a, b], weights = w) }\n'
    (root / "r.mrg").write_text(head + "param w = [0.5, 0.5] in [0, 1]\n" + body)
    (root / "l.mrg").write_text(head + "param w = [0.5, 0.5] learn\n" + body)
    (root / "obj.py").write_text(TARGET_OBJECTIVE + "\ndef loss(state, batch):\n"
                                 "    return sum((state[k] - target[k]).pow(2).mean() for k in target)\n"
                                 "BATCHES = [0, 1]\n")
    (root / "data.txt").write_text("one example\nanother one\n")
    (root / "mk.yml").write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: "
                                 "{weight: 0.5}\n  - model: b\n    parameters: {weight: 0.5}\n")
    _adapter(root / "ad0", 0)
    _adapter(root / "ad1", 1)
    res = CliRunner().invoke(main, ["rmm", str(root / "ad0"), str(root / "ad1"), "-o",
                                    str(root / "rmmfold"), "--basis", "2"])
    assert res.exit_code == 0, res.output
    return root


def _r(root: Path) -> str:
    return str(root / "r.mrg")


#: (command, param) -> (argv, what the path is: "folder" | "file" | "storage")
WRITES: dict[tuple[str, str], tuple[Argv, str]] = {
    ("run", "out"): (lambda p, t: ["run", _r(p), "-o", t, "-q"], "folder"),
    ("compile", "out"): (lambda p, t: ["compile", _r(p), "-o", t], "file"),
    ("explain", "out"): (lambda p, t: ["explain", _r(p), "-o", t], "file"),
    ("import-mergekit", "out"): (lambda p, t: ["import-mergekit", str(p / "mk.yml"), "-o", t], "file"),
    ("tune", "out"): (lambda p, t: ["tune", _r(p), "--objective", f"{p}/obj.py:score",
                                    "--trials", "0", "-o", t, "-q"], "folder"),
    ("tune", "plot_path"): (lambda p, t: ["tune", _r(p), "--objective", f"{p}/obj.py:score",
                                          "--trials", "0", "--plot", t, "-q"], "file"),
    ("tune", "storage"): (lambda p, t: ["tune", _r(p), "--objective", f"{p}/obj.py:score",
                                        "--trials", "0", "--storage", f"sqlite:///{t}", "-q"], "storage"),
    ("learn", "out"): (lambda p, t: ["learn", str(p / "l.mrg"), "--loss", f"{p}/obj.py:loss",
                                     "--data", f"{p}/obj.py:BATCHES", "-o", t, "-q"], "folder"),
    ("extract-lora", "out"): (lambda p, t: ["extract-lora", str(p / "base"), str(p / "a"), "-o", t,
                                            "--rank", "2"], "folder"),
    ("rmm", "out"): (lambda p, t: ["rmm", str(p / "ad0"), str(p / "ad1"), "-o", t, "--basis", "2"],
                     "folder"),
    ("rmm-rebuild", "out"): (lambda p, t: ["rmm-rebuild", str(p / "rmmfold"), "--task", "0", "-o", t],
                             "folder"),
    ("inspect", "out"): (lambda p, t: ["inspect", str(p / "base"), str(p / "a"), str(p / "b"), "-o", t,
                                       "--format", "json"], "folder"),
    ("stats", "out"): (lambda p, t: ["stats", str(p / "a"), "--data", str(p / "data.txt"), "--kind",
                                     "gram", "-o", t, "-q"], "folder"),
}

#: for each command, an input path (file, folder) of that command that an output may not be
INPUTS: dict[str, tuple[str, str]] = {
    "import-mergekit": ("mk.yml", "a"),
    "extract-lora": ("a/config.json", "a"),
    "rmm": ("ad0/adapter_config.json", "ad0"),
    "rmm-rebuild": ("rmmfold/rmm_config.json", "rmmfold"),
    "learn": ("obj.py", "a"),
}


def _path_params() -> list[tuple[str, str]]:
    out = []
    for cname, cmd in main.commands.items():
        for p in cmd.params:
            if p.name == "debug" or isinstance(p.type, click.Choice):
                continue
            if isinstance(p.type, click.Path) or p.type is click.STRING:
                out.append((cname, p.name))
    return out


def test_every_path_option_is_classified() -> None:
    found = set(_path_params())
    unclassified = found - READS - OTHER - set(WRITES)
    assert not unclassified, f"classify these options (READS / OTHER / WRITES + a case): {unclassified}"
    stale = (READS | OTHER | set(WRITES)) - found
    assert not stale, f"no such options any more: {stale}"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted([path, *path.rglob("*")] if path.is_dir() else [path]):
        h.update(str(p.relative_to(path.parent)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _has_force(cname: str) -> bool:
    return any(p.name == "force" for p in main.commands[cname].params)


def _invoke(argv: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(main, argv)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exc_info
    return res.exit_code, res.output


@pytest.mark.parametrize("key", sorted(WRITES), ids=lambda k: f"{k[0]}:{k[1]}")
def test_writing_option_refuses_an_input(project: Path, key: tuple[str, str]) -> None:
    argv_of, kind = WRITES[key]
    file_in, folder_in = INPUTS.get(key[0], ("a/config.json", "a"))
    targets = [project / folder_in] if kind == "folder" else [project / file_in, project / "a/config.json"]
    if kind == "file" and key[0] != "import-mergekit":
        targets.append(project / "r.mrg")  # the recipe being read
    if kind == "storage":  # a database inside an input folder
        targets = [project / "a" / "study.db", project / file_in]
    for target in targets:
        before = _digest(project / folder_in), _digest(project / "r.mrg")
        argv = argv_of(project, str(target)) + (["--force"] if _has_force(key[0]) else [])
        code, out = _invoke(argv)
        assert code == 1 and "E404" in out, (argv, out)
        assert (_digest(project / folder_in), _digest(project / "r.mrg")) == before
        assert not (project / "a" / "study.db").exists()


@pytest.mark.parametrize("key", sorted(WRITES), ids=lambda k: f"{k[0]}:{k[1]}")
def test_writing_option_refuses_a_foreign_path(project: Path, tmp_path: Path,
                                               key: tuple[str, str]) -> None:
    argv_of, kind = WRITES[key]
    if kind == "folder":
        target = tmp_path / "mine"
        target.mkdir()
        (target / "notes.txt").write_text("my notes")
    elif kind == "file":
        target = tmp_path / "mine.png"
        target.write_text("my file")
    else:  # another program's SQLite database
        target = tmp_path / "mine.db"
        con = sqlite3.connect(target)
        con.execute("create table users (name text)")
        con.commit()
        con.close()
    before = _digest(target)
    code, out = _invoke(argv_of(project, str(target)))
    assert code == 1 and "E403" in out, out
    assert _digest(target) == before
    if kind == "storage":  # --force does not make a foreign database writable either
        code, out = _invoke(argv_of(project, str(target)) + ["--force"])
        assert code == 1 and "E403" in out, out
        assert _digest(target) == before


@pytest.fixture(scope="module")
def merged(project: Path) -> Path:
    out = project / "merged"
    code, text = _invoke(["run", _r(project), "-o", str(out), "-q"])
    assert code == 0, text
    return out


@pytest.mark.parametrize("key", sorted(k for k, v in WRITES.items() if v[1] != "storage"),
                         ids=lambda k: f"{k[0]}:{k[1]}")
def test_writing_option_refuses_a_path_inside_an_output(project: Path, merged: Path,
                                                        key: tuple[str, str]) -> None:
    """An output inside a mergelang output folder would make it fail `verify`: E403, --force or
    not, and the folder still verifies."""
    argv_of, kind = WRITES[key]
    target = merged / ("sub" if kind == "folder" else "x.png")
    argv = argv_of(project, str(target)) + (["--force"] if _has_force(key[0]) else [])
    code, out = _invoke(argv)
    assert code == 1 and "E403" in out and "lies inside the mergelang output" in out, (argv, out)
    assert not target.exists()
    code, out = _invoke(["verify", str(merged), "--no-inputs"])
    assert code == 0, out


def test_inspect_replaces_its_own_report_inside_an_output(project: Path, tmp_path: Path) -> None:
    """The one exception: an inspect report folder already inside an output is replaced with
    --force (refused without)."""
    import shutil

    out = tmp_path / "merged"
    assert _invoke(["run", _r(project), "-o", str(out), "-q"])[0] == 0
    argv = WRITES[("inspect", "out")][0]
    assert _invoke(argv(project, str(tmp_path / "rep")))[0] == 0
    shutil.copytree(tmp_path / "rep", out / "rep")  # put there by hand (or an older mergelang)
    code, text = _invoke(argv(project, str(out / "rep")))
    assert code == 1 and "E403" in text, text
    code, text = _invoke(argv(project, str(out / "rep")) + ["--force"])
    assert code == 0, text
    assert (out / "rep" / "report.json").is_file()
    shutil.copytree(tmp_path / "rep", out / "notes")  # a folder that is no report: refused
    (out / "notes" / "mergelang_manifest.json").unlink()
    code, text = _invoke(argv(project, str(out / "notes")) + ["--force"])
    assert code == 1 and "E403" in text, text
