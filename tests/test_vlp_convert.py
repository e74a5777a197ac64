"""Checkpoint conversion for the released MGCA / GLoRIA weights (methods/vlp/convert.py).

The "official" state dicts are built with the official key layouts: torchvision's ResNet-50 (the
constructor both repositories use), hand-written BLIP ``vits.py`` ViT-B/16 and ``med.py`` BERT key
lists (shapes from ``mgca/configs/bert_config.json``), Hugging Face's BertModel for GLoRIA, and the
heads as the official modules define them. The targets use our naming (``image.backbone``,
``text.bert``, ``heads.*``, ``prototypes``) built from timm / transformers, independently of
``methods.vlp.model``. Values are synthetic and distinct per tensor.
"""
from __future__ import annotations

import argparse
import base64
import sys
import types
import zlib

import pytest
import torch
from torch import nn

from bench.errors import CheckpointError
from methods.vlp import convert as C

HIDDEN, MGCA_LAYERS, VOCAB = 768, 6, 28996


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- synthetic values
_POOL = torch.rand(1 << 20, generator=torch.Generator().manual_seed(0))


class _Fake:
    """Distinct synthetic tensors: a slice of a random pool plus the tensor's index."""

    def __init__(self) -> None:
        self.i = 0

    def __call__(self, shape, dtype=torch.float32) -> torch.Tensor:
        self.i += 1
        shape = tuple(shape)
        if dtype == torch.int64:
            if len(shape) == 2 and shape[0] == 1:          # position_ids buffer
                return torch.arange(shape[1]).unsqueeze(0)
            return torch.tensor(self.i, dtype=torch.int64).reshape(shape)  # num_batches_tracked
        n = 1
        for s in shape:
            n *= s
        reps = -(-n // _POOL.numel())
        flat = (_POOL.repeat(reps)[:n] if reps > 1 else _POOL[:n]) + float(self.i)
        return flat.reshape(shape).to(dtype)


def _like(sd, fake) -> dict:
    return {k: fake(v.shape, v.dtype) for k, v in sd.items()}


# ----------------------------------------------------------------------------- official layouts
def vits_keys() -> dict:
    """BLIP's VisionTransformer (mgca/models/backbones/vits.py), ViT-B/16 at 224."""
    d = HIDDEN
    keys = {"cls_token": (1, 1, d), "pos_embed": (1, 197, d),
            "patch_embed.proj.weight": (d, 3, 16, 16), "patch_embed.proj.bias": (d,),
            "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(12):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,),
                     b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                     b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                     b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                     b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
                     b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)})
    return keys


