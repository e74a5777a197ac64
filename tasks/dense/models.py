"""The detectors and segmentors of the dense tasks, as mmdet / mmseg configs around our backbone.

Each builder returns a plain config dict (the encoder object sits in it as the backbone's
``encoder``) and the head's name as results record it. Channel widths come from the backbone's
measured pyramid, so every method's encoder fits every head without per-method code.

Detection
---------
* ``yolov3`` (MGCA §5.3): mmdet's ``YOLOV3Neck`` + ``YOLOV3Head`` on the last three pyramid levels
  (C3-C5 of a ResNet; a shorter pyramid is extended by max pooling), COCO's anchors scaled by
  ``input / 416``, one class, xy and wh losses weighted 2.5, grid assigner with IoU 0.5 for both
  thresholds (MGCA's ignore threshold), NMS IoU 0.5. ``width`` scales the neck (1.0: MGCA's
  512/256/128 and 1024/512/256 channels).
* ``retinanet``: mmdet's ``RetinaNet`` (``FPN`` with two extra levels on the pyramid's last three
  levels, ``RetinaHead``, focal loss, IoU assigner 0.5/0.4), ``anchor_scale`` the octave base scale.

Segmentation
------------
* ``unet`` (MGCA §5.2): :class:`~tasks.dense.heads.UNetHead` on a multi-level pyramid,
  :class:`~tasks.dense.heads.SETRPUPHead` on a one-level pyramid (ViT), one output channel with a
  sigmoid at ``threshold``, MGCA's ``MixedLoss`` (focal + Dice, alpha 10).
* ``upernet`` (BenchX §2.3): mmseg's ``UPerHead`` (pool scales 1, 2, 3, 6) with an ``FCNHead``
  auxiliary on the third level (loss weight 0.4), two classes with softmax cross-entropy; a one-level
  pyramid first goes through mmseg's ``MultiLevelNeck`` (scales 4, 2, 1, 0.5) as BenchX's ViT config does.
"""
from __future__ import annotations

from typing import Any, Mapping

from mmengine.config import ConfigDict

from bench.api import Encoder
from bench.errors import BenchError
from tasks.dense.backbone import REGISTRY_NAME, probe_pyramid

#: COCO's YOLOv3 anchors (w, h) per level, coarsest first, for a 416 px input (MGCA rescales them).
YOLO_ANCHORS_416 = (((116, 90), (156, 198), (373, 326)), ((30, 61), (62, 45), (59, 119)), ((10, 13), (16, 30), (33, 23)))

DET_HEADS = ("yolov3", "retinanet")
SEG_HEADS = ("unet", "upernet")


def _backbone(encoder: Encoder, size: int, *, levels: tuple[int, ...] | None, extra: int, frozen: bool) -> dict:
    return dict(type=REGISTRY_NAME, encoder=encoder, input_size=size, levels=levels, extra_levels=extra,
                frozen=frozen)


def _last_levels(encoder: Encoder, size: int, k: int) -> tuple[tuple[int, ...], int, tuple[int, ...], tuple[int, ...]]:
    """(levels, extra levels, channels, strides) giving ``k`` levels: the pyramid's last ``k``, or all of it
    plus coarser max-pooled ones."""
    channels, strides, _ = probe_pyramid(encoder, size)
    n = len(channels)
    take = min(k, n)
    levels = tuple(range(n - take, n))
    extra = k - take
    ch = tuple(channels[i] for i in levels) + (channels[-1],) * extra
    st = tuple(strides[i] for i in levels) + tuple(strides[-1] * 2 ** (j + 1) for j in range(extra))
    return levels, extra, ch, st


def _preprocessor(kind: str, aug: Mapping[str, float] | None, aug_seed: int) -> dict:
    # images stay one channel in [0, 1]; the backbone applies the encoder's own normalisation
    common = dict(mean=[0.0], std=[255.0], bgr_to_rgb=False, aug=dict(aug) if aug else None, aug_seed=aug_seed)
    if kind == "det":
        return dict(type="AugmentedDetDataPreprocessor", pad_size_divisor=32, **common)
    return dict(type="AugmentedSegDataPreProcessor", size_divisor=32, pad_val=0, seg_pad_val=255, **common)


