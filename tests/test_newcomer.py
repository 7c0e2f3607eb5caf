"""A newcomer's rough edges (hardening issue): the progress bar, `methods` summaries, counts,
`import-mergekit -o` into a missing folder, units."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mergelang.cli import _first_sentence, main
from mergelang.ir.types import format_bytes, plural


class _Tty(io.StringIO):
    def isatty(self) -> bool:  # tqdm draws only on a terminal
        return True


def test_progress_bar_ticks_during_a_long_step_and_stays(monkeypatch) -> None:
    from types import SimpleNamespace

    from mergelang import progress

    stream = _Tty()
    monkeypatch.setattr(progress.sys, "stderr", stream)
    plan = SimpleNamespace(write_bytes=1000)
    with progress.reporter(plan, quiet=False, log_json=False) as (update, finish):
        time.sleep(1.3)  # a long first step: no update at all
        ticked = stream.getvalue()
        update(1000)
        finish("out")
    text = stream.getvalue()
    assert "00:01" in ticked  # the elapsed time moved while nothing was written
    assert text.rstrip().endswith("]") and "100%" in text.split("\r")[-1]  # the bar stays, full


def test_methods_summary_is_not_cut_at_abbreviations() -> None:
    assert _first_sentence("LiNeS (Wang et al. 2025, scaling): scale it. More.") == \
        "LiNeS (Wang et al. 2025, scaling): scale it."
    assert _first_sentence("Use e.g. this. Then that.") == "Use e.g. this."
    res = CliRunner().invoke(main, ["methods"])
    assert res.exit_code == 0
    assert not re.search(r"et al\.\n", res.output)


def test_counts_and_units() -> None:
    assert plural(1, "warning") == "1 warning" and plural(0, "warning") == "0 warnings"
    assert format_bytes(512) == "512 B" and format_bytes(1536) == "1.5 KiB"
    assert format_bytes(5 * 1024 ** 3) == "5.0 GiB"


def test_import_mergekit_into_a_missing_folder(tmp_path: Path) -> None:
    for m in ("a", "b"):
        (tmp_path / m).mkdir()
        save_file({"model.layers.0.w": torch.ones(2)}, str(tmp_path / m / "model.safetensors"))
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models:\n  - model: {tmp_path / 'a'}\n  - model: {tmp_path / 'b'}\n"
                   "merge_method: linear\nparameters:\n  weight: 0.5\n")
    out = tmp_path / "sub" / "deeper" / "x.mrg"
    res = CliRunner().invoke(main, ["import-mergekit", str(cfg), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file() and "merge from" in out.read_text()
    assert "(0 warnings)" in res.output or "(1 warning)" in res.output or "warnings)" in res.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(main, ["import-mergekit", str(cfg), "-o", str(blocker / "x.mrg")])
    assert res.exit_code == 1 and "E502" in res.output and "Traceback" not in res.output


def test_check_summary_uses_binary_units_and_plural(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    save_file({"w": torch.ones(256, 4)}, str(tmp_path / "a" / "model.safetensors"))
    (tmp_path / "r.mrg").write_text('model a = "a"\nmerge from a { "*" => a }\n')
    res = CliRunner().invoke(main, ["check", str(tmp_path / "r.mrg")])
    assert res.exit_code == 0, res.output
    assert "reads 4.0 KiB, writes 4.0 KiB, 0 warnings" in res.output


def test_progress_bar_names_the_family_being_written(monkeypatch) -> None:
    """The bar shows the family of the tensor just written (numbers as `{}`), set once per
    family: 90k expert tensors do not print 90k names."""
    from types import SimpleNamespace

    from mergelang import progress

    names = [f"model.layers.{i}.mlp.experts.{e}.w" for i in range(2) for e in range(3)] + ["lm_head.weight"]
    monkeypatch.setattr(progress, "output_steps", lambda plan: [(n, "float32", 4) for n in names])
    stream = _Tty()
    monkeypatch.setattr(progress.sys, "stderr", stream)
    plan = SimpleNamespace(write_bytes=4 * len(names), steps=())
    shown = []
    import tqdm

    orig = tqdm.tqdm.set_postfix_str
    monkeypatch.setattr(tqdm.tqdm, "set_postfix_str", lambda self, s="", refresh=True: (shown.append(s), orig(self, s, refresh))[1])
    with progress.reporter(plan, quiet=False, log_json=False) as (update, finish):
        for _ in names:
            update(4)
        finish("out")
    assert shown == ["model.layers.{}.mlp.experts.{}.w", "lm_head.weight"]
    assert "lm_head.weight" in stream.getvalue()
