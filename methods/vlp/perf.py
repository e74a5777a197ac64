"""``python -m bench perf pretrain``: what one pretraining step of each vision-language method costs.

Three measurements, all in one call so that the ratios compare numbers taken on the same machine
at the same time (shared CPU machines are noisy):

* **Methods** (:func:`perf_pretrain`): for each method, the model at the preset, one batch of random
  images and tokenised synthetic captions (30-70 words, like real reports), ``warmup`` untimed and
  then ``steps`` timed AdamW steps (forward = ``model(images, tokens)``, the sum of the loss terms,
  backward, step). Reported: pairs/s, seconds per step and per pair, the cost per pair relative to
  a baseline method measured in the same call (``convirt``, the simplest objective, when it is in
  the list) and relative to the image tower alone (forward + backward of its pooled output on the
  same batch, no heads, no text). Every method runs in a fresh subprocess, so its peak memory is
  its own: on CPU the process's peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``), both the
  whole peak and its growth from just before the model is built (after imports and tokenizer
  training); on CUDA ``torch.cuda.max_memory_allocated``. FLOPs per step come from
  :class:`torch.utils.flop_counter.FlopCounterMode` over one extra step (matmuls, convolutions and
  attention; element-wise work is not counted); on CUDA they give the MFU against the GPU's dense
  bf16 peak.
* **CUDA** (when one is available and ``device`` allows it): the same at ``gpu_preset`` (default
  ``paper``) under bf16 autocast. Without a local BERT directory (``--set <method>.text_model_dir``
  / ``$MEDVLP_BERT_DIR``) the text tower is a randomly initialised BERT of Bio_ClinicalBERT's shape
  (hidden 768, 12 heads, vocabulary 28996; 6 layers for MGCA/ConVIRT, 12 for GLoRIA) fed by the
  synthetic WordPiece tokenizer; the cost of a step does not depend on the weights' values.
* **MGCA loss** (:func:`time_mgca_loss`): ``methods.mgca.objective`` forward + backward on random
  tensors with the paper's ViT-B shapes (batch 72, 196 patches, 111 word slots, 128-d, 500
  prototypes), median of ``repeats`` after one warm-up, on CPU and on CUDA when available.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

import torch

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("convirt", "gloria", "mgca", "place", "reclf", "sista")
BASELINE_METHOD = "convirt"
#: Bio_ClinicalBERT's vocabulary (its config.json), for the random-init stand-in at the paper preset.
CLINICAL_BERT_VOCAB = 28996
#: Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of ``torch.cuda.get_device_name``
#: (first match wins, so the longer names come first).
PEAK_BF16_FLOPS: tuple[tuple[str, float | None], ...] = (
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("V100", None),  # V100 has no bf16 tensor cores
)
_RESULT_MARK = "MEDVLP_PERF_RESULT "

# ---------------------------------------------------------------------------------------------
# Synthetic captions
# ---------------------------------------------------------------------------------------------

_OPENERS = ("there is", "there has been", "again seen is", "the radiograph demonstrates", "findings include",
            "compared to the prior study there is", "the frontal and lateral views show", "there may be")
_QUALIFIERS = ("no", "mild", "moderate", "severe", "small", "large", "new", "stable", "persistent", "unchanged",
               "subtle", "patchy", "bibasilar", "focal", "diffuse", "increased", "decreased", "minimal")
_FINDINGS = ("consolidation", "pleural effusion", "pneumothorax", "atelectasis", "pulmonary edema",
             "cardiomegaly", "opacity", "nodule", "interstitial infiltrate", "rib fracture", "pneumonia",
             "scarring", "calcification", "emphysema", "hyperinflation", "vascular congestion",
             "mediastinal widening", "hilar enlargement")
_LOCATIONS = ("in the right lower lobe", "at the left base", "in the right upper lobe", "at both lung bases",
              "in the lingula", "in the retrocardiac region", "along the right hemidiaphragm", "in the left apex",
              "in the perihilar region", "in the left mid lung", "at the costophrenic angles")
_STATEMENTS = ("the cardiomediastinal silhouette is within normal limits.", "heart size is normal.",
               "the lungs are otherwise clear.", "no acute osseous abnormality is seen.",
               "support lines and tubes are in standard position.", "the trachea is midline.",
               "the aorta is tortuous and calcified.", "degenerative changes of the thoracic spine are noted.",
               "an endotracheal tube terminates above the carina.", "no free air below the diaphragm.",
               "clinical correlation is recommended.", "findings were discussed with the referring physician.")


def synthetic_captions(n: int = 300, seed: int = 0, *, min_words: int = 30, max_words: int = 70) -> list[str]:
    """``n`` report-like captions of ``min_words``..``max_words`` words (deterministic for a seed): whole
    sentences until a random target length is reached, cut at ``max_words``."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        target = rng.randint(min_words, max_words)
        words: list[str] = []
        while len(words) < target:
            if rng.random() < 0.35:
                sentence = rng.choice(_STATEMENTS)
            else:
                sentence = (f"{rng.choice(_OPENERS)} {rng.choice(_QUALIFIERS)} {rng.choice(_FINDINGS)} "
                            f"{rng.choice(_LOCATIONS)}.")
            words.extend(sentence.split())
        text = " ".join(words[:max_words])
        out.append(text if text.endswith(".") else text + ".")
    return out


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by name, FLOP/s; ``None`` when it is not in the table."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _definition(name: str) -> Any:
    import importlib

    try:
        module = importlib.import_module(f"methods.{name}")
    except ModuleNotFoundError:
        module = None
    definition = getattr(module, "DEFINITION", None)
    from methods.vlp.method import VLPMethod

    if not isinstance(definition, VLPMethod):
        from bench.errors import BenchError

        raise BenchError(f"perf pretrain: {name!r} is not a vision-language method "
                         f"(expected one of {', '.join(DEFAULT_METHODS)})")
    return definition


