"""ConVIRT, GLoRIA and MGCA on the shared engine: pretraining learns and is cached, resume after a
kill ends at the same weights, gradients reach what should learn (and not MGCA's prototypes in the
first epoch), options are validated and part of the identity, DDP's gather gives batch-wide
gradients, and the encoders honour the Encoder contract."""
from __future__ import annotations

import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import methods  # noqa: F401  (registers the methods)
from bench.api import METHODS, Capability, RunSpec, resolve_options
from bench.errors import BenchError, CheckpointError
from bench.pretrain import PretrainConfig
from methods import convirt, gloria, mgca
from methods.backbones import file_sha256
from methods.vlp import method as M
from methods.vlp import text as T
from methods.vlp.model import gather_batch
from methods.vlp.pairs import mgca_caption
from model_helpers import biases_before_batchnorm

MODULES = {"convirt": convirt, "gloria": gloria, "mgca": mgca}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVLP_BENCH_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path / "cache"
    torch.set_num_threads(before)


BATCH = 4


def short(definition: M.VLPMethod, epochs: int = 5) -> M.VLPMethod:
    """The mechanics, not the recipe, are under test: small batches, a few epochs."""
    def recipe(preset, options):
        r = definition.recipe(preset, options)
        return dataclasses.replace(r, config=dataclasses.replace(r.config, epochs=epochs, batch_size=BATCH, warmup_steps=2,
                                                                 lr=2e-3))
    return dataclasses.replace(definition, recipe=recipe)


def test_caption_follows_mgca_preprocessing():
    cap = mgca_caption("Heart size is normal. 1. No effusion.", "Mild  edema. Ok.")
    # impression first; one-token sentences ("Ok") dropped; lower-cased \w+ tokens
    assert cap == "mild edema heart size is normal no effusion"
    assert mgca_caption("", "") == "" and mgca_caption("Clear.", "") == ""


def test_words_sum_their_subword_pieces():
    tok = T.fast_tokenizer(T.train_wordpiece(["mild effusion"] * 20 + ["cardiomegaly"], 60))
    batch = T.tokenize(tok, ["cardiomegaly mild"], 24)
    pieces = int((batch.word_index[0] == 0).sum())
    assert pieces >= 2                                   # the rare word is split into pieces
    hidden = torch.arange(24, dtype=torch.float32).view(1, 24, 1)
    words, mask = T.aggregate_words(hidden, batch.word_index, batch.n_words)
    expect = float(hidden[0, batch.word_index[0] == 0].sum())
    assert float(words[0, 0, 0]) == expect and mask[0].tolist()[:3] == [True, True, False]


