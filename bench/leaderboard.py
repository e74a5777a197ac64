"""``python -m bench table``: regenerate ``leaderboard.md`` and its plots from ``results/`` alone.

The output is a pure function of the result files: iteration is sorted, nothing depends on the
clock or the machine, and PNGs are written with fixed size/dpi and no software metadata, so
regenerating from the same results gives identical bytes (``tests/test_leaderboard.py`` checks the
committed leaderboard against a fresh regeneration).

Layout: one top-level section per (data source, preset), SYNTHETIC first, every heading and caption
naming the data source; per (task, data root) a methods x label-fractions table (mean ± std over
seeds, mean 95% CI, n seeds) with each column's train/test sizes, a label-efficiency plot, an
average-rank table (rule in :data:`RANK_RULE`), and a reference section quoting published numbers
(:mod:`bench.reference_numbers`) that says which of our columns compare with them.

Rows are every method with a result in the section plus every registered method (``build`` reads
the method registry; ``render`` takes it as an argument), so a method that has not run shows `—`
and one that cannot run a task shows `n/a`.
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
from bench.paths import leaderboard_dir, results_dir
from bench.results import Result, ResultError, data_tag, load_results, variant_hash, variant_parts

log = logging.getLogger(__name__)

COMMAND = "python -m bench table"
PLOTS_DIRNAME = "leaderboard"
NA = "n/a"
MISSING = "—"
KIND_ORDER = ("synthetic", "real")
KIND_LABEL = {"synthetic": "SYNTHETIC", "real": "REAL"}
_PLOT_NAME = re.compile(r"^(synthetic|real)-.+\.png$")

RANK_RULE = (
    "A column is a (task table, label fraction) pair with at least one result in this section. A method is "
    "complete when it has a result in every column it can run; columns it cannot run (n/a: it lacks a "
    "capability the task requires) are left out for it instead of making it incomplete. In each column where "
    "at least two complete methods have a result, those methods are ranked by their mean main metric over "
    "seeds (rank 1 = best, direction from the task's higher-is-better flag); tied means get the average of "
    "the tied ranks; a column with a single complete method counts for no one (it would be a free rank 1). "
    "A method's score is the mean of its ranks over those columns (the Columns count says how many; n/a "
    "says how many columns it cannot run). Methods with a not-run (`—`) column are not ranked and are "
    "listed with the columns they miss."
)

LEGEND = (
    "Cells: mean ± sample std (ddof=1) of the task's main metric over seeds, then the mean over seeds of "
    "each run's bootstrap 95% CI bounds in brackets, then the number of seeds n. Bold: best mean in the "
    "column (when two or more methods have a result). `n/a`: the method lacks a capability the task "
    "requires (it cannot run). `—`: not run yet (every registered method gets a row). Rows: a method plus "
    "its non-default protocol and a hash of its overrides, checkpoint path or split seed. Data roots: a "
    "section is one (data kind, preset); inside it every task gets one table per data root (`synth`, or "
    "the resolved `--data` path, named in the caption), so runs on two roots (two copies of a dataset, or "
    "a synthetic corpus given by path beside the default one) are never pooled into one cell. Only a task "
    "run on more than one root has its root's short hash in the heading, and each such table's columns "
    "count separately in the average rank. Each seed in a cell is one result file; two files for the same "
    "run identity stop the build. Sizes under a table: images / patients of each column's training subset "
    "and of the test split, as the results recorded them."
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


def variant_settings(r: Result) -> str:
    """What a row label's ``#hash`` stands for, in the words a user types (``--set`` overrides, the
    checkpoint, the split seed); empty for a default run."""
    v = variant_parts(r.spec)
    parts = [f"{k}={val}" for k, val in v.get("overrides", [])]
    if "checkpoint" in v:
        parts.append(f"checkpoint {v['checkpoint']}")
    if "split_seed" in v:
        parts.append(f"split seed {v['split_seed']}")
    return ", ".join(f"`{p}`" for p in parts)


def _preset_key(p: str) -> tuple[int, str]:
    return (PRESETS.index(p) if p in PRESETS else len(PRESETS), p)


def _kind_key(k: str) -> tuple[int, str]:
    return (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k)


def _value(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _sizes(details: Any) -> dict[str, tuple[int, int]]:
    """{"train"|"test": (images, patients)} from a result's ``details["sizes"]`` (absent parts left out)."""
    sizes = details.get("sizes") if isinstance(details, dict) else None
    out: dict[str, tuple[int, int]] = {}
    if isinstance(sizes, dict):
        for split in ("train", "test"):
            part = sizes.get(split)
            if isinstance(part, dict) and part.get("images") is not None and part.get("patients") is not None:
                out[split] = (int(part["images"]), int(part["patients"]))
    return out


