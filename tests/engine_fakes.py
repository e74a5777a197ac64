"""Fakes for the engine tests: a tiny method, tasks and a data layer, registered per test.

Nothing here depends on the real methods, tasks or data layer; the registries are patched with
``monkeypatch.setitem(REG._items, ...)`` so every fake disappears after its test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch

from bench import runner
from bench.api import METHODS, TASKS, Capability, Encoder, Features, MethodCard, MethodEntry, TaskEntry, TaskOutput

FAKE_METHOD = "test-fake-method"
FAKE_TASK = "test-fake-task"
GLOBAL = frozenset({Capability.IMAGE_GLOBAL})
DENSE = frozenset({Capability.IMAGE_GLOBAL, Capability.IMAGE_DENSE})


def card(name: str = FAKE_METHOD, caps: frozenset[Capability] = GLOBAL) -> MethodCard:
    return MethodCard(name=name, backbone="none", weights_tag="fake", weights_sha256=None, image_size=8,
                      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), embed_dim=4, feature_channels=(4,),
                      feature_strides=(8,), patch_dim=4, capabilities=caps)


class FakeEncoder(Encoder):
    def image_features(self, x: torch.Tensor) -> Features:
        b = x.shape[0]
        return Features(pooled=torch.zeros(b, 4), patches=torch.zeros(b, 1, 4), pyramid=[torch.zeros(b, 4, 1, 1)])


def score(spec: Any) -> float:
    """The fake task's deterministic main metric."""
    return 0.5 + 0.1 * spec.fraction + 0.01 * spec.seed + 0.1234567891e-3


@dataclass
class FakeWorld:
    """Counters and knobs shared by the fakes of one test."""

    manifest: str = "manifest-1"
    factory_calls: list[tuple] = field(default_factory=list)
    prepare_calls: list[tuple] = field(default_factory=list)
    task_calls: list[Any] = field(default_factory=list)
    offset: float = 0.0                 # added to every metric (to simulate drift)

    def factory(self, caps: frozenset[Capability] = GLOBAL, name: str = FAKE_METHOD) -> Callable[..., Encoder]:
        def make(preset: str, checkpoint: Any, seed: int, data: str = "synth") -> Encoder:
            self.factory_calls.append((preset, checkpoint, seed))
            return FakeEncoder(card(name, caps))
        return make

    def prepare(self, dataset: str, data: str, *, image_size: int, split_seed: int) -> Any:
        self.prepare_calls.append((dataset, data, image_size, split_seed))
        source = {"kind": "synthetic" if data == "synth" else "real", "root": f"/fake/{dataset}",
                  "dataset": dataset, "manifest_sha256": self.manifest, "rows": 10, "skipped_rows": 0}
        if data == "synth":
            source.update(scale="tiny", seed=0)
        return SimpleNamespace(source=source, manifest=SimpleNamespace(sha256=self.manifest))

    def task_run(self, encoder: Encoder, data: Any, spec: Any, device: torch.device) -> TaskOutput:
        self.task_calls.append(spec)
        s = score(spec) + self.offset
        return TaskOutput(
            metrics={"score": s, "aux": 0.25 + self.offset, "undefined": float("nan")},
            ci={"score": (s - 0.05, s + 0.05)},
            details={"epochs": 2, "n_test": 3},
            predictions=[{"image_id": f"img{i}", "prob": 0.1 * i} for i in range(3)],
        )


def add_method(monkeypatch: pytest.MonkeyPatch, world: FakeWorld, name: str = FAKE_METHOD,
               caps: frozenset[Capability] = GLOBAL) -> MethodEntry:
    entry = MethodEntry(name=name, factory=world.factory(caps, name), capabilities=caps, description="fake method")
    monkeypatch.setitem(METHODS._items, name, entry)
    return entry


def add_task(monkeypatch: pytest.MonkeyPatch, world: FakeWorld, name: str = FAKE_TASK, *, version: int = 1,
             requires: frozenset[Capability] = GLOBAL, run: Callable[..., TaskOutput] | None = None,
             family: str = "test-family", settings: dict | None = None) -> TaskEntry:
    entry = TaskEntry(name=name, family=family, dataset="fake-dataset", version=version, requires=requires,
                      main_metric="score", higher_is_better=True, protocols=("default", "other"),
                      run=run or world.task_run, description="fake task",
                      settings=settings if settings is not None else {"tiny": {"lr": 0.1, "epochs": 2}})
    monkeypatch.setitem(TASKS._items, name, entry)
    return entry


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch, tmp_path) -> FakeWorld:
    """Results and cache in tmp_path; registries holding only the fakes; a fake data layer."""
    monkeypatch.setenv("MEDVLP_BENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("MEDVLP_BENCH_CACHE", str(tmp_path / "cache"))
    w = FakeWorld()
    # the real entries are registered first: a module first imported while the fakes stand in would
    # register into the fakes' dict, and importing it again later registers nothing
    runner.load_registries()
    # only the fakes are registered while the test runs (the real entries come back afterwards)
    monkeypatch.setattr(METHODS, "_items", {})
    monkeypatch.setattr(TASKS, "_items", {})
    monkeypatch.setattr(runner, "load_registries", lambda: None)
    monkeypatch.setattr(runner, "prepare_data", w.prepare)
    add_method(monkeypatch, w)
    add_task(monkeypatch, w)
    return w
