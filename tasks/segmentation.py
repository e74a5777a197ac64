"""Segmentation tasks: SIIM pneumothorax and RSNA pneumonia masks, on mmsegmentation.

* ``siim-seg``, ``rsna-seg``: MGCA's protocol (§5.2): the encoder frozen, a U-Net decoder on a
  multi-level pyramid (a SETR-style progressive-upsampling head on a one-level pyramid such as a
  ViT's), MGCA's focal + Dice loss (alpha 10), AdamW, the SIIM training set balanced (all positive
  images and as many negatives).
* ``siim-seg-upernet``, ``rsna-seg-upernet``: BenchX's (§2.3): UPerNet with an FCN auxiliary head,
  softmax cross-entropy, AdamW with linear warmup and poly decay.

Metrics, each labelled (:mod:`bench.metrics_dense`): ``dice_dataset`` (main: foreground Dice of the
whole test set), ``dice_positive`` (mean per-image foreground Dice over the test images that have a
finding), ``dice_mgca`` (MGCA's Dice, an empty prediction on an empty image scoring 1) and
``mdice_benchx`` (BenchX's mmseg mDice with the background class; a compatibility figure only), all
with 95% bootstrap CIs over patients. RSNA masks are the union of
the pneumonia boxes (MGCA, GLoRIA).
"""
from __future__ import annotations

from functools import partial
from typing import Any

from bench import metrics as M
from bench import metrics_dense  # noqa: F401  (registers the dense metric names)
from bench.api import TASKS, Capability, TaskEntry
from tasks.dense.run import DenseTask, run_dense

#: The headline is the dataset-level foreground Dice: it counts false positives on the (many) test images
#: without a finding, which the mean Dice over positive images cannot see, and it is what model
#: selection maximises on validation. The other three Dice figures are reported beside it, labelled.
MAIN_METRIC = "dice_dataset"
REQUIRES = frozenset({Capability.IMAGE_DENSE})

#: MGCA's protocol per preset. ``paper``: 224 px, batch 8 (RSNA 16 in MGCA's scripts), AdamW lr 5e-4,
#: weight decay 0.05, 50 epochs with patience 10 validations (one per epoch), decoder widths 256-16,
#: ShiftScaleRotate(scale 0.1, rotate 10, p 0.5). ``tiny``: a fixed budget of iterations on CPU at the
#: encoder's own 64 px, validated every ``val_every`` iterations (measured in the issue note).
UNET_SETTINGS: dict[str, dict[str, Any]] = {
    "paper": {
        "image_size": 224, "batch_size": 8, "eval_batch_size": 32, "lr": 5e-4, "weight_decay": 0.05,
        "max_epochs": 50, "max_iters": 0, "val_every": 0, "patience": 10, "grad_clip": 0.0,
        "warmup_iters": 0, "poly_decay": False,
        "decoder_channels": 256, "focal_alpha": 10.0, "threshold": 0.5,
        "aug_p": 0.5, "aug_scale": 0.1, "aug_rotate_deg": 10.0, "aug_shift": 0.0,
        "finetune": False, "encoder_lr_mult": 0.1, "n_boot": 1000,
    },
    "tiny": {
        "image_size": 64, "batch_size": 16, "eval_batch_size": 64, "lr": 3e-3, "weight_decay": 0.05,
        "max_epochs": 200, "max_iters": 1000, "val_every": 200, "patience": 3, "grad_clip": 0.0,
        "warmup_iters": 0, "poly_decay": False,
        "decoder_channels": 64, "focal_alpha": 10.0, "threshold": 0.5,
        "aug_p": 0.5, "aug_scale": 0.1, "aug_rotate_deg": 10.0, "aug_shift": 0.0,
        "finetune": False, "encoder_lr_mult": 1.0, "n_boot": 200,
    },
}

#: BenchX's protocol per preset. ``paper``: 512 px, batch 8, AdamW lr 1e-3 (RSNA 1e-4), weight decay
#: 0.05, 1,500 warmup iterations then poly decay to 20,000, validation every 2,000, UPerNet width 512.
UPERNET_SETTINGS: dict[str, dict[str, Any]] = {
    "paper": {
        "image_size": 512, "batch_size": 8, "eval_batch_size": 16, "lr": 1e-3, "weight_decay": 0.05,
        "max_epochs": 100000, "max_iters": 20000, "val_every": 2000, "patience": 0, "grad_clip": 0.0,
        "warmup_iters": 1500, "poly_decay": True, "decoder_channels": 512, "threshold": 0.5,
        "aug_p": 0.0, "aug_scale": 0.0, "aug_rotate_deg": 0.0, "aug_shift": 0.0,
        "finetune": False, "encoder_lr_mult": 0.1, "n_boot": 1000,
    },
    "tiny": {
        "image_size": 64, "batch_size": 16, "eval_batch_size": 64, "lr": 3e-3, "weight_decay": 0.05,
        "max_epochs": 200, "max_iters": 1000, "val_every": 200, "patience": 0, "grad_clip": 0.0,
        "warmup_iters": 50, "poly_decay": True, "decoder_channels": 64, "threshold": 0.5,
        "aug_p": 0.0, "aug_scale": 0.0, "aug_rotate_deg": 0.0, "aug_shift": 0.0,
        "finetune": False, "encoder_lr_mult": 1.0, "n_boot": 200,
    },
}

