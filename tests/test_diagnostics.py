"""Every diagnostic code in `mergelang.diagnostics.CODES` is triggered by a minimal recipe.

Each case builds tiny safetensors checkpoints in `tmp_path`, writes a recipe, compiles (or runs)
it and checks the rendered diagnostic: the code, `file:line:col`, the source line, the caret
under the offending text and the `help:` line. A meta-test checks that `CASES` covers `CODES`.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import mergelang as ml
from mergelang.cli import main as cli_main
from mergelang.diagnostics import CODES, Diagnostic, MergelangError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# tiny checkpoints


def tensors(seed: int = 0, w_shape=(2, 3), extra: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"w": torch.randn(*w_shape, generator=g), "bias": torch.randn(3, generator=g)}
    out.update(extra or {})
    return out


def write_model(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder


def standard_models(root: Path) -> None:
    """models a, b, c: same names and shapes; `d` lacks `bias`; `e` has `w` transposed."""
    for i, name in enumerate("abc"):
        write_model(root / name, tensors(i))
    write_model(root / "d", {"w": tensors(3)["w"]})
    write_model(root / "e", tensors(4, w_shape=(3, 2)))


HEADER = """model a = "a"
model b = "b"
model c = "c"
"""


# ---------------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    """`recipe` is written to tmp_path/recipe.mrg (HEADER prepended unless bare). `caret` is the
    text the caret must underline (found in the rendered source line), None for no span."""

    recipe: str
    caret: str | None
    help: str | None = None
    bare: bool = False
    setup: Callable[[Path], None] | None = None
    action: str = "compile"  # compile | evaluate | run | cli-set | warn
    file: str = "recipe.mrg"  # the file the location points into
    kwargs: dict = field(default_factory=dict)
    message: str | None = None


def _setup_import_cycle(root: Path) -> None:
    (root / "x.mrg").write_text('import "y.mrg"\n')
    (root / "y.mrg").write_text('fn g(v) { return v }\nimport "x.mrg"\n')


def _setup_bad_dtype(root: Path) -> None:
    header = json.dumps({"w": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}).encode()
    folder = root / "odd"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)


def _setup_corrupt(root: Path) -> None:
    (root / "broken.safetensors").write_bytes(b"abc")


def _setup_pickle(root: Path) -> None:
    torch.save({"w": torch.zeros(2)}, root / "model.bin")


def _setup_ints(root: Path) -> None:
    write_model(root / "ia", tensors(0, extra={"ids": torch.arange(4)}))
    write_model(root / "ib", tensors(1, extra={"ids": torch.arange(4)}))


def _setup_output_exists(root: Path) -> None:
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("x")


def _setup_link_out(root: Path) -> None:
    """A model folder whose shard is a symbolic link to a file outside it."""
    (root / "elsewhere").mkdir()
    write_model(root / "elsewhere", tensors(5))
    (root / "linked").mkdir()
    (root / "linked" / "model.safetensors").symlink_to(root / "elsewhere" / "model.safetensors")


def _setup_bad_config(root: Path) -> None:
    write_model(root / "badcfg", tensors(6))
    (root / "badcfg" / "config.json").write_text('{"model_type": "llama",')


def _setup_unwritable(root: Path) -> None:
    (root / "blocker").write_text("a file where a folder is needed")


CASES: dict[str, Case] = {
    "E001": Case('merge from a {\n    "*" = a\n}\n', "=", help="use `=>`"),
    "E002": Case('import "nope.mrg"\nmerge from a { "*" => a }\n', 'import "nope.mrg"',
                 help="paths are relative to"),
    "E003": Case('import "x.mrg"\nmerge from a { "*" => a }\n', 'import "x.mrg"',
                 help="remove one of the imports", setup=_setup_import_cycle, file="y.mrg"),
    "E101": Case('merge from a { "*" => linear([a, bb]) }\n', "bb", help="did you mean `b`?"),
    "E102": Case('merge from a { "*" => lnear([a, b]) }\n', "lnear", help="did you mean `linear`"),
    "E103": Case('merge from a {\n    "*" => ties(a, [b, c], densty = 0.5)\n}\n', "densty = 0.5",
                 help="did you mean `density`?"),
    "E104": Case('merge from a { "*" => slerp(a, b) }\n', "slerp(a, b)",
                 help="signature: slerp(a, b, t)"),
    "E105": Case('merge from a { "*" => passthrough(a, 2, 3) }\n', "3", help="signature:"),
    "E106": Case('param lam = 1\nparam lam = 2\nmerge from a { "*" => a * lam }\n',
                 "param lam = 2", message="`lam` is declared twice"),
    "E107": Case('merge from a { "*" => passthrough(a, model = b) }\n', "model = b"),
    "E108": Case('fn f(x) { return f(x) }\nmerge from a { "*" => f(a) }\n', "f",
                 help="cannot call themselves"),
    "E109": Case('merge from a {\n    re"model.(" => a\n    "*" => a\n}\n', 're"model.("'),
    "E111": Case('merge from a { "*" => sum([x for x, x in zip([a], [b])], over = "models") }\n',
                 "for x, x in zip([a], [b])", help="its own name"),
    "E112": Case('merge from a { "*" => sum([x for x in 3], over = "models") }\n', "3",
                 help="range(n)"),
    "E113": Case('merge from a { "*" => a + len([i for i in range(20000)]) }\n', "range(20000)"),
    "E201": Case('merge from a { "*" => 2 * 3 }\n', "2 * 3", help="a rule must produce a tensor"),
    "E202": Case('model e = "e"\nmerge from a { "*" => a + e }\n', "a + e",
                 message="`a` is [2, 3], `e` is [3, 2]"),
    "E203": Case('merge from a { "*" => sum([a, b], over = "model") }\n',
                 'sum([a, b], over = "model")', help='over = "models"'),
    "E204": Case('merge from a { "*" => linear([a, b], weights = [1, -1]) }\n',
                 "linear([a, b], weights = [1, -1])", message="the weights sum to zero"),
    "E205": Case('merge from a { "*" => a * (1 / 0) }\n', "1 / 0"),
    "E206": Case('model odd = "odd"\nmerge from odd { "*" => odd }\n', '"odd"',
                 help="supported:", setup=_setup_bad_dtype),
    "E207": Case('merge from a { "*" => sum(a, over = "rows") }\n', 'sum(a, over = "rows")',
                 help="follows the names and shapes"),
    "E301": Case('model z = "aa"\nmerge from z { "*" => z }\n', '"aa"', help="did you mean `a`?"),
    "E302": Case('model d = "d"\nmerge from a { "*" => linear([a, d]) }\n', "d",
                 message="tensor `bias` is missing in model `d`"),
    "E303": Case('model z = "broken.safetensors"\nmerge from z { "*" => z }\n',
                 '"broken.safetensors"', setup=_setup_corrupt),
    "E304": Case('merge from a { "w" => b }\n', "a", help='"*" => a'),
    "E305": Case("", None, help="merge from base"),
    "E310": Case('merge "x" from a { "*" => a }\nmerge ["y", "x"] from a { "*" => b }\n', '["y", "x"]',
                 help="OUTDIR/NAME/"),
    "E311": Case('merge "x" from a { "*" => a }\nmerge from b { "*" => b }\n', 'merge from b { "*" => b }',
                 help='merge "main" from b'),
    "E312": Case('merge "../up" from a { "*" => a }\n', '"../up"', help="not starting with `.`"),
    "E313": Case('merge ["x", "y"] from a { "*" => [a, b, c] * 1 }\n', "[a, b, c] * 1",
                 help="one per output name"),
    "E306": Case('model z = "model.bin"\nmerge from z { "*" => z }\n', '"model.bin"',
                 help="--allow-pickle", setup=_setup_pickle),
    "E401": Case('param density = 0.5\nmerge from a { "*" => ties(a, [b, c], density = density) }\n',
                 None, help="did you mean `density`?", action="cli-set"),
    "E402": Case('option dtyp = "bf16"\nmerge from a { "*" => a }\n', 'option dtyp = "bf16"',
                 help="did you mean `dtype`?"),
    "E403": Case('merge from a { "*" => linear([a, b]) }\n', None, help="remove the folder by hand",
                 setup=_setup_output_exists, action="run"),
    "E404": Case('merge from a { "*" => linear([a, b]) }\n', None, help="never writes over its inputs",
                 action="run-into-input"),
    "E314": Case('model l = "linked"\nmerge from l { "*" => l }\n', '"linked"',
                 help="--follow-symlinks", setup=_setup_link_out),
    "E315": Case('model k = "badcfg"\nmerge from k { "*" => k }\n', '"badcfg"',
                 help="copy_files = false", setup=_setup_bad_config),
    "E501": Case('merge from a { "*" => checked(a, a > 100, "too small") }\n',
                 'checked(a, a > 100, "too small")', message="too small", action="evaluate"),
    "E502": Case('merge from a { "*" => linear([a, b]) }\n', None, help="permissions",
                 setup=_setup_unwritable, action="run-unwritable"),
    "W001": Case('merge from a {\n    "nomatch.*" => b\n    "*" => a\n}\n', '"nomatch.*"',
                 help="an earlier rule may match first", action="warn"),
    "W002": Case('model ia = "ia"\nmodel ib = "ib"\nmerge from ia { "*" => linear([ia, ib]) }\n',
                 "linear([ia, ib])", help="floating-point tensors only", setup=_setup_ints,
                 action="warn"),
    "W003": Case('fn linear(x) { return x }\nmerge from a { "*" => linear(a) }\n', "linear",
                 help="rename it", action="warn"),
}


def test_every_code_has_a_case():
    """Every code has a case here, or (codes owned by a feature) a test in that feature's file."""
    assert set(CASES) <= set(CODES)
    others = "\n".join(p.read_text() for p in Path(__file__).parent.rglob("test_*.py")
                       if p.name != Path(__file__).name)
    untested = [c for c in CODES if c not in CASES and f'"{c}"' not in others]
    assert not untested, f"diagnostic codes without a test: {untested}"


