"""Where the harness keeps caches, the synthetic corpus, results and the leaderboard.

Results and the leaderboard belong to a project checkout, never to the installed package: in a
non-editable install the package's parent folder is site-packages. :func:`project_root` finds the
checkout by configuration (see there); :func:`results_dir` and :func:`leaderboard_dir` honour an
environment variable first.
"""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

from bench.errors import BenchError

#: The folder holding the ``bench`` package: the source checkout when running from one (what
#: ``git_info`` describes), site-packages in a non-editable install. Not where results go.
REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT_NAME = "medvlp-bench"
RESULTS_ENV = "MEDVLP_BENCH_RESULTS"
LEADERBOARD_ENV = "MEDVLP_BENCH_LEADERBOARD"


def cache_dir() -> Path:
    """Root of derived, re-creatable files (image caches, feature caches, synthetic corpus)."""
    return Path(os.environ.get("MEDVLP_BENCH_CACHE", Path.home() / ".cache" / "medvlp-bench"))


def synth_root(scale: str | None = None, seed: int = 0) -> Path:
    """Default location of the synthetic corpus of a given scale (default: the one ``--data synth``
    reads, ``default_scale()``) and seed."""
    if scale is None:
        from bench.data.synth.corpus import default_scale

        scale = default_scale()
    return cache_dir() / "synth" / f"{scale}-seed{seed}"


def is_project_checkout(folder: Path) -> bool:
    """True when ``folder`` holds a ``pyproject.toml`` whose project is medvlp-bench (name normalised as PEP 503)."""
    try:
        meta = tomllib.loads((Path(folder) / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False    # absent or not ours: keep looking, never fail on a stranger's file
    name = meta.get("project", {}).get("name") if isinstance(meta.get("project"), dict) else None
    return isinstance(name, str) and re.sub(r"[-_.]+", "-", name).lower() == PROJECT_NAME


def project_root(env_var: str = RESULTS_ENV) -> Path:
    """The medvlp-bench checkout that results and the leaderboard belong to.

    The current directory or the nearest folder above it that is a checkout (so a user in their
    project gets its ``results/``); else the source checkout the package runs from (an editable
    install run from elsewhere); else a :class:`BenchError` telling the user to set ``env_var``.
    """
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if is_project_checkout(folder):
            return folder
    if is_project_checkout(REPO_ROOT):
        return REPO_ROOT
    raise BenchError(f"no {PROJECT_NAME} checkout found: neither {cwd} nor a folder above it holds a "
                     f"pyproject.toml naming {PROJECT_NAME!r}, and the package runs from {REPO_ROOT}, which is "
                     f"not a checkout (an installed copy). Run from your checkout or set {env_var}=/path/to/folder")


def results_dir() -> Path:
    """Where results are read and written: ``$MEDVLP_BENCH_RESULTS``, else ``<project_root()>/results``."""
    env = os.environ.get(RESULTS_ENV)
    return Path(env) if env else project_root(RESULTS_ENV) / "results"


def leaderboard_dir() -> Path:
    """The folder that gets ``leaderboard.md`` and ``leaderboard/``: ``$MEDVLP_BENCH_LEADERBOARD``,
    else :func:`project_root`."""
    env = os.environ.get(LEADERBOARD_ENV)
    return Path(env) if env else project_root(LEADERBOARD_ENV)
