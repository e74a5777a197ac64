"""Classification tasks on a hand-built toy PreparedData (bright square = finding).

The toy mimics ``bench.data.prepare.PreparedData``: a CanonicalTable, a manifest with
``rows(split, fraction)`` and ``sha256``, an image cache with a uint8 ``array`` and a
``fingerprint``, and a ``source`` dict. Patients have 1-3 images; splits are patient-level.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import tasks  # noqa: F401  (registers the tasks)
from bench.api import TASKS, Capability, RunSpec
from bench.data.label_lists import CHEXPERT_OBSERVATIONS, NIH_LABELS
from bench.data.labels import chexpert_labels
from bench.data.table import CanonicalTable, make_frame
from bench.errors import BenchError
from methods.backbones import BackbonePreset
from methods.random_init import build_encoder
from tasks.common.augment import augment
from tasks.common.schedule import warmup_cosine
from tasks.common.settings import resolve_settings
from tasks.fine_tune import FINE_TUNE_SETTINGS
from tasks.linear_probe import LINEAR_PROBE_SETTINGS

CPU = torch.device("cpu")
SIZE = 64  # toy images and encoder input (the tiny preset's resnet18, at 64 px to keep tests fast)


@pytest.fixture(autouse=True)
def feature_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVLP_BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP spin-waiting under contention
    makes multi-threaded CPU training many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- toy data ---------------------------------------------------------------------------------------

@dataclass
class ToyManifest:
    split: np.ndarray
    min_fraction: np.ndarray
    sha256: str

    def rows(self, split: str, fraction: float = 1.0) -> np.ndarray:
        sel = self.split == split
        if split == "train":
            sel &= self.min_fraction <= fraction + 1e-9
        return np.flatnonzero(sel).astype(np.int64)


@dataclass
class ToyImages:
    array: np.ndarray
    fingerprint: str


@dataclass
class ToyPrepared:
    table: CanonicalTable
    manifest: ToyManifest
    images: ToyImages
    source: dict = field(default_factory=dict)


def draw(rng: np.random.Generator, level: float) -> np.ndarray:
    img = rng.normal(60, 15, (SIZE, SIZE))
    if level:
        a, b = rng.integers(4, SIZE - 24, size=2)
        img[a:a + 20, b:b + 20] += level
    return np.clip(img, 0, 255).astype(np.uint8)


def make_toy(kind: str = "binary", n_patients: int = 100, seed: int = 0, salt: str = "",
             lateral_every: int = 0) -> ToyPrepared:
    """``kind``: binary (rsna), multiclass (covidx), nih (14 labels), chexpert (14 raw-coded
    observations; the square is 'Pleural Effusion')."""
    rng = np.random.default_rng(seed)
    rows, labels, imgs, split, minf = [], [], [], [], []
    pattern = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    for p in range(n_patients):
        sp = pattern[p % 10]
        frac = 0.1 if p % 3 == 0 else 1.0
        for k in range(int(rng.integers(1, 4))):
            view = "LATERAL" if lateral_every and (len(rows) % lateral_every == lateral_every - 1) else "PA"
            if kind == "multiclass":
                cls = int(rng.integers(0, 3))
                imgs.append(draw(rng, (0.0, 90.0, 180.0)[cls]))
                labels.append(np.eye(3, dtype=np.float32)[cls])
            else:
                pos = bool(rng.random() < 0.4)
                imgs.append(draw(rng, 150.0 if pos else 0.0))
                if kind == "binary":
                    labels.append(np.array([float(pos)], np.float32))
                elif kind == "nih":
                    lab = np.zeros(14, np.float32)
                    lab[NIH_LABELS.index("Effusion")] = float(pos)
                    lab[NIH_LABELS.index("Mass")] = float(rng.random() < 0.2)
                    labels.append(lab)
                else:  # chexpert raw codes: blanks and uncertain labels included
                    lab = rng.choice(np.array([np.nan, 0.0, -1.0], np.float32), size=14)
                    lab[CHEXPERT_OBSERVATIONS.index("Pleural Effusion")] = 1.0 if pos else np.nan
                    labels.append(lab)
            rows.append({"image_id": f"p{p:03d}_{k}", "image_path": f"/toy/p{p:03d}_{k}.png", "patient_id": f"p{p:03d}",
                         "view": view, "split": sp})
            split.append(sp)
            minf.append(frac if sp == "train" else np.nan)
    classes = {"binary": ("Pneumonia",), "multiclass": ("normal", "pneumonia", "COVID-19"), "nih": NIH_LABELS,
               "chexpert": CHEXPERT_OBSERVATIONS}[kind]
    dataset = {"binary": "rsna", "multiclass": "covidx", "nih": "nih", "chexpert": "chexpert"}[kind]
    table = CanonicalTable(dataset=dataset, root="/toy", frame=make_frame(rows), classes=classes,
                           labels=np.stack(labels).astype(np.float32))
    arr = np.stack(imgs)
    sha = hashlib.sha256(("|".join(split) + salt).encode()).hexdigest()
    return ToyPrepared(table, ToyManifest(np.array(split), np.array(minf), sha),
                       ToyImages(arr, hashlib.sha256(arr.tobytes()).hexdigest()),
                       {"manifest_sha256": sha, "kind": "synthetic", "dataset": dataset})


def encoder(seed: int = 0):
    return build_encoder(BackbonePreset("resnet18", SIZE, (1, 2, 3, 4)), seed)


def count_forwards(enc) -> list[int]:
    calls = [0]
    inner = enc.image_features

    def counted(x):
        calls[0] += x.shape[0]
        return inner(x)

    enc.image_features = counted  # instance attribute shadows the method
    return calls


def spec(task: str, **kw) -> RunSpec:
    # the input size is the protocol's setting: keep the toy's 64 px (as fast as before) unless a test asks
    kw["overrides"] = tuple({"image_size": SIZE, **dict(kw.get("overrides", ()))}.items())
    return RunSpec(method="random", task=task, **kw)


def assert_cis_bracket(out):
    assert out.ci, "no CIs reported"
    for name, (lo, hi) in out.ci.items():
        v = out.metrics[name]
        assert lo <= v + 1e-12 and v <= hi + 1e-12, (name, lo, v, hi)


# -- registration -----------------------------------------------------------------------------------

def test_task_entries():
    for ds, main in (("chexpert", "auroc_macro"), ("rsna", "auroc"), ("covidx", "accuracy"), ("nih", "auroc_macro")):
        lp, ft = TASKS.get(f"{ds}-cls"), TASKS.get(f"{ds}-ft")
        assert (lp.family, ft.family) == ("linear-probe", "fine-tune")
        assert lp.dataset == ft.dataset == ds and lp.main_metric == ft.main_metric == main
        assert lp.requires == {Capability.IMAGE_GLOBAL}
        assert ft.requires == {Capability.IMAGE_GLOBAL, Capability.TRAINABLE}
        assert lp.protocols[0] == "cached" and "augmented" in lp.protocols
        assert lp.version >= 1 and ft.version >= 1 and lp.higher_is_better
        assert set(lp.settings) == set(ft.settings) == {"tiny", "paper"}
    paper = TASKS.get("rsna-cls").settings["paper"]     # MGCA §5.1
    assert (paper["lr"], paper["weight_decay"], paper["batch_size"], paper["max_epochs"], paper["patience"]) == \
        (5e-4, 1e-6, 48, 50, 10)
    assert TASKS.get("rsna-ft").settings["paper"]["encoder_lr_mult"] == 0.1
    assert TASKS.get("rsna-ft").settings["paper"]["aug_hflip"] is False


def test_overrides_are_coerced_and_checked():
    s = resolve_settings(LINEAR_PROBE_SETTINGS["tiny"], (("lr", "0.5"), ("max_epochs", 3.0), ("aug_hflip", "false")))
    assert s["lr"] == 0.5 and s["max_epochs"] == 3 and isinstance(s["max_epochs"], int) and s["aug_hflip"] is False
    with pytest.raises(BenchError, match="unknown setting"):
        resolve_settings(LINEAR_PROBE_SETTINGS["tiny"], (("lrr", 1),))
    with pytest.raises(BenchError, match="expected a int"):
        resolve_settings(LINEAR_PROBE_SETTINGS["tiny"], (("max_epochs", 2.5),))


def test_warmup_cosine_is_clamped_after_its_end():
    f = [warmup_cosine(s, warmup=10, total=100, min_ratio=0.01) for s in range(300)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b - 1e-12 for a, b in zip(f[9:100], f[10:101]))      # monotone decay
    assert f[100] == pytest.approx(0.01) and all(v == pytest.approx(0.01) for v in f[100:])  # never rises again


# -- linear probe -----------------------------------------------------------------------------------

def test_linear_probe_learns_with_cis_details_and_predictions():
    data = make_toy("binary")
    out = TASKS.get("rsna-cls").run(encoder(), data, spec("rsna-cls"), CPU)
    assert out.metrics["auroc"] > 0.8
    assert {"auroc", "f1", "accuracy"} <= set(out.metrics) and {"auroc", "f1", "accuracy"} <= set(out.ci)
    assert_cis_bracket(out)
    d = out.details
    test_rows = data.manifest.rows("test")
    assert d["sizes"]["test"]["images"] == len(test_rows) and d["sizes"]["train"]["images"] == len(data.manifest.rows("train"))
    assert 1 <= d["best_epoch"] <= d["epochs_run"] <= d["settings"]["max_epochs"]
    assert d["threshold_source"] == "validation" and set(d["thresholds"]) == {"f1", "accuracy"}
    assert d["bootstrap"]["unit"] == "patient" and d["bootstrap"]["n_boot"] == d["settings"]["n_boot"]
    assert d["protocol"] == "cached"
    preds = out.predictions
    assert [p["image_id"] for p in preds] == list(data.table.frame["image_id"].to_numpy()[test_rows])
    assert all(set(p) == {"image_id", "patient_id", "labels", "scores"} and len(p["scores"]) == 1 for p in preds)
    assert preds[0]["patient_id"] == preds[0]["image_id"].split("_")[0]


def test_feature_standardizer_uses_training_statistics_only():
    from tasks.linear_probe import FeatureStandardizer

    g = torch.Generator().manual_seed(0)
    x_train = torch.randn(500, 4, generator=g) * torch.tensor([0.01, 1.0, 100.0, 0.0]) + torch.tensor([5.0, -2.0, 0.0, 3.0])
    norm = FeatureStandardizer.fit(x_train)
    z = norm(x_train)
    assert torch.allclose(z[:, :3].mean(0), torch.zeros(3), atol=1e-4)
    var = x_train.double().var(0, unbiased=False)
    eps = 1e-5 * var.mean()                 # relative epsilon (~0.025 here): it shrinks the small dimensions
    assert torch.allclose(z[:, :3].std(0, unbiased=False).double(), (var[:3] / (var[:3] + eps)).sqrt(), atol=1e-4)
    assert z[:, 2].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    assert torch.allclose(FeatureStandardizer.fit(x_train * 1e3 - 7)(x_train * 1e3 - 7), z, atol=1e-4)  # scale-free
    assert torch.equal(z[:, 3], torch.zeros(500))          # a constant dimension maps to 0, not to inf/nan
    x_other = x_train + 1.0                                 # val/test are shifted with the *training* mean
    assert norm(x_other)[:, 1].mean().item() == pytest.approx(1.0 / (var[1] + eps).sqrt().item(), rel=1e-3)


def _scaled_pooled(enc, scale: float, shift: float):
    inner = enc.image_features

    def scaled(x):
        f = inner(x)
        f.pooled = f.pooled * scale + shift
        return f

    enc.image_features = scaled
    return enc


def test_standardized_probe_does_not_depend_on_feature_scale(tmp_path, monkeypatch):
    """The tiny preset standardizes: the same features at another scale and offset give the same
    probe (what standardization is for); the paper preset's raw head does not."""
    data = make_toy("binary", seed=1)
    out = {}
    for i, (scale, shift) in enumerate(((100.0, 0.0), (1e4, 50.0))):
        monkeypatch.setenv("MEDVLP_BENCH_CACHE", str(tmp_path / f"c{i}"))
        out[scale] = TASKS.get("rsna-cls").run(_scaled_pooled(encoder(), scale, shift), data, spec("rsna-cls"), CPU)
    assert out[100.0].details["settings"]["standardize"] is True
    assert out[100.0].details["best_epoch"] == out[1e4].details["best_epoch"]
    assert out[100.0].metrics["auroc"] == pytest.approx(out[1e4].metrics["auroc"], abs=2e-3)
    assert LINEAR_PROBE_SETTINGS["paper"]["standardize"] is False   # MGCA-exact at the paper preset


