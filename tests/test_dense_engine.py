"""The dense tasks on OpenMMLab: backbone wrapper, data conversion, training, resume, metrics vs mmseg.

Everything runs on the toy data of :mod:`dense_toy` with a random tiny encoder, a few iterations.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tasks  # noqa: F401  (registers the tasks)
from bench.api import TASKS, Capability, Encoder, Features, MethodCard, RunSpec
from bench.data.images import Geometry, letterbox_mask
from bench.errors import BenchError
from methods.backbones import backbone_preset
from methods.pixels import PixelEncoder
from methods.random_init import build_encoder
from dense_toy import make_toy

from mmengine.registry import MODELS, init_default_scope

from tasks.dense import backbone as B
from tasks.dense import engine
from tasks.dense import heads as _heads, preprocess as _pre  # noqa: F401  (registration)
from tasks.dense.data import DetectionSamples, SegmentationSamples
from tasks.dense.models import detector_config, segmentor_config

SIZE = 64
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVLP_BENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_encoder(seed: int = 0) -> Encoder:
    """The tiny preset's random ResNet with each block's last BatchNorm zeroed (timm's default init): a
    pixel-preserving pyramid on which a few dozen head steps find the toy's bright boxes. The
    ``random`` method's own init (torchvision's, every block active) needs far more steps."""
    from timm.models.resnet import BasicBlock

    enc = build_encoder(backbone_preset("tiny"), seed)
    for block in enc.model.modules():
        if isinstance(block, BasicBlock):
            nn.init.zeros_(block.bn2.weight)
    return enc


class OneLevelEncoder(Encoder):
    """A ViT-like encoder: one level at stride 16 (patch tokens as a map)."""

    def __init__(self, dim: int = 24, stride: int = 16, card_stride: int | None = None) -> None:
        super().__init__(MethodCard(name="vit-like", backbone="toy", weights_tag="toy", weights_sha256=None,
                                    image_size=SIZE, mean=(0.5,) * 3, std=(0.5,) * 3, embed_dim=dim,
                                    feature_channels=(dim,), feature_strides=(card_stride or stride,), patch_dim=dim,
                                    capabilities=frozenset({Capability.IMAGE_DENSE, Capability.TRAINABLE})))
        self.patch = nn.Conv2d(3, dim, stride, stride)

    def image_features(self, x):
        f = self.patch(x)
        return Features(pooled=f.mean((2, 3)), patches=f.flatten(2).transpose(1, 2), pyramid=[f])


# -- the backbone wrapper -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [64, 96, 128])
def test_wrapper_returns_the_strides_and_channels_the_card_declares(size):
    enc = tiny_encoder()
    bb = B.EncoderBackbone(enc, input_size=size)
    assert bb.out_channels == tuple(enc.card.feature_channels)
    assert bb.out_strides == tuple(enc.card.feature_strides)
    outs = bb(torch.rand(2, 1, size, size))
    assert tuple(o.shape[1] for o in outs) == tuple(enc.card.feature_channels)
    assert tuple(size // o.shape[-1] for o in outs) == tuple(enc.card.feature_strides)


def test_wrapper_levels_and_extra_levels_for_short_pyramids():
    bb = B.EncoderBackbone(OneLevelEncoder(), input_size=SIZE, extra_levels=2)
    outs = bb(torch.rand(1, 1, SIZE, SIZE))
    assert bb.out_strides == (16, 32, 64) and [o.shape[-1] for o in outs] == [4, 2, 1]
    bb = B.EncoderBackbone(tiny_encoder(), input_size=SIZE, levels=(-3, -2, -1))
    assert bb.out_strides == (8, 16, 32) and bb.out_channels == (64, 128, 256)


def test_a_card_that_disagrees_with_its_network_is_refused():
    with pytest.raises(BenchError, match="card declares"):
        B.EncoderBackbone(OneLevelEncoder(card_stride=8), input_size=SIZE)


def test_fixed_grid_encoder_gets_its_measured_stride():
    # pixels: 16 x 16 cells at any input size; the card's stride holds at its own size only
    enc = PixelEncoder(64)
    assert B.EncoderBackbone(enc, input_size=64).out_strides == (4,)
    assert B.EncoderBackbone(enc, input_size=128).out_strides == (8,)


def test_frozen_encoder_stays_put_and_fine_tuning_moves_it():
    for frozen in (True, False):
        enc = tiny_encoder()
        before = {k: v.clone() for k, v in enc.state_dict().items()}
        bb = B.EncoderBackbone(enc, input_size=SIZE, frozen=frozen).train()
        head = nn.Conv2d(256, 1, 1)
        opt = torch.optim.SGD([p for p in list(bb.parameters()) + list(head.parameters()) if p.requires_grad], lr=0.1)
        loss = head(bb(torch.rand(4, 1, SIZE, SIZE))[-1]).pow(2).mean()
        loss.backward()
        opt.step()
        bb.init_weights()                        # what mmengine calls before training: must not touch the encoder
        changed = [k for k, v in enc.state_dict().items() if not torch.equal(v, before[k])]
        if frozen:
            assert changed == [] and not enc.training      # weights and BatchNorm statistics untouched
        else:
            assert any(k.endswith("weight") for k in changed) and any("running_mean" in k for k in changed)


# -- data conversion ------------------------------------------------------------------------------------------

def test_samples_carry_boxes_and_masks_in_the_letterboxed_frame():
    data = make_toy(SIZE)
    rows = np.arange(len(data.table))[:12]
    det, seg = DetectionSamples(data, rows, SIZE), SegmentationSamples(data, rows, SIZE)
    for i, r in enumerate(rows):
        geom = Geometry.from_array(data.images.geometry[r])
        d = det[i]["data_samples"]
        assert torch.allclose(d.gt_instances.bboxes, torch.from_numpy(geom.boxes(data.table.boxes[r])))
        s = seg[i]["data_samples"]
        assert torch.equal(s.gt_sem_seg.data[0], torch.from_numpy(letterbox_mask(data.table.mask(r), SIZE)).long())
        h, w = int(data.table.frame["height"].iat[r]), int(data.table.frame["width"].iat[r])
        assert d.metainfo["content_box"] == geom.content_box(h, w)
        assert np.array_equal(det[i]["inputs"][0].numpy(), data.images.array[r])


def test_data_preprocessor_padding_keeps_boxes_and_pixels_in_place():
    init_default_scope("mmdet")
    data = make_toy(SIZE)
    samples = DetectionSamples(data, np.arange(4), SIZE)
    batch = [samples[i] for i in range(4)]
    # an input whose side is not a multiple of 32 is padded below and to the right only
    batch[0] = dict(batch[0], inputs=batch[0]["inputs"][:, :50, :45])
    pre = MODELS.build(dict(type="AugmentedDetDataPreprocessor", mean=[0.0], std=[255.0], bgr_to_rgb=False,
                            pad_size_divisor=32))
    boxes_before = [b["data_samples"].gt_instances.bboxes.clone() for b in batch]
    out = pre({"inputs": [b["inputs"] for b in batch], "data_samples": [b["data_samples"] for b in batch]}, True)
    assert tuple(out["inputs"].shape[-2:]) == (64, 64)
    assert torch.allclose(out["inputs"][0, 0, :50, :45] * 255, batch[0]["inputs"][0].float())
    assert out["inputs"][0, 0, 50:].abs().sum() == 0 and out["inputs"][0, 0, :, 45:].abs().sum() == 0
    for b, s in zip(boxes_before, out["data_samples"]):
        assert torch.equal(b, s.gt_instances.bboxes)


def test_segmentation_augmentation_moves_images_and_masks_together():
    init_default_scope("mmseg")
    data = make_toy(SIZE)
    rows = np.array([r for r in range(len(data.table)) if data.table.masks[r] is not None][:6])
    samples = SegmentationSamples(data, rows, SIZE)
    pre = MODELS.build(dict(type="AugmentedSegDataPreProcessor", mean=[0.0], std=[255.0], bgr_to_rgb=False,
                            size_divisor=32, pad_val=0, seg_pad_val=255,
                            aug=dict(scale=0.1, rotate_deg=10.0, shift=0.0, p=1.0), aug_seed=3))
    batch = [samples[i] for i in range(len(rows))]
    out = pre({"inputs": [b["inputs"] for b in batch], "data_samples": [b["data_samples"] for b in batch]}, True)
    assert int(pre.aug_step) == 1
    for img, s in zip(out["inputs"], out["data_samples"]):
        mask = s.gt_sem_seg.data[0].bool()
        bright = img[0] > 150 / 255
        # the toy's findings are the bright pixels: after the warp they still coincide with the mask
        agree = (bright == mask).float().mean()
        assert agree > 0.97


# -- models on every kind of pyramid ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_encoder, lambda: PixelEncoder(64), OneLevelEncoder], ids=["cnn", "pixels", "vit"])
def test_every_head_builds_and_runs_on_any_pyramid(make):
    enc = make()
    data = make_toy(SIZE)
    from tasks.detection import RETINA_SETTINGS, YOLO_SETTINGS
    from tasks.segmentation import UNET_SETTINGS, UPERNET_SETTINGS

    for scope, kind, head, table in (("mmdet", "det", "yolov3", YOLO_SETTINGS), ("mmdet", "det", "retinanet", RETINA_SETTINGS),
                                     ("mmseg", "seg", "unet", UNET_SETTINGS), ("mmseg", "seg", "upernet", UPERNET_SETTINGS)):
        init_default_scope(scope)
        s = dict(table["tiny"], image_size=SIZE)
        if kind == "det":
            cfg, name = detector_config(head, enc, SIZE, s, aug_seed=0, frozen=True), head
            samples = DetectionSamples(data, np.arange(3), SIZE)
        else:
            cfg, name = segmentor_config(head, enc, SIZE, s, aug_seed=0, frozen=True)
            samples = SegmentationSamples(data, np.arange(3), SIZE)
        model = MODELS.build(cfg)
        batch = {"inputs": [samples[i]["inputs"] for i in range(3)],
                 "data_samples": [samples[i]["data_samples"] for i in range(3)]}
        losses = model(**model.data_preprocessor(batch, True), mode="loss")
        total, _ = model.parse_losses(losses)
        assert torch.isfinite(total), (head, name)
        total.backward()
        if kind == "seg" and head == "unet":
            assert name == ("unet" if len(enc.card.feature_channels) > 1 else "setr-pup")


@pytest.mark.parametrize("name", sorted(__import__("bench.api", fromlist=["METHODS"]).METHODS.names()))
def test_every_registered_method_runs_the_rsna_det_model(name, tmp_path):
    """No method has dense-specific code: each registered method's tiny encoder (built the way a run
    builds it, untrained) becomes the frozen backbone of rsna-det's YOLOv3 and gives a finite loss."""
    from test_method_contract import build

    from tasks.detection import YOLO_SETTINGS

    enc = build(name, "tiny", 0, tmp_path)
    init_default_scope("mmdet")
    s = dict(YOLO_SETTINGS["tiny"], image_size=SIZE)
    model = MODELS.build(detector_config("yolov3", enc, SIZE, s, aug_seed=0, frozen=True))
    samples = DetectionSamples(make_toy(SIZE), np.arange(2), SIZE)
    batch = {"inputs": [samples[i]["inputs"] for i in range(2)], "data_samples": [samples[i]["data_samples"] for i in range(2)]}
    total, _ = model.parse_losses(model(**model.data_preprocessor(batch, True), mode="loss"))
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is None for p in enc.parameters())          # frozen: the encoder gets no gradient


