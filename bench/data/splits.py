"""Patient-level, seeded train/val/test splits with nested label fractions.

How a manifest is built (:func:`build_splits`)
----------------------------------------------
1. **Official splits.** Rows whose ``split`` is named in ``protocol.official`` keep it (after
   ``protocol.merge_official_val_into`` relabels official ``val`` rows). Every other row belongs to
   the *training pool*. A patient with rows in two official splits, or in an official val/test
   split and in the training pool, is a leak in the publisher's files: :class:`DataError` names the
   patient, or with ``skip_bad=True`` the patient's rows outside their most held-out split
   (test > val > train) are marked ``excluded`` (in no split, logged).
2. **Carving.** Missing test / val splits are cut out of the training pool *by patient*:
   ``round(test_fraction * P)`` and ``round(val_fraction * P)`` patients of the pool's ``P`` (at
   least one each when the pool allows and one patient is always left for training), or for
   ``val_size`` the first patients whose image count reaches ``min(val_size, 10% of the pool's
   images)``. Patients are taken in a *stratified random order* (below), so each carved split is
   approximately stratified.
3. **Nested fractions.** Training patients are put once in a fresh stratified random order; the
   subset for fraction ``f`` in :data:`FRACTIONS` is the shortest prefix whose image count reaches
   ``max(1, ceil(f * N_train_images))``. Prefixes of one order are nested, so 1% ⊂ 10% ⊂ 100% by
   construction; the manifest stores per row the smallest fraction whose subset contains it.

Stratified random order: patients are grouped into strata by their *rarest positive class* (the
positive class with the fewest positive patients in the group being ordered; patients without
positives form one stratum). The classes are the table's labels (raw code 1 = positive) plus
"has a box" / "has a mask" where the table has them, or ``stratify_labels``. Within a stratum of
``n`` patients, the patient of random rank ``i`` gets position ``(i + u) / n`` with
``u ~ U(0, 1)``; sorting all patients by position interleaves the strata evenly, so any prefix holds
about the same share of every stratum, and a stratum of ``n >= 1/f`` patients always has at least
one patient in the ``f`` prefix. Patients are sorted by id before drawing, so the manifest depends
on the table's content and the seed, not on its row order. Randomness comes from
``np.random.default_rng([seed, stream])`` with one stream for carving and one for fractions.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from bench.data.spec import SplitProtocol
from bench.data.table import CanonicalTable
from bench.errors import DataError

log = logging.getLogger(__name__)

#: Label fractions of the training split (the one definition; ``bench.api`` imports it).
FRACTIONS: tuple[float, ...] = (0.01, 0.1, 1.0)
SPLITS: tuple[str, ...] = ("train", "val", "test")
EXCLUDED = "excluded"
MANIFEST_COLUMNS: tuple[str, ...] = ("image_id", "patient_id", "split", "min_fraction")
MANIFEST_FORMAT = "medvlp-split-manifest"
MANIFEST_VERSION = 1
#: Held-out priority used when resolving a patient found in several official splits.
_PRIORITY = {"test": 2, "val": 1, "train": 0}
_STREAM_CARVE, _STREAM_FRACTIONS = 1, 2


def _fraction_str(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(float(value))


def _canonical_protocol(protocol: SplitProtocol | dict) -> dict:
    d = asdict(protocol) if isinstance(protocol, SplitProtocol) else dict(protocol)
    return json.loads(json.dumps(d, sort_keys=True, default=list))


# -- manifest --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SplitManifest:
    """Which split (and smallest label fraction) each row of a canonical table belongs to.

    Row ``i`` of the manifest is row ``i`` of the table it was built from. ``min_fraction`` is the
    smallest fraction in :data:`FRACTIONS` whose training subset contains the row (NaN outside
    train). ``frame`` returns a copy; the manifest itself never changes.
    """

    dataset: str
    seed: int
    protocol: dict
    _frame: pd.DataFrame = field(repr=False)
    #: Malformed source rows left out under ``skip_bad`` (recorded so a result built on a partial
    #: dataset says so). Part of the hash when non-zero.
    skipped_rows: int = 0
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        missing = [c for c in MANIFEST_COLUMNS if c not in self._frame.columns]
        if missing:
            raise ValueError(f"split manifest lacks columns {missing}")
        frame = self._frame.loc[:, list(MANIFEST_COLUMNS)].reset_index(drop=True).copy()
        for col in ("image_id", "patient_id", "split"):
            frame[col] = frame[col].astype(object).map(str)
        frame["min_fraction"] = pd.to_numeric(frame["min_fraction"], errors="coerce").astype(np.float64)
        object.__setattr__(self, "_frame", frame)
        object.__setattr__(self, "protocol", _canonical_protocol(self.protocol))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "skipped_rows", int(self.skipped_rows))
        object.__setattr__(self, "_split", frame["split"].to_numpy(dtype=object))
        object.__setattr__(self, "_minf", frame["min_fraction"].to_numpy(dtype=np.float64))
        object.__setattr__(self, "sha256", hashlib.sha256(self._canonical_bytes()).hexdigest())

    # -- serialisation ---------------------------------------------------------------------------
    def csv_text(self) -> str:
        """Canonical CSV (``\\n`` line ends, minimal quoting, fractions as ``repr`` floats)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(MANIFEST_COLUMNS)
        f = self._frame
        known = {v: _fraction_str(v) for v in np.unique(self._minf[~np.isnan(self._minf)])}
        minf = [known[v] if v == v else "" for v in self._minf.tolist()]
        w.writerows(zip(*(f[c].to_numpy(dtype=object).tolist() for c in MANIFEST_COLUMNS[:3]), minf))
        return buf.getvalue()

    def _canonical_bytes(self) -> bytes:
        head = "\n".join((MANIFEST_FORMAT, str(MANIFEST_VERSION), self.dataset, str(self.seed),
                          json.dumps(self.protocol, sort_keys=True, separators=(",", ":"))))
        if self.skipped_rows:  # appended only when non-zero: manifests of clean data keep their hash
            head += f"\nskipped_rows={self.skipped_rows}"
        return (head + "\n" + self.csv_text()).encode("utf-8")

    def header(self) -> dict:
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "dataset": self.dataset,
                "seed": self.seed, "protocol": self.protocol, "sha256": self.sha256,
                "sizes": self.sizes(), "skipped_rows": self.skipped_rows}

    def write(self, path: str | Path) -> Path:
        """Write ``# <json header>`` then the canonical CSV, atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "# " + json.dumps(self.header(), sort_keys=True) + "\n" + self.csv_text()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def read(cls, path: str | Path) -> "SplitManifest":
        """Read a manifest written by :meth:`write`; its content must match the header's sha256."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError("split manifest not found", path=path) from None
        first, _, body = text.partition("\n")
        if not first.startswith("# "):
            raise DataError("not a split manifest: the first line must be '# {json header}'", path=path, line=1)
        try:
            head = json.loads(first[2:])
        except json.JSONDecodeError as exc:
            raise DataError(f"bad manifest header: {exc}", path=path, line=1) from exc
        if head.get("format") != MANIFEST_FORMAT:
            raise DataError(f"not a split manifest (format {head.get('format')!r})", path=path, line=1)
        frame = pd.read_csv(io.StringIO(body), dtype=str, keep_default_na=False)
        if list(frame.columns) != list(MANIFEST_COLUMNS):
            raise DataError(f"manifest columns {list(frame.columns)} != {list(MANIFEST_COLUMNS)}", path=path, line=2)
        frame["min_fraction"] = frame["min_fraction"].map(lambda v: float(v) if v != "" else np.nan)
        manifest = cls(str(head["dataset"]), int(head["seed"]), head["protocol"], frame,
                       skipped_rows=int(head.get("skipped_rows", 0)))
        if head.get("sha256") != manifest.sha256:
            raise DataError(f"split manifest content does not match its header sha256 "
                            f"({head.get('sha256')} != {manifest.sha256}); it was edited or truncated", path=path)
        return manifest

    # -- queries ---------------------------------------------------------------------------------
    @property
    def frame(self) -> pd.DataFrame:
        return self._frame.copy()

    def __len__(self) -> int:
        return len(self._frame)

    def rows(self, split: str, fraction: float = 1.0) -> np.ndarray:
        """Sorted row indices (into the table) of ``split``; ``fraction`` subsets ``train`` only."""
        if split not in SPLITS and split != EXCLUDED:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if not any(math.isclose(fraction, f) for f in FRACTIONS):
            raise ValueError(f"fraction must be one of {FRACTIONS}, got {fraction}")
        sel = self._split == split
        if split == "train":
            sel &= self._minf <= fraction + 1e-9
        return np.flatnonzero(sel).astype(np.int64)

    def sizes(self) -> dict[str, int]:
        """Images per split: ``train@0.01``, ``train@0.1``, ``train@1.0``, ``val``, ``test``
        (and ``excluded`` when any row is)."""
        out = {f"train@{f!r}": int(len(self.rows("train", f))) for f in FRACTIONS}
        out.update({s: int(np.sum(self._split == s)) for s in ("val", "test")})
        n_excl = int(np.sum(self._split == EXCLUDED))
        if n_excl:
            out[EXCLUDED] = n_excl
        return out

    def patients(self, split: str, fraction: float = 1.0) -> set[str]:
        return set(self._frame["patient_id"].to_numpy()[self.rows(split, fraction)])


