"""``python -m bench demo`` (what ``make demo`` runs): compute a subset of the committed grid on the
synthetic corpus with the tiny preset, compare every cell with the committed result of the same
identity, and build a leaderboard of the cells it ran.

The demo computes its cells; it never just reads the committed ones: results go to
``<project>/.demo/results/`` (ignored by git; a second demo reuses them, ``--force`` recomputes),
the committed ``results/`` are only read for the comparison, and the leaderboard of the demo's
cells is written to ``.demo/leaderboard.md`` (``python -m bench table`` rebuilds the committed
``leaderboard.md`` from ``results/``).

Default grid (:data:`DEFAULT_TASKS` x :data:`DEFAULT_METHODS` x 3 fractions x seed 0): the four
linear probes and one fine-tune, for the reference methods and MGCA, the vision-language anchor
(``--methods all`` takes every registered method: each vision-language method pretrains once on
first use, several CPU minutes apiece). A method that cannot run a cell (weights absent, a missing
capability) is reported as ``skipped: reason`` instead of stopping the demo.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from bench.api import FRACTIONS, METHODS, TASKS, RunSpec
from bench.errors import CapabilityError, CheckpointError
from bench.paths import results_dir

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("rsna-cls", "chexpert-cls", "covidx-cls", "nih-cls", "rsna-ft")
#: The references every method is judged against, and one pretrained vision-language method.
DEFAULT_METHODS = ("pixels", "random", "imagenet", "supervised", "mgca")


def demo_dir() -> Path:
    from bench.paths import leaderboard_dir

    return leaderboard_dir() / ".demo"


def selected_methods(methods: Sequence[str] | None) -> list[str]:
    """``None``: :data:`DEFAULT_METHODS` (those registered); ``["all"]``: every registered method; else as given."""
    if not methods:
        return [m for m in DEFAULT_METHODS if m in METHODS]
    if list(methods) == ["all"]:
        return METHODS.names()
    return list(methods)


def _fmt(v: float | None) -> str:
    return "nan" if v is None else f"{v:.3f}"


@dataclass
class Comparison:
    status: str          # "equal", "differs", "not committed", "in place"
    detail: str = ""


def compare_with_committed(result, path: Path, demo_root: Path, committed_root: Path) -> Comparison:
    """Compare a demo result with the committed result at the same relative path, with the drift
    check's comparison (spec, task version, manifest, every metric within its tolerance)."""
    from bench.drift import compare
    from bench.results import ResultError, load_result

    if demo_root.resolve() == committed_root.resolve():
        # a sweep into the committed results/ overwrites the file it would compare with: the
        # comparison would always say "equal" (git diff shows what changed)
        return Comparison("in place")
    committed = committed_root / path.relative_to(demo_root)
    if not committed.is_file():
        return Comparison("not committed")
    try:
        ref = load_result(committed)
    except ResultError as e:
        return Comparison("differs", f"committed file unreadable: {e}")
    failures = [r for r in compare(path.stem, ref, result) if not r.ok]
    if failures:
        first = failures[0]
        delta = "" if first.delta is None else f" {first.delta:+.4f}"
        return Comparison("differs", f"{first.metric}: {first.status}{delta}")
    return Comparison("equal")


def main(*, seeds: Sequence[int] = (0,), device: str = "auto", force: bool = False,
         methods: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
         results_root: Path | None = None, leaderboard_out: Path | None = None, corpus: bool = True,
         committed_root: Path | None = None) -> int:
    from bench import leaderboard, runner

    t0 = time.perf_counter()
    results_root = demo_dir() / "results" if results_root is None else Path(results_root)
    committed_root = results_dir() if committed_root is None else Path(committed_root)
    leaderboard_out = demo_dir() / "leaderboard.md" if leaderboard_out is None else Path(leaderboard_out)
    runner.load_registries()
    method_names = selected_methods(methods)
    task_names = list(tasks) if tasks else [t for t in DEFAULT_TASKS if t in TASKS]
    if corpus:
        from bench.data.synth.ensure import ensure_synthetic_datasets
        from bench.paths import synth_root

        t1 = time.perf_counter()
        names = ensure_synthetic_datasets(task_names)
        print(f"synthetic corpus: {synth_root()} ({', '.join(names)}: {time.perf_counter() - t1:.0f} s)", flush=True)
    for name in method_names:
        METHODS.get(name)
    for name in task_names:
        TASKS.get(name)
    cells = [(t, m, f, s) for t in task_names for m in method_names for f in FRACTIONS for s in seeds]
    print(f"demo: {len(method_names)} methods x {len(task_names)} tasks ({', '.join(task_names)}) x "
          f"{len(FRACTIONS)} fractions x {len(seeds)} seeds = {len(cells)} runs (SYNTHETIC data, preset tiny) "
          f"-> {results_root}", flush=True)
    counts = {"ran": 0, "reused": 0, "skipped": 0}
    matches = {"equal": 0, "differs": 0, "not committed": 0, "in place": 0}
    reasons: dict[str, str] = {}      # full message -> method, each distinct reason printed once
    width = len(str(len(cells)))
    for i, (t, m, f, s) in enumerate(cells, 1):
        head = f"[{i:>{width}}/{len(cells)}] {t} x {m} @ {f * 100:g}% seed {s}"
        spec = RunSpec(method=m, task=t, fraction=f, seed=s, preset="tiny", data="synth")
        t1 = time.perf_counter()
        try:
            result, path, skipped = runner.run(spec, device=device, force=force, results_root=results_root)
        except (CheckpointError, CapabilityError) as e:
            counts["skipped"] += 1
            first, _, rest = str(e).partition("\n")
            reasons.setdefault(str(e), m)
            print(f"{head}: skipped: {first}" + (" (details below)" if rest else ""), flush=True)
            continue
        ci = f" [{_fmt(result.main_ci[0])}, {_fmt(result.main_ci[1])}]" if result.main_ci else ""
        state = "reused from an earlier demo" if skipped else f"ran in {time.perf_counter() - t1:.1f} s"
        counts["reused" if skipped else "ran"] += 1
        cmp = compare_with_committed(result, path, results_root, committed_root)
        matches[cmp.status] += 1
        note = {"equal": "= committed", "not committed": "no committed result",
                "in place": "written into the committed results"}.get(cmp.status,
                                                                      f"DIFFERS from committed: {cmp.detail}")
        print(f"{head}: {result.main_metric} {_fmt(result.main_value)}{ci} ({state}; {note})", flush=True)
    for why, m in reasons.items():
        if "\n" in why:
            print(f"\nwhy {m} was skipped:\n{why}")
    leaderboard.build(results_root, leaderboard_out)
    elapsed = time.perf_counter() - t0
    print(f"demo done in {elapsed:.1f} s: {counts['ran']} ran, {counts['reused']} reused, {counts['skipped']} skipped")
    compared = matches["equal"] + matches["differs"]
    if matches["in place"]:
        print(f"written into the committed results ({committed_root}), so not compared with them: "
              "`git diff --stat` shows which changed")
    verdict = ("all equal to the committed results" if compared and not matches["differs"]
               else f"{matches['differs']} DIFFER from the committed results" if matches["differs"]
               else "none has a committed counterpart")
    print(f"versus committed results ({committed_root}): {matches['equal']} equal, {matches['differs']} differ, "
          f"{matches['not committed']} not committed -> {verdict}")
    print(f"results:     {results_root}")
    print(f"leaderboard: {leaderboard_out} (plots in {leaderboard_out.parent / leaderboard.PLOTS_DIRNAME})")
    return 1 if matches["differs"] else 0
