"""Issue 27: bad arguments to the Python API and a malformed --ray-address are coded
diagnostics (E402 / E804), not raw exceptions or Ray's traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mergelang as ml
from helpers import write_model
from mergelang.cli import main


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    write_model(tmp_path / "a", {"w": torch.ones(2, 2)}, {"model_type": "test"})
    (tmp_path / "r.mrg").write_text('model a = "a"\nmerge from a { "*" => a }\n')
    return tmp_path / "r.mrg"


@pytest.mark.parametrize("kw", [{"out_dir": None}, {"out_dir": 3}, {"device": "tpu"}, {"device": None},
                                {"nan_check": "maybe"}, {"executor": "spark"}])
def test_bad_run_arguments_are_e402(recipe: Path, tmp_path: Path, kw: dict) -> None:
    r = ml.compile(recipe)
    out = kw.pop("out_dir", tmp_path / "out")
    with pytest.raises(ml.MergelangError) as ei:
        r.run(out, **kw)
    assert ei.value.codes == ["E402"]
    assert isinstance(ei.value, ValueError)  # what these raised before: callers catching it still do
    assert not (tmp_path / "out").exists()
    r.close()


@pytest.mark.parametrize("address", [":", "host:", ":6379", "h:99999"])
def test_malformed_ray_address_is_e804_without_a_traceback(recipe: Path, tmp_path: Path,
                                                           address: str) -> None:
    pytest.importorskip("ray")
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "o"), "--executor", "ray",
                                    "--ray-address", address])
    assert res.exit_code == 1 and "E804" in res.output and "Traceback" not in res.output, res.output
