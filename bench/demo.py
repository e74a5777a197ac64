"""``python -m bench demo``: every method x one task per family x three label fractions, on the
synthetic corpus with the tiny preset, then the leaderboard.

Finished cells are skipped (so a second demo is fast); a method that cannot run a cell (weights
absent, a missing capability) is reported as ``skipped: reason`` instead of stopping the demo.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

from bench.api import FRACTIONS, METHODS, TASKS, RunSpec
from bench.errors import CapabilityError, CheckpointError
from bench.paths import REPO_ROOT, results_dir, synth_root

log = logging.getLogger(__name__)

# family -> preferred task; families not listed use their first task by name
PREFERRED_TASKS = {"linear-probe": "rsna-cls", "fine-tune": "rsna-ft"}
CORPUS_SCALE = "tiny"
CORPUS_SEED = 0


def demo_tasks() -> list[str]:
    """One task per registered family (the preferred one when registered)."""
    by_family: dict[str, list[str]] = {}
    for name, entry in TASKS.items():
        by_family.setdefault(entry.family, []).append(name)
    chosen = []
    # families with a preferred task first (in that order: cheapest first), then the rest by name
    order = list(PREFERRED_TASKS) + sorted(f for f in by_family if f not in PREFERRED_TASKS)
    for family in (f for f in order if f in by_family):
        names = sorted(by_family[family])
        pref = PREFERRED_TASKS.get(family)
        chosen.append(pref if pref in names else names[0])
    return chosen


def ensure_corpus(scale: str = CORPUS_SCALE, seed: int = CORPUS_SEED) -> Path:
    from bench.data.synth.corpus import ensure_corpus as _ensure

    root = synth_root(scale, seed)
    _ensure(root, scale, seed)
    return root


def _fmt(v: float | None) -> str:
    return "nan" if v is None else f"{v:.3f}"


def main(*, seeds: Sequence[int] = (0,), device: str = "auto", force: bool = False,
         methods: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
         results_root: Path | None = None, leaderboard_out: Path | None = None, corpus: bool = True) -> int:
    from bench import leaderboard, runner

    t0 = time.perf_counter()
    results_root = results_dir() if results_root is None else Path(results_root)
    leaderboard_out = REPO_ROOT / "leaderboard.md" if leaderboard_out is None else Path(leaderboard_out)
    if corpus:
        root = ensure_corpus()
        print(f"synthetic corpus: {root}")
    runner.load_registries()
    method_names = list(methods) if methods else METHODS.names()
    task_names = list(tasks) if tasks else demo_tasks()
    for name in method_names:
        METHODS.get(name)
    for name in task_names:
        TASKS.get(name)
    cells = [(t, m, f, s) for t in task_names for m in method_names for f in FRACTIONS for s in seeds]
    print(f"demo: {len(method_names)} methods x {len(task_names)} tasks ({', '.join(task_names)}) x "
          f"{len(FRACTIONS)} fractions x {len(seeds)} seeds = {len(cells)} runs (SYNTHETIC data, preset tiny)")
    counts = {"ran": 0, "cached": 0, "skipped": 0}
    reasons: dict[str, str] = {}      # full message -> method, each distinct reason printed once
    width = len(str(len(cells)))
    for i, (t, m, f, s) in enumerate(cells, 1):
        head = f"[{i:>{width}}/{len(cells)}] {t} x {m} @ {f * 100:g}% seed {s}"
        spec = RunSpec(method=m, task=t, fraction=f, seed=s, preset="tiny", data="synth")
        t1 = time.perf_counter()
        try:
            result, _, skipped = runner.run(spec, device=device, force=force, results_root=results_root)
        except (CheckpointError, CapabilityError) as e:
            counts["skipped"] += 1
            first, _, rest = str(e).partition("\n")
            reasons.setdefault(str(e), m)
            print(f"{head}: skipped: {first}" + (" (details below)" if rest else ""), flush=True)
            continue
        ci = f" [{_fmt(result.main_ci[0])}, {_fmt(result.main_ci[1])}]" if result.main_ci else ""
        state = "cached" if skipped else f"ran in {time.perf_counter() - t1:.1f} s"
        counts["cached" if skipped else "ran"] += 1
        print(f"{head}: {result.main_metric} {_fmt(result.main_value)}{ci} ({state})", flush=True)
    for why, m in reasons.items():
        if "\n" in why:
            print(f"\nwhy {m} was skipped:\n{why}")
    leaderboard.build(results_root, leaderboard_out)
    elapsed = time.perf_counter() - t0
    print(f"demo done in {elapsed:.1f} s: {counts['ran']} ran, {counts['cached']} cached, "
          f"{counts['skipped']} skipped")
    print(f"results:     {results_root}")
    print(f"leaderboard: {leaderboard_out} (plots in {leaderboard_out.parent / leaderboard.PLOTS_DIRNAME})")
    return 0
