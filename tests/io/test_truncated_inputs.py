"""An input shard truncated during a merge (issue 27, item 15): a coded E508 and exit status 1,
never SIGBUS (exit 135) and never an output presented as complete. Sizes are re-checked before
each tensor is mapped or read; the inputs' size / time / inode are compared after the merge; and
a SIGBUS while a mapping is read (the file shrank after it was mapped) is turned into E508 by the
handler io/inputwatch.py installs for `run`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergelang as ml
from mergelang.diagnostics import MergelangError

REPO = Path(__file__).resolve().parents[2]


def shard(folder: Path, n: int = 4, rows: int = 512) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"w{i}": torch.randn(rows, 1024) for i in range(n)}, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


@pytest.mark.parametrize("keep", [0, 200, 2 / 3])
def test_truncated_between_compile_and_run(tmp_path: Path, keep: float) -> None:
    f = shard(tmp_path / "a")
    r = ml.compile(f'model a = "{tmp_path / "a"}"\nmerge from a {{ "*" => a * 2.0 }}\n')
    size = f.stat().st_size
    os.truncate(f, int(size * keep) if keep < 1 else int(keep))
    with pytest.raises(MergelangError) as exc:
        r.run(tmp_path / "out", device="cpu")
    r.close()
    assert exc.value.codes == ["E508"] and not (tmp_path / "out").exists()


def test_rewritten_during_the_run_is_not_presented_as_complete(tmp_path: Path) -> None:
    """The file changes after every tensor was read (same size, new time): E508, no output."""
    f = shard(tmp_path / "a", n=2, rows=16)
    r = ml.compile(f'model a = "{tmp_path / "a"}"\nmerge from a {{ "*" => a }}\n')
    from mergelang.io import inputwatch

    real = inputwatch.inputs_unchanged

    def touched(before):
        os.utime(f, ns=(time.time_ns(), time.time_ns() + 10 ** 9))
        return real(before)

    import mergelang.runtime.folderrun as folderrun

    folderrun.inputs_unchanged = touched
    try:
        with pytest.raises(MergelangError) as exc:
            r.run(tmp_path / "out", device="cpu")
    finally:
        folderrun.inputs_unchanged = real
        r.close()
    assert exc.value.codes == ["E508"] and not (tmp_path / "out").exists()


SCRIPT = textwrap.dedent("""
    import os, sys
    from mergelang.io.locate import open_model
    from mergelang.io.inputwatch import install_sigbus
    if sys.argv[2] == "handler":
        install_sigbus()
    src = open_model("a", sys.argv[1])
    t = src.load_as("w0", view=True)          # the tensor is the file's mapping
    os.truncate(os.path.join(sys.argv[1], "model.safetensors"), 100)
    print(float(t.sum()))                     # reads the pages past the new end
""")


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGBUS"), reason="POSIX only")
def test_sigbus_on_a_mapping_becomes_E508(tmp_path: Path) -> None:
    shard(tmp_path / "a", n=1, rows=256)
    env = dict(os.environ, PYTHONPATH=str(REPO), MERGELANG_READER="mmap")
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "a"), "handler"], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "error[E508]" in res.stderr, (res.returncode, res.stderr[-500:])
    # without the handler the same read is a SIGBUS: the case the handler exists for
    shard(tmp_path / "b", n=1, rows=256)
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "b"), "none"], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode in (-7, 135), res.returncode


def test_cli_run_with_a_shard_truncated_mid_run(tmp_path: Path) -> None:
    """A real `mergelang run` slowed down (one tensor per second, one tensor of budget) whose
    input is truncated once the run has begun: exit 1 with E508, no output folder."""
    f = shard(tmp_path / "a", n=5, rows=1024)
    (tmp_path / "r.mrg").write_text(f'model a = "{tmp_path / "a"}"\nmerge from a {{ "*" => a }}\n')
    env = dict(os.environ, PYTHONPATH=str(REPO), MERGELANG_TEST_DELAY="1")
    p = subprocess.Popen([sys.executable, "-m", "mergelang", "run", str(tmp_path / "r.mrg"), "-o",
                          str(tmp_path / "out"), "--memory-budget", "6MB"], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    work = tmp_path / ".out.mergelang-work"
    t0 = time.time()
    while not any(work.glob("*.safetensors")) and time.time() - t0 < 90 and p.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    os.truncate(f, 100)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "E508" in err, (p.returncode, err[-800:])
    assert not (tmp_path / "out").exists()
