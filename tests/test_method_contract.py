"""Every registered method honours the Encoder contract; checkpoints load strictly or not at all."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import methods  # noqa: F401  (registers the methods)
from bench.api import METHODS, Capability, Encoder
from bench.errors import CheckpointError
from methods.backbones import IMAGENET_MEAN, IMAGENET_STD, file_sha256, load_checkpoint_strict, read_state_dict

PRESETS = ("tiny", "paper")
PRESET_ARCH = {"tiny": "resnet18", "paper": "resnet50"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: OpenMP spin-waiting makes 2 threads far slower on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path_factory, monkeypatch):
    """No test may see (or fill) the real hub caches of this machine."""
    home = tmp_path_factory.mktemp("home")
    for var in ("HF_HUB_CACHE", "HF_HOME", "TORCH_HOME", "MEDVLP_IMAGENET_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def timm_state_dict(arch: str, seed: int = 123) -> dict[str, torch.Tensor]:
    """A full timm classifier's state dict (with ``fc``), randomly initialised: stands in for the
    published ImageNet file, which tests may not download."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(arch, pretrained=False).state_dict()


_CKPT_CACHE: dict[str, dict[str, torch.Tensor]] = {}


def write_checkpoint(path: Path, arch: str) -> Path:
    state = _CKPT_CACHE.setdefault(arch, timm_state_dict(arch))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def build(name: str, preset: str, seed: int, tmp_path: Path) -> Encoder:
    """Build a registered method the way a run would; methods that need weights get a checkpoint
    file written in ``tmp_path`` (exercising the real loading path)."""
    entry = METHODS.get(name)
    if name == "imagenet":
        ckpt = write_checkpoint(tmp_path / f"imagenet-{PRESET_ARCH[preset]}.pth", PRESET_ARCH[preset])
        return entry.factory(preset, ckpt, seed)
    if name == "supervised":  # its weights are a file too (pretraining itself is tested elsewhere)
        from safetensors.torch import save_file

        model = METHODS.get("random").factory(preset, None, 99).model
        ckpt = tmp_path / f"supervised-{preset}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
        return entry.factory(preset, ckpt, seed)
    if entry.options and "image_arch" in entry.options:   # a vision-language method: a weights folder
        return entry.factory(preset, vlp_folder(name, preset, tmp_path), seed, options=vlp_options(preset, tmp_path))
    try:
        return entry.factory(preset, None, seed)
    except CheckpointError as e:  # a new method that needs weights must teach this test to make them
        pytest.fail(f"method {name!r} needs a checkpoint: add a builder for it in tests/test_method_contract.py ({e})")


def local_bert(tmp_path: Path) -> Path:
    """A small BERT saved the Hugging Face way, standing in for a local Bio_ClinicalBERT directory."""
    from transformers import BertConfig, BertModel

    from methods.vlp import text as T

    folder = tmp_path / "bert"
    if not (folder / "config.json").is_file():
        tok = T.fast_tokenizer(T.train_wordpiece(["no acute cardiopulmonary process", "mild edema"] * 3, 100))
        tok.save_pretrained(str(folder))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            BertModel(BertConfig(vocab_size=T.tokenizer_vocab_size(tok), hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=128)).save_pretrained(str(folder))
    return folder


def vlp_options(preset: str, tmp_path: Path) -> dict:
    return {"text_model_dir": str(local_bert(tmp_path))} if preset == "paper" else {}


def vlp_folder(name: str, preset: str, tmp_path: Path) -> Path:
    """A weights folder as `bench pretrain` writes it, with untrained weights (pretraining is tested elsewhere)."""
    import json

    from safetensors.torch import save_file

    from bench.api import resolve_options
    from methods.vlp import method as M
    from methods.vlp import text as T

    definition = getattr(__import__(f"methods.{name}", fromlist=["DEFINITION"]), "DEFINITION")
    opts = resolve_options(name, definition.all_options(), vlp_options(preset, tmp_path))
    if preset == "tiny":
        tok = T.fast_tokenizer(T.train_wordpiece(["no acute cardiopulmonary process", "mild edema"] * 3, 100))
    else:
        tok = T.local_tokenizer(local_bert(tmp_path))
    model = M.build_model(definition, preset, opts, tokenizer=tok)
    folder = tmp_path / f"{name}-{preset}"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / M.WEIGHTS_FILE))
    T.save_tokenizer(tok, folder)
    (folder / M.META_FILE).write_text(json.dumps({"options": opts}))
    return folder