def med_bert_keys() -> dict:
    """BLIP's med.py BertModel with MGCA's bert_config.json (6 layers, cross-attention, no pooler)."""
    d, ff = HIDDEN, 3072
    keys = {"embeddings.word_embeddings.weight": (VOCAB, d),
            "embeddings.position_embeddings.weight": (512, d),
            "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,)}

    def attention(prefix):
        for n in ("self.query", "self.key", "self.value", "output.dense"):
            keys[f"{prefix}.{n}.weight"] = (d, d)
            keys[f"{prefix}.{n}.bias"] = (d,)
        keys[f"{prefix}.output.LayerNorm.weight"] = (d,)
        keys[f"{prefix}.output.LayerNorm.bias"] = (d,)

    for i in range(MGCA_LAYERS):
        b = f"encoder.layer.{i}"
        attention(f"{b}.attention")
        attention(f"{b}.crossattention")
        keys.update({f"{b}.intermediate.dense.weight": (ff, d), f"{b}.intermediate.dense.bias": (ff,),
                     f"{b}.output.dense.weight": (d, ff), f"{b}.output.dense.bias": (d,),
                     f"{b}.output.LayerNorm.weight": (d,), f"{b}.output.LayerNorm.bias": (d,)})
    return keys


def mgca_embedding(in_dim: int, conv: bool) -> nn.Module:
    """GlobalEmbedding / LocalEmbedding of mgca/models/backbones/encoder.py (hidden 2048, out 128)."""
    layer = (lambda i, o: nn.Conv1d(i, o, kernel_size=1)) if conv else nn.Linear
    m = nn.Module()
    m.head = nn.Sequential(layer(in_dim, 2048), nn.BatchNorm1d(2048), nn.ReLU(inplace=True),
                           layer(2048, 128), nn.BatchNorm1d(128, affine=False))
    return m


def mgca_head_dims(arch: str) -> dict:
    return {"image_global": (2048 if arch == "resnet50" else HIDDEN, False),
            "image_local": (1024 if arch == "resnet50" else HIDDEN, True),
            "text_global": (HIDDEN, False), "text_local": (HIDDEN, True)}


def mgca_official(arch: str, backbone: dict, fake: _Fake) -> dict:
    """The state_dict of an MGCA LightningModule (mgca/models/mgca/mgca_module.py)."""
    sd = {f"img_encoder_q.model.{k}": v for k, v in backbone.items()}
    where = {"image_global": "img_encoder_q.global_embed", "image_local": "img_encoder_q.local_embed",
             "text_global": "text_encoder_q.global_embed", "text_local": "text_encoder_q.local_embed"}
    for name, (dim, conv) in mgca_head_dims(arch).items():
        sd.update({f"{where[name]}.{k}": v for k, v in _like(mgca_embedding(dim, conv).state_dict(), fake).items()})
    sd.update({f"text_encoder_q.model.{k}": fake(s) for k, s in med_bert_keys().items()})
    sd["text_encoder_q.model.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    sd["prototype_layer.weight"] = fake((500, 128))
    mha = nn.MultiheadAttention(128, 1, batch_first=True).state_dict()
    for name in ("patch_local_atten_layer", "word_local_atten_layer"):
        sd.update({f"{name}.{k}": v for k, v in _like(mha, fake).items()})
    return sd


# ----------------------------------------------------------------------------- targets (our naming)
class Target(nn.Module):
    """Our VLPModel's state-dict naming, without methods.vlp.model."""

    def __init__(self, backbone: nn.Module, bert: nn.Module | None, heads: dict, prototypes: bool) -> None:
        super().__init__()
        self.image = nn.Module()
        self.image.backbone = backbone
        if bert is not None:
            self.text = nn.Module()
            self.text.bert = bert
        if heads:
            self.heads = nn.ModuleDict(heads)
        if prototypes:
            self.prototypes = nn.Linear(128, 500, bias=False)


@pytest.fixture(scope="module")
def tv_resnet50_sd():
    """torchvision ResNet-50 with fc = Identity (as in both official cnn_backbones.py)."""
    tv = pytest.importorskip("torchvision")
    m = tv.models.resnet50(weights=None)
    m.fc = nn.Identity()
    return m.state_dict()


@pytest.fixture(scope="module")
def timm_resnet():
    import timm
    return timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))


@pytest.fixture(scope="module")
def timm_vit():
    import timm
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)


@pytest.fixture(scope="module")
def bert6():
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=MGCA_LAYERS,
                     num_attention_heads=12, intermediate_size=3072, type_vocab_size=2)
    return BertModel(cfg, add_pooling_layer=False).eval()


def mgca_target(arch, backbone, bert) -> Target:
    heads = {n: mgca_embedding(d, c) for n, (d, c) in mgca_head_dims(arch).items()}
    return Target(backbone, bert, heads, prototypes=True)


@pytest.fixture(scope="module")
def attribute_dict_cls():
    """A stand-in for pytorch_lightning.utilities.parsing.AttributeDict under its real name."""
    class AttributeDict(dict):
        def __getattr__(self, key):
            try:
                return self[key]
            except KeyError as e:
                raise AttributeError(key) from e

        def __setattr__(self, key, value):
            self[key] = value

    AttributeDict.__module__ = "pytorch_lightning.utilities.parsing"
    AttributeDict.__qualname__ = "AttributeDict"
    return AttributeDict