def _tiny_sentence(anchor: str, table: dict[str, dict[str, Any]], whose: str, width: tuple[str, str, str]) -> str:
    """The tiny preset's budget against the paper preset's, quoted from the settings themselves."""
    t, p = table["tiny"], table["paper"]
    label, key, suffix = width

    def budget(s: dict[str, Any]) -> str:
        length = f"{s['max_iters']:,} iterations" if s["max_iters"] else f"{s['max_epochs']} epochs"
        sched = (f", warmup {s['warmup_iters']:,} then poly decay" if s["warmup_iters"] else
                 ", poly decay" if s["poly_decay"] else ", constant")
        return (f"{length} of {s['batch_size']} images at {s['image_size']} px, lr {s['lr']:g}{sched}, "
                f"{label} {s[key]}{suffix}")

    return f"{anchor}: the tiny preset trains {budget(t)} (CPU minutes); the paper preset keeps {whose} {budget(p)}."


_COMMON = (
    "MGCA: validation and test sets are patient-level splits of our manifest (70/15/15, stratified), where MGCA "
    "splits SIIM by RLE row (one image can land in two splits) and RSNA by image.",
    "MGCA: label fractions are nested, patient-level subsets (1% inside 10% inside 100%), where MGCA draws each "
    "fraction with df.sample(frac, random_state=42).",
    "MGCA: images are letterboxed (aspect kept, black padding) and metrics count only the image's content, where "
    "MGCA resizes to 224 and scores the whole square.",
    "MGCA: Dice is reported three ways (positive images, dataset, MGCA's per-image with empty = 1, the last averaged "
    "per image rather than per batch); MGCA reports only the last.",
    "MGCA: several seeds with 95% bootstrap CIs over patients, where MGCA reports one run.",
)

UNET_DIFFERENCES = _COMMON + (
    "MGCA: the best checkpoint is chosen by validation dataset-level Dice (patience counted in validations), where "
    "MGCA early-stops and selects on validation loss.",
    "MGCA: the U-Net decoder starts at the pyramid's stride-4 level (no stride-2 stem skip, which our Encoder does "
    "not expose) and classifies with a 1x1 convolution, where smp's Unet has the stem skip and a 3x3 head.",
    "MGCA: the frozen encoder keeps its BatchNorm statistics (eval mode), as the frozen protocol intends; MGCA's "
    "frozen ResNet stays in train mode, so its BatchNorm statistics drift with the downstream data.",
    "MGCA: augmentation pads rotated or zoomed-out borders with black (the letterbox value), where albumentations' "
    "ShiftScaleRotate reflects the border.",
    _tiny_sentence("MGCA", UNET_SETTINGS, "MGCA's", ("decoder widths", "decoder_channels", "-16")),
)

UPERNET_DIFFERENCES = _COMMON[:2] + (
    "BenchX: BenchX segments at 100% data only; we also run 1% and 10%.",
    "BenchX: mDice (with background) is reported only as mdice_benchx; the main metric is the dataset-level "
    "foreground Dice.",
    "BenchX: the best checkpoint is chosen by validation dataset-level foreground Dice, where BenchX saves the best "
    "by mDice.",
    "BenchX: no random flip (a flip swaps the side of every lateralised finding), where BenchX flips.",
    "BenchX: images are letterboxed to the input size and scored on their content, where BenchX resizes keeping "
    "the ratio to 512 and scores at the original resolution.",
    _tiny_sentence("BenchX", UPERNET_SETTINGS, "BenchX's", ("UPerNet width", "decoder_channels", "")),
)

SIIM_DIFFERENCES = (
    "MGCA: SIIM's negatives for training are drawn once per split seed and fraction (as many as the positives), "
    "where MGCA draws them with seed 42.",
)


def _register() -> None:
    variants = (
        ("siim", "siim-seg", "unet", True, UNET_SETTINGS, UNET_DIFFERENCES + SIIM_DIFFERENCES,
         "SIIM pneumothorax segmentation (MGCA protocol: frozen encoder, U-Net / SETR head, focal + Dice)"),
        ("rsna", "rsna-seg", "unet", False, UNET_SETTINGS, UNET_DIFFERENCES,
         "RSNA pneumonia segmentation, masks from boxes (MGCA protocol: frozen encoder, U-Net / SETR head)"),
        ("siim", "siim-seg-upernet", "upernet", False, UPERNET_SETTINGS, UPERNET_DIFFERENCES,
         "SIIM pneumothorax segmentation (BenchX protocol: frozen encoder, UPerNet + FCN auxiliary)"),
        ("rsna", "rsna-seg-upernet", "upernet", False, UPERNET_SETTINGS, UPERNET_DIFFERENCES,
         "RSNA pneumonia segmentation (BenchX protocol: frozen encoder, UPerNet + FCN auxiliary)"),
    )
    for dataset, name, head, balance, table, differences, title in variants:
        task = DenseTask(kind="seg", head=head)
        table = {preset: {**s, "balance_negatives": balance} for preset, s in table.items()}
        TASKS.add(name, TaskEntry(
            name=name, family="segmentation", dataset=dataset, version=1, requires=REQUIRES,
            main_metric=MAIN_METRIC, higher_is_better=M.higher_is_better(MAIN_METRIC), protocols=(),
            run=partial(run_dense, task=task, settings_table=table, task_name=name),
            description=f"{title}; {MAIN_METRIC}",
            settings={k: dict(v) for k, v in table.items()}, anchor_differences=differences))


_register()
