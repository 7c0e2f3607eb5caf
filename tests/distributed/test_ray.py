"""The Ray executor on local multi-node clusters (ray.cluster_utils.Cluster, every node bound to
127.0.0.1): outputs byte-identical to the local executor for many methods (statistics passes,
random methods, several outputs, row chunks under a memory budget), a node removed mid-run,
resume after a failed Ray run, and the diagnostics E801-E805."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when ray is imported: before it
ray = pytest.importorskip("ray")

import mergelang as ml  # noqa: E402
from helpers import local_ray_cluster, make_sd, write_model  # noqa: E402

SHAPES = {**{f"model.layers.{i}.mlp.weight": (64, 48) for i in range(6)},
          "model.embed_tokens.weight": (40, 48), "model.norm.weight": (48,)}


@pytest.fixture(scope="module")
def cluster():
    yield from local_ray_cluster()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_models")
    out = {}
    for name, seed in (("base", 0), ("a", 1), ("b", 2), ("c", 3)):
        out[name] = write_model(root / name, make_sd(seed, SHAPES), {"architectures": ["X"]})
    return out


def recipe(models, tmp_path, body: str, name: str = "r.mrg") -> Path:
    text = "".join(f'model {k} = "{v}"\n' for k, v in models.items()) + body
    path = tmp_path / name
    path.write_text(text)
    return path


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("mergelang_manifest.json", "README.md")}  # name the run


def run_both(path: Path, tmp_path: Path, address: str, **kw) -> tuple[dict, dict]:
    r = ml.compile(path)
    try:
        r.run(tmp_path / "local", **kw)
        r.run(tmp_path / "ray", executor="ray", ray_address=address, **kw)
    finally:
        r.close()
    return files(tmp_path / "local"), files(tmp_path / "ray")


BODIES = {
    "linear": 'merge from base { "*" => linear([base, a, b]) }',
    "ties": 'merge from base { "*" => ties(base, [a, b, c], density = 0.3) }',
    "dare_ties": 'merge from base { "*" => dare_ties(base, [a, b], density = 0.5, seed = 7) }',
    "ties_global": 'merge from base { "*" => ties_global(base, [a, b, c], k = 0.2) }',  # 3 stat passes
    "emr_outputs": 'merge ["x", "y"] from base { "*" => emr(base, [a, b]) }\n'
                   'merge "avg" from base { "*" => linear([a, b]) }',
    "karcher_loop": 'merge from base { "*" => karcher([a, b, c], max_iter = 50) }',
}


@pytest.mark.parametrize("name", list(BODIES))
def test_ray_output_is_byte_identical(name, cluster, models, tmp_path):
    local, remote = run_both(recipe(models, tmp_path, BODIES[name]), tmp_path, cluster.address)
    assert local.keys() == remote.keys() and any(k.endswith(".safetensors") for k in local)
    for k in local:
        assert local[k] == remote[k], k


def test_row_chunks_under_a_memory_budget(cluster, models, tmp_path):
    path = recipe(models, tmp_path, 'merge from base { "*" => linear([base, a, b, c]) }')
    local, remote = run_both(path, tmp_path, cluster.address, memory_budget="40KB")
    assert local == remote


def test_a_node_removed_mid_run(models, tmp_path, monkeypatch):
    """Workers slowed down (each output tensor waits 0.5 s); one node is removed while they
    work: Ray restarts its workers on the node left and retries their units."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    monkeypatch.setenv("MERGELANG_TEST_DELAY", "0.5")  # inherited by the nodes' workers
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    node = c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    try:
        path = recipe(models, tmp_path, BODIES["ties"])
        r = ml.compile(path)
        monkeypatch.delenv("MERGELANG_TEST_DELAY")
        r.run(tmp_path / "local")
        removed: list[float] = []
        killer = threading.Timer(2.5, lambda: (c.remove_node(node), removed.append(time.time())))
        killer.start()
        r.run(tmp_path / "ray", executor="ray", ray_address=c.address)
        done = time.time()
        killer.join()
        r.close()
        assert removed and removed[0] < done  # the node went while the run was under way
        assert files(tmp_path / "local") == files(tmp_path / "ray")
    finally:
        ray.shutdown()
        c.shutdown()


