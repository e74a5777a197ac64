"""``python -m bench table``: regenerate ``leaderboard.md`` and its plots from ``results/`` alone.

The output is a pure function of the result files: iteration is sorted, nothing depends on the
clock or the machine, and PNGs are written with fixed size/dpi and no software metadata, so
regenerating from the same results gives identical bytes (``tests/test_leaderboard.py`` checks the
committed leaderboard against a fresh regeneration).

Layout: one top-level section per (data source, preset), SYNTHETIC first, every heading and caption
naming the data source; per task a methods x label-fractions table (mean ± std over seeds, mean 95%
CI, n seeds), a label-efficiency plot, an average-rank table (rule in :data:`RANK_RULE`), and a
reference section quoting published numbers (:mod:`bench.reference_numbers`).
"""
from __future__ import annotations

import io
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from bench import reference_numbers as ref
from bench.api import PRESETS
from bench.paths import REPO_ROOT, results_dir
from bench.results import Result, load_results, variant_hash

log = logging.getLogger(__name__)

COMMAND = "python -m bench table"
PLOTS_DIRNAME = "leaderboard"
NA = "n/a"
MISSING = "—"
KIND_ORDER = ("synthetic", "real")
KIND_LABEL = {"synthetic": "SYNTHETIC", "real": "REAL"}
_PLOT_NAME = re.compile(r"^(synthetic|real)-.+\.png$")

RANK_RULE = (
    "For every (task, label fraction) column with at least one result in this section, the methods that "
    "are complete (a result in every column) are ranked by their mean main metric over seeds (rank 1 = "
    "best, direction from the task's higher-is-better flag); tied means get the average of the tied "
    "ranks. A method's score is the mean of its ranks over the columns. Methods missing any column (not "
    "run, or n/a because they lack a capability the task requires) are not ranked and are listed as "
    "incomplete."
)

LEGEND = (
    "Cells: mean ± sample std (ddof=1) of the task's main metric over seeds, then the mean over seeds of "
    "each run's bootstrap 95% CI bounds in brackets, then the number of seeds n. Bold: best mean in the "
    "column (when two or more methods have a result). `n/a`: the method lacks a capability the task "
    "requires (it cannot run). `—`: not run yet."
)

# 10 fixed colours (matplotlib's tab10), assigned by the method's position in its section
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


# --------------------------------------------------------------------------------------------
# Collecting


def variant_label(r: Result) -> str:
    """The row label of a result: method, plus a non-default protocol and the identity hash."""
    label = r.method
    protocol = r.spec.get("protocol")
    if protocol:
        label += f" · {protocol}"
    h = variant_hash(r.spec)
    if h:
        label += f" #{h}"
    return label


def _preset_key(p: str) -> tuple[int, str]:
    return (PRESETS.index(p) if p in PRESETS else len(PRESETS), p)


def _kind_key(k: str) -> tuple[int, str]:
    return (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k)


def _value(v: Any) -> float:
    return float("nan") if v is None else float(v)


def frame(results: dict[Path, Result]) -> pd.DataFrame:
    """One row per result with the fields the leaderboard uses."""
    rows = []
    for path, r in sorted(results.items()):
        ci = r.main_ci or [None, None]
        rows.append({
            "kind": r.data_kind, "preset": r.spec.get("preset", "?"), "task": r.task_name,
            "variant": variant_label(r), "method": r.method, "fraction": r.fraction, "seed": r.seed,
            "value": _value(r.main_value), "ci_lo": _value(ci[0]), "ci_hi": _value(ci[1]),
            "metric": r.main_metric, "hib": bool(r.higher_is_better), "version": r.task_version,
            "family": r.task.get("family", "?"), "dataset": r.dataset,
            "requires": tuple(r.task.get("requires", ())),
            "caps": tuple(r.method_card.get("capabilities", ())),
            "device": r.device.split(":")[0], "torch": r.packages.get("torch", "?"),
            "commit": str(r.git.get("commit", "unknown"))[:10], "dirty": bool(r.git.get("dirty")),
            "path": str(path),
        })
    cols = ["kind", "preset", "task", "variant", "method", "fraction", "seed", "value", "ci_lo", "ci_hi",
            "metric", "hib", "version", "family", "dataset", "requires", "caps", "device", "torch",
            "commit", "dirty", "path"]
    return pd.DataFrame(rows, columns=cols)


@dataclass
class Cell:
    values: list[float]
    ci_lo: list[float]
    ci_hi: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else float("nan")

    def ci(self) -> tuple[float, float] | None:
        lo = [v for v in self.ci_lo if not math.isnan(v)]
        hi = [v for v in self.ci_hi if not math.isnan(v)]
        if not lo or not hi:
            return None
        return float(np.mean(lo)), float(np.mean(hi))


