"""Run one cell: (method, task, fraction, seed, preset, data) -> a result file.

The order matters: everything that can refuse the run cheaply (unknown names, a capability
mismatch, a bad override, a missing checkpoint, a result that is already current) is checked before
the encoder is built or any data is prepared. Once the encoder exists, the identity of its weights
(:mod:`bench.identity`) is compared with the existing result before any data is prepared; the split
manifest is compared last, as it needs the prepared data.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import numbers
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from bench import env
from bench.api import METHODS, TASKS, MethodEntry, RunSpec, TaskEntry, TaskOutput, resolve_options
from bench.errors import BenchError, CapabilityError, CheckpointError
from bench.identity import weights_identity
from bench.results import (
    Result, data_label, find_existing, result_path, sha256_file, stale_reason, to_jsonable, write_result,
)

log = logging.getLogger(__name__)


def load_registries() -> None:
    """Importing the ``methods`` and ``tasks`` packages registers every method and task."""
    import methods  # noqa: F401
    import tasks  # noqa: F401


def prepare_data(dataset: str, data: str, *, image_size: int, split_seed: int, skip_bad: bool = False) -> Any:
    """The data layer's ``prepare_dataset`` (imported lazily; tests replace this function), kept for
    the next run in the same process: ``bench demo`` and ``bench check`` run many cells on one
    dataset, and re-reading its label files (9,600 DICOM headers for RSNA) took half of a linear
    probe's wall time."""
    from bench.data.synth.corpus import default_scale
    from bench.paths import cache_dir

    # keyed by the cache folder and the synthetic scale too: the drift check's fresh cache and smaller
    # corpus must not be served data prepared earlier in the same process
    return _prepare_data_memo(dataset, data, image_size, split_seed, skip_bad, str(cache_dir()), default_scale())


@functools.lru_cache(maxsize=2)   # two prepared datasets (image arrays of up to ~100 MB at 64 px)
def _prepare_data_memo(dataset: str, data: str, image_size: int, split_seed: int, skip_bad: bool,
                       cache: str, scale: str) -> Any:
    from bench.data.prepare import prepare_dataset

    return prepare_dataset(dataset, data, image_size=image_size, split_seed=split_seed, skip_bad=skip_bad)


def _skip_bad_kw(skip_bad: bool) -> dict[str, bool]:
    """``skip_bad`` for :func:`prepare_data` only when set, so stand-ins without it keep working."""
    return {"skip_bad": True} if skip_bad else {}


def input_size(spec: RunSpec, task: TaskEntry, card_size: int) -> int:
    """The image size a run feeds its encoder: the task protocol's (its ``image_size`` setting, or the
    override), else the encoder card's. The image cache is prepared at this size."""
    default = (task.settings.get(spec.preset) or {}).get("image_size", card_size)
    return int(dict(task_overrides(spec)).get("image_size", default))


def missing_capabilities(method: MethodEntry, task: TaskEntry) -> list[str]:
    return sorted(str(c) for c in task.requires - method.capabilities)


def check_capabilities(method: MethodEntry, task: TaskEntry) -> None:
    missing = missing_capabilities(method, task)
    if missing:
        have = ", ".join(sorted(str(c) for c in method.capabilities)) or "none"
        raise CapabilityError(
            f"method {method.name!r} cannot run task {task.name!r}: it lacks {', '.join(missing)} "
            f"(task requires {', '.join(sorted(str(c) for c in task.requires))}; method has {have})")


def _hashable(v: Any) -> Any:
    return tuple(_hashable(x) for x in v) if isinstance(v, (list, tuple)) else v


