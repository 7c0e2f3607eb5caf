"""Row chunking under a memory budget (mergelang/chunking.py).

* row-local recipes over 8 input models with a tiny budget write the same bytes as an
  unconstrained run, and match a plain-torch reference computed here;
* the measured peak of live tensor bytes (computed values + prefetched loads + pending writes,
  `PeakMeter`) stays within the budget, while the unchunked run is far above it;
* tensors that cannot be split (whole-tensor top-k, a statistic over the tensor, 1-D rows) run
  whole and are reported with the reason; `--emit plan` shows the chunks;
* the writer journals a chunked tensor only when all its rows are written, so an interrupted
  chunked run resumes to the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelang as ml
from mergelang.passes.chunking import chunk_plan
from mergelang.runtime.rows import RowAssembler
from mergelang.runtime.executor import PeakMeter, execute, run_plan
from mergelang.ir.graph import verify
from mergelang.io.journal import JOURNAL_NAME, read_journal, work_dir_for
from mergelang.io.writer import CheckpointWriter, OutputTensor, WriterError, plan_shards

SHAPES = {"embed.weight": (96, 24), "w.weight": (40, 24), "norm.weight": (24,)}
N = 8
NAMES = [f"m{i}" for i in range(N)]
BUDGET = 24_000  # bytes: the unchunked plans peak around 200-300 KB


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chunk")
    gen = torch.Generator().manual_seed(3)
    paths = {}
    for name in NAMES:
        (root / name).mkdir()
        sd = {k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in SHAPES.items()}
        save_file(sd, root / name / "model.safetensors")
        paths[name] = root / name
    return paths


def _recipe(models: dict[str, Path], expr: str) -> str:
    head = "".join(f'model {k} = "{v}"\n' for k, v in models.items())
    return head + f'merge from m0 {{\n "*" => {expr}\n}}\n'


def _inputs(models: dict[str, Path]) -> list[dict[str, torch.Tensor]]:
    return [load_file(models[n] / "model.safetensors") for n in NAMES]


def _linear_ref(sds, name):
    return (torch.stack([sd[name].float() for sd in sds]).sum(0) / N).to(torch.bfloat16)


def _task_arithmetic_ref(sds, name):
    base = sds[0][name].float()
    tv = torch.stack([sd[name].float() - base for sd in sds[1:]])
    return (base + (tv * 0.5).sum(0)).to(torch.bfloat16)


ROW_LOCAL = {
    "linear": ("linear([" + ", ".join(NAMES) + "])", _linear_ref),
    "task_arithmetic": ("task_arithmetic(m0, [" + ", ".join(NAMES[1:]) + "], weights = 0.5)",
                        _task_arithmetic_ref),
    "dare_linear": ("dare_linear(m0, [" + ", ".join(NAMES[1:]) + "], density = 0.4, seed = 7)", None),
}


def crc32c_reference(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: independent of the
    `crc32c` package the journal uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_reference_and_journal_checksum() -> None:
    from mergelang.io.journal import checksum, checksum_more

    assert crc32c_reference(b"123456789") == 0xE3069283  # the standard check value
    data = bytes(range(256)) * 3
    assert checksum(data) == crc32c_reference(data)
    assert checksum_more(data[100:], checksum(data[:100])) == crc32c_reference(data)


@pytest.mark.parametrize("method", sorted(ROW_LOCAL))
def test_chunked_matches_unchunked_within_budget(models, method):
    expr, reference = ROW_LOCAL[method]
    r = ml.compile(_recipe(models, expr))
    c = r.compilation
    whole: dict[str, torch.Tensor] = {}
    m_whole = PeakMeter()
    execute(c.plan, c.models, whole.__setitem__, pipelined=False, meter=m_whole)
    assert m_whole.peak > 5 * BUDGET  # the test means something: unchunked is far above

    report = chunk_plan(c.plan, BUDGET)
    verify(report.plan.graph)
    assert report.unchunked == []
    assert report.chunked["embed.weight"] >= 4 and report.chunked["w.weight"] >= 2
    assert report.plan.peak_bytes <= BUDGET
    for pipelined in (False, True):
        got: dict[str, torch.Tensor] = {}
        meter = PeakMeter()
        run_plan(c.plan, c.models, got.__setitem__, memory_budget=BUDGET, pipelined=pipelined,
                meter=meter)
        assert meter.peak <= BUDGET, (pipelined, meter.peak)
        assert list(got) == list(whole)
        for k, v in whole.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    if reference is not None:  # and the merge itself is right (independent plain-torch formula)
        sds = _inputs(models)
        for k in SHAPES:
            torch.testing.assert_close(whole[k].float(), reference(sds, k).float(), rtol=1e-2, atol=1e-2)
    r.close()


#: the model card names its folder, the manifest what each run read: every other file is compared
RECORDS = ("README.md", "mergelang_manifest.json")


def test_run_to_disk_is_byte_identical(models, tmp_path):
    r = ml.compile(_recipe(models, ROW_LOCAL["dare_linear"][0]))
    free = r.run(tmp_path / "free", device="cpu")
    tight = r.run(tmp_path / "tight", device="cpu", memory_budget=BUDGET)
    files = sorted(p.name for p in free.iterdir())
    assert files == sorted(p.name for p in tight.iterdir())
    for name in files:
        if name not in RECORDS:
            assert (free / name).read_bytes() == (tight / name).read_bytes(), name
    r.close()


def test_named_outputs_run_in_chunks_byte_identical(models, tmp_path):
    """Several outputs (named blocks, MultiWriter) take row chunks too."""
    head = "".join(f'model {k} = "{v}"\n' for k, v in models.items())
    text = (head + 'merge ["soup", "delta"] from m0 {\n "*" => [linear([' + ", ".join(NAMES) + "]), "
            + ROW_LOCAL["task_arithmetic"][0] + "]\n}\n")
    r = ml.compile(text)
    assert "rows 0:" in r.emit("plan", memory_budget=BUDGET)
    free = r.run(tmp_path / "free", device="cpu")
    tight = r.run(tmp_path / "tight", device="cpu", memory_budget=BUDGET)
    sds = _inputs(models)
    for out, ref in (("soup", _linear_ref), ("delta", _task_arithmetic_ref)):
        files = sorted(p.name for p in (free / out).iterdir())
        assert files == sorted(p.name for p in (tight / out).iterdir())
        for name in files:
            if name not in RECORDS:
                assert (free / out / name).read_bytes() == (tight / out / name).read_bytes(), (out, name)
        got = load_file(next((tight / out).glob("*.safetensors")))
        for name in SHAPES:
            assert torch.equal(got[name], ref(sds, name)), (out, name)
    r.close()


def test_interrupted_chunked_run_resumes_identically(models, tmp_path, monkeypatch):
    r = ml.compile(_recipe(models, ROW_LOCAL["linear"][0]))
    ref = r.run(tmp_path / "ref", device="cpu")
    out = tmp_path / "out"
    calls = []
    real = CheckpointWriter.write_rows

    def failing(self, name, t, start, total):
        calls.append((name, start))
        if name == "w.weight" and start > 0:  # embed.weight complete, w.weight half written
            raise WriterError("E502", "cannot write: No space left on device")
        real(self, name, t, start, total)

    monkeypatch.setattr(CheckpointWriter, "write_rows", failing)
    with pytest.raises(ml.MergelangError) as info:
        r.run(out, device="cpu", memory_budget=BUDGET, pipelined=False)
    assert info.value.diagnostics[0].code == "E502"
    _, entries = read_journal(work_dir_for(out) / JOURNAL_NAME)
    assert "embed.weight" in entries and "w.weight" not in entries  # only complete tensors
    assert ("w.weight", 0) in calls
    monkeypatch.setattr(CheckpointWriter, "write_rows", real)
    done = r.run(out, device="cpu", memory_budget=BUDGET, resume=True)
    for p in ref.iterdir():
        if p.suffix == ".safetensors":
            assert (done / p.name).read_bytes() == p.read_bytes(), p.name
    r.close()


@pytest.mark.parametrize("expr, reason", [
    ("ties(m0, [m1, m2, m3], density = 0.5)", "topk_mask over tensor needs every row at once"),
    ("m1 / (1.0 + sum(abs(m2 - m0), over = \"tensor\"))", "reduce over tensor needs every row at once"),
])
def test_not_row_local_runs_whole_and_says_why(models, expr, reason):
    r = ml.compile(_recipe(models, expr))
    c = r.compilation
    report = chunk_plan(c.plan, 6000)
    assert report.chunked == {}
    assert {u.name for u in report.unchunked} == {"embed.weight", "w.weight"}
    assert all(u.reason == reason for u in report.unchunked)
    msg = report.unchunked[0].message(6000)
    assert "`embed.weight`" in msg and reason in msg and "cannot be split into row chunks" in msg
    whole: dict[str, torch.Tensor] = {}
    execute(c.plan, c.models, whole.__setitem__)
    got: dict[str, torch.Tensor] = {}
    run_plan(c.plan, c.models, got.__setitem__, memory_budget=6000)
    assert all(torch.equal(got[k], whole[k]) for k in whole)
    r.close()


def test_per_row_ops_chunk_and_1d_rows_do_not(models):
    # rank over rows is per row for 2-D tensors; for the 1-D norm it is the whole tensor
    expr = 'where(rank(abs(m2 - m0), over = "rows", normalized = true) > 0.5, m1, m0)'
    r = ml.compile(_recipe(models, expr))
    c = r.compilation
    report = chunk_plan(c.plan, 2000)
    assert report.chunked.keys() == {"embed.weight", "w.weight"} and report.unchunked == []
    tiny = chunk_plan(c.plan, 300)
    assert "norm.weight" not in tiny.chunked
    assert [u.reason for u in tiny.unchunked if u.name == "norm.weight"] == [
        "rank over the rows of a 1-D tensor takes the whole tensor"]
    whole: dict[str, torch.Tensor] = {}
    execute(c.plan, c.models, whole.__setitem__)
    got: dict[str, torch.Tensor] = {}
    run_plan(c.plan, c.models, got.__setitem__, memory_budget=2000)
    assert all(torch.equal(got[k], whole[k]) for k in whole)
    sds = _inputs(models)
    x = (sds[2]["w.weight"].float() - sds[0]["w.weight"].float()).abs()
    keep = x.argsort(-1).argsort(-1).float() / (x.shape[-1] - 1) > 0.5  # plain per-row ranks
    want = torch.where(keep, sds[1]["w.weight"], sds[0]["w.weight"])
    assert (got["w.weight"] == want).float().mean() > 0.95  # ties may rank differently
    r.close()


def test_emit_plan_shows_chunks(models, tmp_path):
    from click.testing import CliRunner

    from mergelang.cli import main

    recipe = tmp_path / "linear.mrg"
    recipe.write_text(_recipe(models, ROW_LOCAL["linear"][0]))
    res = CliRunner().invoke(main, ["compile", str(recipe), "--emit", "plan", "--memory-budget", "24KB"])
    assert res.exit_code == 0, res.output
    assert "split into row chunks" in res.output
    assert "load m0['embed.weight'] rows 0:" in res.output
    assert "write 'embed.weight' rows 0:" in res.output and " of 96 as bfloat16" in res.output
    plain = CliRunner().invoke(main, ["compile", str(recipe), "--emit", "plan"])
    assert " rows " not in plain.output


def test_row_assembler_and_writer_rows(tmp_path):
    t = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    got = {}
    asm = RowAssembler(got.__setitem__)
    for a, b in ((0, 4), (4, 8), (8, 10)):
        asm("x", t[a:b].clone(), (a, b, 10))
        assert ("x" in got) == (b == 10)
    assert torch.equal(got["x"], t)

    layout = plan_shards([OutputTensor("x", (10, 6), "float32"), OutputTensor("y", (3,), "float32")], 1 << 20)
    out = tmp_path / "out"
    with CheckpointWriter(out, layout, fingerprint={"plan": "p", "inputs": "i"}) as w:
        w.write_rows("x", t[6:10].clone(), 6, 10)  # out of order: the CRC is read back at the end
        w.write_rows("x", t[0:6].clone(), 0, 10)
        with pytest.raises(ValueError, match="written twice"):
            w.write_rows("x", t[0:1].clone(), 0, 10)
        with pytest.raises(ValueError, match="do not fit"):
            w.write_rows("y", torch.zeros(2), 2, 3)
        w.write("y", torch.ones(3))
        w._journal.commit()
        _, entries = read_journal(w.tmp_dir / JOURNAL_NAME)
        assert entries["x"] == crc32c_reference(t.numpy().tobytes())
        w.finish()
    assert torch.equal(load_file(out / "model-00001-of-00001.safetensors")["x"], t)
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]["x"]


@pytest.mark.parametrize("reader", ["mmap", "pread"])
def test_load_rows_reads_the_same_rows(tmp_path, monkeypatch, reader):
    from mergelang.io import checkpoint
    from mergelang.io.locate import open_model

    gen = torch.Generator().manual_seed(0)
    sd = {"bf": torch.randn(37, 5, generator=gen).to(torch.bfloat16),
          "f32": torch.randn(9, 2, 3, generator=gen), "i": torch.arange(20, dtype=torch.int64).reshape(10, 2),
          "empty": torch.zeros(0, 4)}
    save_file(sd, tmp_path / "model.safetensors")
    monkeypatch.setattr(checkpoint, "READER", reader)
    src = open_model("m", tmp_path)
    for name, t in sd.items():
        n = t.shape[0]
        for a, b in ((0, n), (0, 1), (n // 3, n // 2), (max(0, n - 1), n)):
            for dtype in (None, torch.float32):
                got = src.load_rows(name, dtype, a, b)
                want = t[a:b] if dtype is None else t[a:b].to(dtype)
                assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    src.close()


def test_one_row_above_the_budget_is_reported(models):
    r = ml.compile(_recipe(models, ROW_LOCAL["linear"][0]))
    c = r.compilation
    report = chunk_plan(c.plan, 500)  # less than one row of 8 models' float32 values
    assert report.chunked["embed.weight"] == 96  # single rows
    rows = [u for u in report.unchunked if u.name == "embed.weight"]
    assert len(rows) == 1 and rows[0].split and "single-row chunks" in rows[0].message(500)
    got: dict[str, torch.Tensor] = {}
    run_plan(c.plan, c.models, got.__setitem__, memory_budget=500)
    whole: dict[str, torch.Tensor] = {}
    execute(c.plan, c.models, whole.__setitem__)
    assert all(torch.equal(got[k], whole[k]) for k in whole)
    r.close()


def test_cli_run_in_chunks_reports_whole_tensors(models, tmp_path):
    from click.testing import CliRunner

    from mergelang.cli import main

    recipe = tmp_path / "linear.mrg"
    recipe.write_text(_recipe(models, ROW_LOCAL["linear"][0]))
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out"), "--device", "cpu",
                                    "--log-json", "--memory-budget", "24KB"])
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    tensors = [e for e in events if e["event"] == "tensor"]
    # one event per tensor, not per chunk, with the whole tensor's bytes
    assert {e["name"]: e["bytes"] for e in tensors} == {
        k: 2 * int(torch.tensor(s).prod()) for k, s in SHAPES.items()}
    assert len(tensors) == len(SHAPES)
    assert "warning" not in res.stderr.replace("warning[W004]", "")  # W004: no config.json
    out = load_file(tmp_path / "out" / "model-00001-of-00001.safetensors")
    sds = _inputs(models)
    for k in SHAPES:
        torch.testing.assert_close(out[k].float(), _linear_ref(sds, k).float(), rtol=1e-2, atol=1e-2)
