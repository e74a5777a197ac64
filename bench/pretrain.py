"""The pretraining loop every trainable method shares (``supervised`` today; the vision-language
methods of later issues plug their objectives into the same loop).

A method gives a model, the parameter groups that learn, an ``objective(batch) -> {name: loss}``
(the sum of the terms is optimised; each term is logged) and a batch source
``batches(epoch) -> iterator of batches``. The loop owns everything else:

* AdamW with a linear-warmup cosine schedule (clamped at its end), gradient clipping, gradient
  accumulation, bf16 autocast on CUDA;
* one checkpoint per epoch, written atomically (``last.pt``: model, optimiser, scheduler, epoch,
  step, the global RNG state (dropout draws from it); readable with ``torch.load(weights_only=True)``),
  so ``resume=True`` continues from the last finished epoch. Batches are drawn from generators derived from ``(seed, epoch)``, never from
  the state of earlier epochs, so a resumed run ends with the same weights as an uninterrupted one
  on CPU;
* a loss log (``log.csv``: epoch, step, learning rate, every loss term, validation numbers) and a
  progress bar with the time left.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import logging
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from bench.env import autocast
from bench.errors import CheckpointError
from bench.progress import progress
from bench.results import atomic_write
from tasks.common.schedule import warmup_cosine
from tasks.common.seeding import generator  # noqa: F401  (re-exported: methods draw their batches with it)

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
LOG_NAME = "log.csv"

Batch = Any
Objective = Callable[[Batch], Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class PretrainConfig:
    """Optimisation settings of one pretraining run (recorded with its checkpoint)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    accumulate: int = 1                 # optimiser step every `accumulate` batches
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def folder_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``<path>.lock`` (beside a weights folder), so two processes asking for the
    same cached pretraining train it once: the second waits and then finds it finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A ``last.pt`` of this loop, read with ``weights_only=True`` (no pickled code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read pretraining checkpoint ({type(e).__name__}: {e})") from e
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "step", "config") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a pretraining checkpoint (missing {missing})")
    return state


@dataclass
class PretrainOutcome:
    epochs_run: int                     # epochs finished in total (including resumed ones)
    steps: int
    resumed_from_epoch: int             # 0 when started fresh
    history: list[dict[str, float]]     # one row per finished epoch
    seconds: float                      # wall time of this call