def _build(name: str, preset: str, seed: int) -> tuple[Any, Any, str]:
    """(model, definition, text-tower note) for ``name`` at ``preset``."""
    import dataclasses

    from bench.api import resolve_options
    from bench.errors import CheckpointError
    from methods.vlp import text as T
    from methods.vlp.method import build_model, image_spec
    from methods.vlp.towers import ImageTower

    definition = _definition(name)
    opts = resolve_options(name, definition.all_options(), {})
    spec = definition.text_spec(preset, opts)
    captions = synthetic_captions(300, seed)
    if preset == "tiny":
        tokenizer = T.fast_tokenizer(T.train_wordpiece(captions, spec.vocab_size))
        return build_model(definition, preset, opts, tokenizer=tokenizer, seed=seed), definition, "tiny BERT"
    try:
        bert_dir = T.resolve_bert_dir(opts.get("text_model_dir"), name)
    except CheckpointError:
        bert_dir = None
    if bert_dir is not None:
        opts = {**opts, "text_model_dir": str(bert_dir)}
        model = build_model(definition, preset, opts, tokenizer=T.local_tokenizer(bert_dir), seed=seed)
        return model, definition, f"local BERT {bert_dir} ({spec.num_layers} layers)"
    # no local BERT: a randomly initialised one of Bio_ClinicalBERT's shape, fed by a synthetic WordPiece
    tokenizer = T.fast_tokenizer(T.train_wordpiece(captions, T.tiny_text_spec().vocab_size))
    spec = dataclasses.replace(spec, kind="random-init-bert", hidden=768, heads=12, intermediate=3072,
                               vocab_size=CLINICAL_BERT_VOCAB)
    bert = T.build_bert(spec, vocab_size=CLINICAL_BERT_VOCAB, seed=seed + 1)
    image = ImageTower(image_spec(preset, opts), seed=seed)
    text = T.TextTower(bert, tokenizer, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        model = definition.build(image, text, definition.recipe(preset, opts), opts)
    return model, definition, f"random-init BERT of the paper's shape ({spec.num_layers} layers, 768, 12 heads)"


def default_batch_size(preset: str) -> int:
    """tiny: 64 (every method's tiny recipe batch); paper: 72 (MGCA's per-GPU batch), the same for all."""
    return 64 if preset == "tiny" else 72


# ---------------------------------------------------------------------------------------------
# One method, in this process
# ---------------------------------------------------------------------------------------------

def measure_method(method: str, preset: str = "tiny", batch_size: int | None = None, steps: int = 3,
                   warmup: int = 1, device: str = "cpu", threads: int | None = None, *,
                   image_baseline: bool = False, count_flops: bool = True, seed: int = 0) -> dict[str, Any]:
    """Time ``steps`` optimiser steps of ``method`` in this process (see the module docstring).

    Peak memory is the process's: run it in a fresh process (as :func:`perf_pretrain` does) for a
    number that belongs to this method alone."""
    import resource

    from bench.env import autocast, cpu_threads, resolve_device

    dev = resolve_device(device)
    torch.set_num_threads(int(threads or cpu_threads()))
    bs = int(batch_size or default_batch_size(preset))
    torch.manual_seed(seed)
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, definition, text_note = _build(method, preset, seed)
    model.current_epoch = int(getattr(model, "freeze_epochs", 0)) + 1   # steady state: nothing frozen
    model.to(dev).train()
    size = model.image.spec.image_size
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(bs, 3, size, size, generator=g).to(dev)
    captions = synthetic_captions(max(bs, 1), seed + 7)
    tokens = model.text.tokenize(captions).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def step() -> dict[str, torch.Tensor]:
        opt.zero_grad(set_to_none=True)
        with autocast(dev):
            terms = model(images, tokens)
        loss = sum(terms.values())
        loss.backward()
        opt.step()
        return terms

    for _ in range(int(warmup)):
        step()
    _sync(dev)
    times = []
    for _ in range(max(1, int(steps))):
        t0 = time.perf_counter()
        terms = step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    seconds = sum(times)
    out: dict[str, Any] = {
        "method": method, "preset": preset, "device": str(dev), "batch_size": bs, "steps": len(times),
        "image": model.image.spec.describe(), "image_size": size, "text": text_note,
        "text_tokens": int(tokens.input_ids.shape[1]), "pairs_per_s": bs * len(times) / max(seconds, 1e-12),
        "s_per_step": seconds / len(times), "s_per_step_min": min(times), "s_per_pair": seconds / (bs * len(times)),
        "loss": float(sum(float(v.detach()) for v in terms.values())),
        "params_m": sum(p.numel() for p in params) / 1e6,
    }
    if dev.type == "cuda":
        out["peak_mem_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        out["peak_mem_kind"] = "torch.cuda.max_memory_allocated"
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
        out["peak_mem_mib"] = peak_kib / 1024
        out["peak_mem_growth_mib"] = (peak_kib - rss_before_kib) / 1024
        out["peak_mem_kind"] = "process peak RSS (ru_maxrss)"
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = float(counter.get_total_flops())
        out["gflop_per_step"] = flops / 1e9
        out["achieved_tflop_s"] = flops / out["s_per_step"] / 1e12
        if dev.type == "cuda":
            name = torch.cuda.get_device_name(dev)
            peak = peak_bf16_flops(name)
            out["gpu"] = name
            out["mfu"] = flops / out["s_per_step"] / peak if peak else None
            if not peak:
                out["mfu_note"] = f"no bf16 peak known for {name!r}"
    if image_baseline:
        out["image_tower_s_per_step"] = _time_image_tower(model.image, images, steps, warmup, dev)
    del opt, model
    return out


def _time_image_tower(tower: torch.nn.Module, images: torch.Tensor, steps: int, warmup: int,
                      dev: torch.device) -> float:
    """Seconds of one forward + backward of the image tower alone (pooled output), no optimiser step."""
    from bench.env import autocast

    def once() -> None:
        tower.zero_grad(set_to_none=True)
        with autocast(dev):
            out = tower(images)
        out.global_.float().square().mean().backward()

    for _ in range(int(warmup)):
        once()
    _sync(dev)
    times = []
    for _ in range(max(1, int(steps))):
        t0 = time.perf_counter()
        once()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def _child_main(payload: str) -> None:
    """Entry point of the subprocess: measure one method, print the result on a marked line."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    kwargs = json.loads(payload)
    result = measure_method(**kwargs)
    print(_RESULT_MARK + json.dumps(result), flush=True)


def _in_subprocess(kwargs: Mapping[str, Any], timeout_s: float = 3600.0) -> dict[str, Any]:
    from bench.paths import REPO_ROOT

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    code = "import sys; from methods.vlp.perf import _child_main; _child_main(sys.argv[1])"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(dict(kwargs))], cwd=str(REPO_ROOT), env=env,
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            out = json.loads(line[len(_RESULT_MARK):])
            out["process_wall_s"] = wall
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return {"method": kwargs["method"], "preset": kwargs["preset"], "device": kwargs["device"],
            "error": f"exit {proc.returncode}: " + " | ".join(tail)}


# ---------------------------------------------------------------------------------------------
# The MGCA loss alone
# ---------------------------------------------------------------------------------------------

def mgca_inputs(batch: int = 72, patches: int = 196, words: int = 111, dim: int = 128, prototypes: int = 500, *,
                min_words: int = 20, device: str | torch.device = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of ``methods.mgca.objective`` with realistic structure.

    Embeddings L2-normalised, words zero beyond each report's length (random in ``min_words``..``words``),
    word weights positive on real words and patch weights positive, each summing to 1 per sample,
    prototypes row-normalised. The embeddings and the prototypes require grad (leaves); the masks and
    weights do not (the model computes them without gradient)."""
    import torch.nn.functional as F

    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=g), dim=-1)

    lengths = torch.randint(min(min_words, words), words + 1, (batch,), generator=g)
    mask = torch.arange(words).unsqueeze(0) < lengths.unsqueeze(1)
    word_w = torch.rand(batch, words, generator=g) * mask
    word_w = word_w / word_w.sum(1, keepdim=True)
    patch_w = torch.softmax(torch.randn(batch, patches, generator=g), dim=1)
    leaves = {"img": unit(batch, dim), "txt": unit(batch, dim), "patches": unit(batch, patches, dim),
              "words": unit(batch, words, dim) * mask.unsqueeze(-1), "prototypes": unit(prototypes, dim)}
    out = {k: v.to(dev).requires_grad_(True) for k, v in leaves.items()}
    out.update(word_mask=mask.to(dev), word_w=word_w.to(dev), patch_w=patch_w.to(dev))
    return out