def normalise_spec(spec: RunSpec, task: TaskEntry) -> RunSpec:
    """Validate protocol and overrides against the task; spell the default protocol as None and
    the checkpoint as an absolute path, so equal runs have equal specs."""
    changes: dict[str, Any] = {}
    if spec.protocol is not None:
        if spec.protocol not in task.protocols:
            raise BenchError(f"task {task.name!r} has no protocol {spec.protocol!r} "
                             f"(protocols: {', '.join(task.protocols) or 'none'})")
        if task.protocols and spec.protocol == task.protocols[0]:
            changes["protocol"] = None
    settings = task.settings.get(spec.preset) or {}
    if settings:
        for key, _ in task_overrides(spec):
            if key not in settings:
                close = difflib.get_close_matches(key, list(settings), n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise BenchError(f"task {task.name!r} (preset {spec.preset}) has no setting {key!r}{hint} "
                                 f"(settings: {', '.join(sorted(settings))})")
    if spec.overrides:
        changes["overrides"] = tuple((k, _hashable(v)) for k, v in spec.overrides)
    if spec.checkpoint is not None:
        changes["checkpoint"] = str(Path(spec.checkpoint).expanduser().resolve())
    if spec.data != "synth":
        changes["data"] = str(Path(spec.data).expanduser().resolve())
    return dataclasses.replace(spec, **changes) if changes else spec


def split_overrides(spec: RunSpec) -> tuple[tuple[tuple[str, Any], ...], dict[str, Any]]:
    """``--set`` pairs -> (task protocol overrides, method options): keys ``<method>.<option>`` are the
    method's switches (``mgca.official_quirks=true``); every other key is a task setting."""
    prefix = spec.method + "."
    task_part = tuple((k, v) for k, v in spec.overrides if not k.startswith(prefix))
    method_part = {k[len(prefix):]: v for k, v in spec.overrides if k.startswith(prefix)}
    return task_part, method_part


def task_overrides(spec: RunSpec) -> tuple[tuple[str, Any], ...]:
    return split_overrides(spec)[0]


def method_options(spec: RunSpec, method: MethodEntry) -> dict[str, Any]:
    """The run's method options, validated against the method's declared options (refused when unknown)."""
    given = split_overrides(spec)[1]
    if given and not method.options:
        raise BenchError(f"method {method.name!r} has no options (got {', '.join(sorted(given))})")
    resolve_options(method.name, method.options, given)      # raises on an unknown key
    return given


def build_encoder(method: MethodEntry, spec: RunSpec) -> Any:
    """The method's encoder for ``spec``; options only reach factories that take them."""
    options = method_options(spec, method)
    kwargs: dict[str, Any] = {"data": spec.data}
    if method.options:
        kwargs["options"] = options
    return method.factory(spec.preset, Path(spec.checkpoint) if spec.checkpoint else None, spec.seed, **kwargs)


def checkpoint_sha256(checkpoint: str | None) -> str | None:
    """sha256 of a checkpoint file, or of a directory's files (sorted relative names + contents)."""
    if checkpoint is None:
        return None
    p = Path(checkpoint)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_file():
        return sha256_file(p)
    import hashlib

    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(str(f.relative_to(p)).encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def _jsonable_or_repr(x: Any) -> Any:
    try:
        return to_jsonable(x)
    except TypeError:
        if isinstance(x, dict):
            return {str(k): _jsonable_or_repr(v) for k, v in x.items()}
        return repr(x)


def _source_of(data: Any, spec: RunSpec, dataset: str) -> dict[str, Any]:
    source = dict(getattr(data, "source", None) or {})
    source.setdefault("kind", data_label(spec.data))
    source.setdefault("dataset", dataset)
    if "manifest_sha256" not in source:
        manifest = getattr(data, "manifest", None)
        source["manifest_sha256"] = getattr(manifest, "sha256", None)
    return source


def _check_kind_matches_path(source: dict[str, Any], spec: RunSpec, path: Path) -> None:
    """The results store files a run as synthetic/real from the spec alone; the data layer says what
    it loaded. They must agree, or a real result would sit under synthetic-*/ (or the reverse)."""
    kind, filed = source.get("kind"), data_label(spec.data)
    if kind != filed:
        raise BenchError(f"data {spec.data!r}: the data layer reports kind {kind!r} but the results store "
                         f"files it as {filed!r} ({path}); refusing to write a mislabelled result")


def _check_output(out: Any, task: TaskEntry) -> TaskOutput:
    if not isinstance(out, TaskOutput):
        raise TypeError(f"task {task.name!r} returned {type(out).__name__}, expected TaskOutput")
    if task.main_metric not in out.metrics:
        raise ValueError(f"task {task.name!r} did not report its main metric {task.main_metric!r} "
                         f"(reported: {', '.join(sorted(out.metrics))})")
    bad = [k for k in out.metrics if not isinstance(k, str) or "," in k]
    if bad:
        raise ValueError(f"task {task.name!r}: metric names must be plain strings, got {bad}")
    not_numbers = sorted(k for k, v in out.metrics.items()
                         if v is not None and not isinstance(v, numbers.Real))
    if not_numbers:
        raise ValueError(f"task {task.name!r}: metric values must be numbers (or None), not for {not_numbers}")
    return out


def run(spec: RunSpec, *, device: str | torch.device = "auto", force: bool = False,
        results_root: Path | None = None, skip_bad: bool = False) -> tuple[Result, Path, bool]:
    """Run ``spec`` (or find its current result). Returns ``(result, path, skipped)``.

    ``skip_bad``: leave out malformed rows and missing or undecodable images instead of stopping
    (counted in the split manifest and ``data_source``). Not part of the spec: on clean data it
    changes nothing, and on bad data it changes the manifest, whose sha256 the staleness check
    already compares.
    """
    load_registries()
    task = TASKS.get(spec.task)
    method = METHODS.get(spec.method)
    check_capabilities(method, task)                      # before any work
    spec = normalise_spec(spec, task)
    method_options(spec, method)                          # an unknown method option: before any work
    ckpt_sha = checkpoint_sha256(spec.checkpoint)
    path = result_path(spec, task, results_root)

    existing: Result | None = None
    if not force:
        existing, why = find_existing(path)
        if existing is not None:
            reason = stale_reason(existing, spec=spec, task_version=task.version, checkpoint_sha256=ckpt_sha)
            if reason:
                log.info("stale result at %s: %s; re-running", path, reason)
                existing = None
        else:
            log.debug("%s: %s", path, why)

    dev = env.resolve_device(device)
    env.set_determinism(spec.seed)
    log.info("%s x %s: fraction %s, seed %d, preset %s, data %s, device %s", spec.task, spec.method,
             spec.fraction, spec.seed, spec.preset, spec.data, dev)

    encoder = build_encoder(method, spec)
    card_missing = sorted(str(c) for c in task.requires - encoder.card.capabilities)
    if card_missing:
        raise CapabilityError(f"encoder of method {spec.method!r} (card {encoder.card.name!r}) lacks "
                              f"{', '.join(card_missing)} required by task {task.name!r}")
    # The weights are part of the identity (bench.identity): checked before preparing any data.
    weights = weights_identity(encoder, spec.checkpoint, ckpt_sha)
    log.info("weights: %s", weights.describe())
    if existing is not None:
        reason = stale_reason(existing, spec=spec, task_version=task.version, weights_sha256=weights.sha256)
        if reason:
            log.info("stale result at %s: %s; re-running", path, reason)
            existing = None
    data = prepare_data(task.dataset, spec.data, image_size=input_size(spec, task, encoder.card.image_size),
                        split_seed=spec.split_seed, **_skip_bad_kw(skip_bad))
    source = _source_of(data, spec, task.dataset)
    # The data layer decides the kind: a root inside a synthetic corpus is synthetic too.
    log.info("data source: %s (%s)", str(source.get("kind", "unknown")).upper(), source.get("root", spec.data))
    _check_kind_matches_path(source, spec, path)

    if existing is not None:
        reason = stale_reason(existing, spec=spec, task_version=task.version,
                              manifest_sha256=source.get("manifest_sha256"), checkpoint_sha256=ckpt_sha,
                              weights_sha256=weights.sha256)
        if reason is None:
            log.info("finished result exists, skipping (use --force to re-run): %s", path)
            return existing, path, True
        log.info("stale result at %s: %s; re-running", path, reason)

    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    # the task sees its own settings only; method options are the encoder's business
    out = _check_output(task.run(encoder, data, dataclasses.replace(spec, overrides=task_overrides(spec)), dev), task)
    wall = time.perf_counter() - t0

    settings = {**(task.settings.get(spec.preset) or {}), **dict(task_overrides(spec))}
    main_ci = out.ci.get(task.main_metric)
    result = Result(
        spec=to_jsonable(spec.to_dict()),
        task={
            "name": task.name, "version": task.version, "family": task.family, "dataset": task.dataset,
            "requires": sorted(str(c) for c in task.requires),
            "protocol": spec.protocol or (task.protocols[0] if task.protocols else None),
            "main_metric": task.main_metric, "higher_is_better": task.higher_is_better,
            "settings": _jsonable_or_repr(settings),
            # how this protocol differs from the anchor paper's (quoted by the leaderboard)
            "anchor_differences": [str(x) for x in getattr(task, "anchor_differences", ())],
        },
        dataset=task.dataset,
        main_metric=task.main_metric,
        main_value=out.metrics[task.main_metric],
        main_ci=None if main_ci is None else [main_ci[0], main_ci[1]],
        higher_is_better=task.higher_is_better,
        metrics=dict(out.metrics),
        ci={k: [v[0], v[1]] for k, v in out.ci.items()},
        details=_jsonable_or_repr(out.details),
        data_source=_jsonable_or_repr(source),
        method_card={**encoder.card.to_dict(), "options": _jsonable_or_repr(resolve_options(
            method.name, method.options, method_options(spec, method))) if method.options else {}},
        checkpoint_sha256=ckpt_sha,
        weights_sha256=weights.sha256,
        weights_origin=weights.origin,
        weights_file=weights.file,
        git=env.git_info(),
        packages=env.package_versions(),
        device=str(dev),
        host=env.host_description(dev),
        started_at=started_at,
        wall_s=wall,
    )
    result = write_result(result, path, out.predictions)
    log.info("wrote %s (%.1f s)", path, wall)
    return result, path, False