def test_threshold_comes_from_validation_not_test():
    data = make_toy("binary", seed=3)
    out = TASKS.get("rsna-cls").run(encoder(), data, spec("rsna-cls"), CPU)
    # recompute: the threshold chosen on the test scores themselves is generally different, and
    # the reported F1 is the one at the validation threshold
    from bench import metrics as M

    y = np.array([p["labels"][0] for p in out.predictions])
    s = np.array([p["scores"][0] for p in out.predictions])
    t_val = out.details["thresholds"]["f1"]
    assert out.metrics["f1"] == pytest.approx(M.f1_binary(y, s >= t_val), abs=1e-5)


def test_feature_cache_is_reused_and_invalidated_by_the_manifest():
    data = make_toy("binary")
    enc = encoder()
    calls = count_forwards(enc)
    first = TASKS.get("rsna-cls").run(enc, data, spec("rsna-cls", fraction=0.1), CPU)
    n_first = calls[0]
    assert n_first == len(data.manifest.rows("train", 0.1)) + len(data.manifest.rows("val")) + len(data.manifest.rows("test"))
    # same spec: no forward pass at all, same numbers
    again = TASKS.get("rsna-cls").run(enc, data, spec("rsna-cls", fraction=0.1), CPU)
    assert calls[0] == n_first and again.metrics == first.metrics
    assert again.details["feature_cache"]["extracted_rows"] == 0
    # 100% after 10%: only the rows not yet cached are extracted
    full = TASKS.get("rsna-cls").run(enc, data, spec("rsna-cls", fraction=1.0), CPU)
    new_rows = len(data.manifest.rows("train", 1.0)) - len(data.manifest.rows("train", 0.1))
    assert calls[0] - n_first == new_rows == full.details["feature_cache"]["extracted_rows"]
    # a different split manifest invalidates the cache
    moved = make_toy("binary", salt="other-manifest")
    before = calls[0]
    TASKS.get("rsna-cls").run(enc, moved, spec("rsna-cls", fraction=0.1), CPU)
    assert calls[0] - before == n_first
    # different weights (another seed) invalidate it too
    enc2 = encoder(seed=1)
    calls2 = count_forwards(enc2)
    TASKS.get("rsna-cls").run(enc2, data, spec("rsna-cls", fraction=0.1), CPU)
    assert calls2[0] == n_first