@pytest.mark.parametrize("name", ["convirt", "gloria", "mgca"])
def test_pretraining_lowers_the_loss_caches_and_gives_an_encoder(name, micro_mimic, cache):
    definition = short(MODULES[name].DEFINITION)
    folder = M.train_vlp(definition, "tiny", str(micro_mimic), device="cpu")
    meta = json.loads((folder / M.META_FILE).read_text())
    first, last = meta["history"][0], meta["history"][-1]
    loss = lambda row: sum(v for k, v in row.items() if k.startswith("train_"))  # noqa: E731
    assert loss(last) < loss(first), meta["history"]
    assert meta["train"]["pairs"] > 0 and set(meta["train"]["skipped"]) == {"non_frontal", "no_report_text",
                                                                            "caption_too_short"}
    assert (folder / T.TOKENIZER_FILE).is_file() and (folder / "log.csv").is_file()
    assert meta["contrast_scope"] == ("global" if name == "convirt" else "rank")
    assert meta["text_init"]["init"] == "mlm" and "text-mlm" in meta["text_init"]["mlm_dir"]
    stamp = (folder / M.WEIGHTS_FILE).stat().st_mtime_ns
    assert M.train_vlp(definition, "tiny", str(micro_mimic), device="cpu") == folder      # reused
    assert (folder / M.WEIGHTS_FILE).stat().st_mtime_ns == stamp

    enc = M.load_folder(definition, "tiny", folder, {}, weights_tag="test")
    card = enc.card
    assert card.weights_sha256 == file_sha256(folder / M.WEIGHTS_FILE)
    assert Capability.TEXT in card.capabilities and card.text_tokenizer == "tiny-wordpiece"
    assert card.pooling == "avg" and card.local_stride == 16
    x = enc.prepare(torch.randint(0, 255, (2, 1, 64, 64), dtype=torch.uint8))
    with torch.no_grad():
        f = enc.image_features(x)
        assert f.pooled.shape == (2, card.embed_dim)
        assert [m.shape[1] for m in f.pyramid] == list(card.feature_channels)
        assert [64 // m.shape[-1] for m in f.pyramid] == list(card.feature_strides)
        zi, zt = enc.encode_image(x), enc.encode_text(["mild edema", "no effusion"])
    assert zi.shape == zt.shape == (2, card.joint_dim)
    assert torch.allclose(zt.norm(dim=1), torch.ones(2), atol=1e-5)


def test_resume_after_a_kill_mid_epoch_ends_with_the_same_weights(micro_mimic, cache, monkeypatch):
    definition = short(convirt.DEFINITION, epochs=2)     # the cheapest objective: the loop is under test
    whole = M.train_vlp(definition, "tiny", str(micro_mimic), out_dir=cache / "whole", device="cpu")

    from bench.data.prepare import prepare_dataset
    from methods.vlp.pairs import pretraining_pairs

    steps = len(pretraining_pairs(prepare_dataset("mimic-cxr", str(micro_mimic), image_size=64), "train")) // BATCH
    assert steps >= 2
    real_batch, calls = M._batch, {"n": 0}

    def dying(*a, **kw):
        if kw.get("g_aug") is not None:          # a training batch (validation batches are not augmented)
            calls["n"] += 1
            if calls["n"] == steps + 2:          # the second batch of epoch 2
                raise KeyboardInterrupt("killed")
        return real_batch(*a, **kw)

    monkeypatch.setattr(M, "_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        M.train_vlp(definition, "tiny", str(micro_mimic), out_dir=cache / "resumed", device="cpu")
    assert (cache / "resumed.work" / "last.pt").is_file() and not (cache / "resumed").exists()
    monkeypatch.setattr(M, "_batch", real_batch)
    resumed = M.train_vlp(definition, "tiny", str(micro_mimic), out_dir=cache / "resumed", device="cpu")
    assert json.loads((resumed / M.META_FILE).read_text())["resumed_from_epoch"] == 1
    assert file_sha256(resumed / M.WEIGHTS_FILE) == file_sha256(whole / M.WEIGHTS_FILE)


def _tiny_model(name: str, **options):
    d = MODULES[name].DEFINITION
    caps = ["mild patchy opacity in the left lower lobe", "no pneumothorax heart size normal",
            "moderate right pleural effusion"] * 4
    tok = T.fast_tokenizer(T.train_wordpiece(caps, 120))
    model = M.build_model(d, "tiny", resolve_options(d.name, d.all_options(), options), tokenizer=tok)
    return model, torch.randn(len(caps), 3, 64, 64, generator=torch.Generator().manual_seed(0)), model.text.tokenize(caps)


@pytest.mark.parametrize("name", ["convirt", "gloria", "mgca"])
def test_gradients_reach_every_parameter_except_frozen_prototypes(name):
    model, x, tok = _tiny_model(name)
    model.current_epoch = 1
    # timm zero-initialises each residual block's last BN scale, so the blocks' inner layers get their
    # first gradient only after one step: take it, then look
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sum(model(x, tok).values()).backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    sum(model(x, tok).values()).backward()
    cancelled = biases_before_batchnorm(model)       # MGCA's Linear -> BN heads: zero gradient up to rounding
    assert (name == "mgca") == bool(cancelled) and all(".head." in n for n in cancelled)
    no_grad = sorted(n for n, p in model.named_parameters()
                     if n not in cancelled and (p.grad is None or not torch.any(p.grad != 0)))
    frozen = sorted(n for n, p in model.named_parameters() if any(p is q for q in model.frozen_parameters()))
    assert no_grad == frozen == (["prototypes.weight"] if name == "mgca" else [])
    if name == "mgca":
        model.zero_grad(set_to_none=True)
        model.current_epoch = 2
        sum(model(x, tok).values()).backward()
        assert model.prototypes.weight.grad is not None and model.frozen_parameters() == []


def test_mgca_on_a_vit_takes_patch_weights_from_the_cls_attention():
    model, x, tok = _tiny_model("mgca", image_arch="vit")
    out = model.image(x, attention=True)
    assert out.cls_attention.shape == (x.shape[0], out.local.shape[1])
    assert bool((out.cls_attention.sum(1) < 1).all())       # the CLS token's attention to itself is left out
    model.current_epoch = 2
    sum(model(x, tok).values()).backward()
    assert all(p.grad is not None and torch.any(p.grad != 0) for p in model.parameters())
    assert model.describe()["image"]["arch"] == "vit" and model.image.strides == (8,)


def test_mgca_quirk_switches_resolve_and_change_the_loss():
    assert mgca.quirk_flags({"official_quirks": True}, "resnet") == {
        "sum_ita_directions": True, "shift_word_weights": True, "pad_words_as_negatives": True,
        "unnormalised_patch_context": False, "zero_text_positions": True}
    assert mgca.quirk_flags({"official_quirks": True}, "vit")["unnormalised_patch_context"] is True
    assert mgca.quirk_flags({"official_quirks": True, "shift_word_weights": False}, "resnet")["shift_word_weights"] is False
    assert not any(mgca.quirk_flags({"official_quirks": False}, "resnet").values())
    paper, x, tok = _tiny_model("mgca")
    summed, _, _ = _tiny_model("mgca", sum_ita_directions=True)
    quirky, _, _ = _tiny_model("mgca", official_quirks=True)
    for m in (summed, quirky):
        m.load_state_dict(paper.state_dict())
    for m in (paper, summed, quirky):
        m.eval()
    with torch.no_grad():
        a, s, q = paper(x, tok), summed(x, tok), quirky(x, tok)
    assert torch.isclose(s["ita"], 2 * a["ita"], rtol=1e-5)          # sum, not mean, of the two directions
    assert torch.isclose(s["tca_word"], a["tca_word"])                # ... and nothing else moved
    assert not torch.isclose(a["tca_word"], q["tca_word"])            # shifted weights, [PAD] negatives


def test_options_are_validated_and_enter_the_weights_key(micro_mimic):
    with pytest.raises(BenchError, match="no option 'oficial_quirks'.*official_quirks"):
        resolve_options("mgca", mgca.DEFINITION.all_options(), {"mgca.oficial_quirks": True})
    from bench import runner
    spec = RunSpec("mgca", "rsna-cls", 1.0, overrides=(("mgca.official_quirks", True), ("lr", 0.1)))
    assert runner.split_overrides(spec) == ((("lr", 0.1),), {"official_quirks": True})
    with pytest.raises(BenchError, match="has no options"):
        runner.method_options(RunSpec("random", "rsna-cls", 1.0, overrides=(("random.x", 1),)), METHODS.get("random"))
    from bench.data.prepare import prepare_dataset
    mimic = prepare_dataset("mimic-cxr", str(micro_mimic), image_size=64)
    d = mgca.DEFINITION
    keys = [M.weights_key(d, "tiny", resolve_options("mgca", d.all_options(), o), mimic)
            for o in ({}, {"official_quirks": True}, {"text_model_dir": "/x"})]
    assert M.weights_dir(keys[0]) != M.weights_dir(keys[1])
    assert M.weights_dir(keys[0]) == M.weights_dir(keys[2])     # where weights are read from is not identity


def test_real_data_without_checkpoint_says_how_to_pretrain(tmp_path):
    with pytest.raises(CheckpointError, match="bench pretrain --method mgca"):
        METHODS.get("mgca").factory("tiny", None, 0, data=str(tmp_path))


def test_paper_text_tower_never_downloads(monkeypatch):
    monkeypatch.delenv(T.BERT_DIR_ENV, raising=False)
    with pytest.raises(CheckpointError, match="nothing is downloaded.*MEDVLP_BERT_DIR"):
        T.resolve_bert_dir(None, "mgca")


def test_every_vlp_entry_declares_objective_options_and_pretraining():
    for name in MODULES:
        entry = METHODS.get(name)
        assert entry.pretrain is not None and entry.objective is not None and "image_arch" in entry.options
    assert METHODS.get("convirt").convert is None
    assert METHODS.get("mgca").convert is not None and METHODS.get("gloria").convert is not None


# --- DDP: the all-gather used for batch-wide contrast --------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, img: torch.Tensor, txt: torch.Tensor, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = img.shape[0] // world
        v = img[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        u = txt[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        terms = convirt.objective(gather_batch(v), gather_batch(u))
        sum(terms.values()).backward()
        out[rank] = (v.grad.clone(), float(sum(terms.values())))
    finally:
        dist.destroy_process_group()


def test_ddp_gather_gives_each_rank_the_full_batch_gradient():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    full_v = img.clone().requires_grad_(True)
    loss = sum(convirt.objective(full_v, txt).values())
    loss.backward()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, _free_port(), img, txt, out), nprocs=2, join=True)
        out = dict(out)
    for rank in (0, 1):
        grad, value = out[rank]
        assert value == pytest.approx(float(loss), rel=1e-5)             # every rank sees the whole batch
        # the gather's backward sums the ranks' gradients; DDP then averages parameter gradients by 2
        assert torch.allclose(grad / 2, full_v.grad[rank * 4:(rank + 1) * 4], atol=1e-6)


def test_an_mgca_checkpoint_in_the_official_layout_lands_in_our_model(tmp_path):
    """Our model's tensors renamed to the authors' layout (MGCA's Lightning file), converted back."""
    from methods.vlp.convert import convert_file, load_converted

    source, _, _ = _tiny_model("mgca")
    official = {}
    for k, v in source.state_dict().items():
        if k.endswith("token_type_embeddings.weight"):
            continue                                            # med.py's BERT has none: the converter fills zeros
        k = (k.replace("image.backbone.", "img_encoder_q.model.").replace("text.bert.", "text_encoder_q.model.")
             .replace("heads.image_global.", "img_encoder_q.global_embed.").replace("heads.image_local.", "img_encoder_q.local_embed.")
             .replace("heads.text_global.", "text_encoder_q.global_embed.").replace("heads.text_local.", "text_encoder_q.local_embed.")
             .replace("prototypes.", "prototype_layer."))
        official[k] = v.clone()
    file = tmp_path / "resnet_50.ckpt"
    torch.save({"state_dict": official, "hyper_parameters": {"emb_dim": 128}, "epoch": 3}, file)
    target, _, _ = _tiny_model("mgca")
    state, report, _ = convert_file(file, "mgca", image_arch="resnet50")
    load_converted(target, state, report)
    mine = target.state_dict()
    for k, v in source.state_dict().items():
        if k.endswith("token_type_embeddings.weight"):
            assert not torch.any(mine[k])
        else:
            assert torch.equal(mine[k], v), k
    del official["img_encoder_q.model.layer1.0.conv1.weight"]
    torch.save({"state_dict": official}, file)
    state, report, _ = convert_file(file, "mgca", image_arch="resnet50")
    with pytest.raises(CheckpointError, match="layer1.0.conv1.weight"):
        load_converted(_tiny_model("mgca")[0], state, report)