def frame(results: dict[Path, Result]) -> pd.DataFrame:
    """One row per result with the fields the leaderboard uses."""
    rows = []
    for path, r in sorted(results.items()):
        ci = r.main_ci or [None, None]
        rows.append({
            "kind": r.data_kind, "preset": r.spec.get("preset", "?"), "task": r.task_name,
            "root": str(r.spec.get("data", "synth")), "root_tag": data_tag(r.spec) or "",
            "variant": variant_label(r), "method": r.method, "fraction": r.fraction, "seed": r.seed,
            "value": _value(r.main_value), "ci_lo": _value(ci[0]), "ci_hi": _value(ci[1]),
            "metric": r.main_metric, "hib": bool(r.higher_is_better), "version": r.task_version,
            "family": r.task.get("family", "?"), "dataset": r.dataset,
            "requires": tuple(r.task.get("requires", ())),
            "caps": tuple(r.method_card.get("capabilities", ())),
            "sizes": _sizes(r.details), "anchor": tuple(str(x) for x in r.task.get("anchor_differences", ())),
            "device": r.device.split(":")[0], "torch": r.packages.get("torch", "?"),
            "commit": str(r.git.get("commit", "unknown"))[:10], "dirty": bool(r.git.get("dirty")),
            "path": str(path), "settings": variant_settings(r),
            "split_seed": r.data_source.get("split_seed"), "data_version": data_version(r),
        })
    cols = ["kind", "preset", "task", "root", "root_tag", "variant", "method", "fraction", "seed", "value", "ci_lo",
            "ci_hi", "metric", "hib", "version", "family", "dataset", "requires", "caps", "sizes", "anchor",
            "device", "torch", "commit", "dirty", "path", "settings", "split_seed", "data_version"]
    return pd.DataFrame(rows, columns=cols)


def data_version(r: Result) -> str:
    """What a result says of the data it was scored on, beyond its root: the split manifest's hash
    (which rows, in which split) and, for synthetic data, the generator and dataset versions
    (which pixels). Empty when the result records none of them."""
    src = dict(r.data_source)
    if src.get("kind") == "synthetic" and src.get("generator_version"):
        src.setdefault("dataset_version", 1)     # recorded since per-dataset versions; 1 before them
    parts = [str(src.get(k)) for k in ("manifest_sha256", "generator_version", "dataset_version") if src.get(k)]
    return "/".join(parts)


#: Results of one table (and split seed) must come from the same data.
SAME_DATA = ["kind", "preset", "task", "root", "split_seed"]


def check_same_data(df: pd.DataFrame) -> None:
    """Refuse a table whose results were scored on different versions of its data (a synthetic
    dataset regenerated larger, or a real copy re-split after a file changed, with some results left
    from before): pooled into one table they would compare methods across test sets."""
    lines = []
    for key, g in df[df["data_version"] != ""].groupby(SAME_DATA, sort=True, dropna=False):
        versions = g.groupby("data_version")["path"].agg(sorted)
        if len(versions) < 2:
            continue
        where = "; ".join(f"{v[:24]}...: {len(paths)} file(s) ({', '.join(paths[:5])}{', ...' if len(paths) > 5 else ''})"
                          for v, paths in versions.items())
        lines.append(f"{dict(zip(SAME_DATA, key))}: {where}")
    if lines:
        raise ResultError(f"{len(lines)} table(s) hold results scored on different versions of their data "
                          "(split manifest, generator or dataset version); re-run the stale results (or move them "
                          "away) so each table compares methods on one test set:\n  " + "\n  ".join(lines))


#: What makes two result files the same run in a table cell; a second file for one identity would
#: be counted as a second seed, so it is an error.
IDENTITY = ["kind", "preset", "task", "root", "variant", "fraction", "seed"]