def test_augmented_protocol_reruns_the_backbone_each_epoch():
    data = make_toy("binary")
    enc = encoder()
    calls = count_forwards(enc)
    out = TASKS.get("rsna-cls").run(enc, data, spec("rsna-cls", protocol="augmented", overrides=(("max_epochs", 8),)), CPU)
    assert math.isfinite(out.metrics["auroc"]) and out.metrics["auroc"] > 0.6
    n_train = len(data.manifest.rows("train"))
    assert out.details["protocol"] == "augmented" and out.details["augmentation"]["aug_hflip"] is True
    assert calls[0] >= n_train * out.details["epochs_run"]   # one backbone pass per training image per epoch
    assert_cis_bracket(out)


def test_same_seed_same_metrics_and_different_seed_differs(tmp_path, monkeypatch):
    data = make_toy("binary")
    outs = []
    for i, seed in enumerate((4, 4, 5)):
        monkeypatch.setenv("MEDVLP_BENCH_CACHE", str(tmp_path / f"c{i}"))   # cold cache every time
        outs.append(TASKS.get("rsna-cls").run(encoder(seed), data, spec("rsna-cls", seed=seed), CPU))
    assert outs[0].metrics == outs[1].metrics and outs[0].ci == outs[1].ci
    assert outs[0].predictions == outs[1].predictions
    assert outs[0].predictions != outs[2].predictions


