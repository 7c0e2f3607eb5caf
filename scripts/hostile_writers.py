#!/usr/bin/env python3
"""A hostile pass over the commands that write (issue 27, writers): compile / explain /
import-mergekit / tune / learn / extract-lora / rmm / rmm-rebuild outputs, --plot, --storage,
--resume, multi-output --force, objectives and losses that misbehave, bad API arguments.

Each case runs the CLI in-process (click's CliRunner) in a fresh copy of a tiny project and
says whether it HELD: the expected exit code, the expected diagnostic code in the output, no
"internal error" / traceback, and every protected file byte-identical afterwards. Run it against
any checkout to compare (the counts are what notes/issue-27-writers.md reports):

    PYTHONPATH=/path/to/checkout:tests python scripts/hostile_writers.py [-v]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file


def _model(folder: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    save_file({"l.weight": torch.randn(8, 8, generator=g), "l.bias": torch.randn(8, generator=g)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "test"}))


def _adapter(folder: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    m = "base_model.model.layers.0.q_proj"
    folder.mkdir(parents=True)
    save_file({f"{m}.lora_A.weight": torch.randn(4, 8, generator=g),
               f"{m}.lora_B.weight": torch.randn(8, 4, generator=g)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}))


OBJ = """import sys, torch
def ok(state): return float(state["l.weight"].sum())
def two(state): return (1.0, 2.0)
def exits(state): sys.exit(0)
def huge(state): return 10**400
def nan(state): return float("nan")
def raises(state): raise RuntimeError("boom")
def junk(state): return "junk"
def lok(state, batch): return (state["l.weight"] - 3).pow(2).mean()
def lexit(state, batch): sys.exit(0)
def lraise(state, batch): raise ValueError("bad")
def lnan(state, batch): return state["l.weight"].sum() * float("nan")
def lcomplex(state, batch): return state["l.weight"].sum() * 1j
def lnone(state, batch): return None
def lmut(state, batch):
    state["l.bias"].add_(1.0)
    return (state["l.weight"] - 3).pow(2).mean()