def uint8_batch(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", METHODS.names())
def test_features_match_the_card(name, preset, tmp_path):
    enc = build(name, preset, 0, tmp_path).eval()
    card = enc.card
    assert card.name == name
    assert Capability.IMAGE_GLOBAL in card.capabilities
    assert card.capabilities == METHODS.get(name).capabilities   # registry and card agree
    s = card.image_size
    x = enc.prepare(uint8_batch(s))
    with torch.no_grad():
        f = enc.image_features(x)
    assert f.pooled.shape == (2, card.embed_dim) and f.pooled.dtype == torch.float32
    assert torch.isfinite(f.pooled).all()
    last_stride = card.feature_strides[-1]
    assert f.patches.shape == (2, (s // last_stride) ** 2, card.patch_dim) and f.patches.dtype == torch.float32
    assert len(f.pyramid) == len(card.feature_channels) == len(card.feature_strides)
    for level, c, stride in zip(f.pyramid, card.feature_channels, card.feature_strides):
        assert level.dtype == torch.float32
        assert tuple(level.shape) == (2, c, s // stride, s // stride)
    assert torch.equal(enc(x), f.pooled)   # forward = pooled vector
    if Capability.TRAINABLE in card.capabilities:
        assert len(enc.backbone_parameters()) > 0


@pytest.mark.parametrize("name", METHODS.names())
def test_prepare_shape_and_normalisation(name, tmp_path):
    enc = build(name, "tiny", 0, tmp_path)
    s = enc.card.image_size
    imgs = torch.zeros((3, 1, s, s), dtype=torch.uint8)
    imgs[1] = 255
    imgs[2] = 128
    x = enc.prepare(imgs)
    assert x.shape == (3, 3, s, s) and x.dtype == torch.float32
    mean = torch.tensor(enc.card.mean).view(3, 1, 1)
    std = torch.tensor(enc.card.std).view(3, 1, 1)
    assert torch.allclose(x[0], ((0 - mean) / std).expand(3, s, s))
    assert torch.allclose(x[1], ((1 - mean) / std).expand(3, s, s))
    assert torch.allclose(x[2], ((128 / 255 - mean) / std).expand(3, s, s), atol=1e-6)
    # float input in [0, 1] is accepted as is
    assert torch.allclose(enc.prepare(imgs.float() / 255), x, atol=1e-6)


def test_normalisation_conventions(tmp_path):
    assert build("random", "tiny", 0, tmp_path).card.mean == (0.5, 0.5, 0.5)
    assert build("random", "tiny", 0, tmp_path).card.std == (0.5, 0.5, 0.5)
    card = build("imagenet", "tiny", 0, tmp_path).card
    assert card.mean == IMAGENET_MEAN and card.std == IMAGENET_STD
    assert card.backbone == "resnet18" and card.image_size == 64   # full width: the tiny half-width net has no ImageNet weights
    assert build("random", "paper", 0, tmp_path).card.backbone == "resnet50"
    assert build("random", "paper", 0, tmp_path).card.image_size == 224


@pytest.mark.parametrize("name", METHODS.names())
def test_same_seed_same_outputs(name, tmp_path):
    a, b = build(name, "tiny", 5, tmp_path).eval(), build(name, "tiny", 5, tmp_path).eval()
    x = a.prepare(uint8_batch(a.card.image_size))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_random_seeds_differ_and_leave_the_global_rng_alone(tmp_path):
    torch.manual_seed(99)
    before = torch.random.get_rng_state()
    a = build("random", "tiny", 0, tmp_path).eval()
    b = build("random", "tiny", 1, tmp_path).eval()
    assert torch.equal(torch.random.get_rng_state(), before)
    x = a.prepare(uint8_batch(a.card.image_size))
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))
    assert a.card.weights_sha256 is None and a.card.weights_tag == "random-init"


def test_random_is_a_random_deep_network_not_an_identity_pyramid(tmp_path):
    # MGCA's "Random" is torchvision's init, every residual branch active; timm's default zeroes the
    # last BatchNorm of each block, leaving a 7x7 stem and strided 1x1 projections (an 11-px view)
    from timm.models.resnet import BasicBlock

    enc = build("random", "tiny", 0, tmp_path).eval()
    blocks = [m for m in enc.model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8 and all(bool((b.bn2.weight != 0).all()) for b in blocks)
    x = enc.prepare(uint8_batch(enc.card.image_size))
    far = x.clone()
    far[..., 24:32, 24:32] += 1.0                # 24+ px from the stride-32 cell at the origin
    with torch.no_grad():
        assert not torch.allclose(enc.model(x)[-1][..., 0, 0], enc.model(far)[-1][..., 0, 0])


def test_random_refuses_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="takes no checkpoint"):
        METHODS.get("random").factory("tiny", tmp_path / "x.pth", 0)


# -- imagenet: weights from local files only ------------------------------------------------------

def test_imagenet_is_marked_as_needing_weights():
    assert METHODS.get("imagenet").needs_weights
    assert not METHODS.get("random").needs_weights


def test_imagenet_without_weights_names_every_place_looked(isolated_caches):
    with pytest.raises(CheckpointError) as e:
        METHODS.get("imagenet").factory("tiny", None, 0)
    msg = str(e.value)
    hub = isolated_caches / ".cache" / "huggingface" / "hub"
    torch_hub = isolated_caches / ".cache" / "torch" / "hub" / "checkpoints"
    for needle in ("--checkpoint", "MEDVLP_IMAGENET_WEIGHTS", str(hub), "models--timm--resnet18",
                   str(torch_hub), "never downloads"):
        assert needle in msg, needle
    # no hidden download attempt left anything behind
    assert not hub.exists() and not torch_hub.exists()


def test_imagenet_missing_checkpoint_file_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="file not found"):
        METHODS.get("imagenet").factory("tiny", tmp_path / "nope.pth", 0)


def _reference_output(arch: str, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    ref = timm.create_model(arch, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
    ref.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    with torch.no_grad():
        return ref.eval()(x)[-1].mean(dim=(2, 3))


def test_imagenet_loads_exactly_the_file_weights(tmp_path):
    ckpt = write_checkpoint(tmp_path / "w.pth", "resnet18")
    enc = METHODS.get("imagenet").factory("tiny", ckpt, 0).eval()
    assert enc.card.weights_sha256 == file_sha256(ckpt)
    x = enc.prepare(uint8_batch(128))
    with torch.no_grad():
        assert torch.allclose(enc(x), _reference_output("resnet18", read_state_dict(ckpt), x), atol=1e-6)
    # the seed does not matter once weights are loaded
    other = METHODS.get("imagenet").factory("tiny", ckpt, 7).eval()
    with torch.no_grad():
        assert torch.equal(enc(x), other(x))


def test_imagenet_env_var(tmp_path, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "env" / "resnet18-weights.pth", "resnet18")
    monkeypatch.setenv("MEDVLP_IMAGENET_WEIGHTS", str(ckpt))
    assert METHODS.get("imagenet").factory("tiny", None, 0).card.weights_sha256 == file_sha256(ckpt)
    monkeypatch.setenv("MEDVLP_IMAGENET_WEIGHTS", str(ckpt.parent))  # a folder holding the file
    assert METHODS.get("imagenet").factory("tiny", None, 0).card.weights_sha256 == file_sha256(ckpt)


def test_imagenet_reads_an_existing_hf_hub_cache(isolated_caches):
    snap = isolated_caches / ".cache" / "huggingface" / "hub" / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc123"
    f = write_checkpoint(snap / "model.safetensors", "resnet18")
    enc = METHODS.get("imagenet").factory("tiny", None, 0)
    assert enc.card.weights_sha256 == file_sha256(f)
    assert "resnet18.a1_in1k" in enc.card.reference


def test_imagenet_reads_an_existing_torch_hub_cache(isolated_caches):
    f = write_checkpoint(isolated_caches / ".cache" / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth", "resnet18")
    # a different architecture with a similar name must not be picked
    write_checkpoint(isolated_caches / ".cache" / "torch" / "hub" / "checkpoints" / "resnet18d-0000aaaa.pth", "resnet18")
    enc = METHODS.get("imagenet").factory("tiny", None, 0)
    assert enc.card.weights_sha256 == file_sha256(f)


# -- strict loading -------------------------------------------------------------------------------

def _features_model(arch: str = "resnet18"):
    return timm.create_model(arch, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))


def test_missing_backbone_key_raises_with_coverage_report(tmp_path):
    state = dict(timm_state_dict("resnet18"))
    del state["layer3.1.conv2.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as e:
        METHODS.get("imagenet").factory("tiny", path, 0)
    msg = str(e.value)
    assert "layer3.1.conv2.weight" in msg and "missing backbone keys (1)" in msg
    assert "key coverage:" in msg


def test_wrong_prefix_raises_and_explicit_prefix_loads():
    state = {f"backbone.{k}": v for k, v in timm_state_dict("resnet18").items()}
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_strict(_features_model(), state)
    msg = str(e.value)
    assert "key coverage: 0/" in msg and "unexpected checkpoint keys" in msg and "backbone.conv1.weight" in msg
    cov = load_checkpoint_strict(_features_model(), state, prefix="backbone.")
    assert cov.ok and not cov.missing and cov.unexpected == ["fc.bias", "fc.weight"]


def test_shape_mismatch_raises():
    state = dict(timm_state_dict("resnet18"))
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): conv1.weight"):
        load_checkpoint_strict(_features_model(), state)


def test_classifier_head_may_be_absent_from_the_model_but_nothing_else():
    full = timm.create_model("resnet18", pretrained=False)
    backbone_only = {k: v for k, v in timm_state_dict("resnet18").items() if not k.startswith("fc.")}
    cov = load_checkpoint_strict(full, backbone_only)           # fc.* allowed missing
    assert sorted(cov.allowed_missing) == ["fc.bias", "fc.weight"] and not cov.missing
    with pytest.raises(CheckpointError):
        load_checkpoint_strict(full, backbone_only, allowed_missing=())


def test_unreadable_checkpoint_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(bad)
    pickled = tmp_path / "obj.pth"
    torch.save({"meta": "no tensors here"}, pickled)
    with pytest.raises(CheckpointError, match="no tensors"):
        read_state_dict(pickled)
