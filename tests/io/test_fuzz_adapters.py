"""Adapter-config fuzzing (issue 27): random and mutated `adapter_config.json` files and LoRA
factor shapes through `lora("dir")` (compile, and evaluate when it compiles) and `mergelang rmm`
give coded diagnostics only — never another exception, and never a `run` failure that `check`
could have seen. Small and derandomized here; scripts/fuzz.py runs it longer
(MERGELANG_FUZZ_EXAMPLES, random seeds)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import mergelang as ml
from mergelang.diagnostics import MergelangError

LONG = "MERGELANG_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(max_examples=int(os.environ.get("MERGELANG_FUZZ_EXAMPLES", "12")), deadline=None,
                derandomize=not LONG, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
Q = "model.layers.0.self_attn.q_proj"

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 30, 10 ** 30),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=10)
regexish = st.one_of(st.sampled_from(["q_proj", "self_attn\\.q_proj", "[", "(a+)+$", "(?=x)",
                                      "\\1", ".*", "", "q_proj|k_proj", "(x+x+)+y", "\\p{L}+"]),
                     st.text(alphabet="()[]{}*+?.|\\^$qkv_proj0-9", max_size=16))
patterns = st.dictionaries(regexish, st.one_of(st.integers(-5, 100), st.floats(), st.text(max_size=3)),
                           max_size=4)
configs = st.fixed_dictionaries({}, optional={
    "r": json_values | st.integers(0, 64), "lora_alpha": json_values | st.floats(0.1, 64),
    "alpha_pattern": patterns | json_values, "rank_pattern": patterns | json_values,
    "use_rslora": json_values | st.booleans(), "fan_in_fan_out": json_values | st.booleans(),
    "peft_type": st.just("LORA")})
shapes = st.tuples(st.integers(0, 3), st.integers(3, 7), st.integers(3, 7), st.integers(0, 3))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzzbase")
    save_file({f"{Q}.weight": torch.randn(6, 4), "model.norm.weight": torch.ones(4)},
              str(folder / "model.safetensors"))
    return folder


def _adapter(folder: Path, cfg_text: str | bytes, shape: tuple[int, int, int, int]) -> None:
    r, cin, cout, r2 = shape
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"base_model.model.{Q}.lora_A.weight": torch.randn(r, cin),
               f"base_model.model.{Q}.lora_B.weight": torch.randn(cout, r2)},
              str(folder / "adapter_model.safetensors"))
    data = cfg_text.encode() if isinstance(cfg_text, str) else cfg_text
    (folder / "adapter_config.json").write_bytes(data)


def _compile_and_run(base: Path, folder: Path) -> None:
    try:
        r = ml.compile(f'model base = "{base}"\nmodel a = lora("{folder}", base = base)\n'
                       'merge from base { "*" => a }\n')
    except MergelangError:
        return
    try:
        r.evaluate()  # compiled: run must not fail for a reason check could see
    finally:
        r.close()


def _text(cfg: dict) -> str:
    return json.dumps(cfg, default=str)  # NaN / Infinity as Python's json writes them


@FUZZ
@given(cfg=configs, shape=shapes)
def test_random_adapter_configs(base: Path, cfg: dict, shape) -> None:
    with tempfile.TemporaryDirectory() as d:
        _adapter(Path(d) / "ad", _text(cfg), shape)
        _compile_and_run(base, Path(d) / "ad")


@FUZZ
@given(cfg=configs, cut=st.integers(0, 200), junk=st.binary(max_size=8))
def test_mutated_adapter_config_bytes(base: Path, cfg: dict, cut: int, junk: bytes) -> None:
    text = _text({"r": 2, "lora_alpha": 4, **cfg}).encode()
    with tempfile.TemporaryDirectory() as d:
        _adapter(Path(d) / "ad", text[:cut] + junk + text[cut:], (2, 4, 6, 2))
        _compile_and_run(base, Path(d) / "ad")


@FUZZ
@given(cfg=configs, shape=shapes)
def test_rmm_with_random_configs(cfg: dict, shape) -> None:
    from mergelang.tools.rmm import reversible_merge

    with tempfile.TemporaryDirectory() as d:
        _adapter(Path(d) / "a", json.dumps({"r": 2, "lora_alpha": 4}), (2, 4, 6, 2))
        _adapter(Path(d) / "b", _text(cfg), shape)
        try:
            reversible_merge([Path(d) / "a", Path(d) / "b"], Path(d) / "out", basis=2)
        except MergelangError:
            pass
