"""One line describing the machine a measurement ran on, for recorded results (the CPU model and
core count, memory, GPU if any, torch version, and the load average, which on a shared machine
moves wall times more than anything else)."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return None


def load() -> str:
    try:
        return "%.1f" % os.getloadavg()[0]
    except OSError:
        return "?"


def describe() -> str:
    """e.g. `2 x AMD EPYC 7B13 cores, 23 GB RAM, no GPU, torch 2.13.0+cpu, Linux`."""
    import torch

    mem = memory_gb()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} x {cpu_model()} cores, {f'{mem:.0f} GB RAM, ' if mem else ''}{gpu}, "
            f"torch {torch.__version__}, {platform.system()}")