def draise(): raise RuntimeError("no data")
def dexit(): sys.exit(1)
B = [0, 1, 2]
N = 5
EMPTY = []
"""


def project(root: Path) -> None:
    for i, n in enumerate(("base", "a", "b")):
        _model(root / n, i)
    head = 'model base = "base"\nmodel a = "a"\nmodel b = "b"\n'
    body = 'merge from base { "*" => task_arithmetic(base, [a, b], weights = w) }\n'
    (root / "r.mrg").write_text(head + "param w = [0.5, 0.5] in [0, 1]\n" + body)
    (root / "l.mrg").write_text(head + "param w = [0.5, 0.5] learn\n" + body)
    (root / "c.mrg").write_text(head + "param t = 0.9 learn\nmerge from base { \"*\" => linear([base, a], "
                                "weights = [1 - clamp(t, 0, 1), clamp(t, 0, 1)]) }\n")
    (root / "wide.mrg").write_text(head + "param t = 0.5 in [-1e308, 1e308]\nmerge from base { \"*\" => base * t }\n")
    (root / "m.mrg").write_text(head + 'merge "avg" from base { "*" => linear([a, b], weights = [0.5, 0.5]) }\n'
                                'merge "ta" from base { "*" => task_arithmetic(base, [a, b], weights = [0.3, 0.3]) }\n')
    (root / "imp.mrg").write_text('import "lib.mrg"\n' + head + 'merge from base { "*" => base }\n')
    (root / "lib.mrg").write_text("fn f(x) { return x }\n")
    (root / "obj.py").write_text(OBJ)
    (root / "mk.yml").write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 0.5}\n"
                                 "  - model: b\n    parameters: {weight: 0.5}\n")
    (root / "foreign.txt").write_text("mine")
    (root / "foreign.png").write_text("mine")
    (root / "fdir").mkdir()
    (root / "fdir" / "notes.txt").write_text("mine")
    con = sqlite3.connect(root / "foreign.db")
    con.execute("create table users (name text)")
    con.commit()
    con.close()
    (root / "link.txt").symlink_to(root / "foreign.txt")
    (root / "linkdir").symlink_to(root / "fdir")
    (root / "alink").symlink_to(root / "a")  # a link to an input folder
    _adapter(root / "ad0", 0)
    _adapter(root / "ad1", 1)


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file that exists before a case (the protected set), links as their target."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# a case: (name, argv (with {R} for the project root) or a callable(root) -> (code, output),
#          expected exit code, expected diagnostic code or None, files allowed to change)
Case = tuple[str, Any, int, str | None]

T = ["tune", "{R}/r.mrg", "--objective", "{R}/obj.py:ok", "--trials", "1", "-q"]
L = ["learn", "{R}/l.mrg", "--loss", "{R}/obj.py:lok", "--data", "{R}/obj.py:B", "-q"]
XL = ["extract-lora", "{R}/base", "{R}/a", "--rank", "2"]
RMM = ["rmm", "{R}/ad0", "{R}/ad1", "--basis", "2"]

CASES: list[Case] = []


def case(name: str, argv: Any, code: int, diag: str | None) -> None:
    CASES.append((name, argv, code, diag))


for opt_cmd in (["compile", "{R}/r.mrg"], ["explain", "{R}/r.mrg"]):
    c = opt_cmd[0]
    for target, diag in (("{R}/r.mrg", "E404"), ("{R}/a/config.json", "E404"), ("{R}/a/model.safetensors", "E404"),
                         ("{R}/a/new.txt", "E404"), ("{R}/a", "E404"), ("{R}", "E404")):
        case(f"{c} -o {target} --force", [*opt_cmd, "-o", target, "--force"], 1, diag)
        case(f"{c} -o {target}", [*opt_cmd, "-o", target], 1, diag)
    case(f"{c} -o foreign file", [*opt_cmd, "-o", "{R}/foreign.txt"], 1, "E403")
    case(f"{c} -o link --force", [*opt_cmd, "-o", "{R}/link.txt", "--force"], 1, "E403")
    case(f"{c} -o folder", [*opt_cmd, "-o", "{R}/fdir"], 1, None)
    case(f"{c} -o /nonexistent/x", [*opt_cmd, "-o", "/nonexistent/x"], 1, "E502")
case("compile --emit ast -o recipe", ["compile", "{R}/r.mrg", "--emit", "ast", "-o", "{R}/r.mrg", "--force"], 1, "E404")
case("compile -o imported lib", ["compile", "{R}/imp.mrg", "-o", "{R}/lib.mrg", "--force"], 1, "E404")
case("compile -o /dev/null --force", ["compile", "{R}/r.mrg", "-o", "/dev/null", "--force"], 1, "E403")
case("explain -o a FIFO --force", lambda root: (os.mkfifo(root / "fifo"),
                                               run(["explain", "{R}/r.mrg", "-o", "{R}/fifo", "--force"], root))[1],
     1, "E403")
case("tune --plot inside -o", [*T, "-o", "{R}/best", "--plot", "{R}/best/h.png"], 1, None)
case("tune --storage inside -o", [*T, "-o", "{R}/fdir", "--storage", "sqlite:///{R}/fdir/s.db"], 1, "E403")
case("tune --storage /dev/null", [*T, "--storage", "sqlite:////dev/null"], 1, "E403")
case("compile -o through a link into an input", ["compile", "{R}/r.mrg", "-o", "{R}/alink/x.txt"], 1, "E404")
case("explain -o input file via link --force", ["explain", "{R}/r.mrg", "-o", "{R}/alink/config.json", "--force"],
     1, "E404")
case("tune --plot via link into an input", [*T, "--plot", "{R}/alink/h.png"], 1, "E404")
case("tune --storage via link into an input", [*T, "--storage", "sqlite:///{R}/alink/s.db"], 1, "E404")
case("learn -o via link into an input", [*L, "-o", "{R}/alink/sub"], 1, "E404")
case("rmm -o via link into an input", [*RMM, "-o", "{R}/alink"], 1, "E403")
case("compile -o new file", ["compile", "{R}/r.mrg", "-o", "{R}/plan.txt"], 0, None)

IM = ["import-mergekit", "{R}/mk.yml"]
for target, diag in (("{R}/mk.yml", "E404"), ("{R}/a/config.json", "E404"), ("{R}/a/x.mrg", "E404"),
                     ("{R}/foreign.txt", "E403"), ("{R}/link.txt", "E403")):
    case(f"import-mergekit -o {target}", [*IM, "-o", target], 1, diag)
case("import-mergekit -o yaml --force", [*IM, "-o", "{R}/mk.yml", "--force"], 1, "E404")
case("import-mergekit -o deep/new.mrg", [*IM, "-o", "{R}/deep/new.mrg"], 0, None)

for target, diag in (("{R}/a", "E404"), ("{R}", "E404"), ("{R}/fdir", "E403"), ("{R}/foreign.txt", "E403"),
                     ("{R}/linkdir", "E403")):
    case(f"tune -o {target}", [*T, "-o", target], 1, diag)
    case(f"learn -o {target}", [*L, "-o", target], 1, diag)
    case(f"extract-lora -o {target}", [*XL, "-o", target], 1, diag)
    case(f"rmm -o {target}", [*RMM, "-o", target], 1, "E403" if target == "{R}/a" else diag)
case("rmm -o an adapter folder", [*RMM, "-o", "{R}/ad1", "--force"], 1, "E404")
TP = ["tune", "{R}/r.mrg", "--objective", "{R}/obj.py:two", "--trials", "1", "-q", "--direction", "maximize",
      "--direction", "minimize"]
case("tune pareto -o input", [*TP, "-o", "{R}/a"], 1, "E404")
case("tune pareto -o foreign", [*TP, "-o", "{R}/fdir"], 1, "E403")
case("tune pareto -o new", [*TP, "-o", "{R}/front"], 0, None)
case("tune -o objective file's folder", [*T, "-o", "{R}/obj.py"], 1, "E404")
case("extract-lora -o base/sub", [*XL, "-o", "{R}/base/sub"], 1, "E404")
case("rmm -o adapter file", [*RMM, "-o", "{R}/ad0/adapter_model.safetensors"], 1, "E404")

for target, diag in (("{R}/r.mrg", "E404"), ("{R}/a/config.json", "E404"), ("{R}/a/x.png", "E404"),
                     ("{R}/foreign.png", "E403"), ("{R}/foreign.txt", "E403"), ("{R}/plot.txt", "E902"),
                     ("{R}/nofolder/p.png", "E502"), ("{R}/link.txt", "E403"), ("{R}/obj.py", "E404")):
    case(f"tune --plot {target}", [*T, "--plot", target], 1, diag)
case("tune --plot new png", [*T, "--plot", "{R}/p.png"], 0, None)

for url, diag in (("sqlite:///{R}/foreign.db", "E403"), ("sqlite:///{R}/foreign.txt", "E403"),
                  ("sqlite:///{R}/a/config.json", "E404"), ("sqlite:///{R}/a/study.db", "E404"),
                  ("sqlite:///{R}/fdir", "E403"), ("sqlite:///{R}/link.txt", "E403"),
                  ("sqlite:///{R}/r.mrg", "E404"), ("postgresql://u@localhost/db", "E904"),
                  ("sqlite:///{R}/nofolder/s.db", "E502")):
    case(f"tune --storage {url}", [*T, "--storage", url], 1, diag)
case("tune --storage new db", [*T, "--storage", "sqlite:///{R}/s.db"], 0, None)

for fn, code, diag in (("exits", 0, "W110"), ("huge", 1, "E903"), ("junk", 1, "E903"), ("raises", 0, None),
                       ("nan", 0, None)):
    case(f"tune objective {fn}", ["tune", "{R}/r.mrg", "--objective", f"{{R}}/obj.py:{fn}", "--trials", "2", "-q"],
         code, diag)
case("tune range [-1e308, 1e308]", ["tune", "{R}/wide.mrg", "--objective", "{R}/obj.py:ok", "--trials", "1", "-q"],
     1, "E406")


def _directions(root: Path) -> tuple[int, str]:
    url = f"sqlite:///{root}/d.db"
    run([*T, "--storage", url], root)
    return run([*T, "--storage", url, "--direction", "minimize"], root)


def _kind_change(root: Path) -> tuple[int, str]:
    url = f"sqlite:///{root}/k.db"
    run([*T, "--storage", url], root)
    (root / "r.mrg").write_text((root / "r.mrg").read_text().replace("[0.5, 0.5] in [0, 1]", "[1, 1] in [0, 3]"))
    return run([*T, "--storage", url], root)


case("tune stored study, other direction", _directions, 1, "E902")
case("tune stored study, param changed kind", _kind_change, 1, "E902")

for loss, data, extra, code, diag in (
        ("lexit", "B", [], 1, "E907"), ("lraise", "B", [], 1, "E907"), ("lnan", "B", [], 1, "E908"),
        ("lcomplex", "B", [], 1, "E903"), ("lnone", "B", [], 1, "E903"), ("lok", "draise", [], 1, "E907"),
        ("lok", "dexit", [], 1, "E907"), ("lok", "N", [], 1, "E903"), ("lok", "EMPTY", [], 1, "E903"),
        ("lok", "B", ["--lr", "nan"], 1, "E902"), ("lok", "B", ["--lr", "-1"], 1, "E902"),
        ("lok", "B", ["--lr", "inf"], 1, "E902"), ("lmut", "B", [], 0, None)):
    case(f"learn loss={loss} data={data} {' '.join(extra)}",
         ["learn", "{R}/l.mrg", "--loss", f"{{R}}/obj.py:{loss}", "--data", f"{{R}}/obj.py:{data}", "-q",
          "-o", "{R}/out", *extra], code, diag)
case("learn through clamp", ["learn", "{R}/c.mrg", "--loss", "{R}/obj.py:lok", "--data", "{R}/obj.py:B",
                             "--lr", "1", "-q", "-o", "{R}/out"], 0, None)
case("rmm --basis 100000", [*RMM[:-1], "100000", "-o", "{R}/rmm"], 0, "W111")


def _rebuild_into(target: str, diag: str) -> Callable[[Path], tuple[int, str]]:
    def go(root: Path) -> tuple[int, str]:
        run([*RMM, "-o", f"{root}/rmm"], root)
        return run(["rmm-rebuild", "{R}/rmm", "--task", "0", "-o", target], root)
    return go


for target, diag in (("{R}/rmm", "E404"), ("{R}/rmm/sub", "E404"), ("{R}/fdir", "E403"), ("{R}/ad0", "E403"),
                     ("{R}", "E404")):
    case(f"rmm-rebuild -o {target}", _rebuild_into(target, diag), 1, diag)


def _multi(planted: str) -> Callable[[Path], tuple[int, str]]:
    def go(root: Path) -> tuple[int, str]:
        run(["run", "{R}/m.mrg", "-o", "{R}/mo", "-q"], root)
        p = root / "mo" / planted
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("mine")
        return run(["run", "{R}/m.mrg", "-o", "{R}/mo", "-q", "--force"], root)
    return go


case("run --force, file added in OUT/avg/", _multi("avg/my_notes.txt"), 1, "E403")
case("run --force, folder added in OUT/ta/", _multi("ta/mydata/x.bin"), 1, "E403")


def _resume_link(root: Path) -> tuple[int, str]:
    import errno

    import mergelang as ml
    from mergelang.io.journal import work_dir_for

    (root / "s.mrg").write_text('model base = "base"\nmodel a = "a"\noption shard_size = "1KB"\n'
                                'merge from base { "*" => linear([base, a], weights = [0.5, 0.5]) }\n')
    real, n = os.pwrite, [0]

    def filling(fd: int, data: Any, off: int) -> int:
        n[0] += 1
        if n[0] > 1:
            raise OSError(errno.ENOSPC, "full")
        return real(fd, data, off)
    os.pwrite = filling
    try:
        ml.compile(root / "s.mrg").run(root / "so", device="cpu")
    except ml.MergelangError:
        pass
    finally:
        os.pwrite = real
    shards = sorted(work_dir_for(root / "so").glob("model-*.safetensors"))
    if not shards:
        return 0, "no work folder"
    shard = shards[0]
    (root / "outside.bin").write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(root / "outside.bin")
    before = (root / "outside.bin").read_bytes()
    code, out = run(["run", "{R}/s.mrg", "-o", "{R}/so", "--resume", "-q"], root)
    if (root / "outside.bin").read_bytes() != before:
        return 99, out + "\nthe outside file was rewritten"
    return code, out


case("run --resume with a planted link", _resume_link, 1, "E505")


def _api(kw: dict) -> Callable[[Path], tuple[int, str]]:
    def go(root: Path) -> tuple[int, str]:
        import mergelang as ml

        r = ml.compile(root / "r.mrg")
        args = dict(kw)
        out = args.pop("out_dir", root / "apiout")
        try:
            r.run(out, **args)
        except ml.MergelangError as e:
            return 1, str(e)
        except Exception as e:  # noqa: BLE001
            return 3, f"internal error: {type(e).__name__}: {e}"
        finally:
            r.close()
        return 0, ""
    return go


for kw in ({"out_dir": None}, {"device": "tpu"}, {"nan_check": "maybe"}, {"device": None}):
    case(f"API run({kw})", _api(kw), 1, "E402")
case("run --ray-address :", ["run", "{R}/r.mrg", "-o", "{R}/ro", "--executor", "ray", "--ray-address", ":"], 1, "E804")


def run(argv: list[str], root: Path) -> tuple[int, str]:
    from click.testing import CliRunner

    from mergelang.cli import main

    res = CliRunner().invoke(main, [a.replace("{R}", str(root)) for a in argv])
    out = res.output
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        out += f"\ninternal error: {type(res.exception).__name__}: {res.exception}"
        return 3, out
    return res.exit_code, out


def main() -> int:
    verbose = "-v" in sys.argv
    base = Path(tempfile.mkdtemp(prefix="hostile-writers-"))
    template = base / "template"
    template.mkdir()
    project(template)
    held = 0
    for i, (name, argv, code, diag) in enumerate(CASES):
        root = base / f"c{i}"
        shutil.copytree(template, root, symlinks=True)
        for p in root.rglob("*"):  # links point into this copy, not the template
            if p.is_symlink() and str(template) in os.readlink(p):
                target = os.readlink(p).replace(str(template), str(root))
                p.unlink()
                p.symlink_to(target)
        before = digest(root)
        cwd = os.getcwd()
        os.chdir(root)
        try:
            got, out = argv(root) if callable(argv) else run(argv, root)
        except BaseException as e:  # noqa: BLE001 - a case that escapes is a case that broke
            got, out = 3, f"internal error: {type(e).__name__}: {e}"
        finally:
            os.chdir(cwd)
        after = digest(root)
        changed = [p for p, h in before.items() if after.get(p) != h and "/r.mrg" not in p]
        ok = (got == code and (diag is None or diag in out) and "internal error" not in out
              and "Traceback" not in out and not changed)
        held += ok
        if verbose or not ok:
            why = "" if ok else f"  (exit {got}, want {code} {diag or ''}; changed: {changed[:2]}) " + \
                " | ".join(out.strip().splitlines()[:2])[:200]
            print(f"{'held ' if ok else 'BROKE'} {name}{why}")
    shutil.rmtree(base, ignore_errors=True)
    print(f"hostile writers: {held} of {len(CASES)} cases held")
    return 0 if held == len(CASES) else 1


if __name__ == "__main__":
    sys.exit(main())
