"""The driver of a Ray run (`mergelang run --executor ray [--ray-address ADDR]`).

1. Connect (`ray.init(address)`; without an address a local Ray instance is started) and start
   one actor per worker slot (a CPU each; a GPU each with `--device cuda`). Every actor compiles
   the recipe and must report ready before any work starts: an actor that cannot read an input,
   or whose plan differs, stops the run with E802 naming its node; no GPU in the cluster for
   `--device cuda` is E603.
2. Statistics passes (model-wide statistics) as map / reduce: units of feeds go to the actors,
   which return one partial per feed; the driver merges them in plan order into the same
   `StatCollector` a local run uses (runtime/stats.py: `merge`), round after round.
3. The apply plan: the outputs not yet written (resume) in units balanced by bytes (a few per
   actor, never one task per tensor), each written by an actor straight into the preallocated
   shards of the work folder; the driver journals each tensor as its actor reports it (name,
   CRC-32C, bytes). The writer then verifies and renames exactly as in a local run.

Faults: actors are restarted by Ray (`max_restarts`) and their unit retried (`max_task_retries`);
a unit's outputs are only journaled once reported, so a retried unit rewrites the same bytes. A
killed driver leaves the work folder and journal: `--resume` (local or Ray) continues.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

from mergelang.diagnostics import MergelangError, error, warning

if TYPE_CHECKING:
    from mergelang.distributed.ray_worker import RecipeSpec
    from mergelang.io.checked import WriterSink
    from mergelang.passes.pipeline import Target

#: units per actor (load balance against per-task overhead)
UNITS_PER_WORKER = 4
#: a unit is never smaller than this many bytes unless the run is
MIN_UNIT_BYTES = 64 << 20


def import_ray() -> Any:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read at import
    try:
        import ray
    except ImportError:
        raise MergelangError(error(
            "E801", "--executor ray needs Ray, which is not installed", None,
            'install the extra: pip install "mergelang[ray]" (or run without --executor ray)')) from None
    return ray


def units(names: list[str], sizes: dict[str, int], workers: int) -> list[list[str]]:
    """Consecutive groups of `names` (plan order: neighbours share inputs) of about equal bytes:
    UNITS_PER_WORKER per worker, none smaller than MIN_UNIT_BYTES (unless the run is)."""
    total = sum(sizes.get(n, 0) for n in names)
    target = max(total // max(1, workers * UNITS_PER_WORKER), min(total, MIN_UNIT_BYTES), 1)
    out: list[list[str]] = []
    cur: list[str] = []
    acc = 0
    for n in names:
        cur.append(n)
        acc += sizes.get(n, 0)
        if acc >= target:
            out.append(cur)
            cur, acc = [], 0
    if cur:
        out.append(cur)
    return out


def _reachable(address: str, timeout: float = 3.0) -> str | None:
    """None when a `host:port` address accepts a TCP connection (ray.init would otherwise retry
    for minutes), else why not. Other forms (`auto`, `ray://...`) are left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if sep and "/" not in address and not (host and port.isdigit() and 0 < int(port) < 65536):
        return "not a host:port address"  # Ray would print its own traceback first
    if not sep or "/" in address:
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or str(e)


def connect(ray: Any, address: str | None) -> None:
    if ray.is_initialized():
        return
    why = _reachable(address) if address else None
    if why is not None:
        raise MergelangError(error("E804", f"cannot connect to Ray at {address}: {why}", None,
                                   "check --ray-address (the head node's host:port, e.g. "
                                   "10.0.0.5:6379, or `auto` on a node of the cluster)"))
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        where = address or "a local Ray instance"
        raise MergelangError(error("E804", f"cannot connect to Ray at {where}: {e}", None,
                                   "check --ray-address (e.g. 10.0.0.5:6379, or `auto` on a "
                                   "node of the cluster)")) from None


def start_workers(ray: Any, spec: RecipeSpec, device: str, budget: int | None, digest: str,
                  max_workers: int | None = None) -> list[Any]:
    from mergelang.distributed.ray_worker import MergeWorker

    res = ray.cluster_resources()
    cls = ray.remote(max_restarts=4, max_task_retries=4)(MergeWorker)
    if device == "cuda":
        slots = int(res.get("GPU", 0))
        if slots < 1:
            raise MergelangError(error("E803", "--device cuda, but the Ray cluster has no GPU",
                                       None, "add GPU nodes, or run with --device cpu"))
        opts: list[dict[str, Any]] = [{"num_gpus": 1, "num_cpus": 1}] * slots
    else:
        opts = cpu_slots(ray)
    if max_workers:
        opts = opts[:max_workers]
    actors = [cls.options(**o).remote(spec, device, budget, digest) for o in opts]
    await_ready(ray, actors, "every worker must see the recipe and the models at the same paths "
                "as the driver (a shared filesystem), with the same mergelang version")
    return actors


