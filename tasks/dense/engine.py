"""Training a dense model with mmengine's Runner: loops, hooks, logging, checkpoints and resume.

:func:`build_runner` assembles a ``Runner`` from an already built model (the backbone holds a live
Encoder, which a config file cannot carry), our datasets, the optimiser and the schedule of a
task's settings. Validation runs every ``val_interval`` iterations; ``CheckpointHook`` keeps the
last checkpoint and the best one by the validation metric; :class:`ResumablePatience` stops after
``patience`` validations without improvement.

Resume under ``torch.load(weights_only=True)``: mmengine's checkpoints carry, besides tensors, its
message hub (``HistoryBuffer`` objects holding numpy arrays) and a few numpy scalars.
:func:`allow_mmengine_checkpoints` registers exactly those classes with
``torch.serialization.add_safe_globals``, and :class:`WeightsOnlyCheckpoints` stores the buffers in a
form that needs nothing more (mmengine's own pickles a ``getattr`` call); weights_only stays on, so a
checkpoint still cannot run code when it is read.
"""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from mmengine.evaluator import Evaluator
from mmengine.hooks import EarlyStoppingHook, Hook
from mmengine.logging import HistoryBuffer
from mmengine.registry import HOOKS
from mmengine.runner import Runner

log = logging.getLogger(__name__)


class CheckpointHistoryBuffer(HistoryBuffer):
    """A HistoryBuffer that pickles its numbers only.

    mmengine's ``HistoryBuffer.__getstate__`` adds the class's table of statistic functions, which
    pickle as ``getattr(HistoryBuffer, "min")``: reading that back would need ``getattr`` itself on
    the weights_only allowlist. The table is rebuilt on load anyway (``_set_default_statistics``),
    so checkpoints store buffers of this class, which leave it out.
    """

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "statistics_methods"}

    @classmethod
    def of(cls, buffer: HistoryBuffer) -> "CheckpointHistoryBuffer":
        out = cls.__new__(cls)
        out.__dict__.update({k: v for k, v in buffer.__dict__.items() if k != "statistics_methods"})
        return out


def safe_globals() -> list[Any]:
    """The non-tensor classes and functions a checkpoint of ours holds (numpy arrays and scalars in
    mmengine's message hub; its history buffers). Nothing that can call arbitrary code."""
    from numpy._core import multiarray

    dtypes = [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "int16", "int8",
                                          "uint8", "bool")]
    return [HistoryBuffer, CheckpointHistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct,
            multiarray.scalar, *dtypes]


def allow_mmengine_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read our mmengine checkpoints (idempotent)."""
    torch.serialization.add_safe_globals(safe_globals())


@HOOKS.register_module()
class WeightsOnlyCheckpoints(Hook):
    """Keeps every checkpoint readable under ``weights_only=True`` with :func:`safe_globals` alone."""

    priority = "VERY_LOW"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        scalars = (checkpoint.get("message_hub") or {}).get("log_scalars") or {}
        for key, value in list(scalars.items()):
            if isinstance(value, HistoryBuffer) and not isinstance(value, CheckpointHistoryBuffer):
                scalars[key] = CheckpointHistoryBuffer.of(value)


@HOOKS.register_module()
class ResumablePatience(EarlyStoppingHook):
    """mmengine's EarlyStoppingHook whose counters travel in the checkpoint, so a resumed run stops
    where an uninterrupted one would."""

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault("meta", {})["early_stopping"] = {
            "best_score": float(self.best_score), "wait_count": int(self.wait_count)}

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = (checkpoint.get("meta") or {}).get("early_stopping")
        if state:
            self.best_score, self.wait_count = float(state["best_score"]), int(state["wait_count"])


class ValHistory:
    """Validation metrics per check, kept by a hook whose records travel in the checkpoint."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []

    def hook(self) -> "_HistoryHook":
        return _HistoryHook(self)

    def best_iter(self, key: str) -> int | None:
        scored = [r for r in self.records if key in r]
        return int(max(scored, key=lambda r: r[key])["iter"]) if scored else None


class _HistoryHook(Hook):
    priority = "LOW"

    def __init__(self, history: ValHistory) -> None:
        self.history = history

    def before_train(self, runner) -> None:
        """Replay the validation a resumed run would otherwise skip. mmengine's CheckpointHook saves in
        ``after_train_iter``, before that iteration's validation, so a checkpoint is one validation
        behind (history, patience, best checkpoint); resuming starts after its iteration."""
        it, loop = int(runner.iter), runner.train_loop
        interval = int(getattr(loop, "val_interval", 0) or 0)
        if it > 0 and interval and it % interval == 0 and not any(r["iter"] == it for r in self.history.records):
            runner.val_loop.run()

    def after_val_epoch(self, runner, metrics=None) -> None:
        if metrics:
            self.history.records.append({"iter": int(runner.iter), **{k: float(v) for k, v in metrics.items()}})

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault("meta", {})["val_history"] = list(self.history.records)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self.history.records[:] = list((checkpoint.get("meta") or {}).get("val_history") or [])