def test_multiclass_covidx():
    data = make_toy("multiclass")
    out = TASKS.get("covidx-cls").run(encoder(), data, spec("covidx-cls"), CPU)
    assert {"accuracy", "auroc_macro", "f1_macro", "auroc/COVID-19"} <= set(out.metrics)
    assert out.metrics["accuracy"] > 0.45 and out.metrics["auroc_macro"] > 0.65   # chance: 1/3 and 0.5
    assert_cis_bracket(out)
    p = out.predictions[0]
    assert len(p["scores"]) == 3 and sum(p["labels"]) == 1 and abs(sum(p["scores"]) - 1) < 1e-4


def test_nih_multilabel():
    data = make_toy("nih")
    out = TASKS.get("nih-cls").run(encoder(), data, spec("nih-cls"), CPU)
    per = [k for k in out.metrics if k.startswith("auroc/")]
    assert len(per) == 14
    # classes without positives are nan per class and left out of the macro mean
    assert math.isnan(out.metrics["auroc/Hernia"])
    defined = [out.metrics[k] for k in per if math.isfinite(out.metrics[k])]
    assert out.metrics["auroc_macro"] == pytest.approx(np.mean(defined))
    assert out.metrics["auroc/Effusion"] > 0.8


# -- CheXpert label policy and frontal filter -----------------------------------------------------

