"""The tiny text tower's masked-language-model pretraining (methods.vlp.mlm): it learns, it is cached
and shared, it is a pure function of its inputs, and the vision-language pretraining starts from it."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from methods.vlp import mlm
from methods.vlp import text as T

CAPTIONS = [f"{sev} {finding} in the {side} lower lobe" for sev in ("mild", "moderate", "severe")
            for finding in ("opacity", "effusion", "atelectasis", "consolidation")
            for side in ("left", "right")] * 3


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVLP_BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _setup(epochs: int = 6):
    spec = dataclasses.replace(T.tiny_text_spec(max_length=16, num_layers=2), hidden=32, intermediate=64)
    tok = T.fast_tokenizer(T.train_wordpiece(CAPTIONS, 80))
    return spec, tok, mlm.MLMRecipe(epochs=epochs, batch_size=8, lr=3e-3, warmup_steps=2)


def test_mlm_lowers_its_loss_caches_and_is_deterministic(cache):
    spec, tok, recipe = _setup()
    state = mlm.pretrained_text_state(CAPTIONS, tok, spec, recipe, device=torch.device("cpu"))
    folder = mlm.mlm_dir(mlm.mlm_key(CAPTIONS, tok, spec, recipe))
    history = json.loads((folder / mlm.META_FILE).read_text())["history"]
    assert len(history) == recipe.epochs and history[-1]["train_mlm"] < 0.8 * history[0]["train_mlm"]
    # the tower's own keys: it loads strictly into the BertModel every method builds
    bert = T.build_bert(spec, vocab_size=T.tokenizer_vocab_size(tok), seed=0)
    bert.load_state_dict(state, strict=True)
    assert not any(torch.equal(v, bert.state_dict()[k]) for k, v in
                   T.build_bert(spec, vocab_size=T.tokenizer_vocab_size(tok), seed=0).state_dict().items()
                   if k.endswith("query.weight"))
    stamp = (folder / mlm.WEIGHTS_FILE).stat().st_mtime_ns
    again = mlm.pretrained_text_state(CAPTIONS, tok, spec, recipe, device=torch.device("cpu"))
    assert (folder / mlm.WEIGHTS_FILE).stat().st_mtime_ns == stamp          # read, not retrained
    assert all(torch.equal(again[k], v) for k, v in state.items())
    # a fresh training (other cache) gives the same weights: a pure function of captions, vocabulary and recipe
    import shutil
    shutil.rmtree(folder)
    fresh = mlm.pretrained_text_state(CAPTIONS, tok, spec, recipe, device=torch.device("cpu"))
    assert all(torch.equal(fresh[k], v) for k, v in state.items())


def test_the_key_follows_captions_vocabulary_shape_and_recipe():
    spec, tok, recipe = _setup()
    base = mlm.mlm_dir(mlm.mlm_key(CAPTIONS, tok, spec, recipe))
    assert mlm.mlm_dir(mlm.mlm_key(CAPTIONS[:-1], tok, spec, recipe)) != base
    assert mlm.mlm_dir(mlm.mlm_key(CAPTIONS, tok, dataclasses.replace(spec, num_layers=3), recipe)) != base
    assert mlm.mlm_dir(mlm.mlm_key(CAPTIONS, tok, spec, dataclasses.replace(recipe, epochs=7))) != base
    other_tok = T.fast_tokenizer(T.train_wordpiece(CAPTIONS + ["pneumothorax"] * 3, 80))
    assert mlm.mlm_dir(mlm.mlm_key(CAPTIONS, other_tok, spec, recipe)) != base


def test_tiny_methods_start_from_the_mlm_tower_and_key_it():
    from methods import convirt
    from methods.vlp import method as M

    assert T.tiny_text_spec().init == "mlm"
    opts = {k: o.default for k, o in convirt.DEFINITION.all_options().items()}
    key = M.weights_key(convirt.DEFINITION, "tiny", opts, _FakeMimic())
    assert key["text"]["init"] == "mlm" and key["text_mlm"] == mlm.MLMRecipe().to_dict()


class _FakeMimic:
    source = {"manifest_sha256": "m", "kind": "synthetic"}

    class images:
        fingerprint = "f"