def _run_case(case: Case, root: Path) -> tuple[list[Diagnostic], str]:
    """Returns the diagnostics of the expected kind and their rendered text."""
    standard_models(root)
    if case.setup:
        case.setup(root)
    path = root / "recipe.mrg"
    path.write_text(case.recipe if case.bare else HEADER + case.recipe)
    if case.action == "cli-set":
        res = CliRunner().invoke(cli_main, ["check", str(path), "--set", "densty=0.3"])
        assert res.exit_code == 1, res.output
        # the diagnostics are re-created through the API to inspect them as objects too
        with pytest.raises(MergelangError) as ei:
            ml.compile(path, densty=0.3)
        return ei.value.diagnostics, res.output
    if case.action == "warn":
        recipe = ml.compile(path, **case.kwargs)
        return recipe.warnings, "\n\n".join(d.render() for d in recipe.warnings)
    with pytest.raises(MergelangError) as ei:
        recipe = ml.compile(path, **case.kwargs)
        if case.action == "evaluate":
            recipe.evaluate()
        elif case.action == "run":
            recipe.run(root / "out", device="cpu")
        elif case.action == "run-into-input":
            recipe.run(root / "a", device="cpu", force=True)
        elif case.action == "run-unwritable":
            recipe.run(root / "blocker" / "out", device="cpu")
    return ei.value.diagnostics, ei.value.render()