def test_chexpert_policy_on_hand_made_rows():
    from bench.data.loaders.chexpert import COMPETITION_TASKS

    nan = np.nan
    raw = np.full((4, len(CHEXPERT_OBSERVATIONS)), nan, dtype=np.float32)
    comp = [CHEXPERT_OBSERVATIONS.index(c) for c in COMPETITION_TASKS]
    # Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion
    raw[0, comp] = [-1, -1, -1, -1, -1]        # uncertain: U-ones (Atel, Edema, PE) / U-zeros (Cardio, Consol)
    raw[1, comp] = [nan, nan, nan, nan, nan]   # blank -> 0
    raw[2, comp] = [1, 0, 1, 0, 1]             # certain labels kept
    raw[3, comp] = [0, 1, -1, nan, 1]
    frame = make_frame([{"image_id": f"i{i}", "image_path": f"/x/i{i}.jpg", "patient_id": f"p{i}",
                         "view": v} for i, v in enumerate(("PA", "AP", "LATERAL", ""))])
    table = CanonicalTable(dataset="chexpert", root="/x", frame=frame, classes=CHEXPERT_OBSERVATIONS, labels=raw)
    space = chexpert_labels(table)
    assert space.classes == tuple(COMPETITION_TASKS) and space.kind == "multilabel"
    np.testing.assert_array_equal(space.targets, np.array([
        [1, 0, 0, 1, 1],
        [0, 0, 0, 0, 0],
        [1, 0, 1, 0, 1],
        [0, 1, 0, 0, 1],
    ], dtype=np.float32))
    # frontal only: the lateral row is dropped, a frontal row with unknown AP/PA is kept
    np.testing.assert_array_equal(space.keep, [True, True, False, True])


