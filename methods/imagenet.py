"""Method ``imagenet``: the preset's backbone with ImageNet-1k weights from a **local file only**.

Where the weights come from, in order:

1. ``--checkpoint PATH`` (a timm or torchvision state dict, ``.pth``/``.bin``/``.safetensors``);
2. the environment variable ``MEDVLP_IMAGENET_WEIGHTS`` (a file, or a folder holding one);
3. an existing Hugging Face hub cache of the timm weights
   (``$HF_HUB_CACHE`` or ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``, folders
   ``models--timm--<arch>.<tag>/snapshots/*/model.safetensors``), read as plain files, never
   through the hub client, so ``HF_HUB_OFFLINE`` does not matter;
4. an existing torch hub cache (``$TORCH_HOME/hub/checkpoints`` or ``~/.cache/torch/hub/checkpoints``,
   files named ``<arch>-<hash>.pth`` (torchvision) or ``<arch>_<tag>-<hash>.pth`` (timm)).

Nothing is downloaded and a missing file is never replaced by a random initialisation: when no
candidate exists (or none loads with full key coverage), :class:`CheckpointError` names every
place looked and how to provide the weights.

Files the user named (``--checkpoint`` and ``$MEDVLP_IMAGENET_WEIGHTS``) are never skipped: one that
does not exist or fails strict loading is an error naming it, because falling through to a hub
cache would silently evaluate other weights than the ones asked for. Only hub-cache candidates,
which nobody chose, fall through to the next one.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bench.api import METHODS, Capability, MethodEntry
from bench.errors import CheckpointError
from methods.backbones import (IMAGENET_MEAN, IMAGENET_STD, TimmEncoder, backbone_preset, file_sha256,
                               load_checkpoint_strict, make_card, read_state_dict, seeded_backbone)

log = logging.getLogger(__name__)

NAME = "imagenet"
ENV_VAR = "MEDVLP_IMAGENET_WEIGHTS"
CAPABILITIES = frozenset({Capability.IMAGE_GLOBAL, Capability.IMAGE_DENSE, Capability.TRAINABLE})
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
#: Preferred timm pretrained tags per architecture (MGCA used torchvision's default ResNet-50
#: weights, IMAGENET1K_V2 = timm ``resnet50.tv2_in1k``); other cached tags follow in name order.
PREFERRED_TAGS = {"resnet50": ("tv2_in1k", "tv_in1k", "a1_in1k"), "resnet18": ("tv_in1k", "a1_in1k")}


@dataclass(frozen=True)
class Candidate:
    path: Path
    origin: str            # "--checkpoint", "$MEDVLP_IMAGENET_WEIGHTS", "hf-hub-cache", "torch-hub-cache"
    tag: str               # timm pretrained tag where known, else ""


#: Origins a user named explicitly; their failures are errors (module docstring).
USER_NAMED = ("--checkpoint", f"${ENV_VAR}")


def _home_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return _home_cache() / "huggingface" / "hub"


def torch_hub_checkpoints() -> Path:
    root = Path(os.environ["TORCH_HOME"]) if os.environ.get("TORCH_HOME") else _home_cache() / "torch"
    return root / "hub" / "checkpoints"


def _weights_in_dir(folder: Path, arch: str) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    named = [p for p in files if p.name.startswith(arch)]
    return named or files


def _hf_candidates(arch: str) -> list[Candidate]:
    root = hf_hub_cache()
    if not root.is_dir():
        return []
    found: list[tuple[int, str, Candidate]] = []
    prefs = PREFERRED_TAGS.get(arch, ())
    for repo in root.glob(f"models--timm--{arch}.*"):
        tag = repo.name[len(f"models--timm--{arch}."):]
        for snap in sorted((repo / "snapshots").glob("*")):
            for fname in ("model.safetensors", "pytorch_model.bin"):
                f = snap / fname
                if f.is_file():
                    rank = prefs.index(tag) if tag in prefs else len(prefs)
                    found.append((rank, f"{tag}/{snap.name}/{fname}", Candidate(f, "hf-hub-cache", f"{arch}.{tag}")))
    return [c for _, _, c in sorted(found, key=lambda t: (t[0], t[1]))]


def _torch_hub_candidates(arch: str) -> list[Candidate]:
    root = torch_hub_checkpoints()
    if not root.is_dir():
        return []
    # torchvision "<arch>-<hex>.pth", timm "<arch>_<tag>-<hex>.pth" (e.g. resnet50_a1_0-14fe96d1.pth);
    # "resnet50d-..." / "resnet50_gn..." are other architectures and fail the strict load if picked.
    pattern = re.compile(rf"^{re.escape(arch)}(-[0-9a-f]+|_a\d\w*-[0-9a-f]+|_ram-[0-9a-f]+)\.pth$")
    return [Candidate(p, "torch-hub-cache", "torchvision" if re.match(rf"^{re.escape(arch)}-", p.name) else "")
            for p in sorted(root.iterdir()) if pattern.match(p.name)]


def find_weights(arch: str, checkpoint: Path | str | None) -> tuple[list[Candidate], list[str]]:
    """Candidate files in priority order, and a line per place looked (for the error message)."""
    looked: list[str] = []
    cands: list[Candidate] = []
    if checkpoint is not None:
        p = Path(checkpoint).expanduser()
        if not p.is_file():
            raise CheckpointError(f"--checkpoint {p}: file not found (ImageNet weights for {arch} expected)")
        return [Candidate(p, "--checkpoint", "")], [f"--checkpoint: {p}"]
    looked.append("--checkpoint: not given")
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if p.is_file():
            cands.append(Candidate(p, f"${ENV_VAR}", ""))
        elif p.is_dir():
            cands += [Candidate(f, f"${ENV_VAR}", "") for f in _weights_in_dir(p, arch)]
        if not cands:
            what = (f"no weight file ({', '.join(WEIGHT_SUFFIXES)}) in this folder" if p.is_dir()
                    else "file not found")
            raise CheckpointError(f"${ENV_VAR}={p}: {what} (ImageNet weights for {arch} expected; "
                                  f"unset {ENV_VAR} to use a hub cache)")
        # a user-named source is the only one looked at: never fall through to a hub cache
        return cands, looked + [f"${ENV_VAR}={p}: found"]
    looked.append(f"${ENV_VAR}: not set")
    hf = _hf_candidates(arch)
    looked.append(f"Hugging Face hub cache: {hf_hub_cache()}/models--timm--{arch}.*/snapshots/*/"
                  f"{{model.safetensors,pytorch_model.bin}}: {len(hf)} found")
    th = _torch_hub_candidates(arch)
    looked.append(f"torch hub cache: {torch_hub_checkpoints()}/{arch}-<hash>.pth or {arch}_<tag>-<hash>.pth: "
                  f"{len(th)} found")
    return cands + hf + th, looked


def how_to_provide(arch: str) -> str:
    return (f"provide ImageNet weights for timm '{arch}' as a local file: pass --checkpoint PATH "
            f"(a timm or torchvision state dict, .pth or .safetensors), or set {ENV_VAR}=PATH; or, on a "
            f"machine with internet, run `python -c \"import timm; timm.create_model('{arch}."
            f"{PREFERRED_TAGS.get(arch, ('a1_in1k',))[0]}', pretrained=True)\"` and copy its Hugging Face "
            f"cache folder (models--timm--{arch}.*) into {hf_hub_cache()}. This harness never downloads.")


def factory(preset: str = "tiny", checkpoint: Path | str | None = None, seed: int = 0,
            data: str = "synth") -> TimmEncoder:
    """ImageNet-initialised backbone; ``seed`` only fixes the (overwritten) construction draw and
    ``data`` (the run's ``--data``) is not used: ImageNet weights do not depend on it."""
    p = backbone_preset(preset)
    cands, looked = find_weights(p.arch, checkpoint)
    if not cands:
        raise CheckpointError(f"method {NAME!r}: no ImageNet weights for {p.arch} found locally. Looked in:\n  - "
                              + "\n  - ".join(looked) + "\n" + how_to_provide(p.arch))
    failures: list[str] = []
    for cand in cands:
        model = seeded_backbone(p.arch, p.out_indices, seed)
        try:
            state = read_state_dict(cand.path)
            cov = load_checkpoint_strict(model, state, source=f"{cand.origin} {cand.path}")
        except CheckpointError as e:
            if cand.origin == "--checkpoint":
                raise
            if cand.origin in USER_NAMED:   # the user chose this file: an error, not a fall-through
                raise CheckpointError(f"{e}\n(file named by ${ENV_VAR}={os.environ.get(ENV_VAR)}: fix it or unset "
                                      f"{ENV_VAR}; a named file is never skipped for a hub cache)") from None
            log.warning("skipping %s: %s", cand.path, e)
            failures.append(f"{cand.path}: {e}")
            continue
        sha = file_sha256(cand.path)
        card = make_card(name=NAME, model=model, arch=p.arch, image_size=p.image_size, weights_tag="imagenet-1k",
                         weights_sha256=sha, mean=IMAGENET_MEAN, std=IMAGENET_STD, capabilities=CAPABILITIES,
                         pretrain_datasets=frozenset({"imagenet-1k"}),
                         reference=f"{cand.tag or 'ImageNet-1k weights'} from {cand.origin} ({cand.path.name})")
        enc = TimmEncoder(card, model)
        enc.checkpoint_coverage = cov.to_dict()  # type: ignore[attr-defined]  (provenance for results)
        enc.checkpoint_path = str(cand.path)     # type: ignore[attr-defined]
        log.info("imagenet: loaded %s (%s, sha256 %s...)", cand.path, cand.origin, sha[:12])
        return enc
    raise CheckpointError(f"method {NAME!r}: no usable ImageNet weights for {p.arch}; every candidate failed:\n  - "
                          + "\n  - ".join(failures) + "\nLooked in:\n  - " + "\n  - ".join(looked) + "\n"
                          + how_to_provide(p.arch))


METHODS.add(NAME, MethodEntry(
    name=NAME, factory=factory, capabilities=CAPABILITIES, needs_weights=True,
    description="ImageNet-1k weights from a local file (--checkpoint, $MEDVLP_IMAGENET_WEIGHTS, HF/torch hub "
                "cache); resnet18@128 (tiny) / resnet50@224 (paper); ImageNet mean/std"))