def save_lightning(path, state_dict, hparams, attribute_dict_cls) -> None:
    """torch.save a checkpoint shaped like PyTorch Lightning 1.5's, with an AttributeDict."""
    mods = {}
    names = ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing")
    for name in names:
        mods[name] = sys.modules.get(name)
        sys.modules[name] = types.ModuleType(name)
    sys.modules["pytorch_lightning.utilities.parsing"].AttributeDict = attribute_dict_cls
    try:
        ckpt = {"epoch": 3, "global_step": 10, "pytorch-lightning_version": "1.5.10",
                "state_dict": state_dict, "hyper_parameters": attribute_dict_cls(hparams),
                "hparams_name": "kwargs",
                "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
                    "best_model_score": torch.tensor(0.5), "best_model_path": "/ckpt/epoch=3.ckpt",
                    "best_k_models": {"/ckpt/epoch=3.ckpt": torch.tensor(0.5)}}},
                "optimizer_states": [{"state": {0: {"step": 10, "exp_avg": torch.zeros(2)}},
                                      "param_groups": [{"lr": 2e-5, "betas": (0.9, 0.999),
                                                        "weight_decay": 0.05, "params": [0]}]}],
                "lr_schedulers": [{"last_epoch": 10, "_last_lr": [1e-5], "warmup_steps": 4}],
                "loops": {"fit_loop": {"state_dict": {}}},
                "args": argparse.Namespace(seed=42)}
        torch.save(ckpt, path)
    finally:
        for name in names:
            if mods[name] is None:
                del sys.modules[name]
            else:
                sys.modules[name] = mods[name]


def assert_backbone_and_text_equal(model, official, report):
    ours = model.state_dict()
    checked = 0
    for our_key, src_key in report.mapped.items():
        if C.part_of(our_key) in ("image", "text"):
            assert torch.equal(ours[our_key], official[src_key]), our_key
            checked += 1
    n_required = sum(1 for k in ours if C.part_of(k) in ("image", "text"))
    # every image/text tensor of the model came from the checkpoint, except the filled one(s)
    assert checked + len([k for k in report.filled if C.part_of(k) == "text"]) == n_required
    return checked


# ================================================================================ MGCA
@pytest.fixture(scope="module")
def mgca_resnet_official(tv_resnet50_sd):
    fake = _Fake()
    return mgca_official("resnet50", _like(tv_resnet50_sd, fake), fake)


def test_mgca_resnet_file_roundtrip(tmp_path, mgca_resnet_official, tv_resnet50_sd, timm_resnet, bert6,
                                    attribute_dict_cls):
    official = mgca_resnet_official
    path = tmp_path / "resnet_50.ckpt"
    save_lightning(path, official, {"img_encoder": "resnet_50", "emb_dim": 128, "gpus": 2},
                   attribute_dict_cls)

    state, hp = C.read_lightning_checkpoint(path)
    assert hp == {"img_encoder": "resnet_50", "emb_dim": 128, "gpus": 2} and type(hp) is dict
    assert set(state) == set(official)
    model = mgca_target("resnet50", timm_resnet, bert6)
    ours, report = C.convert_mgca(state, image_arch="resnet50", hyper_parameters=hp, source=str(path))
    C.load_converted(model, ours, report)

    assert report.ok and not report.partial and report.unexpected == []
    assert report.coverage["image"].model_keys == len(tv_resnet50_sd) and not report.missing("image")
    n = assert_backbone_and_text_equal(model, official, report)
    assert n > 400
    # heads and prototypes: every tensor loaded, equal to the official one
    sd = model.state_dict()
    for our_key, src_key in report.mapped.items():
        if C.part_of(our_key) in ("heads", "prototypes"):
            assert torch.equal(sd[our_key], official[src_key]), our_key
    assert report.mapped["prototypes.weight"] == "prototype_layer.weight"
    assert report.mapped["heads.image_local.head.0.weight"] == "img_encoder_q.local_embed.head.0.weight"
    assert sd["heads.image_local.head.0.weight"].shape == (2048, 1024, 1)

    # dropped: cross-attention (text), local attention layers (heads), position_ids buffer
    cross = [k for k in official if ".crossattention." in k]
    assert len(cross) == MGCA_LAYERS * 10 and set(cross) <= set(report.dropped_in("text"))
    atten = [k for k in official if "local_atten_layer" in k]
    assert len(atten) == 8 and sorted(atten) == report.dropped_in("heads")
    for k in cross + atten:
        assert report.dropped[k][1].startswith("unused by the method")
    assert "text_encoder_q.model.embeddings.position_ids" in report.dropped
    assert not any(C.part_of(k) == "text" and ".crossattention." in k for k in sd)

    # filled: token-type embedding, zeros, reported
    assert list(report.filled) == [C.TOKEN_TYPE_KEY]
    tt = sd[C.TOKEN_TYPE_KEY]
    assert tt.shape == (2, HIDDEN) and torch.count_nonzero(tt) == 0
    text = report.summary()
    assert "filled" in text and "token_type_embeddings" in text and "unused by the method" in text
    assert report.to_dict()["filled"][C.TOKEN_TYPE_KEY].startswith("zeros")