def caret_under(rendered: str, text: str, line_no: int, col: int) -> None:
    """The rendered block shows `N | <source line>` and a caret line underlining `text` at col."""
    lines = rendered.splitlines()
    for i, ln in enumerate(lines):
        if ln.lstrip().startswith(f"{line_no} |"):
            src = ln.split("|", 1)[1][1:]
            caret = lines[i + 1].split("|", 1)[1][1:]
            assert src[col - 1: col - 1 + len(text)] == text, (src, text, col)
            assert caret == " " * (col - 1) + "^" * len(text), (caret, text)
            return
    raise AssertionError(f"no source line {line_no} in:\n{rendered}")


@pytest.mark.parametrize("code", sorted(CASES))
def test_diagnostic(code: str, tmp_path: Path):
    case = CASES[code]
    diags, rendered = _run_case(case, tmp_path)
    found = [d for d in diags if d.code == code]
    assert found, f"{code} not reported; got:\n{rendered}"
    d = found[0]
    assert d.is_error == code.startswith("E")
    text = d.render()
    assert f"[{code}]" in text
    if case.message:
        assert case.message in d.message
    if case.help:
        assert d.help and case.help in d.help, d.help
        assert f"= help: {d.help}" in text
    if case.caret is None:
        assert d.span is None or code in ("E401",)
        return
    assert d.span is not None, text
    assert Path(d.span.source.path).name == case.file
    src_text = d.span.source.text
    # the span covers exactly the expected text
    assert d.span.text == case.caret, (d.span.text, case.caret)
    line = src_text.count("\n", 0, d.span.start) + 1
    col = d.span.start - (src_text.rfind("\n", 0, d.span.start) + 1) + 1
    assert f"--> {d.span.source.path}:{line}:{col}" in text
    caret_under(text, case.caret, line, col)


