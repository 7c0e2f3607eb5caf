"""Small helpers shared by tests in every sub-folder (tests/conftest.py puts this folder on
sys.path): random state dicts and tiny safetensors checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file


def make_sd(seed: int, shapes: Mapping[str, tuple[int, ...]], scale: float = 1.0,
            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A state dict of standard-normal tensors (times `scale`) from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g) * scale).to(dtype) for k, s in shapes.items()}


def write_model(folder: Path, sd: Mapping[str, torch.Tensor], config: dict | None = None) -> Path:
    """`folder/model.safetensors` holding `sd` (and `config.json` when given)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def local_ray_cluster():
    """A local two-node Ray cluster bound to 127.0.0.1, one CPU per node (a pytest fixture's
    generator: `yield from local_ray_cluster()`); stopped afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    yield c
    ray.shutdown()
    c.shutdown()


#: the head of a tune objective file living beside model folders base, a, b: `target` is
#: base + 0.3 (a - base) + 0.6 (b - base), `score` the negative squared distance to it
TARGET_OBJECTIVE = '''
import os
import torch
from pathlib import Path
from safetensors.torch import load_file
here = Path(__file__).parent
base, a, b = (load_file(here / n / "model.safetensors") for n in ("base", "a", "b"))
target = {k: base[k] + 0.3 * (a[k] - base[k]) + 0.6 * (b[k] - base[k]) for k in base}

def score(state):
    return -sum(float((state[k] - target[k]).pow(2).sum()) for k in target)
'''