def cpu_slots(ray: Any) -> list[dict[str, Any]]:
    """Actor options: one actor per CPU of each live node, placed there softly and holding no
    CPU reservation (when a node leaves, Ray restarts its actors on the nodes left instead of
    waiting for free CPUs that may never come)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    opts: list[dict[str, Any]] = []
    for node in ray.nodes():
        if node.get("Alive"):
            where = NodeAffinitySchedulingStrategy(node["NodeID"], soft=True)
            opts += [{"num_cpus": 0, "scheduling_strategy": where}] * \
                max(1, int(node.get("Resources", {}).get("CPU", 1)))
    return opts


def await_ready(ray: Any, actors: list[Any], hint: str) -> None:
    """Every actor reports ready (`ready()` -> (node, error or None)); else they are stopped
    and the first failure is E802, named by node."""
    try:
        ready = ray.get([a.ready.remote() for a in actors], timeout=600)
    except Exception as e:  # noqa: BLE001 - e.g. GetTimeoutError, an actor that died at start
        stop(ray, actors)
        raise MergelangError(error("E802", f"Ray workers did not start: {e}", None)) from None
    bad = [(node, err) for node, err in ready if err]
    if bad:
        stop(ray, actors)
        node, err = bad[0]
        raise MergelangError(error("E802", f"a Ray worker on {node} cannot run the recipe: {err}",
                                   None, hint))


def stop(ray: Any, actors: list[Any]) -> None:
    for a in actors:
        try:
            ray.kill(a)
        except Exception:  # noqa: BLE001 - already gone
            pass


class RayExecutor:
    """The Ray executor (the run contract of runtime/executor.Executor): connected, with every
    worker started and ready for `target` (or E801-E804 before any output exists). Its sink
    must be an output folder's (io/checked.WriterSink): the workers write their tensors into the
    writer's shards, and the driver journals them."""

    def __init__(self, spec: RecipeSpec, target: Target, digest: str, address: str | None = None,
                 max_workers: int | None = None):
        self.ray = import_ray()
        connect(self.ray, address)
        device = target.device.partition(":")[0]  # the workers resolve their own device index
        self.actors = start_workers(self.ray, spec, device, target.memory_budget, digest, max_workers)

    def close(self) -> None:
        stop(self.ray, self.actors)
        self.actors = []

    def run(self, plan: Any, models: Any, sink: WriterSink, target: Target,
            progress: Callable[[int], None] | None = None) -> None:
        """Run the final plan `plan` into `sink`'s writer (the workers read the models from the
        shared filesystem, not `models`); NaN warnings go to `sink`'s warnings, once each."""
        try:
            values = self._statistics(plan, target.memory_budget)
            self._apply(plan, values, sink, progress)
        except MergelangError:
            raise
        except Exception as e:  # noqa: BLE001 - a task that failed for good (after Ray's retries)
            cause = getattr(e, "cause", None) or e
            raise MergelangError(error("E805", f"the Ray run failed: {type(cause).__name__}: {cause}",
                                       None, "the finished tensors are kept; rerun with --resume")) from None

    def _statistics(self, plan: Any, budget: int | None) -> dict[str, Any]:
        """Model-wide statistics: units of feeds mapped onto the workers, their partials merged
        here (`StatCollector.merge`: the sums and entries in plan order), round after round."""
        from ray.util import ActorPool

        from mergelang.runtime.stats import StatCollector, stat_limit

        actors = self.actors
        values: dict[str, Any] = {}
        for i, pp in enumerate(plan.prepasses):
            limit = stat_limit(pp, budget)
            col = StatCollector(plan.stats, limit)
            feeds, sizes = output_sizes(pp)
            while True:
                pool = ActorPool(actors)
                parts: dict[str, Any] = {}
                for got in pool.map_unordered(
                        lambda a, u: a.stats_unit.remote(i, u, values, col.bucket, limit),
                        units(feeds, sizes, len(actors))):
                    parts.update(got["feeds"])
                    col.merge(got["hist"])
                for name in feeds:  # in plan order: the sums add up as a local run's do
                    col.merge(parts[name])
                if not col.finish():
                    break
            values.update(col.values)
        return values

    def _apply(self, plan: Any, values: dict[str, Any], sink: WriterSink,
               progress: Callable[[int], None] | None) -> None:
        from ray.util import ActorPool

        writer = sink.writer
        names, sizes = output_sizes(plan)
        todo = [n for n in names if n not in writer.resumed]
        targets = {n: writer.target(n) for n in todo}
        pool = ActorPool(self.actors)
        seen: set[tuple[str, str]] = set()
        for written, warns, failure in pool.map_unordered(
                lambda a, u: a.apply_unit.remote(u, values, {n: targets[n] for n in u}, sink.mode,
                                                 sink.fsync),
                units(todo, sizes, len(self.actors))):
            if failure is not None:  # e.g. E503 (NaN in an output): the worker's diagnostic
                code, message, help_ = failure
                raise MergelangError(error(code, message, None, help_))
            for name, crc, nbytes in written:
                writer.record_written(name, crc, nbytes)
                if progress is not None:
                    progress(nbytes)
            for code, message, help_ in warns:
                if (code, message) in seen:
                    continue  # an input read by several units (W125) is reported once
                seen.add((code, message))
                diag = warning(code, message, None, help_)
                sink.say(diag.render())
                sink.warnings.append(diag)


def output_sizes(plan: Any) -> tuple[list[str], dict[str, int]]:
    """The output names of `plan` in plan order (a tensor split into row chunks: once) and the
    bytes of each."""
    g = plan.graph
    sizes: dict[str, int] = {}
    for n in g.outputs():
        node = g.node(n)
        rows = node.attrs.get("rows")
        sizes[node.attrs["name"]] = node.type.nbytes if rows is None else \
            sizes.get(node.attrs["name"], 0) + node.type.nbytes
    return list(sizes), sizes
