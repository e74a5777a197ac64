"""The results store: one JSON file per finished run, addressed by the run's identity.

Layout (``results_dir()`` = ``results/`` unless ``MEDVLP_BENCH_RESULTS`` is set)::

    results/<synthetic|real>-<preset>/<task>/<method>/frac<f>-seed<s>[-<protocol>][-<hash>][-root<hash>].json
    results/<...>/frac<f>-seed<s>[...].predictions.jsonl.gz     per-sample test predictions
    results/golden/                                             drift-check references (bench.drift)

``<protocol>`` appears only for a non-default protocol; ``<hash>`` (8 hex digits) only when the spec
has protocol overrides, a checkpoint or a non-zero split seed; ``root<hash>`` (8 hex digits of the
resolved data root) whenever ``--data`` is a path rather than ``synth``, so two different roots
never share a file. ``synthetic`` vs ``real`` follows the data: a path inside a synthetic corpus
(``bench.data.synth.corpus.corpus_of``) is synthetic.

The JSON is written last and atomically, so its presence means the run finished ("status":
"finished"). A run is skipped when a finished result with the same spec, task version, weights
hash, split-manifest hash and checkpoint hash exists; otherwise (stale or missing) it is run again
and the file replaced. The weights hash is what the encoder was built from (see
:mod:`bench.identity`): a file the method read, or a fingerprint of the built weights.

Schema version 2 (:data:`SCHEMA_VERSION`; 2 added ``weights_sha256``, ``weights_origin`` and
``weights_file``); readers refuse other versions instead of guessing.
"""
from __future__ import annotations

import dataclasses
import enum
import gzip
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from bench.api import RunSpec, TaskEntry
from bench.errors import BenchError
from bench.paths import results_dir

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
FLOAT_DIGITS = 6
PREDICTIONS_SUFFIX = ".predictions.jsonl.gz"
GOLDEN_DIRNAME = "golden"


class ResultError(BenchError):
    """A result file is malformed, from another schema version, or cannot be written."""


# --------------------------------------------------------------------------------------------
# JSON normalisation


