"""The dense task entries: registration, settings, anchor differences, capability checks, train rows."""
from __future__ import annotations

import numpy as np
import pytest

import tasks  # noqa: F401  (registers the tasks)
from bench import metrics as M
from bench import runner
from bench.api import TASKS, Capability, RunSpec
from bench.errors import BenchError, CapabilityError
from dense_toy import make_toy
from engine_fakes import GLOBAL, add_method, world  # noqa: F401  (fixture)
from tasks.dense.run import budget, train_rows

DENSE_TASKS = ("siim-seg", "rsna-seg", "siim-seg-upernet", "rsna-seg-upernet",
               "rsna-det", "object-cxr-det", "rsna-det-retinanet", "object-cxr-det-retinanet")


def test_dense_tasks_are_registered_with_their_metrics():
    for name in DENSE_TASKS:
        t = TASKS.get(name)
        assert t.requires == frozenset({Capability.IMAGE_DENSE}), name
        assert t.family in ("segmentation", "detection")
        assert t.main_metric == ("dice_dataset" if t.family == "segmentation" else "map_40_75")
        assert M.higher_is_better(t.main_metric)
        assert set(t.settings) == {"tiny", "paper"}
        for preset, s in t.settings.items():
            assert isinstance(s["image_size"], int) and s["finetune"] is False, (name, preset)
    assert TASKS.get("siim-seg").dataset == "siim" and TASKS.get("object-cxr-det").dataset == "object-cxr"
    # MGCA balances SIIM's training set (all positives, as many negatives); RSNA keeps every image
    assert TASKS.get("siim-seg").settings["paper"]["balance_negatives"] is True
    assert TASKS.get("rsna-seg").settings["paper"]["balance_negatives"] is False


def test_object_cxr_reads_its_small_objects_at_128_px_at_the_tiny_preset_only():
    for name in ("object-cxr-det", "object-cxr-det-retinanet"):
        t, rsna = TASKS.get(name), TASKS.get(name.replace("object-cxr", "rsna"))
        assert t.version == 2 and t.settings["tiny"]["image_size"] == 128 and rsna.settings["tiny"]["image_size"] == 64
        assert t.settings["paper"] == rsna.settings["paper"]                        # MGCA's 224 px protocol
        assert {k: v for k, v in t.settings["tiny"].items() if k != "image_size"} == \
               {k: v for k, v in rsna.settings["tiny"].items() if k != "image_size"}
        (budget,) = [d for d in t.anchor_differences if "tiny preset" in d]
        assert "at 128 px" in budget and any("read at 128 px" in d and "foreign objects" in d
                                             for d in t.anchor_differences)


def test_paper_presets_keep_the_anchor_protocols():
    unet, upernet = TASKS.get("siim-seg").settings["paper"], TASKS.get("siim-seg-upernet").settings["paper"]
    assert (unet["image_size"], unet["lr"], unet["weight_decay"], unet["max_epochs"], unet["patience"]) == (224, 5e-4, 0.05, 50, 10)
    assert (unet["focal_alpha"], unet["aug_scale"], unet["aug_rotate_deg"], unet["aug_p"]) == (10.0, 0.1, 10.0, 0.5)
    assert (upernet["image_size"], upernet["max_iters"], upernet["warmup_iters"], upernet["val_every"]) == (512, 20000, 1500, 2000)
    yolo = TASKS.get("rsna-det").settings["paper"]
    assert (yolo["image_size"], yolo["batch_size"], yolo["lr"], yolo["weight_decay"], yolo["max_epochs"]) == (224, 16, 5e-4, 1e-6, 50)
    assert (yolo["loss_xy_wh"], yolo["nms_iou"], yolo["mgca_conf"], yolo["aug_p"], yolo["width"]) == (2.5, 0.5, 0.5, 0.0, 1.0)


def test_every_dense_task_names_its_anchor_differences():
    for name in DENSE_TASKS:
        diffs = TASKS.get(name).anchor_differences
        assert len(diffs) >= 5 and len(set(diffs)) == len(diffs), name
        for d in diffs:
            anchor, sep, sentence = d.partition(": ")
            assert sep and anchor in ("MGCA", "BenchX") and sentence.endswith("."), (name, d)
        tiny = TASKS.get(name).settings["tiny"]
        (sentence,) = [d for d in diffs if "tiny preset" in d]
        assert f"{tiny['max_iters']:,} iterations" in sentence and f"{tiny['image_size']} px" in sentence, name


#: The real entries, taken before the engine fakes empty the registries for a test.
_ENTRIES = {name: TASKS.get(name) for name in DENSE_TASKS}


def test_a_method_without_dense_features_is_refused_before_any_work(world, monkeypatch):
    monkeypatch.setitem(TASKS._items, "rsna-det", _ENTRIES["rsna-det"])
    add_method(monkeypatch, world, name="global-only", caps=GLOBAL)
    with pytest.raises(CapabilityError, match="image_dense"):
        runner.run(RunSpec(method="global-only", task="rsna-det", fraction=0.01), device="cpu")
    assert world.factory_calls == [] and world.prepare_calls == []


def test_unknown_dense_setting_is_refused_with_the_valid_ones(world, monkeypatch):
    monkeypatch.setitem(TASKS._items, "siim-seg", _ENTRIES["siim-seg"])
    add_method(monkeypatch, world, name="dense", caps=frozenset({Capability.IMAGE_DENSE, Capability.IMAGE_GLOBAL}))
    with pytest.raises(BenchError, match="decoder_channels"):
        runner.run(RunSpec(method="dense", task="siim-seg", fraction=0.1, overrides=(("decoder_chanels", 8),)),
                   device="cpu")


def test_siim_trains_on_all_positives_and_as_many_negatives():
    data = make_toy(64, n_patients=80, dataset="siim", positive_rate=0.3)
    rows, info = train_rows(data, 1.0, True, split_seed=0)
    all_rows = data.manifest.rows("train", 1.0)
    positive = {int(r) for r in all_rows if data.table.masks[r] is not None}
    assert positive <= set(rows.tolist())
    assert info["positives"] == len(positive) and info["negatives_kept"] == min(len(positive), len(all_rows) - len(positive))
    assert len(rows) == info["positives"] + info["negatives_kept"]
    again, _ = train_rows(data, 1.0, True, split_seed=0)
    other, _ = train_rows(data, 1.0, True, split_seed=1)
    assert np.array_equal(rows, again) and not np.array_equal(rows, other)
    plain, info = train_rows(data, 1.0, False, split_seed=0)
    assert np.array_equal(plain, np.sort(all_rows)) and info == {}
    # nested like the fractions: 1% inside 10% inside 100%, negatives included
    by_fraction = {f: set(train_rows(data, f, True, split_seed=0)[0].tolist()) for f in (0.01, 0.1, 1.0)}
    assert by_fraction[0.01] <= by_fraction[0.1] <= by_fraction[1.0] == set(rows.tolist())
    assert len(by_fraction[0.1]) > len(by_fraction[0.01])


def test_budget_caps_epochs_by_iterations_and_validates_per_epoch_by_default():
    s = {"batch_size": 16, "max_epochs": 50, "max_iters": 0, "val_every": 0}
    assert budget(s, 1000) == (50 * 63, 63)                       # paper: 50 epochs, one validation each
    assert budget({**s, "max_iters": 600, "val_every": 100}, 1000) == (600, 100)
    assert budget({**s, "max_epochs": 2, "max_iters": 600, "val_every": 100}, 30) == (4, 4)