def test_chexpert_linear_probe_uses_frontal_images_only():
    data = make_toy("chexpert", lateral_every=4)
    views = data.table.frame["view"].to_numpy()
    assert (views == "LATERAL").sum() > 20
    out = TASKS.get("chexpert-cls").run(encoder(), data, spec("chexpert-cls"), CPU)
    frontal_test = [r for r in data.manifest.rows("test") if views[r] != "LATERAL"]
    assert out.details["sizes"]["test"]["images"] == len(frontal_test)
    ids = {p["image_id"] for p in out.predictions}
    lateral_ids = set(data.table.frame["image_id"].to_numpy()[views == "LATERAL"])
    assert ids and not ids & lateral_ids
    assert out.metrics["auroc/Pleural Effusion"] > 0.7
    assert "U-ones" in out.details["label_policy"]


# -- fine-tuning ------------------------------------------------------------------------------------

def test_fine_tune_updates_the_encoder_and_learns():
    data = make_toy("binary", n_patients=80)
    enc = encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    out = TASKS.get("rsna-ft").run(enc, data, spec("rsna-ft", overrides=(("max_epochs", 10),)), CPU)
    changed = [k for k, v in enc.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any(k.endswith("conv1.weight") for k in changed), "encoder weights did not change"
    assert out.metrics["auroc"] > 0.75
    d = out.details
    assert d["family"] == "fine-tune" and 1 <= d["best_epoch"] <= d["epochs_run"]
    assert d["augmentation"]["aug_hflip"] is False
    # encoder lr = encoder_lr_mult x head lr throughout (BenchX's 0.1 at the paper preset)
    mult = d["settings"]["encoder_lr_mult"]
    assert FINE_TUNE_SETTINGS["paper"]["encoder_lr_mult"] == 0.1
    for _, enc_lr, head_lr in d["lr_curve"]:
        assert enc_lr == pytest.approx(mult * head_lr)
    assert_cis_bracket(out)


def test_fine_tune_ends_with_its_clamped_schedule():
    data = make_toy("binary", n_patients=40)
    ov = (("schedule_steps", 3), ("warmup_steps", 1), ("max_epochs", 50), ("patience", 50))
    out = TASKS.get("rsna-ft").run(encoder(), data, spec("rsna-ft", overrides=ov), CPU)
    d = out.details
    assert d["stop_reason"] == "schedule_end" and d["steps"] == 3 and d["schedule_steps"] == 3
    assert d["epochs_run"] < 50


def test_fine_tune_is_deterministic_on_cpu():
    data = make_toy("binary", n_patients=40)
    ov = (("max_epochs", 1),)
    a = TASKS.get("rsna-ft").run(encoder(2), data, spec("rsna-ft", seed=2, overrides=ov), CPU)
    b = TASKS.get("rsna-ft").run(encoder(2), data, spec("rsna-ft", seed=2, overrides=ov), CPU)
    assert a.metrics == b.metrics and a.predictions == b.predictions


def test_augment_is_seeded_and_shape_preserving():
    x = torch.rand(4, 1, 32, 32)
    kw = dict(scale=(0.5, 1.0), rotate_deg=10.0, hflip=True)
    a = augment(x, torch.Generator().manual_seed(0), **kw)
    b = augment(x, torch.Generator().manual_seed(0), **kw)
    c = augment(x, torch.Generator().manual_seed(1), **kw)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    # identity parameters reproduce the input
    ident = augment(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), rotate_deg=0.0, hflip=False,
                      ratio=(1.0, 1.0))
    assert torch.allclose(ident, x, atol=1e-5)
