"""`AlignedSource`: a model whose tensors are another checkpoint's, permuted on load.

Nothing permuted is written to disk. The permutations are solved once, in `prepare` (called by
the executor before any tensor is streamed, or by the first `load`): the spec's tensors are read
from both checkpoints, matched, and dropped; afterwards `load(name)` reads the tensor from the
wrapped checkpoint and gathers it along its permuted axes (with soft OT maps, `reg > 0`: a matrix
product along the mixed axes, see soft.py).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    import torch

from mergelang.io.checkpoint import ModelSource, TensorInfo
from mergelang.sources.align.solve import AlignResult, weight_matching
from mergelang.sources.align.spec import AlignSpec, permute_tensor


class AlignedSource(ModelSource):
    def __init__(self, label: str, source: ModelSource, ref: ModelSource, spec: AlignSpec,
                 method: str = "weight_matching", seed: int = 0, reg: float = 0.0,
                 stats: ModelSource | None = None, stats_info: dict | None = None):
        self.label = label
        self.source, self.ref, self.spec = source, ref, spec
        self.method, self.seed, self.reg = method, seed, reg
        #: `by = "activations"`: the correlation sidecar and its JSON (sources/align/activations.py)
        self.stats, self.stats_info = stats, stats_info
        self.folder = source.folder
        self.result: AlignResult | None = None
        self._members = spec.by_tensor()
        self._lock = threading.Lock()

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self.source.tensors()

    def config(self) -> dict | None:
        return self.source.config()

    def prepare(self, device: str | torch.device | None = None) -> AlignResult:
        with self._lock:
            if self.result is None:
                for s in (self.source, self.ref):  # nested align(...) values solve first
                    if isinstance(s, AlignedSource):
                        s.prepare(device)
                if self.stats is not None and self.stats_info is not None:
                    from mergelang.sources.align.activations import activation_matching, used_keys

                    from mergelang.sources.align.activations import StatsError

                    corrs = {k: self.stats.load(f"{k}.corr") for k in used_keys(self.stats_info)}
                    bad = next((k for k, v in corrs.items() if not bool(v.isfinite().all())), None)
                    if bad is not None:
                        raise StatsError(f"align's stats: tensor `{bad}.corr` holds NaN or inf values "
                                         "(an edited or broken sidecar): compute them again with "
                                         "mergelang stats A B --kind correlation")
                    self.result = activation_matching(corrs, self.stats_info, self.spec, self.seed,
                                                      self.method, device=device)
                    return self.result
                names = self.spec.tensors()
                ref = {n: self.ref.load(n) for n in names}
                other = {n: self.source.load(n) for n in names}
                self.result = weight_matching(ref, other, self.spec, self.seed, self.method,
                                              device=device, reg=self.reg)
            return self.result

    @property
    def perms(self) -> dict[str, torch.Tensor]:
        return self.prepare().perms

    def load(self, name: str) -> torch.Tensor:
        t = self.source.load(name)
        members = self._members.get(name)
        if not members:
            return t
        result = self.prepare()
        if result.maps:  # soft OT: a matrix product along the mixed axes (computed in float64)
            from mergelang.sources.align.soft import transform_tensor  # torch: imported only when a tensor is read
            return transform_tensor(t, members, result.perms, result.maps)
        return permute_tensor(t, members, result.perms)

    def close(self) -> None:  # the wrapped sources are declared models: the compiler closes them
        pass
