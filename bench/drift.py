"""``python -m bench check``: re-run a small golden suite and compare it with ``results/golden/``.

The suite (:data:`GOLDEN_CELLS`) runs the tiny preset on the synthetic corpus at
:data:`CORPUS_SCALE` (each result records the scale in ``data_source``), on CPU, into a
temporary results folder, so the committed results are never touched. For each cell the main
metric and every other metric are compared with the golden file within an absolute tolerance
(:data:`DEFAULT_TOLERANCE`, per metric in :data:`TOLERANCES`); the task version and split-manifest
hash are compared too. Anything that moved, a missing golden file or a cell that cannot run makes
the check fail (exit 1): a missing golden file is a failure, never a skip.

``python -m bench check --update`` rewrites the golden files from a fresh run. That is a deliberate
act: do it only when a change is *meant* to move the numbers (say so in the commit message), and
review the diff of ``results/golden/`` before committing.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from tabulate import tabulate

from bench.api import RunSpec
from bench.data.synth.corpus import using_scale
from bench.data.synth.ensure import ensure_synthetic_datasets
from bench.errors import BenchError
from bench.paths import cache_dir, results_dir
from bench.registry import RegistryError
from bench.results import GOLDEN_DIRNAME, Result, ResultError, load_result, write_result

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4          # absolute; CPU runs of the tiny preset are deterministic
TOLERANCES: dict[str, float] = {}  # metric name -> absolute tolerance (overrides the default)
DEVICE = "cpu"                    # golden numbers are CPU numbers
#: The synthetic corpus the golden cells read. Not the benchmark's ``bench`` scale: the check needs a
#: deterministic corpus that exercises every code path; on the ``bench`` corpus the check took ~6 minutes
#: on 2 cores with the corpus already there, plus its generation on CI's fresh machine, where the
#: whole check on ``tiny`` takes ~1.5 minutes from nothing.
CORPUS_SCALE = "tiny"


@dataclass(frozen=True)
class GoldenCell:
    method: str
    task: str
    fraction: float
    seed: int = 0
    preset: str = "tiny"
    learns: bool = False        # the run's final train loss must be < LEARNING_RATIO x its prior loss

    def spec(self) -> RunSpec:
        return RunSpec(method=self.method, task=self.task, fraction=self.fraction, seed=self.seed,
                       preset=self.preset, data="synth")

    @property
    def name(self) -> str:
        return f"{self.task}--{self.method}--{self.preset}-frac{self.fraction!r}-seed{self.seed}"


# Small on purpose: the whole check (corpus, image caches, the supervised pretraining, the cells)
# must stay within ~2 minutes on 2 CPU cores from an empty cache (CI runs it and the tests in 15).
#: One cell per code path that produces numbers (binary, multi-label and multi-class probes, a nested
#: fraction, fine-tuning) and cells that *learn*: the pretrained ``supervised`` probe (its numbers move
#: when pretraining moves) and a fine-tune whose training loss must fall well below the loss of
#: predicting the training prior (``learns=True``: checked on every run, not only against the file).
GOLDEN_CELLS: tuple[GoldenCell, ...] = (
    GoldenCell("random", "rsna-cls", 1.0),
    GoldenCell("supervised", "rsna-cls", 0.1),
    GoldenCell("supervised", "chexpert-cls", 1.0),
    GoldenCell("random", "covidx-cls", 1.0),
    GoldenCell("supervised", "rsna-ft", 0.1, learns=True),
)
#: A ``learns`` cell passes when its last training loss is below this share of its prior loss.
LEARNING_RATIO = 0.9


def golden_dir() -> Path:
    return results_dir() / GOLDEN_DIRNAME


def golden_path(cell: GoldenCell, root: Path | None = None) -> Path:
    return (golden_dir() if root is None else Path(root)) / f"{cell.name}.json"


@dataclass
class Row:
    cell: str
    metric: str
    golden: Any
    now: Any
    delta: float | None
    tolerance: float | None
    status: str                 # "ok" or an upper-case failure word

    @property
    def ok(self) -> bool:
        return self.status == "ok" or self.status.startswith("ok ")


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    updated: list[Path] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.ok]

    def table(self) -> str:
        def fmt(v: Any) -> str:
            if v is None:
                return "—"
            if isinstance(v, float):
                return "nan" if math.isnan(v) else f"{v:.6f}"
            return str(v)

        rows = [[r.cell, r.metric, fmt(r.golden), fmt(r.now),
                 "—" if r.delta is None else f"{r.delta:+.2e}",
                 "—" if r.tolerance is None else f"{r.tolerance:.0e}", r.status] for r in self.rows]
        return tabulate(rows, headers=["cell", "metric", "golden", "now", "delta", "tolerance", "status"],
                        tablefmt="simple", disable_numparse=True)


def tolerance_for(metric: str, default: float | None = None) -> float:
    return TOLERANCES.get(metric, DEFAULT_TOLERANCE if default is None else default)


def _num(v: Any) -> float | None:
    return None if v is None else float(v)


def numerics_fingerprint(result: Result) -> tuple[Any, ...] | None:
    """What fixes a CPU run's floating-point results besides the code: CPU model, ATen's kernel ISA, the
    ISA caps (:mod:`bench.numerics`), thread count and torch version. None for results written before
    the host recorded them."""
    host = result.host or {}
    if "cpu_model" not in host:
        return None
    return (host.get("cpu_model"), host.get("cpu_capability"), tuple(sorted((host.get("numerics") or {}).items())),
            host.get("torch_threads"), (result.packages or {}).get("torch"), result.device)


def same_numerics(golden: Result, now: Result) -> bool:
    g = numerics_fingerprint(golden)
    return g is not None and g == numerics_fingerprint(now)


def _ci_half_width(result: Result, metric: str) -> float | None:
    ci = result.ci.get(metric) or (result.main_ci if metric == result.main_metric else None)
    if not ci or ci[0] is None or ci[1] is None:
        return None
    return (float(ci[1]) - float(ci[0])) / 2.0


def cross_hardware_tolerance(golden: Result, metric: str, default: float) -> float:
    """Tolerance when golden and current run differ in :func:`numerics_fingerprint`: the golden run's own
    95% CI half-width for the metric (else for its main metric). A run that trains for hundreds of steps
    turns last-bit kernel differences into differences of this order (measured between two CI machines:
    at most 0.014 AUROC and 0.021 F1, inside CI half-widths of 0.03-0.05); a change of the code that moves
    a number by more than its own statistical uncertainty still fails."""
    width = _ci_half_width(golden, metric)
    if width is None:
        width = _ci_half_width(golden, golden.main_metric)
    return max(default, width or 0.0)


def compare(cell: str, golden: Result, now: Result, default_tolerance: float | None = None) -> list[Row]:
    """Rows for one cell: identity checks, the main metric, failing metrics, a summary of the rest.

    On the golden run's hardware (:func:`same_numerics`) every metric must match to its tolerance
    (1e-4: CPU runs are deterministic). Elsewhere the metrics are compared within the golden run's CI
    half-width (:func:`cross_hardware_tolerance`), and a row says so.
    """
    rows: list[Row] = []
    same_hw = same_numerics(golden, now)
    if not same_hw:
        g, n = golden.host or {}, now.host or {}
        rows.append(Row(cell, "hardware", g.get("cpu_model", "not recorded"), n.get("cpu_model"), None, None,
                        "ok (other CPU numerics: metrics compared within the golden 95% CI half-width)"))
    if golden.spec != now.spec:
        diff = sorted(k for k in set(golden.spec) | set(now.spec) if golden.spec.get(k) != now.spec.get(k))
        rows.append(Row(cell, "spec", ", ".join(diff), None, None, None, "SPEC DIFFERS"))
    if golden.task_version != now.task_version:
        rows.append(Row(cell, "task version", golden.task_version, now.task_version, None, None,
                        "TASK VERSION CHANGED"))
    if golden.manifest_sha256 != now.manifest_sha256:
        rows.append(Row(cell, "split manifest sha256", str(golden.manifest_sha256)[:12],
                        str(now.manifest_sha256)[:12], None, None, "MANIFEST CHANGED"))
    if golden.main_metric != now.main_metric:
        rows.append(Row(cell, "main metric", golden.main_metric, now.main_metric, None, None, "MAIN METRIC CHANGED"))
    others_ok, others_max = 0, 0.0
    for name in [golden.main_metric] + sorted((set(golden.metrics) | set(now.metrics)) - {golden.main_metric}):
        g, n = _num(golden.metrics.get(name)), _num(now.metrics.get(name))
        tol = tolerance_for(name, default_tolerance)
        if not same_hw:
            tol = cross_hardware_tolerance(golden, name, tol)
        label = name + (" (main)" if name == golden.main_metric else "")
        if name not in golden.metrics:
            rows.append(Row(cell, label, None, n, None, tol, "NEW METRIC"))
            continue
        if name not in now.metrics:
            rows.append(Row(cell, label, g, None, None, tol, "METRIC GONE"))
            continue
        if g is None or n is None:      # NaN is stored as null
            same = g is None and n is None
            delta = None
        else:
            delta = n - g
            same = abs(delta) <= tol + 1e-12
        if name == golden.main_metric or not same:
            rows.append(Row(cell, label, g, n, delta, tol, "ok" if same else "MOVED"))
        else:
            others_ok += 1
            others_max = max(others_max, abs(delta or 0.0))
    if others_ok:
        rows.append(Row(cell, f"({others_ok} other metrics)", None, None, others_max, None,
                        "ok (max |delta| shown)"))
    return rows


def learning_row(cell: GoldenCell, result: Result) -> Row:
    """Does the run learn? Its last training loss against the loss of predicting the training prior
    (``details["prior_loss"]``, written by the training tasks)."""
    history = result.details.get("history") or []
    prior = result.details.get("prior_loss")
    last = history[-1].get("train_loss") if history else None
    if prior is None or last is None:
        return Row(cell.name, "train loss / prior", None, None, None, None,
                   "NO LEARNING RECORD (details need history[].train_loss and prior_loss)")
    ratio = float(last) / float(prior) if prior else float("inf")
    ok = ratio < LEARNING_RATIO
    return Row(cell.name, "train loss / prior", float(prior), float(last), ratio, LEARNING_RATIO,
               "ok (learns)" if ok else "DOES NOT LEARN")


@contextlib.contextmanager
def isolated_cache() -> Iterator[Path]:
    """A fresh temporary cache (image, feature and split caches are rebuilt by the current code), sharing
    only the synthetic corpus with the normal cache, whose validity the data layer checks itself."""
    shared_synth = cache_dir() / "synth"
    shared_synth.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("MEDVLP_BENCH_CACHE")
    with tempfile.TemporaryDirectory(prefix="medvlp-drift-cache-") as tmp:
        (Path(tmp) / "synth").symlink_to(shared_synth.resolve(), target_is_directory=True)
        os.environ["MEDVLP_BENCH_CACHE"] = tmp
        try:
            yield Path(tmp)
        finally:
            if old is None:
                os.environ.pop("MEDVLP_BENCH_CACHE", None)
            else:
                os.environ["MEDVLP_BENCH_CACHE"] = old


def check(*, cells: Sequence[GoldenCell] | None = None, golden_root: Path | None = None,
          tolerance: float | None = None, update: bool = False, device: str = DEVICE,
          fresh_cache: bool = True) -> Report:
    """Run the golden cells fresh and compare (or, with ``update``, rewrite the golden files).

    With ``fresh_cache`` (default) the runs use an empty cache apart from the synthetic corpus, so a
    feature or image cache written by older code cannot hide a change.
    """
    from bench import runner

    cells = GOLDEN_CELLS if cells is None else tuple(cells)
    golden_root = golden_dir() if golden_root is None else Path(golden_root)
    report = Report()
    t0 = time.perf_counter()
    if not cells:
        report.rows.append(Row("-", "-", None, None, None, None, "NO GOLDEN CELLS"))
        return report
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="medvlp-drift-"))
        if fresh_cache:
            stack.enter_context(isolated_cache())
        stack.enter_context(using_scale(CORPUS_SCALE))
        ensure_synthetic_datasets([c.task for c in cells if c.spec().data == "synth"])
        for cell in cells:
            t1 = time.perf_counter()
            try:
                now, _, _ = runner.run(cell.spec(), device=device, force=True, results_root=Path(tmp))
            except (BenchError, RegistryError) as e:
                report.rows.append(Row(cell.name, "-", None, None, None, None, f"ERROR: {e}"))
                continue
            log.info("drift: %s ran in %.1f s", cell.name, time.perf_counter() - t1)
            if cell.learns:
                report.rows.append(learning_row(cell, now))
            gpath = golden_path(cell, golden_root)
            if update:
                write_result(now, gpath, None)
                report.updated.append(gpath)
                report.rows.append(Row(cell.name, now.main_metric + " (main)", None, _num(now.main_value),
                                       None, None, "ok (updated)"))
                continue
            if not gpath.exists():
                report.rows.append(Row(cell.name, now.main_metric + " (main)", None, _num(now.main_value), None,
                                       None, f"MISSING golden file {gpath} (create it with `python -m bench "
                                             "check --update`)"))
                continue
            try:
                golden = load_result(gpath)
            except ResultError as e:
                report.rows.append(Row(cell.name, "-", None, None, None, None, f"MALFORMED: {e}"))
                continue
            report.rows.extend(compare(cell.name, golden, now, tolerance))
    report.wall_s = time.perf_counter() - t0
    return report