@dataclass
class TaskTable:
    task: str
    metric: str
    hib: bool
    family: str
    dataset: str
    requires: tuple[str, ...]
    versions: tuple[int, ...]
    fractions: tuple[float, ...]
    cells: dict[tuple[str, float], Cell] = field(default_factory=dict)
    runs: int = 0
    devices: tuple[str, ...] = ()
    torch: tuple[str, ...] = ()


@dataclass
class Section:
    kind: str
    preset: str
    variants: tuple[str, ...]
    caps: dict[str, frozenset[str]]
    tasks: list[TaskTable]
    commits: dict[str, int]
    dirty_runs: int

    @property
    def label(self) -> str:
        return KIND_LABEL.get(self.kind, self.kind.upper())

    @property
    def slug(self) -> str:
        return f"{self.kind}-{self.preset}"

    def missing_caps(self, variant: str, t: TaskTable) -> list[str]:
        return sorted(set(t.requires) - self.caps.get(variant, frozenset()))


def sections(df: pd.DataFrame) -> list[Section]:
    out = []
    if df.empty:
        return out
    keys = sorted({(k, p) for k, p in zip(df["kind"], df["preset"])},
                  key=lambda kp: (_kind_key(kp[0]), _preset_key(kp[1])))
    for kind, preset in keys:
        sdf = df[(df["kind"] == kind) & (df["preset"] == preset)]
        variants = tuple(sorted(set(sdf["variant"])))
        caps: dict[str, frozenset[str]] = {}
        for v in variants:
            first = sdf[sdf["variant"] == v].iloc[0]          # rows are sorted by path
            caps[v] = frozenset(first["caps"])
        tasks = []
        for task in sorted(set(sdf["task"])):
            tdf = sdf[sdf["task"] == task]
            last = tdf.iloc[-1]
            t = TaskTable(
                task=task, metric=str(last["metric"]), hib=bool(last["hib"]), family=str(last["family"]),
                dataset=str(last["dataset"]), requires=tuple(sorted(set().union(*tdf["requires"]))),
                versions=tuple(sorted(set(int(v) for v in tdf["version"]))),
                fractions=tuple(sorted(set(float(f) for f in tdf["fraction"]))),
                runs=len(tdf), devices=tuple(sorted(set(tdf["device"]))), torch=tuple(sorted(set(tdf["torch"]))),
            )
            for (variant, frac), g in tdf.groupby(["variant", "fraction"], sort=True):
                g = g.sort_values("seed")
                t.cells[(variant, float(frac))] = Cell(list(g["value"]), list(g["ci_lo"]), list(g["ci_hi"]))
            tasks.append(t)
        commits = {str(c): int(n) for c, n in sorted(sdf["commit"].value_counts().items())}
        out.append(Section(kind, preset, variants, caps, tasks, commits, int(sdf["dirty"].sum())))
    return out


# --------------------------------------------------------------------------------------------
# Formatting


def _num(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.3f}"


def _frac(f: float) -> str:
    return f"{f * 100:g}%"


def format_cell(c: Cell, best: bool = False) -> str:
    mean = _num(c.mean)
    if best:
        mean = f"**{mean}**"
    text = mean if c.n < 2 else f"{mean} ± {_num(c.std)}"
    ci = c.ci()
    if ci is not None:
        text += f" [{_num(ci[0])}, {_num(ci[1])}]"
    return f"{text} (n={c.n})"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _arrow(hib: bool) -> str:
    return "↑" if hib else "↓"


def _best_means(t: TaskTable, frac: float) -> float | None:
    means = [c.mean for (v, f), c in t.cells.items() if f == frac and not math.isnan(c.mean)]
    if not means:
        return None
    return max(means) if t.hib else min(means)