def test_zero_token_type_reproduces_med_embeddings(bert6):
    """med.py: LayerNorm(word + position). HF adds token_type_embeddings[token_type_ids] too."""
    emb = bert6.embeddings
    with torch.no_grad():
        emb.token_type_embeddings.weight.zero_()
        ids = torch.tensor([[101, 2009, 2003, 102, 0]])
        ours = emb(input_ids=ids, token_type_ids=torch.tensor([[0, 0, 0, 1, 1]]))
        med = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(torch.arange(5)[None]))
    assert torch.allclose(ours, med, atol=1e-6)


def test_mgca_vit_conversion(timm_vit, bert6):
    fake = _Fake()
    official = mgca_official("vit_base", {k: fake(s) for k, s in vits_keys().items()}, fake)
    model = mgca_target("vit_base", timm_vit, bert6)
    targets = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours, report = C.convert_mgca(official, image_arch="vit_base", target_keys=targets)
    assert report.ok  # dry-run coverage already complete
    C.load_converted(model, ours, report)
    assert report.coverage["image"].model_keys == len(vits_keys()) == 150
    assert not report.missing("image") and not report.missing("text") and report.unexpected == []
    assert_backbone_and_text_equal(model, official, report)
    assert model.state_dict()["heads.image_global.head.0.weight"].shape == (2048, HIDDEN)


def test_mgca_arch_mismatch_is_refused(mgca_resnet_official):
    official = mgca_resnet_official
    with pytest.raises(CheckpointError, match="resnet50"):
        C.convert_mgca(official, image_arch="vit_base")
    with pytest.raises(CheckpointError, match="vit_base"):
        C.convert_mgca(official, image_arch="resnet50", hyper_parameters={"img_encoder": "vit_base"})


@pytest.fixture(scope="module")
def mgca_resnet_converted(mgca_resnet_official):
    official = mgca_resnet_official
    ours, _ = C.convert_mgca(official, image_arch="resnet50")
    return official, ours


def test_missing_backbone_tensor_refused_then_partial(mgca_resnet_converted, timm_resnet, bert6):
    official, ours = mgca_resnet_converted
    key = "image.backbone.layer4.2.conv3.weight"
    partial = {k: v for k, v in ours.items() if k != key}
    _, report = C.convert_mgca(official, image_arch="resnet50")
    model = mgca_target("resnet50", timm_resnet, bert6)
    before = model.state_dict()[key].clone()
    with pytest.raises(CheckpointError, match=r"layer4\.2\.conv3\.weight") as err:
        C.load_converted(model, partial, report)
    assert "MISSING" in str(err.value) and "refusing" in str(err.value)

    C.load_converted(model, partial, report, allow_partial=True)
    assert report.partial and any(key in w for w in report.warnings)
    assert "PARTIAL" in report.summary() and report.missing("image") == [key]
    assert torch.equal(model.state_dict()[key], before)  # left as built
    other = "image.backbone.layer4.2.conv2.weight"
    assert torch.equal(model.state_dict()[other], official["img_encoder_q.model.layer4.2.conv2.weight"])