def _write_log(path: Path, history: list[dict[str, float]]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write(path, lambda fh: fh.write(buf.getvalue().encode()))


def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside ``torchrun``/DDP."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Join the process group ``torchrun`` describes (env ``WORLD_SIZE`` > 1); gloo on CPU, nccl on CUDA."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return True


def _all_mean(values: dict[str, float]) -> dict[str, float]:
    """Epoch means averaged over DDP ranks (each rank saw its own share of every batch)."""
    rank, world = dist_info()
    if world == 1 or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


class _TensorBoard:
    """Scalars to ``work_dir/tensorboard`` when the ``tensorboard`` package is installed (else a no-op, logged once)."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the CSV log has the same numbers
            log.warning("tensorboard is not installed: loss log in CSV only")
            return
        self.writer = SummaryWriter(log_dir=str(folder))

    def scalars(self, row: Mapping[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for k, v in row.items():
            if k not in ("epoch", "step") and isinstance(v, (int, float)):
                self.writer.add_scalar(k.replace("_", "/", 1) if k.startswith(("train_", "val_")) else k, v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def pretrain(model: nn.Module, param_groups: list[dict[str, Any]], objective: Objective,
             batches: Callable[[int], Iterable[Batch]], steps_per_epoch: int, config: PretrainConfig, *,
             work_dir: Path, device: torch.device, resume: bool = True, desc: str = "pretraining",
             evaluate: Callable[[], Mapping[str, float]] | None = None,
             frozen: Callable[[], Iterable[nn.Parameter]] | None = None,
             record: Mapping[str, Any] | None = None, tensorboard: bool = True,
             local: bool = False) -> PretrainOutcome:
    """Train ``model`` in place for ``config.epochs`` epochs; checkpoints and log in ``work_dir``.

    ``batches(epoch)`` yields the batches of epoch ``epoch`` (1-based; draw its randomness from
    :func:`generator` with ``(config.seed, f"...:{epoch}")``). ``evaluate()`` (optional) runs after
    each epoch in eval mode and its numbers join the log row. With ``resume`` and a readable
    ``work_dir/last.pt``, training continues after the checkpoint's epoch.

    Under DDP (``torchrun``; the caller wraps the model and shards the batches) only rank 0 writes
    the checkpoint and logs; logged losses are averaged over ranks. ``frozen()`` names parameters
    that must not move this epoch (their gradients are dropped before the step, as MGCA freezes its
    prototypes in the first epoch). ``record`` is stored in the checkpoint (e.g. the DDP contrast
    choice); a resume with a different record is refused like one with different settings.
    ``local=True`` trains in this process alone even inside a DDP job (no rank checks, no barriers):
    for a preliminary model one rank trains while the others wait for its cached result.
    """
    rank, world = (0, 1) if local else dist_info()
    record = dict(record or {})
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    opt = torch.optim.AdamW(param_groups, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = max(1, math.ceil(steps_per_epoch / config.accumulate) * config.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(
        warmup_cosine, warmup=config.warmup_steps, total=total_steps, min_ratio=config.min_lr_ratio))
    params = [p for g in opt.param_groups for p in g["params"]]
    history: list[dict[str, float]] = []
    start_epoch, step, resumed = 1, 0, 0
    ckpt = work_dir / CHECKPOINT_NAME
    if resume and ckpt.is_file():
        state = read_checkpoint(ckpt)
        if state["config"] != config.to_dict() or dict(state.get("record") or {}) != record:
            raise CheckpointError(f"{ckpt}: written with other settings ({state['config']}); "
                                  f"remove {work_dir} or pass the same settings ({config.to_dict()})")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, step, resumed = int(state["epoch"]) + 1, int(state["step"]), int(state["epoch"])
        history = [dict(r) for r in state.get("history", [])]
        if "rng_cpu" in state:   # dropout and other global-RNG draws continue as if never interrupted
            torch.set_rng_state(state["rng_cpu"])
            if torch.cuda.is_available() and state.get("rng_cuda"):
                torch.cuda.set_rng_state_all(list(state["rng_cuda"]))
        log.info("%s: resuming after epoch %d (step %d) from %s", desc, resumed, step, ckpt)
    board = _TensorBoard(work_dir / "tensorboard", tensorboard and rank == 0)
    t0 = time.perf_counter()
    for epoch in range(start_epoch, config.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        sums: dict[str, float] = {}
        n_batches = 0
        opt.zero_grad(set_to_none=True)
        for i, batch in enumerate(progress(batches(epoch), f"{desc} epoch {epoch}/{config.epochs}",
                                           total=steps_per_epoch, unit="batch")):
            with autocast(device):
                terms = dict(objective(batch))
            loss = sum(t.float() for t in terms.values())
            (loss / config.accumulate).backward()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            n_batches += 1
            if (i + 1) % config.accumulate == 0 or i + 1 == steps_per_epoch:
                for p in (frozen() if frozen is not None else ()):
                    p.grad = None
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
        row: dict[str, float] = {"epoch": epoch, "step": step, "lr": float(opt.param_groups[0]["lr"])}
        means = {f"train_{k}": v / max(n_batches, 1) for k, v in sums.items()}
        row.update(_all_mean(means) if world > 1 else means)
        if evaluate is not None:
            model.eval()
            with torch.no_grad():
                row.update({k: float(v) for k, v in evaluate().items()})
        row["seconds"] = round(time.perf_counter() - t_epoch, 3)
        history.append(row)
        if rank == 0:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "epoch": epoch, "step": step, "config": config.to_dict(), "history": history, "record": record,
                     "rng_cpu": torch.get_rng_state(),
                     "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
            atomic_write(ckpt, lambda fh: torch.save(state, fh))
            _write_log(work_dir / LOG_NAME, history)
            board.scalars(row, step)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        left = (config.epochs - epoch) * row["seconds"]
        log.info("%s epoch %d/%d: %s (about %.0f s left)", desc, epoch, config.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "step")), left)
    board.close()
    return PretrainOutcome(epochs_run=config.epochs, steps=step, resumed_from_epoch=resumed, history=history,
                           seconds=time.perf_counter() - t0)
