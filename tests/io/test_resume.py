"""Resume after a crash, disk full, NaN checks and read-only inputs (issue 5).

The kill test runs a real `python -m mergelang run` process over a tiny synthetic checkpoint with
many tensors, slowed down per tensor with MERGELANG_TEST_DELAY, SIGKILLs it at a random point
after its journal has entries, resumes with `--resume`, and compares every output byte with an
uninterrupted run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mergelang as ml  # noqa: E402
from mergelang.io.journal import JOURNAL_NAME, read_journal, work_dir_for  # noqa: E402

N_TENSORS = 40


def make_models(root: Path, n: int = N_TENSORS) -> Path:
    """models/{a,b}: `n` small float32 tensors each (a as two shards with an index), a config."""
    g = torch.Generator().manual_seed(1)
    for m in ("a", "b"):
        folder = root / "models" / m
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"layers.{i}.weight": torch.randn(6, 5, generator=g) for i in range(n)}
        tensors["norm.weight"] = torch.randn(5, generator=g).to(torch.bfloat16)
        (folder / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32"}))
        if m == "a":
            names = list(tensors)
            half = len(names) // 2
            parts = {"s1.safetensors": names[:half], "s2.safetensors": names[half:]}
            for fname, part in parts.items():
                save_file({k: tensors[k] for k in part}, folder / fname)
            (folder / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}))
        else:
            save_file(tensors, folder / "model.safetensors")
    return root / "models"


RECIPE = """model a = "models/a"
model b = "models/b"
param t = 0.25
option shard_size = "1KB"
merge from a {
    "*" => linear([a, b], weights = [1 - t, t])
}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    make_models(root)
    (root / "recipe.mrg").write_text(RECIPE)
    ml.compile(root / "recipe.mrg").run(root / "reference", device="cpu")
    return root


def run_cli(*args, env_extra: dict | None = None, cwd: Path | None = None, **kw):
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "mergelang", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def cli(*args) -> tuple[int, str]:
    """In-process `mergelang ARGS` (click's CliRunner): exit code and stderr."""
    from click.testing import CliRunner

    from mergelang.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result.exit_code, result.stderr


#: what records how an output was made (the card and manifest name the command line, which
#: differs between a run and its --resume); every other file must be bit-identical
RECORDS = ("README.md", "mergelang_manifest.json")


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in RECORDS}


def journal_entries(work_dir: Path) -> int:
    try:
        return len(read_journal(work_dir / JOURNAL_NAME)[1])
    except Exception:  # noqa: BLE001 - not there yet
        return 0


def test_reference_is_sharded(work: Path) -> None:
    names = files_of(work / "reference")
    assert sum(n.endswith(".safetensors") for n in names) > 3
    assert {"config.json", "mergelang_recipe.mrg", "model.safetensors.index.json"} <= set(names)
    assert not work_dir_for(work / "reference").exists()