def test_shape_mismatch_refused(mgca_resnet_converted, timm_resnet, bert6):
    _, ours = mgca_resnet_converted
    key = "text.bert.encoder.layer.0.attention.self.query.weight"
    bad = dict(ours)
    bad[key] = torch.zeros(HIDDEN, HIDDEN - 1)
    report = C.ConversionReport(method="mgca", image_arch="resnet50", source="x.ckpt")
    model = mgca_target("resnet50", timm_resnet, bert6)
    with pytest.raises(CheckpointError, match=r"layer\.0\.attention\.self\.query\.weight") as err:
        C.load_converted(model, bad, report)
    assert "SHAPE MISMATCH" in str(err.value) and "x.ckpt" in str(err.value)
    assert report.coverage["text"].shape_mismatch[0][0] == key


def test_missing_heads_need_explicit_permission(mgca_resnet_converted, timm_resnet, bert6):
    _, ours = mgca_resnet_converted
    no_heads = {k: v for k, v in ours.items() if C.part_of(k) in ("image", "text")}
    model = mgca_target("resnet50", timm_resnet, bert6)
    report = C.ConversionReport(method="mgca", image_arch="resnet50")
    with pytest.raises(CheckpointError, match="heads"):
        C.load_converted(model, no_heads, report)
    C.load_converted(model, no_heads, report, allow_missing_heads=True)
    assert not report.partial and report.coverage["heads"].allowed_missing
    assert report.coverage["prototypes"].allowed_missing == ["prototypes.weight"]


def test_image_only_model_loads_backbone(mgca_resnet_converted, timm_resnet):
    official, ours = mgca_resnet_converted
    model = Target(timm_resnet, None, {}, prototypes=False)
    report = C.ConversionReport(method="mgca", image_arch="resnet50")
    C.load_converted(model, ours, report)
    assert report.ok and report.coverage["text"].model_keys == 0 and report.coverage["text"].unexpected
    sd = model.state_dict()
    assert torch.equal(sd["image.backbone.conv1.weight"], official["img_encoder_q.model.conv1.weight"])


def test_wrong_layout_is_refused(mgca_resnet_converted):
    official, _ = mgca_resnet_converted
    with pytest.raises(CheckpointError, match="official GLoRIA layout"):
        C.convert_gloria({"model." + k: v for k, v in list(official.items())[:5]})


# ================================================================================ GLoRIA
@pytest.fixture(scope="module")
def small_bert12():
    """GLoRIA's text tower is the full 12-layer Bio_ClinicalBERT with a pooler; narrow here."""
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=12, num_attention_heads=2,
                     intermediate_size=128)
    return BertModel(cfg, add_pooling_layer=True), BertModel(cfg, add_pooling_layer=False)


