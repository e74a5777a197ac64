"""How a dataset plugs into the harness: its loader, its official files and its split protocol."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.data.table import CanonicalTable
from bench.registry import Registry


@dataclass(frozen=True)
class SplitProtocol:
    """How train/val/test are drawn (patient-level, seeded), after MGCA's conventions.

    Official splits named in ``official`` are kept as given; the missing parts are carved out of the
    official training pool by patient. ``test_fraction`` / ``val_fraction`` are fractions of the
    patients of the pool they are carved from; ``val_size`` (images), when set, overrides
    ``val_fraction`` (MGCA CheXpert: 5,000 images) but is capped at 10% of the pool.
    """

    official: tuple[str, ...] = ()      # subset of ("train", "val", "test") taken from the files
    test_fraction: float = 0.15
    val_fraction: float = 0.15
    val_size: int | None = None
    stratify: bool = True
    merge_official_val_into: str | None = None  # e.g. MIMIC: "validate" -> "test" or "val"
    note: str = ""                      # the convention followed, quoted in summaries


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset. ``load(root, skip_bad=False)`` reads the official raw files."""

    name: str                           # registry key, e.g. "rsna"
    title: str                          # "RSNA Pneumonia Detection Challenge (stage 2)"
    official_layout: str                # one line naming the files a root must hold
    load: Callable[..., CanonicalTable] # (root: Path, *, skip_bad: bool = False) -> CanonicalTable
    split: SplitProtocol
    synth_subdir: str                   # folder of this dataset inside the synthetic corpus root
    tasks_hint: str = ""                # what the dataset is used for
    #: (root) -> the folder ``load`` reads, for datasets whose archive unpacks into a named folder
    #: (CheXpert: a root holding ``CheXpert-v1.0-small/`` -> that folder). Resolving it here, not
    #: only in the loader, makes both layouts one data source: same root in results and caches.
    locate_root: Callable[[Path], Path] | None = None


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    return DATASETS.add(spec.name, spec)


def resolve_root(spec: DatasetSpec, data: str | Path, synth_root: Path) -> tuple[Path, str]:
    """Map a ``--data`` value to (dataset root, source kind "synthetic" | "real")."""
    if str(data) == "synth":
        return synth_root / spec.synth_subdir, "synthetic"
    root = Path(data).expanduser().resolve()
    if spec.locate_root is not None:
        root = Path(spec.locate_root(root)).resolve()
    return root, "real"