# ---------------------------------------------------------------------------------------------
# specific behaviours


def test_unknown_kwarg_help_and_location(tmp_path: Path):
    standard_models(tmp_path)
    p = tmp_path / "r.mrg"
    p.write_text(HEADER + 'merge from a {\n    "*" => ties(a, [b, c], densty = 0.5)\n}\n')
    with pytest.raises(MergelangError) as ei:
        ml.compile(p)
    text = ei.value.diagnostics[0].render()
    assert text.splitlines() == [
        "error[E103]: unknown keyword argument `densty` for `ties`",
        f" --> {p}:5:28",
        "  |",
        '5 |     "*" => ties(a, [b, c], densty = 0.5)',
        "  | " + " " * 27 + "^" * len("densty = 0.5"),
        "  = help: did you mean `density`?",
    ]


def test_stdlib_error_points_at_user_call(tmp_path: Path):
    """linear with weights summing to zero fails inside stdlib/linear.mrg; the diagnostic points
    at the user's `linear(` call with a note naming the library location."""
    standard_models(tmp_path)
    p = tmp_path / "r.mrg"
    p.write_text(HEADER + 'merge from a {\n    "*" => linear([a, b], weights = [1, -1])\n}\n')
    with pytest.raises(MergelangError) as ei:
        ml.compile(p)
    (d,) = [d for d in ei.value.diagnostics if d.code == "E204"]
    assert d.span.source.path == str(p)
    assert d.span.text.startswith("linear(")
    assert (d.span.line, d.span.col) == (5, 12)
    notes = [n for n, _ in d.notes]
    assert any("inside `linear`" in n and "linear.mrg:" in n for n in notes), notes
    assert any("while merging tensor" in n for n in notes)


def test_repeated_error_is_reported_once_with_a_note(tmp_path: Path):
    standard_models(tmp_path)
    p = tmp_path / "r.mrg"
    p.write_text(HEADER + 'model d = "d"\nmerge from a { "*" => b + 2 * d }\n')
    with pytest.raises(MergelangError) as ei:
        ml.compile(p)
    assert ei.value.codes == ["E302"]