def time_mgca_loss(batch: int = 72, patches: int = 196, words: int = 111, dim: int = 128, prototypes: int = 500, *,
                   repeats: int = 5, warmup: int = 1, device: str | torch.device = "cpu", threads: int | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """Median seconds of one ``methods.mgca.objective`` forward + backward on :func:`mgca_inputs`
    (paper's ViT-B shapes by default); bf16 autocast on CUDA as in training."""
    from bench.env import cpu_threads, resolve_device

    dev = resolve_device(device)
    previous_threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(int(threads or cpu_threads()))
    try:
        return _time_mgca_loss(batch, patches, words, dim, prototypes, repeats, warmup, dev, seed)
    finally:
        torch.set_num_threads(previous_threads)


def _time_mgca_loss(batch: int, patches: int, words: int, dim: int, prototypes: int, repeats: int, warmup: int,
                    dev: torch.device, seed: int) -> dict[str, Any]:
    from bench.env import autocast
    from methods.mgca import objective

    x = mgca_inputs(batch, patches, words, dim, prototypes, device=dev, seed=seed)
    leaves = [x[k] for k in ("img", "txt", "patches", "words", "prototypes")]

    def once() -> tuple[float, float, dict[str, torch.Tensor]]:
        for t in leaves:
            t.grad = None
        _sync(dev)
        t0 = time.perf_counter()
        with autocast(dev):
            terms = objective(x["img"], x["txt"], x["patches"], x["words"], x["word_mask"], x["word_w"],
                              x["patch_w"], x["prototypes"])
        loss = sum(terms.values())
        _sync(dev)
        t1 = time.perf_counter()
        loss.backward()
        _sync(dev)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t0, terms

    for _ in range(int(warmup)):
        once()
    fwd, total = [], []
    for _ in range(max(1, int(repeats))):
        f, t, terms = once()
        fwd.append(f)
        total.append(t)
    grad_finite = all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in leaves)
    return {"device": str(dev), "batch": batch, "patches": patches, "words": words, "dim": dim,
            "prototypes": prototypes, "repeats": len(total), "seconds": statistics.median(total),
            "seconds_min": min(total), "forward_s": statistics.median(fwd),
            "loss": float(sum(float(v.detach()) for v in terms.values())),
            "terms": {k: float(v.detach()) for k, v in terms.items()}, "grads_finite": grad_finite,
            "threads": torch.get_num_threads() if dev.type == "cpu" else None}