def check_unique(df: pd.DataFrame) -> None:
    dup = df[df.duplicated(IDENTITY, keep=False)]
    if dup.empty:
        return
    lines = []
    for key, g in dup.groupby(IDENTITY, sort=True):
        lines.append(f"{dict(zip(IDENTITY, key))}: " + ", ".join(sorted(g["path"])))
    raise ResultError(f"{len(lines)} run identit{'y has' if len(lines) == 1 else 'ies have'} more than one result "
                      "file (each would count as another seed); remove the copies:\n  " + "\n  ".join(lines))


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
    root: str = "synth"                      # spec.data of every result in the table
    root_tag: str = ""                       # data_tag of the root ("" for synth)
    several_roots: bool = False              # the task has tables on other roots in this section
    # fraction -> split ("train" | "test") -> distinct (images, patients) recorded by its results
    sizes: dict[float, dict[str, tuple[tuple[int, int], ...]]] = field(default_factory=dict)
    anchor: tuple[str, ...] = ()             # anchor_differences recorded by its results

    @property
    def title(self) -> str:
        """The task, plus the root's short hash when the task has tables on several roots."""
        return f"{self.task} @ root #{self.root_tag}" if self.several_roots and self.root_tag else self.task

    @property
    def slug(self) -> str:
        return f"{self.task}-root{self.root_tag}" if self.several_roots and self.root_tag else self.task