def task_table(sec: Section, t: TaskTable) -> str:
    headers = ["Method"] + [_frac(f) for f in t.fractions]
    rows = []
    # bold the best mean only where there is something to compare with
    best = {f: _best_means(t, f) if sum(1 for (v, g) in t.cells if g == f) > 1 else None for f in t.fractions}
    for v in sec.variants:
        na = bool(sec.missing_caps(v, t))
        row = [f"`{v}`"]
        for f in t.fractions:
            c = t.cells.get((v, f))
            if c is not None:
                row.append(format_cell(c, best=(best[f] is not None and c.mean == best[f])))
            else:
                row.append(NA if na else MISSING)
        rows.append(row)
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def rank_section(sec: Section) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """(ranked table, {incomplete variant: reasons}) following :data:`RANK_RULE`."""
    columns = [(t, f) for t in sec.tasks for f in t.fractions]
    incomplete: dict[str, list[str]] = {}
    complete = []
    for v in sec.variants:
        reasons = []
        for t in sec.tasks:
            absent = [f for f in t.fractions if (v, f) not in t.cells]
            if not absent:
                continue
            miss = sec.missing_caps(v, t)
            where = f"{t.task} @ {', '.join(_frac(f) for f in absent)}"
            reasons.append(f"n/a on {t.task} (lacks {', '.join(miss)})" if miss else f"not run: {where}")
        if reasons:
            incomplete[v] = reasons
        else:
            complete.append(v)
    if not complete or not columns:
        return pd.DataFrame(columns=["variant", "avg_rank", "columns"]), incomplete
    ranks = pd.DataFrame(index=complete)
    for t, f in columns:
        means = pd.Series({v: t.cells[(v, f)].mean for v in complete}, dtype=float)
        ranks[f"{t.task}@{f!r}"] = means.rank(method="average", ascending=not t.hib, na_option="bottom")
    table = pd.DataFrame({
        "variant": complete,
        "avg_rank": [float(ranks.loc[v].mean()) for v in complete],
        "columns": [len(columns)] * len(complete),
    }).sort_values(["avg_rank", "variant"], kind="stable").reset_index(drop=True)
    return table, incomplete


def rank_markdown(sec: Section) -> str:
    table, incomplete = rank_section(sec)
    lines = [f"### Average rank ({sec.label}, preset `{sec.preset}`)", "",
             f"*{sec.label} data, preset {sec.preset}: average rank across tasks and label fractions "
             f"(rule at the top of this file).*", ""]
    if table.empty:
        lines.append("No method has a result in every column yet, so none is ranked.")
    else:
        place = table["avg_rank"].round(6).rank(method="min").astype(int)
        rows = [[int(p), f"`{v}`", f"{a:.2f}", int(c)]
                for p, v, a, c in zip(place, table["variant"], table["avg_rank"], table["columns"])]
        lines.append(tabulate(rows, headers=["Rank", "Method", "Avg. rank", "Columns"], tablefmt="github",
                              disable_numparse=True))
    if incomplete:
        lines += ["", "Incomplete (not ranked):", ""]
        for v in sorted(incomplete):
            lines.append(f"- `{v}`: {'; '.join(incomplete[v])}")
    return "\n".join(lines)


def plot_name(sec: Section, t: TaskTable) -> str:
    return f"{sec.slug}-{re.sub(r'[^A-Za-z0-9._-]', '_', t.task)}.png"