def test_E801_without_ray(models, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    r = ml.compile(recipe(models, tmp_path, BODIES["linear"]))
    with pytest.raises(ml.MergelangError) as info:
        r.run(tmp_path / "out", executor="ray")
    r.close()
    assert info.value.diagnostics[0].code == "E801" and "mergelang[ray]" in info.value.diagnostics[0].help
    assert not (tmp_path / "out").exists()


def test_E802_a_worker_that_cannot_read_an_input(cluster, models, tmp_path):
    from dataclasses import replace

    from mergelang.distributed.ray_driver import RayExecutor
    from mergelang.passes.pipeline import Target

    r = ml.compile(recipe(models, tmp_path, BODIES["linear"]))
    spec = replace(r._spec, overrides={"a": str(tmp_path / "not-on-the-workers")})
    r.close()
    ray.shutdown()
    with pytest.raises(ml.MergelangError) as info:
        RayExecutor(spec, Target("cpu"), "x", cluster.address)
    d = info.value.diagnostics[0]
    assert d.code == "E802" and "not-on-the-workers" in d.message and "on " in d.message


def test_E803_gpu_without_gpus(cluster, models, tmp_path):
    from mergelang.distributed.ray_driver import RayExecutor
    from mergelang.passes.pipeline import Target

    r = ml.compile(recipe(models, tmp_path, BODIES["linear"]))
    with pytest.raises(ml.MergelangError) as info:
        RayExecutor(r._spec, Target("cuda"), "x", cluster.address)
    r.close()
    assert info.value.diagnostics[0].code == "E803"


def test_E804_unreachable_address(models, tmp_path):
    ray.shutdown()
    r = ml.compile(recipe(models, tmp_path, BODIES["linear"]))
    t = time.time()
    with pytest.raises(ml.MergelangError) as info:
        r.run(tmp_path / "out", executor="ray", ray_address="127.0.0.1:1")
    r.close()
    assert info.value.diagnostics[0].code == "E804" and time.time() - t < 10
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_E805_and_resume_after_a_failed_run(cluster, models, tmp_path, monkeypatch):
    """A unit that fails for good (here: NaN in an output, E503 from the worker) stops the run;
    the work folder keeps what was journaled and --resume finishes it locally."""
    body = 'merge from base { "*" => if numel(base) == 48 then base / 0 else linear([a, b]) }'
    r = ml.compile(recipe(models, tmp_path, body))
    with pytest.raises(ml.MergelangError) as info:
        r.run(tmp_path / "out", executor="ray", ray_address=cluster.address)
    assert info.value.diagnostics[0].code == "E503"
    assert not (tmp_path / "out").exists()
    r.run(tmp_path / "out", resume=True, nan_check="warn")
    r.close()
    assert (tmp_path / "out").is_dir()


def test_in_memory_models_are_refused(cluster):
    import torch

    r = ml.compile('model base = "x"\nmerge from base { "*" => base }', base={"w": torch.ones(2)})
    with pytest.raises(ml.MergelangError) as info:
        r.run("/tmp/never-written", executor="ray", ray_address=cluster.address)
    r.close()
    assert info.value.diagnostics[0].code == "E802"


def test_E805_a_unit_that_fails_for_good(cluster, models, tmp_path, monkeypatch):
    from mergelang.io.writer import CheckpointWriter

    real = CheckpointWriter.target
    monkeypatch.setattr(CheckpointWriter, "target",
                        lambda self, name: (str(tmp_path / "gone" / "shard"), *real(self, name)[1:]))
    r = ml.compile(recipe(models, tmp_path, BODIES["linear"]))
    with pytest.raises(ml.MergelangError) as info:
        r.run(tmp_path / "out", executor="ray", ray_address=cluster.address)
    r.close()
    d = info.value.diagnostics[0]
    assert d.code == "E805" and "gone" in d.message and not (tmp_path / "out").exists()


def test_cli_executor_flags(cluster, models, tmp_path):
    from click.testing import CliRunner

    from mergelang.cli import main

    path = recipe(models, tmp_path, BODIES["ties"])
    res = CliRunner().invoke(main, ["run", str(path), "-o", str(tmp_path / "o"), "--ray-address",
                                    cluster.address])
    assert res.exit_code == 2 and "--ray-address needs --executor ray" in res.output
    res = CliRunner().invoke(main, ["run", str(path), "-o", str(tmp_path / "o"), "--executor", "ray",
                                    "--ray-address", cluster.address, "-q"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["run", str(path), "-o", str(tmp_path / "l"), "-q"])
    assert files(tmp_path / "o") == files(tmp_path / "l")


def test_statistics_by_radix_select_under_a_budget(cluster, models, tmp_path):
    """A small budget makes ties_global's threshold a two-round radix select (histograms added
    up on the workers, then on the driver) instead of kept entries."""
    path = recipe(models, tmp_path, BODIES["ties_global"])
    local, remote = run_both(path, tmp_path, cluster.address, memory_budget="60KB")
    assert local == remote


def test_input_nan_check_on_ray(cluster, tmp_path):
    """--nan-check covers the inputs the workers read: E222 stops the run, "warn" gives W125
    (once), as the local executor does."""
    root = tmp_path / "m"
    sds = {n: make_sd(i, SHAPES) for i, n in enumerate(("base", "a", "b"))}
    sds["a"]["model.layers.2.mlp.weight"][0, 0] = float("nan")
    ms = {n: write_model(root / n, sd, {"architectures": ["X"]}) for n, sd in sds.items()}
    r = ml.compile(recipe(ms, tmp_path, BODIES["ties"].replace(", c]", "]")))
    with pytest.raises(ml.MergelangError) as info:
        r.run(tmp_path / "out", executor="ray", ray_address=cluster.address)
    assert info.value.diagnostics[0].code == "E222" and "model `a`" in info.value.diagnostics[0].message
    r.run(tmp_path / "out2", executor="ray", ray_address=cluster.address, nan_check="warn")
    assert [d.code for d in r.run_warnings].count("W125") == 1
    r.close()


def test_a_python_plugin_method_runs_on_the_workers(cluster, tmp_path):
    """A method written in Python (examples/plugins/sdmecha_methods.py, `import "m.py"` with
    allow_plugins) gives the workers' bytes equal to a local run's."""
    import shutil

    repo = Path(__file__).resolve().parents[2]
    shapes = {"w": (8, 4), "b": (4,)}
    for seed, name in enumerate(("base", "a", "b")):
        write_model(tmp_path / name, make_sd(seed, shapes))
    shutil.copy(repo / "examples" / "plugins" / "sdmecha_methods.py", tmp_path / "m.py")
    (tmp_path / "r.mrg").write_text('import "m.py"\nmodel base = "base"\nmodel a = "a"\nmodel b = "b"\n'
                                    'merge from base { "*" => geometric_sum(a, b, alpha = 0.3) }\n')
    local = ml.compile(tmp_path / "r.mrg", allow_plugins=True).run(tmp_path / "local")
    remote = ml.compile(tmp_path / "r.mrg", allow_plugins=True).run(
        tmp_path / "ray", executor="ray", ray_address=cluster.address)
    for shard in sorted(Path(local).glob("*.safetensors")):
        assert shard.read_bytes() == (Path(remote) / shard.name).read_bytes()