def test_sigkill_then_resume_is_bit_identical(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    wdir = work_dir_for(out)
    proc = run_cli("run", work / "recipe.mrg", "-o", out, "-q", env_extra={"MERGELANG_TEST_DELAY": "0.1"})
    want = random.Random().randint(3, N_TENSORS - 15)  # a random point, after some entries
    deadline = time.monotonic() + 120
    while journal_entries(wdir) < want:
        assert proc.poll() is None, f"the merge ended before the kill: {proc.communicate()}"
        assert time.monotonic() < deadline, "the journal did not grow"
        time.sleep(0.01)
    time.sleep(random.random() * 0.05)  # sometimes in the middle of a tensor
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "an interrupted run must leave nothing at the output path"
    assert wdir.is_dir() and (wdir / JOURNAL_NAME).is_file()
    done = journal_entries(wdir)
    assert want <= done < N_TENSORS + 1

    code, err = finish(run_cli("run", work / "recipe.mrg", "-o", out, "--resume"))
    assert code == 0, err
    assert "Traceback" not in err
    assert "resuming:" in err and f"of {N_TENSORS + 1} tensors" in err
    assert files_of(out) == files_of(work / "reference")
    assert not wdir.exists()
    # the resumed tensors' checksums (from the journal) give the same output digests
    digests = [{k: v for k, v in json.loads((f / "mergelang_manifest.json").read_text())["digests"].items()
                if k != "README.md"} for f in (out, work / "reference")]
    assert digests[0] == digests[1]


def test_no_fsync_skips_data_syncs_and_still_resumes(work: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--no-fsync: no fsync/fdatasync of shard data or journal lines (folders are still synced);
    the output is byte-identical, and a kill + resume still works (checksums, not syncs, decide
    what is kept)."""
    synced: list[str] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def spy(real, kind):
        def call(fd):
            target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else "?"
            synced.append(f"{kind} {target}")
            return real(fd)
        return call

    monkeypatch.setattr(os, "fsync", spy(real_fsync, "fsync"))
    monkeypatch.setattr(os, "fdatasync", spy(real_fdatasync, "fdatasync"))
    r = ml.compile(work / "recipe.mrg")
    r.run(tmp_path / "fast", device="cpu", fsync=False)
    assert files_of(tmp_path / "fast") == files_of(work / "reference")
    assert not [s for s in synced if s.endswith((".safetensors", ".jsonl"))], synced
    r.run(tmp_path / "safe", device="cpu")  # the default syncs shards and the journal
    assert any(s.endswith(".safetensors") for s in synced)
    monkeypatch.undo()

    out = tmp_path / "out"
    wdir = work_dir_for(out)
    proc = run_cli("run", work / "recipe.mrg", "-o", out, "-q", "--no-fsync",
                   env_extra={"MERGELANG_TEST_DELAY": "0.1"})
    deadline = time.monotonic() + 120
    while journal_entries(wdir) < 5:
        assert proc.poll() is None, f"the merge ended before the kill: {proc.communicate()}"
        assert time.monotonic() < deadline, "the journal did not grow"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    code, err = finish(run_cli("run", work / "recipe.mrg", "-o", out, "--resume", "--no-fsync"))
    assert code == 0, err
    assert "resuming:" in err
    assert files_of(out) == files_of(work / "reference")


def test_api_disk_full_keeps_work_folder_then_resume(work: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    recipe = ml.compile(work / "recipe.mrg")
    real = os.pwrite
    calls = {"n": 0}

    def filling(fd: int, data, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > 25:  # shard headers + some tensors fit, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", filling)
    with pytest.raises(ml.MergelangError) as ei:
        recipe.run(out, device="cpu")
    monkeypatch.undo()
    assert ei.value.codes == ["E502"]
    text = str(ei.value)
    assert "No space left on device" in text and "--resume" in text
    assert not out.exists()
    wdir = work_dir_for(out)
    assert 0 < journal_entries(wdir) < N_TENSORS + 1

    logs: list[str] = []
    recipe.run(out, device="cpu", resume=True, log=logs.append)
    assert any(m.startswith("resuming:") for m in logs)
    assert files_of(out) == files_of(work / "reference")
    assert not wdir.exists()


def test_ctrl_c_keeps_work_folder_and_says_how_to_resume(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    wdir = work_dir_for(out)
    # the child must take Ctrl-C even when the test runs as a background job of a
    # non-interactive shell, which starts with SIGINT ignored (POSIX) and would pass that on
    proc = run_cli("run", work / "recipe.mrg", "-o", out, env_extra={"MERGELANG_TEST_DELAY": "0.1"},
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while journal_entries(wdir) < 5:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert code == 130, err
    assert "interrupted; nothing was written to the output folder" in err
    assert "--resume" in err and str(wdir) in err and "Traceback" not in err
    assert not out.exists() and wdir.is_dir()
    code, err = cli("run", work / "recipe.mrg", "-o", out, "--resume", "-q")
    assert code == 0 and "resuming:" in err
    assert files_of(out) == files_of(work / "reference")


def test_cli_disk_full_is_clean_e502(work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real, calls = os.pwrite, []

    def full(*args) -> int:
        calls.append(1)
        if len(calls) > 12:  # the shards were created, some tensors written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    monkeypatch.setattr(os, "pwrite", full)
    code, err = cli("run", work / "recipe.mrg", "-o", out, "-q")
    monkeypatch.undo()
    assert code == 1 and "error[E502]" in err and "No space left on device" in err
    assert "Traceback" not in err and "--resume" in err
    assert not out.exists() and work_dir_for(out).is_dir()
    code, err = cli("run", work / "recipe.mrg", "-o", out, "--resume", "-q")
    assert code == 0, err
    assert files_of(out) == files_of(work / "reference")


def interrupted(work: Path, out: Path, after: int = 10) -> Path:
    """Run the merge in-process until `after` tensors are written, then fail (a simulated crash)."""
    recipe = ml.compile(work / "recipe.mrg")
    count = {"n": 0}

    def progress(_: int) -> None:
        count["n"] += 1
        if count["n"] >= after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recipe.run(out, device="cpu", progress=progress)
    assert journal_entries(work_dir_for(out)) >= after - 1
    return work_dir_for(out)


def test_resume_recomputes_corrupted_and_torn_entries(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    wdir = interrupted(work, out)
    header, entries = read_journal(wdir / JOURNAL_NAME)
    index = ml.compile(work / "recipe.mrg")
    # corrupt the bytes of one journaled tensor, and tear the journal's last line
    victim = next(iter(entries))
    from mergelang.io.writer import plan_shards

    layout = plan_shards(index.outputs, int(index.compilation.options.shard_size))
    shard, begin, end = layout.where(victim)
    with open(wdir / shard.filename, "r+b") as f:
        f.seek(begin)
        f.write(b"\xff" * (end - begin))
    with open(wdir / JOURNAL_NAME, "ab") as f:
        f.write(b'{"name": "layers.39.wei')
    logs: list[str] = []
    index.run(out, device="cpu", resume=True, log=logs.append)
    resumed = [m for m in logs if m.startswith("resuming:")]
    assert resumed and f"{len(entries) - 1} of" in resumed[0]
    assert files_of(out) == files_of(work / "reference")


def test_resume_refuses_a_different_recipe_or_inputs(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    wdir = interrupted(work, out)
    with pytest.raises(ml.MergelangError) as ei:
        ml.compile(work / "recipe.mrg", t=0.5).run(out, device="cpu", resume=True)
    assert ei.value.codes == ["E504"] and "different recipe" in str(ei.value)
    assert wdir.is_dir()

    code, err = finish(run_cli("run", work / "recipe.mrg", "-o", out, "--resume", "--set", "t=0.5"))
    assert code == 1 and "E504" in err and "Traceback" not in err

    # the same recipe, but an input file changed (touched) since: refused too
    b = work / "models" / "b" / "model.safetensors"
    st = b.stat()
    try:
        os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        with pytest.raises(ml.MergelangError) as ei:
            ml.compile(work / "recipe.mrg").run(out, device="cpu", resume=True)
        assert ei.value.codes == ["E504"] and "input checkpoints" in str(ei.value)
    finally:
        os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))

    # same size, modification time restored, one tensor's bytes changed: the content sample
    # (head and blocks cover these small files whole) refuses it as well
    original = b.read_bytes()
    try:
        changed = bytearray(original)
        changed[-3] ^= 0x5A
        b.write_bytes(bytes(changed))
        os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert b.stat().st_size == st.st_size and b.stat().st_mtime_ns == st.st_mtime_ns
        with pytest.raises(ml.MergelangError) as ei:
            ml.compile(work / "recipe.mrg").run(out, device="cpu", resume=True)
        assert ei.value.codes == ["E504"] and "input checkpoints" in str(ei.value)
    finally:
        b.write_bytes(original)
        os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))

    # without --resume the old work folder is replaced, and says so
    code, err = cli("run", work / "recipe.mrg", "-o", out, "--set", "t=0.5")
    assert code == 0, err
    assert "replaced the work folder" in err
    assert not wdir.exists() and (out / "model.safetensors.index.json").is_file()


def test_resume_without_work_folder_and_unreadable_journal(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    logs: list[str] = []
    ml.compile(work / "recipe.mrg").run(out, device="cpu", resume=True, log=logs.append)
    assert any("nothing to resume" in m for m in logs)
    assert files_of(out) == files_of(work / "reference")

    out2 = tmp_path / "out2"
    wdir = interrupted(work, out2)
    (wdir / JOURNAL_NAME).write_text("garbage\n")
    with pytest.raises(ml.MergelangError) as ei:
        ml.compile(work / "recipe.mrg").run(out2, device="cpu", resume=True)
    assert ei.value.codes == ["E505"]


# ------------------------------------------------------------------------------- NaN / Inf

NAN_RECIPE = """model a = "models/a"
model b = "models/b"
{option}
merge from a {{
    "layers.3.weight" => a * 1e40 - b * 1e40
    "*" => linear([a, b])
}}
"""


@pytest.mark.parametrize("mode", ["error", "warn", "off"])
def test_nan_check_cli(work: Path, tmp_path: Path, mode: str) -> None:
    recipe = tmp_path / "nan.mrg"
    recipe.write_text(NAN_RECIPE.format(option="").replace('"models/', f'"{work}/models/'))
    out = tmp_path / "out"
    args = ("run", recipe, "-o", out, "--nan-check", mode, "-q")
    code, err = finish(run_cli(*args)) if mode == "error" else cli(*args)  # one real process
    assert "Traceback" not in err
    if mode == "error":
        assert code == 1, err
        assert "error[E503]" in err and "`layers.3.weight`" in err and "NaN" in err
        assert "nan.mrg:5:" in err  # points at the rule
        assert not out.exists() and work_dir_for(out).is_dir()  # kept, e.g. for --nan-check warn
        code, err = cli("run", recipe, "-o", out, "--nan-check", "warn", "--resume", "-q")
        assert code == 0 and "resuming:" in err and "warning[E503]" in err
    elif mode == "warn":
        assert code == 0, err
        assert "warning[E503]" in err and "`layers.3.weight`" in err
    else:
        assert code == 0 and "E503" not in err
    if code == 0:
        from safetensors import safe_open

        index = json.loads((out / "model.safetensors.index.json").read_text())
        with safe_open(out / index["weight_map"]["layers.3.weight"], "pt") as f:
            assert not torch.isfinite(f.get_tensor("layers.3.weight")).any()


def test_nan_check_option_and_api(work: Path) -> None:
    base = NAN_RECIPE.replace('"models/', f'"{work}/models/')
    r = ml.compile(base.format(option=""))
    assert r.compilation.options.nan_check == "error"
    with pytest.raises(ml.MergelangError) as ei:
        r.run(work / "nan-api", device="cpu")
    assert ei.value.codes == ["E503"] and "layers.3.weight" in str(ei.value)
    r2 = ml.compile(base.format(option='option nan_check = "warn"'))
    r2.run(work / "nan-api", device="cpu")
    assert [d.code for d in r2.run_warnings] == ["E503"]
    with pytest.raises(ml.MergelangError) as ei:
        ml.compile(base.format(option='option nan_check = "maybe"'))
    assert ei.value.codes == ["E402"]


def test_overflow_in_output_dtype_is_caught(work: Path, tmp_path: Path) -> None:
    text = RECIPE.replace('"*" => linear([a, b], weights = [1 - t, t])', '"*" => a * 1e6').replace(
        '"models/', f'"{work}/models/').replace('option shard_size = "1KB"', 'option dtype = "float16"')
    with pytest.raises(ml.MergelangError) as ei:
        ml.compile(text).run(tmp_path / "o", device="cpu")
    assert ei.value.codes == ["E503"] and "infinite" in str(ei.value)


# ------------------------------------------------------------------------------- inputs untouched

def test_inputs_are_never_modified(work: Path, tmp_path: Path) -> None:
    def snapshot() -> dict[str, tuple[int, str]]:
        return {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
                for p in sorted((work / "models").rglob("*")) if p.is_file()}

    before = snapshot()
    ml.compile(work / "recipe.mrg").run(tmp_path / "o1", device="cpu")
    interrupted(work, tmp_path / "o2")
    ml.compile(work / "recipe.mrg").run(tmp_path / "o2", device="cpu", resume=True)
    assert snapshot() == before
    # and the files could not have been written through: merging read-only inputs works
    for p in (work / "models").rglob("*"):
        p.chmod(0o444 if p.is_file() else 0o555)
    try:
        ml.compile(work / "recipe.mrg").run(tmp_path / "o3", device="cpu")
    finally:
        for p in (work / "models").rglob("*"):
            p.chmod(0o644 if p.is_file() else 0o755)
    assert snapshot() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_matches_isfinite(dtype: torch.dtype) -> None:
    from mergelang.api import all_finite

    g = torch.Generator().manual_seed(0)
    t = (torch.randn(64, 33, generator=g) * 100).to(dtype)
    assert all_finite(t) and all_finite(t[:, ::2])  # non-contiguous too
    big = torch.full((1000,), torch.finfo(dtype).max / 2, dtype=dtype)
    assert all_finite(big)  # its sum overflows, but every element is finite
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[17, 5] = bad
        assert not all_finite(u) and not all_finite(u[:, 1::2])
    assert all_finite(torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).tiny, -0.0], dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_all_finite_numba_pass_on_large_16bit_tensors(dtype: torch.dtype) -> None:
    """With the fused kernels' runtime loaded, 16-bit tensors of >= 65536 elements take the
    numba pass: every bit pattern, judged against torch.isfinite."""
    pytest.importorskip("numba")
    import mergelang.runtime.kernels.numba_runtime  # noqa: F401  (what a fused plan has loaded)
    from mergelang.api import all_finite

    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = every[torch.isfinite(every)]
    assert not all_finite(every)
    assert all_finite(torch.cat([finite, finite]))  # only finite patterns, >= 65536 of them
    g = torch.Generator().manual_seed(1)
    bad_ones = every[~torch.isfinite(every)]
    for k in range(20):
        u = torch.cat([finite, finite])
        pos = int(torch.randint(0, u.numel(), (1,), generator=g)) if k else u.numel() - 1
        u[pos] = bad_ones[int(torch.randint(0, bad_ones.numel(), (1,), generator=g))]
        assert not all_finite(u)


def test_content_sample_sees_a_change_far_into_a_large_file(tmp_path: Path) -> None:
    """Past the 1 MiB head, the sampled blocks cover the file's end and evenly spaced offsets."""
    from mergelang.io.journal import SAMPLE_BLOCK, SAMPLE_HEAD, content_sample

    f = tmp_path / "big.bin"
    data = bytearray(os.urandom(SAMPLE_HEAD + 64 * 8192))
    f.write_bytes(bytes(data))
    before = content_sample(str(f), len(data))
    for off in (len(data) - 1, SAMPLE_HEAD + 5):  # in the last block; in the first sampled block
        changed = bytearray(data)
        changed[off] ^= 1
        f.write_bytes(bytes(changed))
        assert content_sample(str(f), len(data)) != before
    f.write_bytes(bytes(data))
    assert content_sample(str(f), len(data)) == before
    assert SAMPLE_BLOCK <= 8192


def test_a_folder_named_like_a_work_folder_is_never_removed(work: Path, tmp_path: Path) -> None:
    """`.OUT.mergelang-work` that mergelang did not make (no marker) is refused, not deleted."""
    out = tmp_path / "out"
    theirs = work_dir_for(out)
    theirs.mkdir()
    (theirs / "notes.txt").write_text("the user's")
    for resume in (False, True):
        with pytest.raises(ml.MergelangError) as ei:
            ml.compile(work / "recipe.mrg").run(out, device="cpu", resume=resume)
        assert ei.value.codes == ["E505"] and "by hand" in str(ei.value)
    assert (theirs / "notes.txt").read_text() == "the user's" and not out.exists()
