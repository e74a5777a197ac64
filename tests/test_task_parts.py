"""The shared task parts: protocol input size, anchor differences, label spaces and one-home constants."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tasks  # noqa: F401  (registers the tasks)
from bench.api import TASKS, Capability, Encoder, Features, MethodCard, RunSpec
from bench.errors import BenchError, DataError
from tasks.common.inputs import input_size, to_input
from tasks.common.settings import resolve_settings
from tasks.fine_tune import FINE_TUNE_SETTINGS
from tasks.linear_probe import LINEAR_PROBE_SETTINGS
from test_classification_tasks import CPU, make_toy, spec


@pytest.fixture(autouse=True)
def feature_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVLP_BENCH_CACHE", str(tmp_path / "cache"))


class ConvEncoder(Encoder):
    """One strided conv + mean pool (card at 64 px): fast, seeded, and it records its input sizes."""

    def __init__(self, seed: int = 0) -> None:
        card = MethodCard(name="conv-test", backbone="conv4", weights_tag="test", weights_sha256=None, image_size=64,
                          mean=(0.5,) * 3, std=(0.5,) * 3, embed_dim=8, feature_channels=(8,), feature_strides=(4,),
                          patch_dim=8, capabilities=frozenset({Capability.IMAGE_GLOBAL, Capability.TRAINABLE}))
        super().__init__(card)
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.1)
        self.seen: list[tuple[int, int]] = []

    def image_features(self, x: torch.Tensor) -> Features:
        self.seen.append(tuple(x.shape[-2:]))
        m = F.relu(self.conv(x))
        return Features(pooled=m.mean((2, 3)), patches=m.flatten(2).transpose(1, 2), pyramid=[m])


def encoder() -> ConvEncoder:
    return ConvEncoder()


# -- input size belongs to the protocol ------------------------------------------------------------

@pytest.mark.parametrize("table", [LINEAR_PROBE_SETTINGS, FINE_TUNE_SETTINGS])
def test_every_preset_has_an_image_size(table):
    assert table["paper"]["image_size"] == 224
    assert isinstance(table["tiny"]["image_size"], int) and table["tiny"]["image_size"] > 0
    for name in ("chexpert", "rsna", "covidx", "nih"):
        for suffix in ("cls", "ft"):
            assert TASKS.get(f"{name}-{suffix}").settings["paper"]["image_size"] == 224


def test_image_size_override_is_coerced_and_checked():
    assert input_size(resolve_settings(LINEAR_PROBE_SETTINGS["tiny"], (("image_size", "96"),))) == 96
    with pytest.raises(BenchError, match="image_size"):
        input_size(resolve_settings(LINEAR_PROBE_SETTINGS["tiny"], (("image_size", 0),)))
    with pytest.raises(BenchError, match="expected a int"):
        resolve_settings(LINEAR_PROBE_SETTINGS["tiny"], (("image_size", 95.5),))


def test_to_input_resizes_to_the_size_asked_not_the_card():
    enc = encoder()                       # card image_size 64
    x = torch.zeros(2, 1, 64, 64, dtype=torch.uint8)
    assert to_input(enc, x, CPU, 40).shape == (2, 3, 40, 40)
    assert to_input(enc, x, CPU, 64).shape == (2, 3, 64, 64)


def test_linear_probe_runs_at_the_protocol_size_and_records_it():
    data = make_toy("binary", n_patients=40)
    enc = encoder()
    ov = (("image_size", 32), ("max_epochs", 2))
    out = TASKS.get("rsna-cls").run(enc, data, spec("rsna-cls", overrides=ov), CPU)
    assert enc.seen and set(enc.seen) == {(32, 32)}
    assert out.details["image_size"] == 32 and out.details["input_array_size"] == 64
    # a different input size is a different feature-cache entry
    again = TASKS.get("rsna-cls").run(enc, data, spec("rsna-cls", overrides=(("image_size", 48), ("max_epochs", 2))), CPU)
    assert again.details["feature_cache"]["path"] != out.details["feature_cache"]["path"]
    assert again.details["feature_cache"]["hit_rows"] == 0


def test_fine_tune_runs_at_the_protocol_size():
    data = make_toy("binary", n_patients=30)
    enc = encoder()
    ov = (("image_size", 32), ("max_epochs", 1))
    out = TASKS.get("rsna-ft").run(enc, data, spec("rsna-ft", overrides=ov), CPU)
    assert enc.seen and set(enc.seen) == {(32, 32)} and out.details["image_size"] == 32


def test_image_size_override_changes_the_result_identity(tmp_path):
    from bench.results import result_path

    entry = TASKS.get("rsna-cls")
    plain = result_path(RunSpec(method="random", task="rsna-cls"), entry, tmp_path)
    small = result_path(RunSpec(method="random", task="rsna-cls", overrides=(("image_size", 96),)), entry, tmp_path)
    assert plain != small


def test_runner_prepares_the_image_cache_at_the_protocol_size(monkeypatch, tmp_path):
    from bench import runner

    asked: list[int] = []

    class Stop(Exception):
        pass

    def fake_prepare(dataset, data, *, image_size, split_seed):
        asked.append(image_size)
        raise Stop

    monkeypatch.setattr(runner, "prepare_data", fake_prepare)
    for overrides, want in (((), LINEAR_PROBE_SETTINGS["tiny"]["image_size"]), ((("image_size", 96),), 96)):
        with pytest.raises(Stop):
            runner.run(RunSpec(method="random", task="rsna-cls", overrides=overrides), device="cpu",
                       results_root=tmp_path)
        assert asked[-1] == want


# -- anchor differences ----------------------------------------------------------------------------

def test_every_task_names_its_anchor_differences():
    names = [n for n in TASKS.names() if n.endswith(("-cls", "-ft"))]
    assert len(names) == 8
    for name in names:
        diffs = TASKS.get(name).anchor_differences
        assert isinstance(diffs, tuple) and len(diffs) >= 5, name
        for d in diffs:
            anchor, sep, sentence = d.partition(": ")
            assert sep and anchor in ("MGCA", "BenchX") and sentence.endswith("."), (name, d)
        assert len(set(diffs)) == len(diffs), f"{name}: a difference is listed twice"
    probe, ft = TASKS.get("rsna-cls").anchor_differences, TASKS.get("rsna-ft").anchor_differences
    assert any("cached" in d and "256->224" in d for d in probe)
    assert any("MGCA-style" in d for d in probe)
    assert any("threshold" in d and "argmax" in d for d in probe) and any("argmax" in d for d in ft)
    assert any("per method" in d for d in ft) and any("rises again" in d for d in ft)
    assert any("horizontal flip" in d for d in ft)


def test_tiny_difference_quotes_the_settings_it_describes():
    tiny = LINEAR_PROBE_SETTINGS["tiny"]
    (sentence,) = [d for d in TASKS.get("nih-cls").anchor_differences if "tiny preset" in d]
    assert f"at {tiny['image_size']} px" in sentence and f"batch {tiny['batch_size']}" in sentence


# -- label spaces and one-home constants -----------------------------------------------------------

def test_label_space_lookup():
    from bench.data.labels import chexpert_labels, label_space

    assert label_space("chexpert") is chexpert_labels
    with pytest.raises(DataError, match="siim.*chexpert"):
        label_space("siim")


def test_label_lists_have_one_home():
    from bench.data import label_lists as L
    from bench.data.loaders import chexpert, covidx, mimic_cxr, nih
    from bench.data.synth import case

    assert chexpert.CHEXPERT_OBSERVATIONS is L.CHEXPERT_OBSERVATIONS is mimic_cxr.CHEXPERT_OBSERVATIONS
    assert case.CHEXPERT_OBSERVATIONS is L.CHEXPERT_OBSERVATIONS and case.NIH_LABELS is L.NIH_LABELS
    assert nih.NIH_LABELS is L.NIH_LABELS and covidx.CLASSES is L.COVIDX_CLASSES
    assert chexpert.COMPETITION_TASKS is L.CHEXPERT_COMPETITION_TASKS
    assert set(L.CHEXPERT_COMPETITION_TASKS) < set(L.CHEXPERT_OBSERVATIONS) and len(L.NIH_LABELS) == 14


def test_fractions_have_one_home():
    from bench import api
    from bench.data import splits

    assert api.FRACTIONS is splits.FRACTIONS


def test_covidx_labels_keep_only_single_label_rows():
    from bench.data.labels import covidx_labels
    from bench.data.table import CanonicalTable, make_frame

    frame = make_frame([{"image_id": f"i{i}", "image_path": f"/x/i{i}.png", "patient_id": f"p{i}"} for i in range(3)])
    labels = np.array([[0, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=np.float32)
    space = covidx_labels(CanonicalTable(dataset="covidx", root="/x", frame=frame,
                                         classes=("normal", "pneumonia", "COVID-19"), labels=labels))
    np.testing.assert_array_equal(space.targets, [2, -1, -1])
    np.testing.assert_array_equal(space.keep, [True, False, False])