# -- building --------------------------------------------------------------------------------------
def _positive_matrix(table: CanonicalTable, stratify_labels) -> np.ndarray:
    """bool [N, K] of the classes used for stratification."""
    n = len(table)
    if stratify_labels is not None:
        lab = np.asarray(stratify_labels)
        if lab.shape[0] != n:
            raise ValueError(f"stratify_labels has {lab.shape[0]} rows for a table of {n}")
        if lab.ndim == 1:  # categorical: one column per value
            keys = pd.Series(lab).astype(str).to_numpy()
            values = np.unique(keys)
            return keys[:, None] == values[None, :]
        return np.nan_to_num(lab.astype(np.float64), nan=0.0).reshape(n, -1) == 1
    cols = [np.asarray(table.labels, dtype=np.float64) == 1] if table.labels.size else []
    if table.has_boxes:
        cols.append(np.array([len(b) > 0 for b in table.boxes])[:, None])
    if table.has_masks:
        cols.append(np.array([m is not None for m in table.masks])[:, None])
    return np.concatenate(cols, axis=1) if cols else np.zeros((n, 0), dtype=bool)


def _patient_strata(pos: np.ndarray, enabled: bool) -> np.ndarray:
    """Stratum id per patient: its rarest positive class (counted over these patients), or -1."""
    n, k = pos.shape
    if not enabled or k == 0 or n == 0:
        return np.full(n, -1, dtype=np.int64)
    counts = pos.sum(axis=0)
    order = np.argsort(counts, kind="stable")  # rarest class first (ties: column order)
    strata = np.full(n, -1, dtype=np.int64)
    for c in order[::-1]:  # assign commonest first, rarer classes overwrite
        if counts[c]:
            strata[pos[:, c]] = c
    return strata