def test_several_elaboration_errors_reported_together(tmp_path: Path):
    """One `mergelang check` shows a missing tensor and a shape mismatch at once."""
    standard_models(tmp_path)
    p = tmp_path / "r.mrg"
    p.write_text(HEADER + 'model d = "d"\nmodel e = "e"\nmerge from a {\n'
                 '    "w" => a + e\n'
                 '    "bias" => linear([a, d])\n'
                 '}\n')
    res = CliRunner().invoke(cli_main, ["check", str(p)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert "error[E202]" in res.output and "error[E302]" in res.output
    assert "Traceback" not in res.output
    assert "mergelang: 2 errors" in res.output


def test_static_and_elaboration_errors_reported_together(tmp_path: Path):
    """An unknown keyword (a static check) AND a missing tensor AND a shape mismatch (found while
    elaborating against the headers) in one recipe: all three are reported by one check."""
    standard_models(tmp_path)
    p = tmp_path / "r.mrg"
    p.write_text(HEADER + 'model d = "d"\nmodel e = "e"\nmerge from a {\n'
                 '    "w" => a + e\n'
                 '    "bias" => linear([a, d])\n'
                 '    "nothing" => ties(a, [b, c], densty = 0.5)\n'
                 '}\n')
    with pytest.raises(MergelangError) as ei:
        ml.compile(p)
    assert {"E103", "E202", "E302"} <= set(ei.value.codes)
    res = _cli("check", str(p))
    assert res.returncode == 1
    for code in ("E103", "E202", "E302"):
        assert f"error[{code}]" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_several_static_errors_reported_together(tmp_path: Path):
    standard_models(tmp_path)
    p = tmp_path / "r.mrg"
    p.write_text(HEADER + 'option dtyp = "bf16"\nmerge from a {\n'
                 '    "w" => lnear([a, b])\n'
                 '    "*" => ties(a, [b, cc], densty = 0.5)\n'
                 '}\n')
    with pytest.raises(MergelangError) as ei:
        ml.compile(p)
    assert {"E102", "E101", "E103", "E402"} <= set(ei.value.codes)
    assert ei.value.render().endswith(f"{len(ei.value.diagnostics)} errors")


# ---------------------------------------------------------------------------------------------
# the CLI: exit codes, no tracebacks


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("MERGELANG_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "mergelang", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def _write_case(code: str, root: Path) -> Path:
    case = CASES[code]
    standard_models(root)
    if case.setup:
        case.setup(root)
    p = root / "recipe.mrg"
    p.write_text(HEADER + case.recipe)
    return p


@pytest.mark.parametrize("code", ["E001", "E002", "E103", "E202", "E301", "E303", "E306"])
def test_cli_check_reports_without_traceback(code: str, tmp_path: Path):
    res = CliRunner().invoke(cli_main, ["check", str(_write_case(code, tmp_path))])
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit)
    assert f"error[{code}]" in res.output
    assert "Traceback" not in res.output
    assert "-->" in res.output and "^" in res.output


def test_cli_process_corrupt_checkpoint(tmp_path: Path):
    """A real process (no CliRunner): a corrupt checkpoint is a diagnostic, not a traceback."""
    res = _cli("check", str(_write_case("E303", tmp_path)))
    assert res.returncode == 1, res.stderr
    assert "error[E303]" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_cli_missing_recipe_file(tmp_path: Path):
    res = CliRunner().invoke(cli_main, ["check", str(tmp_path / "missing.mrg")])
    assert res.exit_code == 1
    assert "error[E002]" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("args", [["check"], ["run", "x.mrg"], ["compile", "x.mrg", "--emit", "bogus"],
                                  ["frobnicate"], ["run", "x.mrg", "-o", "o", "--device", "tpu"]])
def test_cli_usage_errors_exit_2(args: list[str], tmp_path: Path):
    res = CliRunner().invoke(cli_main, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output


def test_cli_bad_set_is_a_diagnostic(tmp_path: Path):
    standard_models(tmp_path)
    p = tmp_path / "r.mrg"
    p.write_text(HEADER + 'merge from a { "*" => a }\n')
    res = CliRunner().invoke(cli_main, ["check", str(p), "--set", "novalue"])
    assert res.exit_code == 2  # a malformed option is a usage error (README: exit 2)
    assert "--set" in res.output and "NAME=VALUE" in res.output and "Traceback" not in res.output
