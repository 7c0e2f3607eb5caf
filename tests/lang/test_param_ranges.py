"""Ranges on params (issue 18, contract syntax): `param x = v in [lo, hi]`, each element of a
list, `log`, integer ranges; defaults and --set values checked (E405); bad ranges (E406)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import mergelang as ml
from mergelang.cli import main
from mergelang.lang.ranges import ParamRange

SD = {"w": torch.ones(3)}
HEAD = 'model base = "x"\n'


def codes(text, **kw):
    with pytest.raises(ml.MergelangError) as info:
        ml.compile(HEAD + text, base=SD, **kw)
    return [(d.code, d.message) for d in info.value.diagnostics if d.is_error]


def test_ranges_are_parsed_and_kept():
    r = ml.compile(HEAD + '''param lam = 0.3 in [0.0, 1.0]
param lr = 1e-3 in [1e-5, 1e-1] log
param k = 3 in [1, 8]
param w = [1, 1.5] in [0, 2]
param plain = 2
merge from base { "*" => base * lam * log(lr) * k * w[1] * plain }''', base=SD)
    try:
        assert r.compilation.ranges == {
            "lam": ParamRange(0.0, 1.0), "lr": ParamRange(1e-5, 0.1, log=True),
            "k": ParamRange(1, 8, integer=True), "w": ParamRange(0, 2)}
        torch.testing.assert_close(r.evaluate()["w"], torch.full((3,), 0.3 * float(torch.log(torch.tensor(1e-3))) * 3 * 1.5 * 2))
    finally:
        r.close()


def test_E405_defaults_and_overrides_outside_the_range():
    assert codes('param lam = 1.3 in [0.0, 1.0]\nmerge from base { "*" => base * lam }') == \
        [("E405", "param `lam` defaults to 1.3, outside its range [0, 1]")]
    assert codes('param w = [1, 3] in [0, 2]\nmerge from base { "*" => base * w[0] }')[0][0] == "E405"
    got = codes('param lam = 0.5 in [0.0, 1.0]\nmerge from base { "*" => base * lam }', lam=-1)
    assert got == [("E405", "param `lam` is set to -1, outside its range [0, 1]")]


@pytest.mark.parametrize("decl,part", [
    ("param lam = 0.3 in [1.0, 0.0]", "empty"),
    ("param lam = 0.3 in [0.0, 1.0] log", "lo > 0"),
    ('param lam = 0.3 in ["a", 1.0]', "two numbers"),
    ('param lam = "x" in [0.0, 1.0]', "number or a list of numbers"),
])
def test_E406_bad_ranges(decl, part):
    got = codes(decl + '\nmerge from base { "*" => base }')
    assert got[0][0] == "E406" and part in got[0][1]


def test_log_and_in_stay_usable_as_names():
    r = ml.compile(HEAD + 'param in2 = 2\nfn f(x) { return log(x) }\n'
                   'merge from base { "*" => f(base * in2) }', base=SD)
    r.close()


def test_check_reports_a_default_outside_its_range(tmp_path):
    from safetensors.torch import save_file

    save_file(SD, str(tmp_path / "m.safetensors"))
    (tmp_path / "r.mrg").write_text(f'model base = "{tmp_path / "m.safetensors"}"\n'
                                    'param lam = 2 in [0, 1]\nmerge from base {{ "*" => base * lam }}\n'
                                    .replace("{{", "{").replace("}}", "}"))
    res = CliRunner().invoke(main, ["check", str(tmp_path / "r.mrg")])
    assert res.exit_code == 1 and "E405" in res.output and "^" in res.output