@dataclass
class Section:
    kind: str
    preset: str
    variants: tuple[str, ...]
    caps: dict[str, frozenset[str]]
    tasks: list[TaskTable]
    commits: dict[str, int]
    dirty_runs: int
    #: row label with an identity hash -> the settings it stands for, per task where they differ
    settings: dict[str, list[str]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return KIND_LABEL.get(self.kind, self.kind.upper())

    @property
    def slug(self) -> str:
        return f"{self.kind}-{self.preset}"

    def missing_caps(self, variant: str, t: TaskTable) -> list[str]:
        return sorted(set(t.requires) - self.caps.get(variant, frozenset()))

    def can_run(self, variant: str, t: TaskTable, frac: float) -> bool:
        # a result proves it can, whatever the capabilities say now
        return (variant, frac) in t.cells or not self.missing_caps(variant, t)


def _task_table(tdf: pd.DataFrame, task: str, root: str, several_roots: bool) -> TaskTable:
    last = tdf.iloc[-1]
    t = TaskTable(
        task=task, metric=str(last["metric"]), hib=bool(last["hib"]), family=str(last["family"]),
        dataset=str(last["dataset"]), requires=tuple(sorted(set().union(*tdf["requires"]))),
        versions=tuple(sorted(set(int(v) for v in tdf["version"]))),
        fractions=tuple(sorted(set(float(f) for f in tdf["fraction"]))),
        runs=len(tdf), devices=tuple(sorted(set(tdf["device"]))), torch=tuple(sorted(set(tdf["torch"]))),
        root=root, root_tag=str(last["root_tag"]), several_roots=several_roots,
        anchor=tuple(dict.fromkeys(a for anchors in tdf["anchor"] for a in anchors)),
    )
    for (variant, frac), g in tdf.groupby(["variant", "fraction"], sort=True):
        g = g.sort_values("seed")
        t.cells[(variant, float(frac))] = Cell(list(g["value"]), list(g["ci_lo"]), list(g["ci_hi"]))
    for frac in t.fractions:
        recorded = list(tdf[tdf["fraction"] == frac]["sizes"])
        t.sizes[frac] = {split: tuple(sorted({s[split] for s in recorded if split in s}))
                         for split in ("train", "test")}
    return t


def sections(df: pd.DataFrame, registered: dict[str, frozenset[str]] | None = None) -> list[Section]:
    """Sections of ``df``; ``registered`` (method -> capabilities) adds a row for each registered
    method without any result in a section, so it shows `—` (or `n/a`) instead of being absent."""
    out = []
    if df.empty:
        return out
    check_unique(df)
    check_same_data(df)
    keys = sorted({(k, p) for k, p in zip(df["kind"], df["preset"])},
                  key=lambda kp: (_kind_key(kp[0]), _preset_key(kp[1])))
    for kind, preset in keys:
        sdf = df[(df["kind"] == kind) & (df["preset"] == preset)]
        caps: dict[str, frozenset[str]] = {}
        for v in sorted(set(sdf["variant"])):
            first = sdf[sdf["variant"] == v].iloc[0]          # rows are sorted by path
            caps[v] = frozenset(first["caps"])
        ran = set(sdf["method"])
        for name, method_caps in sorted((registered or {}).items()):
            if name not in ran:
                caps[name] = frozenset(method_caps)
        variants = tuple(sorted(caps))
        tasks = []
        for task in sorted(set(sdf["task"])):
            tdf = sdf[sdf["task"] == task]
            roots = sorted(set(tdf["root"]))
            for root in roots:
                tasks.append(_task_table(tdf[tdf["root"] == root], task, root, len(roots) > 1))
        commits = {str(c): int(n) for c, n in sorted(sdf["commit"].value_counts().items())}
        hashed = sdf[sdf["variant"].str.contains("#", regex=False)]
        settings = {v: [f"{st} ({', '.join(sorted(set(tasks_of)))})" for st, tasks_of in vdf.groupby("settings")["task"]]
                    for v, vdf in hashed.groupby("variant")}
        out.append(Section(kind, preset, variants, caps, tasks, commits, int(sdf["dirty"].sum()), settings))
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
        row = [f"`{v}`"]
        for f in t.fractions:
            c = t.cells.get((v, f))
            if c is not None:
                row.append(format_cell(c, best=(best[f] is not None and c.mean == best[f])))
            else:
                row.append(MISSING if sec.can_run(v, t, f) else NA)
        rows.append(row)
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _size_text(pairs: tuple[tuple[int, int], ...]) -> str:
    if not pairs:
        return "not recorded"
    text = " or ".join(f"{i} / {p}" for i, p in pairs)
    return text + " (results differ: mixed splits, re-run the stale cells)" if len(pairs) > 1 else text


def sizes_line(t: TaskTable) -> str:
    """Each column's training subset and test split, images / patients."""
    parts = [f"{_frac(f)}: train {_size_text(t.sizes.get(f, {}).get('train', ()))}, "
             f"test {_size_text(t.sizes.get(f, {}).get('test', ()))}" for f in t.fractions]
    return "Sizes (images / patients) · " + " · ".join(parts)


def _column_name(t: TaskTable, f: float) -> str:
    return f"{t.title} @ {_frac(f)}"


def rank_section(sec: Section) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """(ranked table, {unranked variant: reasons}) following :data:`RANK_RULE`."""
    columns = [(t, f) for t in sec.tasks for f in t.fractions]
    unranked: dict[str, list[str]] = {}
    runnable: dict[str, list[tuple[TaskTable, float]]] = {}
    for v in sec.variants:
        can = [(t, f) for t, f in columns if sec.can_run(v, t, f)]
        if not can:
            lacks = sorted({c for t, _ in columns for c in sec.missing_caps(v, t)})
            unranked[v] = [f"n/a in every column (lacks {', '.join(lacks)})"] if columns else ["no columns"]
            continue
        if not any((v, f) in t.cells for t, f in can):
            unranked[v] = ["not run (no result in this section)"]
            continue
        reasons = []
        for t in sec.tasks:
            absent = [f for f in t.fractions if (t, f) in can and (v, f) not in t.cells]
            if absent:
                reasons.append(f"not run: {t.title} @ {', '.join(_frac(f) for f in absent)}")
        if reasons:
            unranked[v] = reasons
        else:
            runnable[v] = can
    empty = pd.DataFrame(columns=["variant", "avg_rank", "columns", "na"])
    if not runnable:
        return empty, unranked
    ranks: dict[str, list[float]] = {v: [] for v in runnable}
    for t, f in columns:
        here = [v for v in runnable if (v, f) in t.cells]
        if len(here) < 2:   # a method alone in a column would collect a free rank 1
            continue
        means = pd.Series({v: t.cells[(v, f)].mean for v in here}, dtype=float)
        for v, rank in means.rank(method="average", ascending=not t.hib, na_option="bottom").items():
            ranks[v].append(float(rank))
    for v in [v for v in runnable if not ranks[v]]:
        unranked[v] = ["no column shared with another ranked method"]
        del runnable[v]
    if not runnable:
        return empty, unranked
    table = pd.DataFrame({
        "variant": list(runnable),
        "avg_rank": [float(np.mean(ranks[v])) for v in runnable],
        "columns": [len(ranks[v]) for v in runnable],
        "na": [len(columns) - len(runnable[v]) for v in runnable],
    }).sort_values(["avg_rank", "variant"], kind="stable").reset_index(drop=True)
    return table, unranked


def rank_markdown(sec: Section) -> str:
    table, unranked = rank_section(sec)
    lines = [f"### Average rank ({sec.label}, preset `{sec.preset}`)", "",
             f"*{sec.label} data, preset {sec.preset}: average rank across tasks and label fractions "
             f"(rule at the top of this file).*", ""]
    if table.empty:
        lines.append("No method has a result in every column it can run yet, so none is ranked.")
    else:
        place = table["avg_rank"].round(6).rank(method="min").astype(int)
        rows = [[int(p), f"`{v}`", f"{a:.2f}", int(c), int(n)]
                for p, v, a, c, n in zip(place, table["variant"], table["avg_rank"], table["columns"], table["na"])]
        lines.append(tabulate(rows, headers=["Rank", "Method", "Avg. rank", "Columns", "n/a"], tablefmt="github",
                              disable_numparse=True))
    if unranked:
        lines += ["", "Not ranked:", ""]
        for v in sorted(unranked):
            lines.append(f"- `{v}`: {'; '.join(unranked[v])}")
    return "\n".join(lines)


def plot_name(sec: Section, t: TaskTable) -> str:
    return f"{sec.slug}-{re.sub(r'[^A-Za-z0-9._-]', '_', t.slug)}.png"


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
        # colours follow the methods drawn, so rows without results (not run, n/a) take none
        shown = [v for v in sec.variants if any((v, f) in t.cells for f in t.fractions)]
        for i, v in enumerate(shown):
            pts = [(f, t.cells[(v, f)]) for f in t.fractions if (v, f) in t.cells]
            # small horizontal dodge (in log space) so error bars of different methods do not overlap
            dodge = 10 ** (0.012 * (i - (len(shown) - 1) / 2))
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
        ax.set_title(f"{t.title} ({sec.label} data, preset {sec.preset}): mean ± std over seeds")
        ax.grid(True, linewidth=0.4, alpha=0.5)
        ax.legend(loc="best", fontsize=8, frameon=False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _anchor_differences(secs: list[Section], task: str,
                        registry: dict[str, tuple[str, ...]]) -> tuple[tuple[str, ...], str]:
    """(the anchor's differences for ``task``, where they come from): as recorded in its results,
    else (no result records any) from the task registry; only sentences naming the anchor."""
    recorded = tuple(dict.fromkeys(a for s in secs for t in s.tasks if t.task == task for a in t.anchor))
    if recorded:
        diffs, where = recorded, "as recorded in the results"
    else:
        diffs, where = registry.get(task, ()), "from the task registry"
    return tuple(d for d in diffs if d.startswith(ref.ANCHOR)), where


def comparable_markdown(secs: list[Section], anchor_differences: dict[str, tuple[str, ...]] | None = None) -> str:
    """Which of our columns compare with the quoted table, and how each task's protocol differs.

    Differences shared by every quoted task are listed once, then each task's own.
    """
    lines = ["### Which of our columns compare with this table", "", ref.COMPARABLE_RULE, ""]
    per_task = {d: _anchor_differences(secs, ref.MGCA_TASKS[d][0], anchor_differences or {})
                for d in ref.MGCA_DATASETS}
    first = per_task[ref.MGCA_DATASETS[0]][0]
    shared = tuple(x for x in first if all(x in diffs for diffs, _ in per_task.values()))
    if shared:
        wheres = sorted({w for _, w in per_task.values()})
        lines += [f"Differences from {ref.ANCHOR}'s protocol shared by all {len(per_task)} tasks "
                  f"({', '.join(wheres)}):", ""]
        lines += [f"- {x}" for x in shared] + [""]
    for dataset in ref.MGCA_DATASETS:
        task, metric = ref.MGCA_TASKS[dataset]
        comparable = [(s, t) for s in secs for t in s.tasks
                      if t.task == task and s.kind == ref.COMPARABLE_KIND and s.preset == ref.COMPARABLE_PRESET
                      and t.metric == metric]
        if comparable:
            where = "; ".join(f"{s.label} preset `{s.preset}`, {t.title} (data `{t.root}`): "
                              f"{', '.join(_frac(f) for f in t.fractions)}" for s, t in comparable)
        else:
            where = f"none yet (no REAL-data results with preset `{ref.COMPARABLE_PRESET}`)"
        lines.append(f"- **{dataset}** ({ref.MGCA_METRICS[dataset]}) ↔ `{task}` (`{metric}`): comparable columns: "
                     f"{where}.")
        diffs, src = per_task[dataset]
        own = [x for x in diffs if x not in shared]
        if own:
            lines.append(f"  {'Further differences' if shared else 'Differences'} ({src}):")
            lines += [f"  - {x}" for x in own]
        elif not shared:
            lines.append(f"  Differences from {ref.ANCHOR}'s protocol: none recorded.")
    return "\n".join(lines)


def reference_markdown(secs: list[Section] | None = None,
                       anchor_differences: dict[str, tuple[str, ...]] | None = None) -> str:
    headers = ["Method"] + [f"{d} {ref.MGCA_METRICS[d]} 1 / 10 / 100%" for d in ref.MGCA_DATASETS]
    rows = []
    for m in ref.MGCA_ROWS:
        rows.append([m] + [" / ".join(f"{x:.1f}" for x in ref.MGCA_LINEAR_CLS[m][d]) for d in ref.MGCA_DATASETS])
    return "\n".join([
        "## Reference: published numbers (REAL data, not produced by this harness)", "",
        "*MGCA paper, linear classification (ResNet-50 unless noted), 1% / 10% / 100% of training labels.*", "",
        tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), "",
        f"Source: {ref.MGCA_CITATION}", "",
        f"Note: {ref.MGCA_NOTE} † {ref.MGCA_VIT_NOTE}", "",
        comparable_markdown(secs or [], anchor_differences),
    ])


def _caption(sec: Section, t: TaskTable) -> str:
    versions = ", ".join(f"v{v}" for v in t.versions)
    mixed = " (mixed versions: re-run the stale cells)" if len(t.versions) > 1 else ""
    data = "data `synth`" if t.root == "synth" else f"data root `{t.root}` (#{t.root_tag})"
    return (f"*{sec.label} data, preset {sec.preset} · task `{t.task}` {versions}{mixed} · {t.family} on "
            f"`{t.dataset}` · {data} · main metric `{t.metric}` ({_arrow(t.hib)} "
            f"{'higher' if t.hib else 'lower'} is better) · {_plural(t.runs, 'run')} · device "
            f"{', '.join(t.devices)} · torch {', '.join(t.torch)}*")


@dataclass(frozen=True)
class Registered:
    """What the leaderboard reads from the registries besides results/."""

    methods: dict[str, frozenset[str]] = field(default_factory=dict)           # name -> capabilities
    anchor_differences: dict[str, tuple[str, ...]] = field(default_factory=dict)  # task -> sentences


def registered() -> Registered:
    """The registered methods (with capabilities) and tasks' anchor differences."""
    from bench.api import METHODS, TASKS
    from bench.runner import load_registries

    load_registries()
    return Registered(
        methods={name: frozenset(str(c) for c in m.capabilities) for name, m in sorted(METHODS.items())},
        anchor_differences={name: tuple(str(a) for a in getattr(t, "anchor_differences", ()))
                            for name, t in sorted(TASKS.items())})


def render(results: dict[Path, Result],
           registry: Registered | None = None) -> tuple[str, dict[str, bytes]]:
    """(markdown text, {plot file name: PNG bytes}) for a set of results (and the registries)."""
    registry = registry or Registered()
    df = frame(results)
    secs = sections(df, registry.methods)
    plots: dict[str, bytes] = {}
    out = [
        "# medvlp-bench leaderboard", "",
        f"<!-- GENERATED by `{COMMAND}` from results/ alone. Do not edit by hand: edits are overwritten. -->", "",
        f"Generated by `{COMMAND}` from the result files under `results/` (drift-check files in "
        f"`results/golden/` excluded) and the method and task registries. Never edit this file by hand; "
        f"re-run the command.", "",
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
                       f"{', '.join(f'`{t.title}`' for t in sec.tasks)}")
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
        if sec.settings:
            out += ["Rows with a `#` hash (a variant of the method):", ""]
            out += [f"- `{v}`: {'; '.join(items)}" for v, items in sec.settings.items()] + [""]
        for t in sec.tasks:
            name = plot_name(sec, t)
            plots[name] = render_plot(sec, t)
            out += [f"### {t.title}: {t.metric} {_arrow(t.hib)} ({sec.label}, preset `{sec.preset}`)", "",
                    _caption(sec, t), "", task_table(sec, t), "", sizes_line(t), "",
                    f"![{t.title} label efficiency ({sec.label} data, preset {sec.preset})]"
                    f"({PLOTS_DIRNAME}/{name})", ""]
        out += [rank_markdown(sec), ""]
    out += [reference_markdown(secs, registry.anchor_differences), ""]
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


def build(results_root: Path | None = None, out: Path | None = None,
          registry: Registered | None = None) -> list[Path]:
    """Regenerate ``out`` (default ``<repo>/leaderboard.md``) and ``<out dir>/leaderboard/*.png``
    from the results and the registries (``registry``, default: what is registered now).

    Plots of earlier runs that no longer correspond to results are removed. Returns written paths.
    """
    results_root = results_dir() if results_root is None else Path(results_root)
    out = leaderboard_dir() / "leaderboard.md" if out is None else Path(out)
    results = load_results(results_root)
    text, plots = render(results, registered() if registry is None else registry)
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