def to_jsonable(x: Any) -> Any:
    """Plain JSON types; floats rounded to 6 digits; NaN/inf -> null; keys as strings."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, enum.Enum):
        return to_jsonable(x.value)
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return round(v, FLOAT_DIGITS) if math.isfinite(v) else None
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (set, frozenset)):
        return sorted(to_jsonable(v) for v in x)
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if hasattr(x, "tolist"):  # torch tensors and the like
        return to_jsonable(x.tolist())
    raise TypeError(f"cannot store {type(x).__name__} in a result file: {x!r}")


def dumps(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def _as_tuple(v: Any) -> Any:
    return tuple(_as_tuple(x) for x in v) if isinstance(v, list) else v


# --------------------------------------------------------------------------------------------
# The record


@dataclass
class Result:
    """One finished run. Field names are the JSON keys (plus ``schema_version``)."""

    spec: dict[str, Any]                    # RunSpec.to_dict()
    task: dict[str, Any]                    # name, version, family, requires, protocol, main_metric, higher_is_better
    dataset: str
    main_metric: str
    main_value: float | None
    main_ci: list[float] | None             # 95% CI of the main metric, when the task gives one
    higher_is_better: bool
    metrics: dict[str, float | None]        # every metric, plain names
    ci: dict[str, list[float]]              # name -> [lo, hi]
    details: dict[str, Any]
    data_source: dict[str, Any]             # kind synthetic|real, root, dataset, manifest_sha256, rows, ...
    method_card: dict[str, Any]             # MethodCard.to_dict()
    checkpoint_sha256: str | None           # of --checkpoint (file, or a folder's files); None without one
    weights_sha256: str | None              # identity of the weights the encoder was built with (bench.identity)
    weights_origin: str | None              # "method-card" (a file the method read), "checkpoint", "state-fingerprint"
    weights_file: str | None                # the file behind weights_sha256 where one was read
    git: dict[str, Any]                     # commit, dirty
    packages: dict[str, str]
    device: str
    host: dict[str, Any]
    started_at: str                         # ISO 8601, UTC
    wall_s: float
    predictions: str | None = None          # sibling file name, or None
    predictions_sha256: str | None = None
    status: str = "finished"
    schema_version: int = SCHEMA_VERSION

    # convenience ------------------------------------------------------------------------
    @property
    def task_name(self) -> str:
        return self.task["name"]

    @property
    def task_version(self) -> int:
        return int(self.task["version"])

    @property
    def method(self) -> str:
        return self.spec["method"]

    @property
    def fraction(self) -> float:
        return float(self.spec["fraction"])

    @property
    def seed(self) -> int:
        return int(self.spec["seed"])

    @property
    def data_kind(self) -> str:
        return self.data_source.get("kind", "synthetic" if self.spec.get("data") == "synth" else "real")

    @property
    def manifest_sha256(self) -> str | None:
        return self.data_source.get("manifest_sha256")

    def run_spec(self) -> RunSpec:
        d = dict(self.spec)
        d["overrides"] = tuple((k, _as_tuple(v)) for k, v in d.get("overrides", ()))
        return RunSpec(**d)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Any, *, path: Path | str | None = None) -> "Result":
        where = f"{path}: " if path is not None else ""
        if not isinstance(d, dict):
            raise ResultError(f"{where}expected a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ResultError(f"{where}unsupported schema_version {version!r} (this harness reads {SCHEMA_VERSION}; "
                              "re-run the cell with --force, or regenerate results/)")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - d.keys())
        unknown = sorted(d.keys() - names)
        if missing or unknown:
            parts = ([f"missing keys {missing}"] if missing else []) + ([f"unknown keys {unknown}"] if unknown else [])
            raise ResultError(f"{where}malformed result: {'; '.join(parts)}")
        if d.get("status") != "finished":
            raise ResultError(f"{where}status is {d.get('status')!r}, expected 'finished'")
        for key in ("spec", "task", "metrics", "ci", "data_source", "method_card"):
            if not isinstance(d[key], dict):
                raise ResultError(f"{where}malformed result: {key!r} must be an object")
        for key in ("method", "task", "fraction", "seed"):
            if key not in d["spec"]:
                raise ResultError(f"{where}malformed result: spec has no {key!r}")
        for key in ("name", "version"):
            if key not in d["task"]:
                raise ResultError(f"{where}malformed result: task has no {key!r}")
        if d["main_metric"] not in d["metrics"]:
            raise ResultError(f"{where}malformed result: main metric {d['main_metric']!r} not in metrics")
        return cls(**d)


# --------------------------------------------------------------------------------------------
# Identity -> path

_SAFE = re.compile(r"[^A-Za-z0-9._+=-]")


def _safe(name: str) -> str:
    return _SAFE.sub("_", str(name))


def data_label(data: str) -> str:
    """``"synthetic"`` for ``--data synth`` or a dataset folder inside a synthetic corpus, else ``"real"``.

    The corpus test is the data layer's own (``corpus_of``: a ``corpus.json`` above the folder), so
    the results store and the data source of a run never disagree about what the data is.
    """
    if str(data) == "synth":
        return "synthetic"
    from bench.data.synth.corpus import corpus_of   # lazy: the results store is read without the data layer

    return "synthetic" if corpus_of(data) is not None else "real"


def data_tag(spec: RunSpec | Mapping[str, Any]) -> str | None:
    """8 hex digits of the spec's data root, or None for ``--data synth``.

    Part of the file name: two roots (two copies of a dataset, or a synthetic corpus given by path
    next to the default one) are two identities and never replace each other's result. The runner
    resolves the root first (``normalise_spec``); the root is hashed as written in the spec, not
    resolved again, so the tag is a pure function of the spec on any machine.
    """
    data = spec.data if isinstance(spec, RunSpec) else spec.get("data", "synth")
    if str(data) == "synth":
        return None
    return hashlib.sha256(str(data).encode()).hexdigest()[:8]


def variant_parts(spec: RunSpec | Mapping[str, Any]) -> dict[str, Any]:
    """What sets a run apart from its method's default: the overrides, the checkpoint and the split
    seed, each only where given (empty for a default run)."""
    d = spec.to_dict() if isinstance(spec, RunSpec) else dict(spec)
    parts: dict[str, Any] = {}
    if d.get("overrides"):
        parts["overrides"] = [list(kv) for kv in d["overrides"]]
    if d.get("checkpoint"):
        parts["checkpoint"] = str(d["checkpoint"])
    if d.get("split_seed", 0):
        parts["split_seed"] = int(d["split_seed"])
    return parts


def variant_hash(spec: RunSpec | Mapping[str, Any]) -> str | None:
    """8 hex digits identifying :func:`variant_parts`; None when all are defaults."""
    parts = variant_parts(spec)
    if not parts:
        return None
    return hashlib.sha256(json.dumps(to_jsonable(parts), sort_keys=True).encode()).hexdigest()[:8]


def run_stem(spec: RunSpec, default_protocol: str | None) -> str:
    stem = f"frac{float(spec.fraction)!r}-seed{int(spec.seed)}"
    if spec.protocol is not None and spec.protocol != default_protocol:
        stem += f"-{_safe(spec.protocol)}"
    h = variant_hash(spec)
    if h:
        stem += f"-{h}"
    root = data_tag(spec)
    if root:
        stem += f"-root{root}"
    return stem


def result_path(spec: RunSpec, task_entry: TaskEntry, root: Path | None = None) -> Path:
    """Where the result of ``spec`` lives: a pure function of the spec (and the task's default protocol)."""
    root = results_dir() if root is None else Path(root)
    default = task_entry.protocols[0] if task_entry.protocols else None
    return (root / f"{data_label(spec.data)}-{_safe(spec.preset)}" / _safe(spec.task) / _safe(spec.method)
            / f"{run_stem(spec, default)}.json")


def predictions_path(result_file: Path) -> Path:
    return result_file.with_name(result_file.name[: -len(".json")] + PREDICTIONS_SUFFIX)


# --------------------------------------------------------------------------------------------
# Atomic writing


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(fileobj)`` into a temp file in the same folder, fsync, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _write_predictions(fh: Any, predictions: Iterable[Mapping[str, Any]]) -> None:
    # mtime=0 and no file name: identical predictions give identical bytes
    with gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) as gz:
        for row in predictions:
            gz.write((json.dumps(to_jsonable(row), sort_keys=True, allow_nan=False) + "\n").encode())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_result(result: Result, path: Path,
                 predictions: Iterable[Mapping[str, Any]] | None = None) -> Result:
    """Write predictions (if any) then the result JSON, each atomically; return the stored record.

    An existing JSON at ``path`` is removed first, so an interrupted re-run never leaves an old
    "finished" marker next to new predictions.
    """
    path = Path(path)
    if not path.name.endswith(".json"):
        raise ValueError(f"result files end in .json: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    pred_file = predictions_path(path)
    if predictions is not None:
        rows = list(predictions)
        atomic_write(pred_file, lambda fh: _write_predictions(fh, rows))
        result = dataclasses.replace(result, predictions=pred_file.name, predictions_sha256=sha256_file(pred_file))
    else:
        pred_file.unlink(missing_ok=True)
        result = dataclasses.replace(result, predictions=None, predictions_sha256=None)
    text = dumps(result.to_dict()).encode("utf-8")
    atomic_write(path, lambda fh: fh.write(text))
    log.debug("wrote %s", path)
    return Result.from_dict(json.loads(text), path=path)


def read_predictions(result_file: Path) -> list[dict[str, Any]]:
    with gzip.open(predictions_path(Path(result_file)), "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --------------------------------------------------------------------------------------------
# Reading


def load_result(path: Path) -> Result:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ResultError(f"{path}: cannot read result file ({e.strerror or e})") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return Result.from_dict(d, path=path)


def result_files(root: Path, *, exclude: Iterable[str] = (GOLDEN_DIRNAME,)) -> list[Path]:
    """Result JSON files under ``root`` in sorted order, skipping the top-level folders ``exclude``."""
    root = Path(root)
    if not root.exists():
        return []
    excluded = set(exclude)
    out = []
    for p in sorted(root.rglob("*.json")):
        rel = p.relative_to(root).parts
        if rel[0] in excluded or any(part.startswith(".") for part in rel):
            continue
        out.append(p)
    return out


def load_results(root: Path | None = None, *, exclude: Iterable[str] = (GOLDEN_DIRNAME,)) -> dict[Path, Result]:
    """Every result under ``root`` (default ``results_dir()``), keyed by path, in sorted order.

    Malformed files are collected and reported together, each by its path.
    """
    root = results_dir() if root is None else Path(root)
    out: dict[Path, Result] = {}
    errors: list[str] = []
    for p in result_files(root, exclude=exclude):
        try:
            out[p] = load_result(p)
        except ResultError as e:
            errors.append(str(e))
    if errors:
        head = f"{len(errors)} malformed result file(s) under {root}:"
        raise ResultError(head + ("\n  " if len(errors) > 1 else " ") + "\n  ".join(errors))
    return out


# --------------------------------------------------------------------------------------------
# Skip / stale logic


def stale_reason(existing: Result, *, spec: RunSpec, task_version: int,
                 manifest_sha256: str | None = ..., checkpoint_sha256: str | None = ...,
                 weights_sha256: str | None = ...) -> str | None:
    """None when ``existing`` answers ``spec``; otherwise why it must be re-run.

    ``manifest_sha256`` / ``checkpoint_sha256`` / ``weights_sha256`` left out (``...``) are not
    compared, so the runner can check cheaply before building the encoder, again once the encoder
    exists (weights), and fully once the data is prepared (manifest).
    """
    want = to_jsonable(spec.to_dict())
    if existing.spec != want:
        diff = sorted(k for k in set(want) | set(existing.spec) if want.get(k) != existing.spec.get(k))
        return f"spec differs ({', '.join(diff)})"
    if existing.task_version != task_version:
        return f"task version changed ({existing.task_version} -> {task_version})"
    if checkpoint_sha256 is not ... and existing.checkpoint_sha256 != checkpoint_sha256:
        return "checkpoint file changed"
    if weights_sha256 is not ... and existing.weights_sha256 != weights_sha256:
        return (f"weights changed (sha256 {str(existing.weights_sha256)[:12]} from {existing.weights_origin} -> "
                f"{str(weights_sha256)[:12]})")
    if manifest_sha256 is not ... and existing.manifest_sha256 != manifest_sha256:
        return (f"split manifest changed ({str(existing.manifest_sha256)[:12]} -> "
                f"{str(manifest_sha256)[:12]})")
    return None


def find_existing(path: Path) -> tuple[Result | None, str]:
    """(result, "") when a readable finished result is at ``path``; else (None, why not)."""
    if not path.exists():
        return None, "no result yet"
    try:
        return load_result(path), ""
    except ResultError as e:
        log.warning("ignoring unreadable result (it will be replaced): %s", e)
        return None, f"unreadable ({e})"


__all__ = [
    "FLOAT_DIGITS", "GOLDEN_DIRNAME", "atomic_write", "PREDICTIONS_SUFFIX", "Result", "ResultError", "SCHEMA_VERSION",
    "data_label", "data_tag", "dumps", "find_existing", "load_result", "load_results", "predictions_path",
    "read_predictions", "result_files", "result_path", "run_stem", "sha256_file", "stale_reason",
    "to_jsonable", "variant_hash", "variant_parts", "write_result",
]