# ---------------------------------------------------------------------------------------------
# Everything
# ---------------------------------------------------------------------------------------------

def _rows(results: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Table rows with the ratios against ``baseline`` and the image tower."""
    base = next((r for r in results if r.get("method") == baseline and "error" not in r), None)
    image_s = base.get("image_tower_s_per_step") if base else None
    rows = []
    for r in results:
        if "error" in r:
            rows.append({"method": r["method"], "error": r["error"]})
            continue
        row = {"method": r["method"], "batch": r["batch_size"], "pairs/s": round(r["pairs_per_s"], 1),
               "s/step": round(r["s_per_step"], 4),
               f"x {baseline}/pair": round(r["s_per_pair"] / base["s_per_pair"], 2) if base else None,
               "x image tower": round(r["s_per_step"] / image_s, 2) if image_s else None,
               "peak MiB": round(r["peak_mem_mib"], 1)}
        if "peak_mem_growth_mib" in r:
            row["peak growth MiB"] = round(r["peak_mem_growth_mib"], 1)
        if "gflop_per_step" in r:
            row["GFLOP/step"] = round(r["gflop_per_step"], 2)
            row["TFLOP/s"] = round(r["achieved_tflop_s"], 4 if r["device"] == "cpu" else 1)
        if r["device"].startswith("cuda"):
            row["MFU"] = round(r["mfu"], 4) if r.get("mfu") is not None else None
        row["params M"] = round(r["params_m"], 2)
        row["text"] = r["text"]
        rows.append(row)
    return rows


def _section(methods: Sequence[str], preset: str, batch_size: int | None, steps: int, warmup: int, device: str,
             threads: int | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    baseline = BASELINE_METHOD if BASELINE_METHOD in methods else methods[0]
    results = []
    for m in methods:
        log.info("perf pretrain: %s at %s on %s (fresh process)", m, preset, device)
        results.append(_in_subprocess(dict(method=m, preset=preset, batch_size=batch_size, steps=steps,
                                           warmup=warmup, device=device, threads=threads,
                                           image_baseline=(m == baseline))))
    return results, _rows(results, baseline), baseline


def _mgca_row(r: Mapping[str, Any]) -> dict[str, Any]:
    return {"device": r["device"], "shapes": f"B{r['batch']} N{r['patches']} W{r['words']} D{r['dim']} "
                                             f"K{r['prototypes']}",
            "fwd+bwd ms (median)": round(r["seconds"] * 1e3, 2), "fwd+bwd ms (min)": round(r["seconds_min"] * 1e3, 2),
            "fwd ms": round(r["forward_s"] * 1e3, 2), "repeats": r["repeats"], "loss": round(r["loss"], 4),
            "grads finite": r["grads_finite"]}


def perf_pretrain(methods: Sequence[str] | str = DEFAULT_METHODS, preset: str = "tiny", batch_size: int | None = None,
                  steps: int = 3, warmup: int = 1, device: str = "auto", threads: int | None = None, *,
                  gpu_preset: str = "paper", repeats: int = 5, mgca_batch: int = 72) -> dict[str, Any]:
    """Pretraining cost per method (pairs/s, s/step, peak memory, ratios to ``convirt`` and to the image
    tower), plus the MGCA loss alone at the paper's shapes.

    ``device``: ``cpu`` runs the methods at ``preset`` on CPU; ``cuda`` runs them at ``gpu_preset``
    (default ``paper``) on the GPU in bf16 with MFU; ``auto`` does the CPU part and, when a GPU is
    there, the CUDA part too. ``methods``: names or one comma-separated string. ``batch_size``:
    default 64 at tiny, 72 at paper (the same for every method, so per-pair costs compare).
    ``threads``: CPU intra-op threads (default ``MEDVLP_BENCH_THREADS`` or 2). ``repeats``, ``mgca_batch``:
    the MGCA loss microbenchmark."""
    from bench.env import cpu_threads
    from bench.errors import BenchError

    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(methods)
    if not methods:
        raise BenchError("perf pretrain: no methods given")
    for m in methods:
        _definition(m)                       # fail fast on a name that is not a VLP method
    if device not in ("auto", "cpu") and not str(device).startswith("cuda"):
        raise BenchError(f"perf pretrain: unknown device {device!r} (auto, cpu, cuda)")
    cuda = torch.cuda.is_available()
    if str(device).startswith("cuda") and not cuda:
        raise BenchError("perf pretrain: --device cuda but CUDA is not available here")
    run_cpu = device in ("auto", "cpu")
    run_cuda = str(device).startswith("cuda") or (device == "auto" and cuda)
    n_threads = int(threads or cpu_threads())
    out: dict[str, Any] = {"torch": torch.__version__, "threads": n_threads, "cuda": torch.cuda.get_device_name(0)
                           if cuda else None, "methods": ",".join(methods), "steps": int(steps), "warmup": int(warmup)}
    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out.update({"cpus": cpus, "load_avg_1m": round(load, 2) if load is not None else None})
    notes = []
    if load is not None and run_cpu and load > cpus - 0.5:
        notes.append(f"the CPU was busy before this run (1-min load {load:.1f} on {cpus} cores): multi-threaded "
                     f"timings inflate when cores are oversubscribed; compare ratios, or use --threads 1")
    if run_cpu:
        results, rows, baseline = _section(methods, preset, batch_size, steps, warmup, "cpu", n_threads)
        out.update({"cpu_preset": preset, "cpu_batch_size": int(batch_size or default_batch_size(preset))})
        out["cpu_methods"] = rows
        notes.append(_ratio_note(results, baseline, "CPU", preset))
    if run_cuda:
        dev = "cuda" if device == "auto" else str(device)
        results, rows, baseline = _section(methods, gpu_preset, batch_size, steps, warmup, dev, n_threads)
        out.update({"cuda_preset": gpu_preset, "cuda_batch_size": int(batch_size or default_batch_size(gpu_preset)),
                    "cuda_precision": "bf16 autocast"})
        out["cuda_methods"] = rows
        notes.append(_ratio_note(results, baseline, "CUDA", gpu_preset))
        if any("random-init BERT" in str(r.get("text", "")) for r in results):
            notes.append("CUDA text tower: random-init BERT of the paper's shape (no local BERT directory "
                         "configured; the step cost does not depend on the weights)")
    mgca = [time_mgca_loss(mgca_batch, repeats=repeats, device="cpu", threads=n_threads)]
    if run_cuda:
        mgca.append(time_mgca_loss(mgca_batch, repeats=repeats, device="cuda" if device == "auto" else device))
    out["mgca_loss"] = [_mgca_row(r) for r in mgca]
    out["notes"] = [n for n in notes if n] + [
        "each method runs in a fresh process: CPU peak = that process's peak RSS (ru_maxrss, includes Python, "
        "torch and the libraries); 'peak growth' = its rise from just before the model was built; "
        "CUDA peak = torch.cuda.max_memory_allocated",
        "x image tower: a step of the method / forward+backward of the image tower alone (pooled output) on "
        "the same batch; FLOPs: FlopCounterMode over one step (matmul/conv/attention only); MFU vs the dense "
        "bf16 peak of the GPU",
        "MGCA prototypes are trainable (steady state after the frozen first epoch)"]
    return out


def _ratio_note(results: list[dict[str, Any]], baseline: str, where: str, preset: str) -> str | None:
    base = next((r for r in results if r.get("method") == baseline and "error" not in r), None)
    if base is None:
        return f"{where}: the baseline {baseline} failed; no ratios"
    parts = [f"{r['method']} costs {r['s_per_pair'] / base['s_per_pair']:.2f}x {baseline} per pair"
             for r in results if "error" not in r and r["method"] != baseline]
    errors = [f"{r['method']} failed: {r['error']}" for r in results if "error" in r]
    img = base.get("image_tower_s_per_step")
    if img:
        parts.append(f"{baseline}'s step is {base['s_per_step'] / img:.2f}x the image tower's forward+backward")
    return f"{where} ({preset}, batch {base['batch_size']}): " + "; ".join(parts + errors)