def optim_wrapper(settings: dict, device: torch.device, encoder_lr_mult: float | None = None) -> dict:
    """AdamW with the settings' lr / weight decay; bf16 autocast on CUDA; encoder lr scaled when it trains."""
    wrapper: dict[str, Any] = dict(optimizer=dict(type="AdamW", lr=float(settings["lr"]),
                                                  weight_decay=float(settings["weight_decay"]), betas=(0.9, 0.999)))
    if device.type == "cuda":
        wrapper.update(type="AmpOptimWrapper", dtype="bfloat16")
    else:
        wrapper["type"] = "OptimWrapper"
    if float(settings.get("grad_clip", 0) or 0) > 0:
        wrapper["clip_grad"] = dict(max_norm=float(settings["grad_clip"]))
    if encoder_lr_mult is not None and encoder_lr_mult != 1.0:
        wrapper["paramwise_cfg"] = dict(custom_keys={"backbone.encoder": dict(lr_mult=float(encoder_lr_mult))})
    return wrapper


def schedule(settings: dict, max_iters: int) -> list[dict]:
    """Constant lr (MGCA), or BenchX's linear warmup then poly decay when ``warmup_iters`` is set."""
    warmup = int(settings.get("warmup_iters", 0) or 0)
    if not warmup and not settings.get("poly_decay"):
        return []
    out = []
    if warmup:
        out.append(dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=min(warmup, max_iters)))
    if settings.get("poly_decay"):
        out.append(dict(type="PolyLR", eta_min=0.0, power=1.0, begin=min(warmup, max_iters), end=max_iters,
                        by_epoch=False))
    return out


def _loader(dataset, batch_size: int, *, shuffle: bool, seed: int) -> dict:
    return dict(dataset=dataset, batch_size=int(batch_size), num_workers=0, persistent_workers=False,
                sampler=dict(type="DefaultSampler", shuffle=shuffle, seed=int(seed)),
                collate_fn=dict(type="pseudo_collate"))


def build_runner(model: torch.nn.Module, *, scope: str, work_dir: Path, train_set, val_set, test_set,
                 val_metric, test_metric, select_key: str, settings: dict, max_iters: int, val_interval: int,
                 seed: int, shuffle_seed: int, device: torch.device, resume: bool,
                 encoder_lr_mult: float | None = None, log_interval: int = 50,
                 extra_hooks: Sequence[dict] = ()) -> Runner:
    """A Runner that trains ``model`` for ``max_iters`` iterations, validating every ``val_interval``."""
    allow_mmengine_checkpoints()
    if device.type == "cpu" and torch.cuda.is_available():
        from bench.errors import BenchError

        raise BenchError("dense tasks run where mmengine puts the model, which is CUDA on this machine; "
                         "use --device auto or cuda (or hide the GPUs with CUDA_VISIBLE_DEVICES='')")
    patience = int(settings["patience"])
    # min_delta 0: mmengine's default (0.1) counts any gain under 0.1 of a 0-1 metric as no gain
    hooks = [dict(type="ResumablePatience", monitor=select_key, rule="greater", patience=patience,
                  min_delta=0.0, strict=False)] if patience > 0 else []
    hooks += [dict(type="WeightsOnlyCheckpoints")] + list(extra_hooks)
    eval_bs = int(settings["eval_batch_size"])
    return Runner(
        # mmengine keys its message hub, logger and scope by experiment name: one name per Runner, or
        # a second run in the same process inherits the first one's best score and log file
        model=model, work_dir=str(work_dir), experiment_name=f"dense-{uuid.uuid4().hex[:12]}",
        train_dataloader=_loader(train_set, int(settings["batch_size"]), shuffle=True, seed=shuffle_seed),
        val_dataloader=_loader(val_set, eval_bs, shuffle=False, seed=shuffle_seed),
        test_dataloader=_loader(test_set, eval_bs, shuffle=False, seed=shuffle_seed),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=int(max_iters), val_interval=int(val_interval)),
        val_cfg=dict(type="ValLoop"), test_cfg=dict(type="TestLoop"),
        val_evaluator=Evaluator([val_metric]), test_evaluator=Evaluator([test_metric]),
        optim_wrapper=optim_wrapper(settings, device, encoder_lr_mult),
        param_scheduler=schedule(settings, int(max_iters)) or None,
        default_hooks=dict(
            runtime_info=dict(type="RuntimeInfoHook"), timer=dict(type="IterTimerHook"),
            sampler_seed=dict(type="DistSamplerSeedHook"),
            logger=dict(type="LoggerHook", interval=int(log_interval), log_metric_by_epoch=False),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=int(val_interval), max_keep_ckpts=1,
                            save_last=True, save_best=select_key, rule="greater", save_optimizer=True,
                            save_param_scheduler=True)),
        custom_hooks=hooks,
        randomness=dict(seed=int(seed), deterministic=False),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl" if device.type == "cuda" else "gloo")),
        log_processor=dict(by_epoch=False, window_size=int(log_interval)),
        log_level=os.environ.get("MEDVLP_MM_LOG_LEVEL", "WARNING"),
        default_scope=scope, resume=resume, launcher="none")


def last_checkpoint(work_dir: Path) -> Path | None:
    """The checkpoint mmengine would resume from in ``work_dir`` (its ``last_checkpoint`` pointer)."""
    pointer = Path(work_dir) / "last_checkpoint"
    if not pointer.is_file():
        return None
    path = Path(pointer.read_text().strip())
    return path if path.is_file() else None


def best_checkpoint(runner: Runner) -> Path | None:
    best = runner.message_hub.get_info("best_ckpt")
    return Path(best) if best and Path(best).is_file() else None
