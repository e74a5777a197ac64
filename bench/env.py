"""The environment a run executes in: device, mixed precision, determinism and provenance.

Everything here is recorded in (or shapes) a result file, so the numbers can be traced back to
the code (git commit + dirty flag), the libraries (package versions) and the machine.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.errors import BenchError
from bench.numerics import cpu_model, numerics_settings
from bench.paths import REPO_ROOT

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")

# distribution name -> key in the result file
_PACKAGES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "numpy": "numpy",
    "pandas": "pandas",
    "scikit-learn": "sklearn",
    "pydicom": "pydicom",
}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``. Asking for CUDA without one is an error."""
    if isinstance(name, torch.device):
        return name
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BenchError(f"device {name!r} requested but CUDA is not available here (use --device cpu or auto)")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise BenchError(f"unknown device {name!r}; expected one of {', '.join(DEVICES)}")


def autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op on CPU (CPU runs stay in float32 for exact reproducibility)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_determinism(seed: int) -> None:
    """Make a run a function of its spec's seed.

    Code in this harness draws randomness from explicit generators built from ``spec.seed``; seeding
    the global generators here is only a safety net so that a stray draw in a third-party library is
    reproducible too. No other seed source exists.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    # CPU float reductions are split across intra-op threads, so the thread count changes the last
    # bits of every sum (measured: fine-tune AUROC 0.570 with 1 thread, 0.574 with 2). A fixed count
    # makes the same spec give the same numbers on any CPU machine.
    torch.set_num_threads(cpu_threads())


def cpu_threads() -> int:
    """Intra-op CPU threads for runs: ``MEDVLP_BENCH_THREADS`` or 2 (recorded with every result)."""
    value = os.environ.get("MEDVLP_BENCH_THREADS", "2")
    try:
        threads = int(value)
    except ValueError:
        raise ValueError(f"MEDVLP_BENCH_THREADS must be a positive integer, got {value!r}") from None
    if threads < 1:
        raise ValueError(f"MEDVLP_BENCH_THREADS must be a positive integer, got {value!r}")
    return threads


def generators(seed: int) -> tuple[np.random.Generator, torch.Generator]:
    """The numpy and torch generators of a seed."""
    return np.random.default_rng(seed), torch.Generator().manual_seed(seed)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """``{"commit": sha | "unknown", "dirty": bool | None}`` of the repository holding the code.

    Dirty means tracked or untracked source changes; generated outputs (results/, leaderboard) do not
    count, so writing results does not make the next run "dirty".
    """
    commit = _git(["rev-parse", "HEAD"], repo)
    if not commit:
        return {"commit": "unknown", "dirty": None}
    status = _git(["status", "--porcelain", "--", ".", ":(exclude)results", ":(exclude)leaderboard.md",
                   ":(exclude)leaderboard"], repo)
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str]:
    """Versions of the libraries that can move the numbers (``"absent"`` when not installed)."""
    out = {"python": platform.python_version()}
    for dist, key in _PACKAGES.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = "absent"
    out["cuda"] = torch.version.cuda or "none"
    return out


def host_description(device: torch.device | str | None = None) -> dict[str, Any]:
    """Machine description without identifying names (no hostname, no user)."""
    d: dict[str, Any] = {
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "numerics": numerics_settings(),
    }
    if device is not None and torch.device(device).type == "cuda":
        idx = torch.device(device).index or 0
        d["gpu"] = torch.cuda.get_device_name(idx)
    return d