# -- training through mmengine's Runner: determinism and resume -----------------------------------------------

def _toy_runner(work_dir, max_iters, *, resume=False, seed=0, patience=0):
    init_default_scope("mmseg")
    from tasks.dense.evaluate import SegmentationRecords
    from tasks.segmentation import UNET_SETTINGS

    data = make_toy(SIZE)
    s = dict(UNET_SETTINGS["tiny"], batch_size=4, eval_batch_size=16, patience=patience, image_size=SIZE)
    enc = tiny_encoder()
    cfg, _ = segmentor_config("unet", enc, SIZE, s, aug_seed=7, frozen=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = MODELS.build(cfg)
    val = SegmentationSamples(data, data.manifest.rows("val"), SIZE)
    history = engine.ValHistory()
    runner = engine.build_runner(
        model, scope="mmseg", work_dir=work_dir, train_set=SegmentationSamples(data, data.manifest.rows("train"), SIZE),
        val_set=val, test_set=val, val_metric=SegmentationRecords(), test_metric=SegmentationRecords(),
        select_key="seg/dice_dataset", settings=s, max_iters=max_iters, val_interval=2, seed=seed, shuffle_seed=5,
        device=CPU, resume=resume, extra_hooks=[history.hook()])
    runner.history = history
    return runner, model


def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    full, model_full = _toy_runner(tmp_path / "full", 6)
    full.train()
    part, _ = _toy_runner(tmp_path / "resumed", 4)
    part.train()
    assert engine.last_checkpoint(tmp_path / "resumed") is not None
    again, model_again = _toy_runner(tmp_path / "resumed", 6, resume=True)
    again.train()
    assert again.iter == 6
    a, b = model_full.state_dict(), model_again.state_dict()
    assert a.keys() == b.keys()
    assert int(b["data_preprocessor.aug_step"]) == 6
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    # the validation at the checkpoint's iteration (saved before it ran) is replayed, not skipped
    assert [r["iter"] for r in again.history.records] == [r["iter"] for r in full.history.records] == [2, 4, 6]
    assert again.history.records == full.history.records
    assert engine.best_checkpoint(again).name == engine.best_checkpoint(full).name
    # a run that starts over from scratch with another seed does not end there (the comparison can fail)
    other, model_other = _toy_runner(tmp_path / "other", 6, seed=1)
    other.train()
    assert any(not torch.equal(a[k], model_other.state_dict()[k]) for k in a if "decode_head" in k)


def test_patience_counts_any_gain_as_a_gain():
    from mmengine.hooks import EarlyStoppingHook  # noqa: F401  (registers the base)

    hook = engine.ResumablePatience(monitor="seg/dice", rule="greater", patience=2, min_delta=0.0, strict=False)

    class _Loop:
        stop_training = False

    class _Runner:
        train_loop = _Loop()
        logger = __import__("logging").getLogger("test")

    r = _Runner()
    for score in (0.30, 0.31, 0.32, 0.33, 0.34):        # small but steady gains: never stops
        hook.after_val_epoch(r, {"seg/dice": score})
    assert r.train_loop.stop_training is False
    for score in (0.33, 0.32):                          # two validations without a gain: stops
        hook.after_val_epoch(r, {"seg/dice": score})
    assert r.train_loop.stop_training is True


def test_the_runner_builds_patience_with_no_minimum_gain(tmp_path):
    runner, _ = _toy_runner(tmp_path / "p", 2, patience=3)
    (hook,) = [h for h in runner.hooks if isinstance(h, engine.ResumablePatience)]
    assert hook.min_delta == 0.0 and hook.patience == 3


def test_checkpoints_load_with_weights_only_through_the_allowlist(tmp_path):
    runner, _ = _toy_runner(tmp_path / "w", 2)
    runner.train()
    ckpt = engine.last_checkpoint(tmp_path / "w")
    torch.serialization.clear_safe_globals()
    try:
        with pytest.raises(Exception, match="weights_only|Unsupported global"):
            torch.load(ckpt, map_location="cpu", weights_only=True)
        engine.allow_mmengine_checkpoints()
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert "state_dict" in state and "message_hub" in state
    finally:
        engine.allow_mmengine_checkpoints()


# -- BenchX's mDice is mmseg's --------------------------------------------------------------------------------

def test_mdice_benchx_equals_mmseg_iou_metric():
    from mmseg.evaluation import IoUMetric

    from bench import metrics_dense as D

    rng = np.random.default_rng(4)
    pred = rng.random((6, 16, 16)) < 0.2
    truth = rng.random((6, 16, 16)) < 0.15
    truth[2] = False                                   # an image without a finding
    metric = IoUMetric(iou_metrics=["mDice"])
    metric.dataset_meta = {"classes": ("background", "finding")}
    metric.process({}, [{"pred_sem_seg": {"data": torch.from_numpy(p.astype(np.int64))[None]},
                         "gt_sem_seg": {"data": torch.from_numpy(t.astype(np.int64))[None]}} for p, t in zip(pred, truth)])
    mm = metric.compute_metrics(metric.results)["mDice"] / 100          # mmseg reports percent, 2 decimals
    ours = D.seg_metric("mdice_benchx", D.seg_counts(pred, truth))
    assert ours == pytest.approx(mm, abs=1e-4)
    assert ours > D.seg_metric("dice_dataset", D.seg_counts(pred, truth)) + 0.2   # the background lifts it


# -- whole runs ------------------------------------------------------------------------------------------------

def _spec(task: str, **overrides) -> RunSpec:
    base = {"image_size": SIZE, "max_iters": 30, "val_every": 10, "batch_size": 8, "eval_batch_size": 32, "n_boot": 50}
    base.update(overrides)
    return RunSpec(method="random", task=task, fraction=1.0, seed=0, overrides=tuple(base.items()))


def _run(task: str, enc=None, **overrides):
    entry = TASKS.get(task)
    return entry.run(enc or tiny_encoder(), make_toy(SIZE), _spec(task, **overrides), CPU)


def test_segmentation_run_learns_reports_labelled_metrics_and_repeats_exactly():
    out = _run("rsna-seg", max_iters=40, lr=3e-3)
    for key in ("dice_positive", "dice_dataset", "dice_mgca", "mdice_benchx"):
        assert key in out.metrics and key in out.ci
        lo, hi = out.ci[key]
        assert lo <= out.metrics[key] <= hi
    # the toy's findings are bright boxes: 40 steps of the head find them
    assert out.metrics["dice_positive"] > 0.5
    assert out.details["head"] == "unet" and out.details["encoder"] == "frozen"
    # every validation is kept (reloading the best weights must not roll the history back)
    assert [h["iter"] for h in out.details["val_history"]] == [10, 20, 30, 40]
    best = max(out.details["val_history"], key=lambda h: h["seg/dice_dataset"])
    assert out.details["best_checkpoint_iter"] == best["iter"]
    assert out.details["pyramid"]["strides"] == [4, 8, 16, 32]
    again = _run("rsna-seg", max_iters=40, lr=3e-3)
    assert again.metrics == out.metrics


def test_detection_run_reports_every_labelled_metric():
    out = _run("object-cxr-det", max_iters=20)
    for key in ("map_40_75", "map_40_75_mgca", "coco_map", "froc"):
        assert key in out.metrics
    assert 0.0 <= out.metrics["map_40_75"] <= 1.0 and out.metrics["coco_map"] <= out.metrics["map_40_75"] + 1e-9
    assert out.details["pyramid"]["strides"] == [8, 16, 32]
    assert len(out.predictions) == len(make_toy(SIZE).manifest.rows("test"))


def test_fine_tuning_needs_a_trainable_encoder():
    with pytest.raises(BenchError, match="cannot be fine-tuned"):
        _run("rsna-seg", enc=PixelEncoder(64), finetune=True)