def render_plot(sec: Section, t: TaskTable) -> bytes:
    """Label-efficiency curve (main metric vs fraction, one line per method) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"font.family": "DejaVu Sans", "font.size": 9, "path.simplify": False}):
        fig = Figure(figsize=(6.0, 4.0), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        shown = [v for v in sec.variants if any((v, f) in t.cells for f in t.fractions)]
        for i, v in enumerate(sec.variants):
            pts = [(f, t.cells[(v, f)]) for f in t.fractions if (v, f) in t.cells]
            if not pts:
                continue
            # small horizontal dodge (in log space) so error bars of different methods do not overlap
            dodge = 10 ** (0.012 * (shown.index(v) - (len(shown) - 1) / 2))
            xs = [f * dodge for f, _ in pts]
            ys = [c.mean for _, c in pts]
            es = [0.0 if math.isnan(c.std) else c.std for _, c in pts]
            ax.errorbar(xs, ys, yerr=es, label=v, color=_COLORS[i % len(_COLORS)],
                        marker=_MARKERS[i % len(_MARKERS)], markersize=4, linewidth=1.2, capsize=3)
        ax.set_xscale("log")
        ax.set_xticks(list(t.fractions))
        ax.set_xticklabels([_frac(f) for f in t.fractions])
        ax.minorticks_off()
        ax.set_xlabel("label fraction (training set)")
        ax.set_ylabel(f"{t.metric} ({'higher' if t.hib else 'lower'} is better)")
        ax.set_title(f"{t.task} ({sec.label} data, preset {sec.preset}): mean ± std over seeds")
        ax.grid(True, linewidth=0.4, alpha=0.5)
        ax.legend(loc="best", fontsize=8, frameon=False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def reference_markdown() -> str:
    headers = ["Method"] + [f"{d} {ref.MGCA_METRICS[d]} 1 / 10 / 100%" for d in ref.MGCA_DATASETS]
    rows = []
    for m in ref.MGCA_ROWS:
        rows.append([m] + [" / ".join(f"{x:.1f}" for x in ref.MGCA_LINEAR_CLS[m][d]) for d in ref.MGCA_DATASETS])
    return "\n".join([
        "## Reference: published numbers (REAL data, not produced by this harness)", "",
        "*MGCA paper, linear classification (ResNet-50 unless noted), 1% / 10% / 100% of training labels.*", "",
        tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), "",
        f"Source: {ref.MGCA_CITATION}", "",
        f"Note: {ref.MGCA_NOTE} † {ref.MGCA_VIT_NOTE}",
    ])


def _caption(sec: Section, t: TaskTable) -> str:
    versions = ", ".join(f"v{v}" for v in t.versions)
    mixed = " (mixed versions: re-run the stale cells)" if len(t.versions) > 1 else ""
    return (f"*{sec.label} data, preset {sec.preset} · task `{t.task}` {versions}{mixed} · {t.family} on "
            f"`{t.dataset}` · main metric `{t.metric}` ({_arrow(t.hib)} {'higher' if t.hib else 'lower'} is "
            f"better) · {_plural(t.runs, 'run')} · device {', '.join(t.devices)} · torch {', '.join(t.torch)}*")


def render(results: dict[Path, Result]) -> tuple[str, dict[str, bytes]]:
    """(markdown text, {plot file name: PNG bytes}) for a set of results."""
    df = frame(results)
    secs = sections(df)
    plots: dict[str, bytes] = {}
    out = [
        "# medvlp-bench leaderboard", "",
        f"<!-- GENERATED by `{COMMAND}` from results/ alone. Do not edit by hand: edits are overwritten. -->", "",
        f"Generated by `{COMMAND}` from the result files under `results/` (drift-check files in "
        f"`results/golden/` excluded). Never edit this file by hand; re-run the command.", "",
        LEGEND, "",
        f"Average-rank rule: {RANK_RULE}", "",
    ]
    if not secs:
        out += ["No results yet. Run `python -m bench demo` (synthetic corpus, CPU) or "
                "`python -m bench run ...`, then `python -m bench table`.", ""]
    else:
        out += ["Contents:", ""]
        for sec in secs:
            out.append(f"- {sec.label} data, preset `{sec.preset}`: "
                       f"{', '.join(f'`{t.task}`' for t in sec.tasks)}")
        out.append("")
    for sec in secs:
        out += [f"## {sec.label} data — preset `{sec.preset}`", ""]
        if sec.kind == "synthetic":
            out += ["> SYNTHETIC: every number in this section was measured on the procedurally generated "
                    "corpus. It exercises the harness and ranks methods on synthetic findings; it says "
                    "nothing about clinical performance and is not comparable with published numbers.", ""]
        commits = ", ".join(f"`{c}` ({_plural(n, 'run')})" for c, n in sec.commits.items())
        dirty = (f"; {_plural(sec.dirty_runs, 'run')} from a tree with uncommitted changes"
                 if sec.dirty_runs else "")
        out += [f"Code: {commits}{dirty}.", ""]
        for t in sec.tasks:
            name = plot_name(sec, t)
            plots[name] = render_plot(sec, t)
            out += [f"### {t.task}: {t.metric} {_arrow(t.hib)} ({sec.label}, preset `{sec.preset}`)", "",
                    _caption(sec, t), "", task_table(sec, t), "",
                    f"![{t.task} label efficiency ({sec.label} data, preset {sec.preset})]"
                    f"({PLOTS_DIRNAME}/{name})", ""]
        out += [rank_markdown(sec), ""]
    out += [reference_markdown(), ""]
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"
    return text, plots


# --------------------------------------------------------------------------------------------
# Writing


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_bytes() == data:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build(results_root: Path | None = None, out: Path | None = None) -> list[Path]:
    """Regenerate ``out`` (default ``<repo>/leaderboard.md``) and ``<out dir>/leaderboard/*.png``.

    Plots of earlier runs that no longer correspond to results are removed. Returns written paths.
    """
    results_root = results_dir() if results_root is None else Path(results_root)
    out = REPO_ROOT / "leaderboard.md" if out is None else Path(out)
    results = load_results(results_root)
    text, plots = render(results)
    plot_dir = out.parent / PLOTS_DIRNAME
    written = []
    for name in sorted(plots):
        _write_bytes(plot_dir / name, plots[name])
        written.append(plot_dir / name)
    if plot_dir.exists():
        for old in sorted(plot_dir.iterdir()):
            if _PLOT_NAME.match(old.name) and old.name not in plots:
                old.unlink()
                log.info("removed stale plot %s", old)
    _write_bytes(out, text.encode("utf-8"))
    written.insert(0, out)
    log.info("leaderboard: %d results -> %s (%d plots)", len(results), out, len(plots))
    return written
