"""Checking a recipe does not import torch (`import torch` alone costs 1.5-2 s here, more than
compiling a 70B-shaped recipe): `mergelang check` and `compile --emit plan` run in a fresh
process and report which heavy modules got imported. Constant folding of reshapes / stacks /
indexes runs without torch and gives the same values as the kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergelang.ir.graph import MergeGraph
from mergelang.passes.optimize import as_python
from mergelang.runtime.kernels import KERNELS, run_node
from mergelang.ir.ops import Attrs, Op
from mergelang.passes.optimize import _fold_structural
from mergelang.ir.types import TType

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
from mergelang.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "scipy", "safetensors"))
print(json.dumps(heavy))
"""


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imports")
    for name in ("a", "b", "c"):
        (root / name).mkdir()
        save_file({"x.weight": torch.zeros(4, 4, dtype=torch.bfloat16), "n.weight": torch.zeros(4)},
                  root / name / "model.safetensors")
    models = "".join(f'model {n} = "{root / n}"\n' for n in ("a", "b", "c"))
    (root / "linear.mrg").write_text(models + 'merge from a {\n "*" => linear([a, b, c], weights = [1, 2, 0.1])\n}\n')
    (root / "ties.mrg").write_text(models + 'merge from a {\n "*" => ties(a, [b, c], density = 0.5)\n}\n')
    return root


def _heavy_modules(*args: str) -> list[str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines and lines[0].startswith("ok") or "--emit" in args, out.stdout
    return json.loads(lines[-1])


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_check_does_not_import_torch(recipes, method):
    heavy = _heavy_modules("check", str(recipes / f"{method}.mrg"))
    assert not [m for m in heavy if m.split(".")[0] in ("torch", "safetensors")], heavy


def test_emit_plan_does_not_import_torch(recipes):
    heavy = _heavy_modules("compile", str(recipes / "linear.mrg"), "--emit", "plan")
    assert "torch" not in heavy, heavy


def _const(g: MergeGraph, value, ty: TType) -> int:
    return g.make(Op.CONST, (), Attrs(value=value, type=ty))


@pytest.mark.parametrize("case", ["reshape", "reshape_scalar", "stack", "index", "index_neg", "bool"])
def test_fold_without_torch_equals_kernels(case):
    g = MergeGraph()
    w = _const(g, (1, 2.5, 0.1, 1e-40), TType((4,)))
    if case == "reshape":
        nid = g.make(Op.RESHAPE, (w,), Attrs(shape=(2, 2)))
    elif case == "reshape_scalar":
        s = _const(g, 0.3, TType(()))
        nid = g.make(Op.RESHAPE, (s,), Attrs(shape=(1, 1)))
    elif case == "stack":
        v = _const(g, (3.0, -0.7, 2.0 ** 30 + 1, 7), TType((4,)))
        nid = g.make(Op.STACK, (w, v))
    elif case in ("index", "index_neg"):
        st = _const(g, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6), TType((2,), models=3))
        nid = g.make(Op.INDEX, (st,), Attrs(i=1 if case == "index" else -1))
    else:
        b = _const(g, (True, False, True), TType((3,), "bool"))
        nid = g.make(Op.RESHAPE, (b,), Attrs(shape=(3, 1)))
    n = g.node(nid)
    args = [g.node(a) for a in n.args]
    got = _fold_structural(n, args)
    want = as_python(run_node(n, [KERNELS[Op.CONST](a, []) for a in args]))
    assert got is not None and got == want and type(got) is type(want)
