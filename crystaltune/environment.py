"""The machine and library versions a measurement ran on, recorded with every benchmark and search."""

from __future__ import annotations

import os
import platform
from importlib import metadata


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> str:
    """e.g. ``"2 CPUs (AMD EPYC 7B13), no GPU"``; GPUs named when torch sees CUDA."""
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:  # torch missing or CUDA broken: the description must still work
        pass
    return f"{os.cpu_count()} CPUs ({cpu_model()}), {gpu}"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("crystaltune", "torch", "ray", "mlflow", "optuna", "torch-geometric", "pymatgen"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def versions_line(v: dict[str, str] | None = None) -> str:
    return ", ".join(f"{k} {val}" for k, val in (v or versions()).items())
