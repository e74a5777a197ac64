"""``python -m bench perf seg|det``: training images/s of our wrapped encoder against mmdet's ResNet-18.

Three models, identical but for the backbone, train on the same synthetic batches through
mmengine's ``train_step`` (data preprocessor, forward, loss, backward, optimiser step: one Runner
iteration without data loading):

* ``ours: resnet18`` — a full-width timm ResNet-18 in our :class:`~tasks.dense.backbone.EncoderBackbone`
  (one-channel [0, 1] input, the encoder's own normalisation), the comparison that isolates what the
  wrapper costs;
* ``mmdet: ResNet-18`` — mmdet's ``ResNet(depth=18)`` on the usual three-channel input, frozen the
  same way (``frozen_stages=4``, ``norm_eval``);
* ``ours: tiny preset`` — the preset's half-width ResNet-18, what the tiny runs actually use.

Both frozen (the protocols' default). The detection model is the YOLOv3 of ``rsna-det``, the
segmentation model the U-Net of ``siim-seg``, at their tiny settings. Timed steps alternate
between the models one step at a time, so load from other processes on the machine hits them
alike; the reported rate is the batch over the median step time.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from tasks.common.seeding import generator


def _batch(kind: str, n: int, size: int, channels: int, seed: int) -> dict:
    from mmengine.structures import InstanceData, PixelData

    g = generator(seed, f"perf-{kind}")
    images = (torch.rand(n, channels, size, size, generator=g) * 255).to(torch.uint8)
    samples = []
    for i in range(n):
        meta = {"img_id": i, "img_shape": (size, size), "ori_shape": (size, size), "scale_factor": (1.0, 1.0),
                "pad_shape": (size, size)}
        if kind == "det":
            from mmdet.structures import DetDataSample

            s = DetDataSample(metainfo=meta)
            xy = torch.rand(2, 2, generator=g) * size * 0.6
            wh = 4 + torch.rand(2, 2, generator=g) * size * 0.3
            s.gt_instances = InstanceData(bboxes=torch.cat([xy, xy + wh], 1), labels=torch.zeros(2, dtype=torch.long))
            s.ignored_instances = InstanceData(bboxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
        else:
            from mmseg.structures import SegDataSample

            s = SegDataSample(metainfo=meta)
            m = torch.zeros(1, size, size, dtype=torch.long)
            y, x = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
            m[:, y:y + size // 4, x:x + size // 4] = 1
            s.gt_sem_seg = PixelData(data=m)
        samples.append(s)
    return {"inputs": list(images), "data_samples": samples}


def _mm_resnet18(kind: str, cfg: dict) -> dict:
    """``cfg`` with mmdet's ResNet-18 (three-channel input, mmdet's usual normalisation) as backbone."""
    out = dict(cfg)
    pre = dict(cfg["data_preprocessor"])
    pre.update(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=False)
    out["data_preprocessor"] = pre
    indices = (1, 2, 3) if kind == "det" else (0, 1, 2, 3)
    out["backbone"] = dict(type="mmdet.ResNet", depth=18, in_channels=3, out_indices=indices, frozen_stages=4,
                           norm_eval=True, style="pytorch", norm_cfg=dict(type="BN", requires_grad=False))
    return out


def perf_dense(what: str = "det", preset: str = "tiny", steps: int | None = None, warmup: int | None = None,
               batch_size: int | None = None, threads: int | None = None, seed: int = 0,
               repeats: int | None = None) -> dict[str, Any]:
    """Training images/s of the three models (see module notes) at ``preset``'s settings, on CPU."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, init_default_scope

    from bench.env import cpu_threads
    from methods.backbones import BackbonePreset, backbone_preset
    from methods.random_init import build_encoder
    from tasks.dense import backbone as _bb, heads as _h, preprocess as _p  # noqa: F401  (registration)
    from tasks.dense.engine import optim_wrapper
    from tasks.dense.models import detector_config, segmentor_config
    from tasks.dense.run import _require_openmmlab

    _require_openmmlab()
    if what not in ("det", "seg"):
        raise ValueError(f"perf_dense: what must be 'det' or 'seg', got {what!r}")
    if what == "det":
        from tasks.detection import YOLO_SETTINGS as TABLE
    else:
        from tasks.segmentation import UNET_SETTINGS as TABLE
    settings = dict(TABLE[preset])
    size, bs = int(settings["image_size"]), int(batch_size or settings["batch_size"])
    steps, warmup, rounds = int(steps or 10), int(warmup or 3), int(repeats or 3)
    threads = int(threads or cpu_threads())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    init_default_scope("mmdet" if what == "det" else "mmseg")
    device = torch.device("cpu")
    try:
        encoders = {"ours: resnet18": build_encoder(BackbonePreset("resnet18", 64, (1, 2, 3, 4)), seed),
                    "ours: tiny preset": build_encoder(backbone_preset(preset), seed)}
        models = {}
        for name, enc in encoders.items():
            if what == "det":
                cfg = detector_config("yolov3", enc, size, settings, aug_seed=0, frozen=True)
            else:
                cfg, _ = segmentor_config("unet", enc, size, settings, aug_seed=0, frozen=True)
            models[name] = cfg
        models["mmdet: ResNet-18"] = _mm_resnet18(what, models["ours: resnet18"])
        order = ["ours: resnet18", "mmdet: ResNet-18", "ours: tiny preset"]
        built, optims, batches = {}, {}, {}
        for name in order:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                built[name] = MODELS.build(models[name]).train()
            optims[name] = build_optim_wrapper(built[name], optim_wrapper(settings, device))
            batches[name] = _batch(what, bs, size, 1 if name.startswith("ours") else 3, seed)
        for name in order:
            for _ in range(warmup):
                built[name].train_step(batches[name], optims[name])
        # one step of each model in turn, many times: a load spike from another process hits one step of
        # every model, and the median step time discards it
        times: dict[str, list[float]] = {n: [] for n in order}
        for _ in range(rounds * steps):
            for name in order:
                t0 = time.perf_counter()
                built[name].train_step(batches[name], optims[name])
                times[name].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    rate = {n: bs / statistics.median(ts) for n, ts in times.items()}
    overhead = rate["mmdet: ResNet-18"] / rate["ours: resnet18"] - 1.0
    rows = [{"model": n, "train images/s": round(rate[n], 2),
             "vs mmdet ResNet-18": f"{rate[n] / rate['mmdet: ResNet-18']:.3f}x",
             "median step (s)": round(statistics.median(times[n]), 4),
             "quartiles (s)": " ".join(f"{q:.3f}" for q in statistics.quantiles(times[n], n=4))} for n in order]
    head = "YOLOv3 (rsna-det)" if what == "det" else "U-Net (siim-seg)"
    return {"task model": head, "preset": preset, "image size": size, "batch": bs, "timed steps per model": steps * rounds,
            "threads": threads, "device": "cpu",
            "wrapper overhead (time per image, ours resnet18 vs mmdet ResNet-18)": f"{overhead * 100:+.1f}%",
            "models": rows}