def detector_config(head: str, encoder: Encoder, size: int, s: Mapping[str, Any], *, aug_seed: int,
                    frozen: bool) -> ConfigDict:
    """mmdet config of detector ``head`` (one class) on ``encoder`` at input ``size``."""
    # mmdet and mmseg read train_cfg / test_cfg by attribute: a ConfigDict, the encoder object kept as is
    return ConfigDict(_detector_config(head, encoder, size, s, aug_seed=aug_seed, frozen=frozen))


def _detector_config(head: str, encoder: Encoder, size: int, s: Mapping[str, Any], *, aug_seed: int,
                     frozen: bool) -> dict:
    aug = _aug(s)
    pre = _preprocessor("det", aug, aug_seed)
    if head == "yolov3":
        levels, extra, ch, st = _last_levels(encoder, size, 3)
        w = float(s["width"])
        neck_out = [max(8, int(round(c * w))) for c in (512, 256, 128)]
        head_out = [max(8, int(round(c * w))) for c in (1024, 512, 256)]
        scale = size / 416.0
        anchors = [[(a * scale, b * scale) for a, b in level] for level in YOLO_ANCHORS_416]
        strides = list(reversed(st))
        return dict(
            type="YOLOV3", data_preprocessor=pre,
            backbone=_backbone(encoder, size, levels=levels, extra=extra, frozen=frozen),
            neck=dict(type="YOLOV3Neck", num_scales=3, in_channels=list(reversed(ch)), out_channels=neck_out),
            bbox_head=dict(
                type="YOLOV3Head", num_classes=1, in_channels=neck_out, out_channels=head_out,
                anchor_generator=dict(type="YOLOAnchorGenerator", base_sizes=anchors, strides=strides),
                bbox_coder=dict(type="YOLOBBoxCoder"), featmap_strides=strides,
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0, reduction="sum"),
                loss_conf=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0, reduction="sum"),
                loss_xy=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=float(s["loss_xy_wh"]),
                             reduction="sum"),
                loss_wh=dict(type="MSELoss", loss_weight=float(s["loss_xy_wh"]), reduction="sum")),
            train_cfg=dict(assigner=dict(type="GridAssigner", pos_iou_thr=float(s["ignore_iou"]),
                                         neg_iou_thr=float(s["ignore_iou"]), min_pos_iou=0)),
            test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=float(s["score_thr"]), conf_thr=0.005,
                          nms=dict(type="nms", iou_threshold=float(s["nms_iou"])), max_per_img=100))
    if head == "retinanet":
        levels, extra, ch, st = _last_levels(encoder, size, 3)
        width = max(16, int(round(256 * float(s["width"]))))
        return dict(
            type="RetinaNet", data_preprocessor=pre,
            backbone=_backbone(encoder, size, levels=levels, extra=extra, frozen=frozen),
            neck=dict(type="FPN", in_channels=list(ch), out_channels=width, start_level=0,
                      add_extra_convs="on_input", num_outs=5),
            bbox_head=dict(
                type="RetinaHead", num_classes=1, in_channels=width, stacked_convs=4, feat_channels=width,
                anchor_generator=dict(type="AnchorGenerator", octave_base_scale=float(s["anchor_scale"]),
                                      scales_per_octave=3, ratios=[0.5, 1.0, 2.0],
                                      strides=[st[0] * 2 ** k for k in range(5)]),
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
                loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
                loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
            train_cfg=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0,
                                         ignore_iof_thr=-1),
                           sampler=dict(type="PseudoSampler"), allowed_border=-1, pos_weight=-1, debug=False),
            test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=float(s["score_thr"]),
                          nms=dict(type="nms", iou_threshold=float(s["nms_iou"])), max_per_img=100))
    raise BenchError(f"unknown detection head {head!r} (heads: {', '.join(DET_HEADS)})")