def gloria_official(resnet_sd, bert_sd, fake) -> dict:
    """PretrainModel.state_dict() of gloria/lightning/pretrain_model.py (all under 'gloria.')."""
    sd = {f"gloria.img_encoder.model.{k}": v for k, v in resnet_sd.items()}
    sd["gloria.img_encoder.global_embedder.weight"] = fake((768, 2048))
    sd["gloria.img_encoder.global_embedder.bias"] = fake((768,))
    sd["gloria.img_encoder.local_embedder.weight"] = fake((768, 1024, 1, 1))
    sd.update({f"gloria.text_encoder.model.{k}": v for k, v in bert_sd.items()})
    # transformers 4.x (GLoRIA's era) saved the position_ids buffer
    sd["gloria.text_encoder.model.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    return sd


def gloria_target(backbone, bert) -> Target:
    heads = {"image_global": nn.Linear(2048, 768), "image_local": nn.Conv2d(1024, 768, 1, bias=False)}
    return Target(backbone, bert, heads, prototypes=False)


def test_gloria_file_roundtrip(tmp_path, tv_resnet50_sd, timm_resnet, small_bert12, attribute_dict_cls):
    fake = _Fake()
    with_pooler, target_bert = small_bert12
    official = gloria_official(_like(tv_resnet50_sd, fake), _like(with_pooler.state_dict(), fake), fake)
    path = tmp_path / "chexpert_resnet50.ckpt"
    save_lightning(path, official, {"model": {"vision": {"model_name": "resnet_50"}}}, attribute_dict_cls)
    state, hp = C.read_lightning_checkpoint(path)
    model = gloria_target(timm_resnet, target_bert)
    ours, report = C.convert_gloria(state, hyper_parameters=hp, source=str(path))
    C.load_converted(model, ours, report)

    assert report.ok and report.unexpected == [] and report.filled == {}
    assert_backbone_and_text_equal(model, official, report)
    sd = model.state_dict()
    assert torch.equal(sd["heads.image_global.weight"], official["gloria.img_encoder.global_embedder.weight"])
    assert torch.equal(sd["heads.image_local.weight"], official["gloria.img_encoder.local_embedder.weight"])
    token_type = official["gloria.text_encoder.model.embeddings.token_type_embeddings.weight"]
    assert torch.equal(sd[C.TOKEN_TYPE_KEY], token_type)  # GLoRIA's HF BERT has it: loaded, not filled
    assert sum(1 for k in sd if k.startswith("text.bert.encoder.layer.11.")) == 16
    pooler = [k for k in official if ".pooler." in k]
    assert pooler and set(pooler) <= set(report.dropped_in("text"))
    assert report.dropped[pooler[0]][1].startswith("unused by the method")
    assert "gloria.text_encoder.model.embeddings.position_ids" in report.dropped
    assert not report.coverage["heads"].missing and report.coverage["prototypes"].model_keys == 0


def test_gloria_bare_keys_and_hparam_check(tv_resnet50_sd):
    fake = _Fake()
    bare = {f"img_encoder.model.{k}": v for k, v in _like(tv_resnet50_sd, fake).items()}
    ours, report = C.convert_gloria(bare)
    assert set(ours) == {f"image.backbone.{k}" for k in tv_resnet50_sd} and report.unexpected == []
    with pytest.raises(CheckpointError, match="densenet_121"):
        C.convert_gloria(bare, hyper_parameters={"model": {"vision": {"model_name": "densenet_121"}}})


# ================================================================================ reading files
# A PyTorch-Lightning-1.1-style checkpoint (legacy torch format) whose hyper_parameters is a real
# OmegaConf 2.0.6 DictConfig (GLoRIA saves its config that way), generated with omegaconf once;
# zlib + base64 of the file. omegaconf is not needed to read it.
_OMEGACONF_CKPT = (
    "eNptlml3FEUUhicLCTSLgKgEUNAITlQGEsImLmwBdcgADWq7YNvTU5lq6Omet7smMNGSRdGwuIMriLu4b7/Kn+A5fvBWdQrS"
    "Oc6HOd01Vc996723bs2pzvNW+O+VPf+sOnr9QF/pVOfo3130LVEoOgsLhUIziUXsx6E7zpI0iCN00ARnPv0SBkKEzGVRLfAi"
    "dE46Fg2KdpO5aTDBUnRJdBedWTSY8jgRmFXudLroLYgEesrdTrdixFEdveXuVsvEVJBUeIK5tcAX6JDodGbTWD2Mk8ArHUeX"
    "L+LE5yW3JYIwtdyEVVtBWHMFi9I4cceHLApbdHo1J068OsOsbIm1J4w9cSgbtNDjLKA5W4eHtwxvHto0ODQ8uHkTerVEv9nC"
    "7HJHRWDOwXKh3HEWlvqae84nJ0LmCzIitfYnNZaw2m7SaWHegI35Agts3JJq4zg5kbhNL/EaTJB3WOjHDVb3/DgaK6m9qYeg"
    "bqnlu7JHLBo4jcUStxadOURwaaFX84SHJdOWVr2UWbRAeEHEktGpKRZuo7W3S9xR1HYlbMxVucBS33WVQSKIXNeqaa19zlya"
    "EleP0k6yWcsqelXcVDvzQiyf1D4cY22sqOgcjoVePcWdEndp2xKWxiGVhOt7PmdYmTOmxsa8ViiyYKt431ncbeMeHYGIWcT+"
    "ijOP3lnIGiyaUnFvpVXViVO20ShWZ7Jc2rhQ72sk7stKqhHXWIgiV44NSNxf5Eu4cuABiQeLfKlPvCCqWzuitoW1fFmFL5/k"
    "K3iR0wZKfCXXotbZWM/7K1yF5av5Yk74waLTQ/jxQNf6kOZvkBg2/I0Sm4jPbzKHFHOzYW6xsXUac0AxH8qqWkt2IyoHbJuW"
    "z4iGUyW0Qg8WHqYgj0g8SgFnJv1mrh+jSdslduSVbFNKdholu2zs1ho26JPmjlNaR3RdUe4iJtyN67GH/Lb0IWciUfVUw16u"
    "FDwu8YTasgr0pEQ5H2ivCrTPBBq1kW12Ax+ZbFVbxFQBBTshsF8beEDioDHQljiUp+1XtMOG9pSNp2ca+Ex2HqosmSoUR4t8"
    "VuI5I/J5iRfyWEdhjxjsizZcDTzAR5yVqvAaQdj2wpTKaoIl63YGsbsrDKLA98KdI/ZhvETb0F3OS4UbuaHXVmfY04GrEr4J"
    "XJNg+cCeCjxmAtdtcBOY+lwGZY0qq9WoQKnJNRBo6FGJYwYaSjTy0EBBIwONbTQNdLTQlZnec6NLAtr2RCI1tguJVp4IRRw3"
    "xOM2Tsy0va1PmmCN5iAmtMaXJV4xGqXEq3nihCKeNMRTNk5rVsJH9m5XHZE+rWqaiVXkJqeqxhlNfk3idUM+K/FGnnxGkd80"
    "5Ekb56ZO7IjuD6Z8cZ7Ic/TVVOciIn9xQTtxUeIt48TbEu/k6RcU/V1Df8/G+zO7wge6K2VHJMElzbws8aFhfiTxcZ55STE/"
    "McxPbXw2jXlRMa/oU1JvtlJcnXbSwyA1N8M+ejQ3w+cU5ZrEFybilxJfTUXMNXi13MLXmYirSsQ3RsS3Nr7j/fnZdP1a+N7o"
    "uszXHMF1nY8fJH40+fhJ4ufc7soFBf7FgH+18Ztef41KnFLs6SxPJVo1ea5vwTQ7u7/zRTr7rBn7HH+Uu5w+lcK2vqLX3sjc"
    "jf8bf+rZg6XB0jD+Un8TjqDwfzd3h1fqKNz8/Af31tvQ"
)


def test_omegaconf_hparams_read_without_omegaconf(tmp_path):
    path = tmp_path / "gloria_like.ckpt"
    path.write_bytes(zlib.decompress(base64.b64decode("".join(_OMEGACONF_CKPT))))
    state, hp = C.read_lightning_checkpoint(path)
    assert set(state) == {"gloria.w"}
    assert hp["model"]["vision"] == {"model_name": "resnet_50", "pretrained": True}
    assert hp["model"]["text"]["last_n_layers"] == 4 and hp["lightning"]["trainer"]["gpus"] == [0]


def test_plain_state_dict_file(tmp_path):
    path = tmp_path / "weights.pt"
    sd = {"img_encoder_q.model.conv1.weight": torch.ones(2, 3)}
    torch.save(sd, path)
    state, hp = C.read_lightning_checkpoint(path)
    assert hp == {} and torch.equal(state["img_encoder_q.model.conv1.weight"], sd["img_encoder_q.model.conv1.weight"])


def _evil_hook():  # pragma: no cover - never called
    raise AssertionError("must not run")


class _Payload:
    pass


class _Reducer:
    def __reduce__(self):
        return (print, ("this must never be printed",))


@pytest.mark.parametrize("payload, name", [(_evil_hook, "_evil_hook"), (_Payload(), "_Payload"),
                                           (_Reducer(), "print")])
def test_arbitrary_globals_are_refused(tmp_path, capsys, payload, name):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"x": payload}}, path)
    with pytest.raises(CheckpointError) as err:
        C.read_lightning_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and name in msg and "Hint" in msg
    assert "must never be printed" not in capsys.readouterr().out


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        C.read_lightning_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        C.read_lightning_checkpoint(tmp_path / "absent.ckpt")