def _stratified_order(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Permutation of patients (indices) interleaving strata evenly (see module notes)."""
    n = len(strata)
    position = np.empty(n, dtype=np.float64)
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        m = len(idx)
        position[idx] = (rng.permutation(m) + rng.random(m)) / m
    return np.lexsort((np.arange(n), position))


def _take_images(order: np.ndarray, images: np.ndarray, target: int) -> int:
    """Number of patients (from the front of ``order``) whose image count first reaches target."""
    if target <= 0 or len(order) == 0:
        return 0
    cum = np.cumsum(images[order])
    return int(min(np.searchsorted(cum, target, side="left") + 1, len(order)))


def build_splits(table: CanonicalTable, protocol: SplitProtocol, seed: int = 0,
                 stratify_labels: np.ndarray | None = None, *, skip_bad: bool = False) -> SplitManifest:
    """Patient-level, seeded split of ``table`` following ``protocol`` (see module notes)."""
    frame = table.frame
    n = len(frame)
    image_ids = frame["image_id"].to_numpy(dtype=object)
    patients = frame["patient_id"].to_numpy(dtype=object).copy()
    blank = patients == ""
    if blank.any():
        log.warning("%s: %d rows have no patient id; each is treated as its own patient",
                    table.dataset, int(blank.sum()))
        patients[blank] = np.array(["image:" + str(i) for i in image_ids[blank]], dtype=object)

    official = frame["split"].to_numpy(dtype=object).copy()
    bad = ~np.isin(official, ["train", "val", "test", ""])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"row {i} (image_id {image_ids[i]!r}) has split {official[i]!r}; the canonical table "
                        "allows 'train', 'val', 'test' or ''", path=table.root)
    if protocol.merge_official_val_into:
        target = protocol.merge_official_val_into
        if target not in SPLITS:
            raise ValueError(f"merge_official_val_into must be one of {SPLITS}, got {target!r}")
        official[official == "val"] = target
    fixed = np.isin(official, list(protocol.official))
    # Effective side of each row: its official split when fixed, else the training pool.
    side = np.where(fixed, official, "train").astype(object)

    # -- leaks in the official splits ----------------------------------------------------------
    pat_codes, pat_index = np.unique(patients.astype(str), return_inverse=True)
    pat_codes = pat_codes.astype(object)
    n_pat = len(pat_codes)
    prio = np.vectorize(_PRIORITY.__getitem__, otypes=[np.int64])(side) if n else np.zeros(0, np.int64)
    pmax = np.full(n_pat, -1, dtype=np.int64)
    np.maximum.at(pmax, pat_index, prio)
    pmin = np.full(n_pat, 99, dtype=np.int64)
    np.minimum.at(pmin, pat_index, prio)
    conflict = pmax != pmin
    split = side.copy()
    if conflict.any():
        bad_p = np.flatnonzero(conflict)
        first = bad_p[0]
        rows_p = np.flatnonzero(pat_index == first)
        where = sorted(set(side[rows_p]), key=_PRIORITY.get)
        if not skip_bad:
            raise DataError(f"patient {str(pat_codes[first])!r} is in several official splits ({', '.join(where)}; "
                            f"rows {', '.join(map(str, rows_p[:6]))}); {len(bad_p)} patient(s) in all. "
                            "Splits must be patient-level", path=table.root,
                            hint="pass skip_bad to drop such patients' rows outside their most held-out split")
        drop = conflict[pat_index] & (prio < pmax[pat_index])
        split[drop] = EXCLUDED
        log.warning("%s: %d patient(s) in several official splits; %d rows outside their most held-out split "
                    "excluded (first: patient %r)", table.dataset, len(bad_p), int(drop.sum()), str(pat_codes[first]))

    pos = _positive_matrix(table, stratify_labels)
    # patient-level positives: any row of the patient positive (only rows still in play)
    pat_pos = np.zeros((n_pat, pos.shape[1]), dtype=bool)
    if pos.shape[1]:
        live = split != EXCLUDED
        np.logical_or.at(pat_pos, pat_index[live], pos[live])
    pat_images = np.bincount(pat_index[split == "train"], minlength=n_pat)

    # -- carve missing val / test out of the training pool ------------------------------------
    pool = np.flatnonzero((pmax == 0) & (pat_images > 0))  # patients entirely in the pool
    need_test = "test" not in protocol.official and protocol.test_fraction > 0
    need_val = "val" not in protocol.official and (protocol.val_fraction > 0 or (protocol.val_size or 0) > 0)
    pat_split = np.full(n_pat, "", dtype=object)
    if len(pool) and (need_test or need_val):
        rng = np.random.default_rng([seed, _STREAM_CARVE])
        order = pool[_stratified_order(_patient_strata(pat_pos[pool], protocol.stratify), rng)]
        P = len(order)
        taken = 0

        def count_for(frac: float) -> int:
            c = int(round(frac * P))
            if frac > 0 and c == 0:
                c = 1
            return max(0, min(c, P - taken - 1))  # keep at least one training patient

        if need_test:
            k = count_for(protocol.test_fraction)
            pat_split[order[taken:taken + k]] = "test"
            taken += k
        if need_val:
            if protocol.val_size:
                target = min(int(protocol.val_size), int(math.floor(0.1 * pat_images[pool].sum())))
                k = _take_images(order[taken:], pat_images, max(target, 1))
                k = max(0, min(k, P - taken - 1))
            else:
                k = count_for(protocol.val_fraction)
            pat_split[order[taken:taken + k]] = "val"
            taken += k
        carved = pat_split[pat_index] != ""
        carved &= split == "train"
        split[carved] = pat_split[pat_index][carved]

    # -- nested fractions ----------------------------------------------------------------------
    min_fraction = np.full(n, np.nan, dtype=np.float64)
    train_rows = split == "train"
    train_pats = np.unique(pat_index[train_rows])
    if len(train_pats):
        rng = np.random.default_rng([seed, _STREAM_FRACTIONS])
        imgs = np.bincount(pat_index[train_rows], minlength=n_pat)
        order = train_pats[_stratified_order(_patient_strata(pat_pos[train_pats], protocol.stratify), rng)]
        n_train = int(imgs[train_pats].sum())
        pat_minf = np.full(n_pat, np.nan)
        for f in sorted(FRACTIONS, reverse=True):
            target = max(1, math.ceil(f * n_train - 1e-9))
            k = _take_images(order, imgs, target)
            pat_minf[order[:k]] = f
        min_fraction[train_rows] = pat_minf[pat_index[train_rows]]

    out = pd.DataFrame({"image_id": image_ids, "patient_id": frame["patient_id"].to_numpy(dtype=object),
                        "split": split, "min_fraction": min_fraction})
    manifest = SplitManifest(table.dataset, seed, protocol, out, skipped_rows=table.skipped_rows)
    log.debug("%s: splits %s (sha256 %s)", table.dataset, manifest.sizes(), manifest.sha256[:12])
    return manifest


# -- checks ----------------------------------------------------------------------------------------
def _listing(items: Sequence, limit: int = 5) -> str:
    items = list(items)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(repr(x) for x in items[:limit]) + more


def check_manifest(table: CanonicalTable, manifest: SplitManifest) -> list[str]:
    """Problems of ``manifest`` for ``table`` as ``"kind: detail"`` strings; empty when clean.

    Kinds: ``coverage`` (rows missing, extra or out of order), ``patient`` (patient id differs from
    the table), ``split`` (unknown split value), ``leak`` (a patient in two splits), ``fraction``
    (bad ``min_fraction``, a patient cut between fraction subsets, a subset that is empty, below
    its target size or not the shortest prefix reaching it).
    """
    problems: list[str] = []
    mf = manifest.frame
    t_ids = table.frame["image_id"].to_numpy(dtype=object).astype(str)
    m_ids = mf["image_id"].to_numpy(dtype=object).astype(str)
    if manifest.dataset != table.dataset:
        problems.append(f"coverage: manifest is for dataset {manifest.dataset!r}, table is {table.dataset!r}")
    t_set, m_set = set(t_ids), set(m_ids)
    missing, extra = sorted(t_set - m_set), sorted(m_set - t_set)
    if missing:
        problems.append(f"coverage: {len(missing)} table rows not in the manifest: {_listing(missing)}")
    if extra:
        problems.append(f"coverage: {len(extra)} manifest rows not in the table: {_listing(extra)}")
    if len(t_ids) == len(m_ids) and not missing and not extra and not np.array_equal(t_ids, m_ids):
        i = int(np.flatnonzero(t_ids != m_ids)[0])
        problems.append(f"coverage: manifest row order differs from the table from row {i} "
                        f"({m_ids[i]!r} vs {t_ids[i]!r})")

    # Align manifest rows to table rows by image id for the remaining checks.
    m_index = pd.Index(m_ids)
    dup = int(m_index.duplicated().sum())
    if dup:
        problems.append(f"coverage: {dup} duplicated image ids in the manifest")
        m_index = m_index[~m_index.duplicated()]
        m_pos = np.flatnonzero(~pd.Index(m_ids).duplicated())
    else:
        m_pos = np.arange(len(m_ids))
    found = m_index.get_indexer(t_ids)
    t_rows = np.flatnonzero(found >= 0)
    m_rows = m_pos[found[t_rows]]
    common = t_ids[t_rows]
    split = mf["split"].to_numpy(dtype=object)[m_rows]
    minf = mf["min_fraction"].to_numpy(dtype=np.float64)[m_rows]
    t_pat = table.frame["patient_id"].to_numpy(dtype=object)[t_rows].astype(str)
    m_pat = mf["patient_id"].to_numpy(dtype=object)[m_rows].astype(str)
    diff = np.flatnonzero(t_pat != m_pat)
    if len(diff):
        problems.append(f"patient: {len(diff)} rows have a different patient id than the table: "
                        f"{_listing([common[i] for i in diff])}")
    unknown = sorted(set(split) - set(SPLITS) - {EXCLUDED})
    if unknown:
        problems.append(f"split: unknown split values {_listing(unknown)}")

    # Leaks: judged on the table's patient ids (the manifest's could be wrong too).
    df = pd.DataFrame({"patient": t_pat, "split": split})
    df = df[df["split"].isin(SPLITS)].drop_duplicates()
    n_splits = df.groupby("patient")["split"].size()
    leaks = n_splits[n_splits > 1]
    if len(leaks):
        where = df[df["patient"].isin(leaks.index[:20])].groupby("patient")["split"].agg(
            lambda s: tuple(sorted(s, key=_PRIORITY.get)))
        for patient in leaks.index[:20]:
            problems.append(f"leak: patient {patient!r} is in {' and '.join(where[patient])}")
    if len(leaks) > 20:
        problems.append(f"leak: {len(leaks) - 20} more patients in several splits")

    # Fractions.
    is_train = split == "train"
    valid = np.zeros(len(minf), dtype=bool)
    for f in FRACTIONS:
        valid |= np.isclose(minf, f)
    bad_train = is_train & ~valid
    if bad_train.any():
        problems.append(f"fraction: {int(bad_train.sum())} train rows have min_fraction outside {FRACTIONS}: "
                        f"{_listing(common[bad_train])}")
    bad_other = ~is_train & ~np.isnan(minf)
    if bad_other.any():
        problems.append(f"fraction: {int(bad_other.sum())} val/test rows have a min_fraction (must be empty): "
                        f"{_listing(common[bad_other])}")
    tr = pd.DataFrame({"patient": t_pat[is_train & valid], "minf": minf[is_train & valid]})
    if len(tr):
        spread = tr.groupby("patient")["minf"].nunique()
        cut = spread[spread > 1]
        if len(cut):
            problems.append(f"fraction: {len(cut)} patients are cut between fraction subsets: {_listing(cut.index)}")
        per_pat = tr.groupby("patient").agg(images=("minf", "size"), minf=("minf", "min"))
        n_train = int(per_pat["images"].sum())
        for f in FRACTIONS:
            inside = per_pat[per_pat["minf"] <= f + 1e-9]
            target = max(1, math.ceil(f * n_train - 1e-9))
            got = int(inside["images"].sum())
            if got < target:
                problems.append(f"fraction: the {f:g} subset has {got} images, fewer than its target {target}")
            elif len(inside) and got - int(inside["images"].max()) >= target:
                problems.append(f"fraction: the {f:g} subset has {got} images, more than the shortest "
                                f"patient prefix reaching its target {target} needs")
    return problems