def segmentor_config(head: str, encoder: Encoder, size: int, s: Mapping[str, Any], *, aug_seed: int,
                     frozen: bool) -> tuple[ConfigDict, str]:
    """mmseg config of segmentor ``head`` on ``encoder`` at input ``size``, and the head's name."""
    cfg, name = _segmentor_config(head, encoder, size, s, aug_seed=aug_seed, frozen=frozen)
    return ConfigDict(cfg), name


def _segmentor_config(head: str, encoder: Encoder, size: int, s: Mapping[str, Any], *, aug_seed: int,
                      frozen: bool) -> tuple[dict, str]:
    channels, strides, _ = probe_pyramid(encoder, size)
    n = len(channels)
    pre = _preprocessor("seg", _aug(s), aug_seed)
    norm = dict(type="BN", requires_grad=True)
    if head == "unet":
        loss = dict(type="MixedFocalDiceLoss", alpha=float(s["focal_alpha"]), gamma=2.0)
        common = dict(num_classes=2, out_channels=1, threshold=float(s["threshold"]), dropout_ratio=0.0,
                      norm_cfg=norm, align_corners=False, loss_decode=loss)
        if n > 1:
            decode = dict(type="UNetHead", in_channels=list(channels), in_index=list(range(n)), strides=strides,
                          decoder_channels=int(s["decoder_channels"]), **common)
            name = "unet"
        else:
            k = max(1, (strides[0] - 1).bit_length())          # x2 blocks from the level's stride to 1
            widths = tuple(max(16, int(s["decoder_channels"]) * 2 // 2 ** j) for j in range(k))
            decode = dict(type="SETRPUPHead", in_channels=channels[0], in_index=0, decoder_channels=widths, **common)
            name = "setr-pup"
        cfg = dict(type="EncoderDecoder", data_preprocessor=pre,
                   backbone=_backbone(encoder, size, levels=None, extra=0, frozen=frozen),
                   decode_head=decode, train_cfg=dict(), test_cfg=dict(mode="whole"))
        return cfg, name
    if head == "upernet":
        width = int(s["decoder_channels"])
        neck = None
        in_ch = list(channels)
        if n == 1:
            neck = dict(type="MultiLevelNeck", in_channels=[channels[0]], out_channels=channels[0],
                        scales=[4, 2, 1, 0.5])
            in_ch = [channels[0]] * 4
        levels = len(in_ch)
        cfg = dict(
            type="EncoderDecoder", data_preprocessor=pre,
            backbone=_backbone(encoder, size, levels=None, extra=0, frozen=frozen),
            decode_head=dict(type="UPerHead", in_channels=in_ch, in_index=list(range(levels)), pool_scales=(1, 2, 3, 6),
                             channels=width, dropout_ratio=0.1, num_classes=2, norm_cfg=norm, align_corners=False,
                             loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0, avg_non_ignore=True)),
            auxiliary_head=dict(type="FCNHead", in_channels=in_ch[min(2, levels - 1)], in_index=min(2, levels - 1),
                                channels=max(16, width // 2), num_convs=1, concat_input=False, dropout_ratio=0.1,
                                num_classes=2, norm_cfg=norm, align_corners=False,
                                loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4, avg_non_ignore=True)),
            train_cfg=dict(), test_cfg=dict(mode="whole"))
        if neck is not None:
            cfg["neck"] = neck
        return cfg, "upernet+fcn-aux" + ("+multilevel-neck" if neck is not None else "")
    raise BenchError(f"unknown segmentation head {head!r} (heads: {', '.join(SEG_HEADS)})")


def _aug(s: Mapping[str, Any]) -> dict | None:
    if float(s.get("aug_p", 0.0)) <= 0:
        return None
    return dict(scale=float(s["aug_scale"]), rotate_deg=float(s["aug_rotate_deg"]), shift=float(s.get("aug_shift", 0.0)),
                p=float(s["aug_p"]))
