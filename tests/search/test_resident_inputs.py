"""Trial inputs resident on the trial device (search/trials.py: DeviceRoom, HeldSource): read
once, placed on the device while the room lasts, the rest held in host memory (and counted).
On the CPU the room is a stand-in (its device is "cpu"); the GPU run is benchmarks/gpu_check.sh."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mergelang.api import Recipe
from mergelang.compiler import compile_recipe
from mergelang.diagnostics import SourceFile
from mergelang.search.trials import DeviceRoom, HeldSource, TrialRunner


class Inner(SimpleNamespace):
    def __init__(self, tensors):
        super().__init__(label="m", folder=None, tensors_=tensors, reads=0)

    def load_as(self, name, dtype=None, *, view=False):
        self.reads += 1
        return self.tensors_[name].clone()


def test_room_places_what_fits_and_counts_the_rest():
    inner = Inner({"a": torch.ones(4), "b": torch.arange(8.0)})
    room = DeviceRoom("cpu", left=16)  # a's 16 bytes fit, b's 32 do not
    src = HeldSource(inner, room)
    for _ in range(3):
        assert torch.equal(src.load_as("a"), torch.ones(4))
        assert torch.equal(src.load_as("b"), torch.arange(8.0))
    assert inner.reads == 2 and room.left == 0 and room.spilled == 32
    x = src.load_as("a")
    x += 1  # a trial's copy: the held tensor is unchanged
    assert torch.equal(src.load_as("a", view=True), torch.ones(4))


def test_cpu_trials_hold_no_room():
    assert DeviceRoom.for_device("cpu") is None


def test_trials_with_a_room_give_the_plain_results(monkeypatch):
    g = torch.Generator().manual_seed(0)
    models = {m: {"w": torch.randn(6, 5, generator=g), "v": torch.randn(7, generator=g)}
              for m in ("base", "a", "b")}
    src = ('model base = "<memory>"\nmodel a = "<memory>"\nmodel b = "<memory>"\nparam lam = 1.0\n'
           'merge from base {\n    "*" => task_arithmetic(base, [a, b], lambda = lam)\n}\n')

    def compile_(runtime, fixed):
        return compile_recipe(SourceFile("r.mrg", src), Path.cwd(), {**models, **fixed}, runtime=runtime)

    monkeypatch.setattr(DeviceRoom, "for_device", classmethod(lambda cls, d: cls("cpu", 6 * 5 * 4 * 3)))
    r = TrialRunner(compile_, ("lam",))
    try:
        for lam in (0.5, 1.5):
            want = Recipe(compile_recipe(SourceFile("r.mrg", src), Path.cwd(), {**models, "lam": lam})).evaluate()
            if lam == 0.5:  # the first trial says once that some inputs stay in host memory
                with pytest.warns(UserWarning, match="copied to the GPU in every trial"):
                    got = r.run({"lam": lam})
            else:
                got = r.run({"lam": lam})
            assert all(torch.equal(got[k], want[k]) for k in want)
        assert r.room.left == 0 and r.room.spilled == 7 * 4 * 3  # the 3 `w` held there, `v` not
    finally:
        r.close()
