"""Method ``supervised``: label policy, on-demand pretraining cached per corpus, strict loading, and
the refusal to guess weights on real data."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.api import METHODS
from bench.errors import CheckpointError
from methods import supervised as sup
from methods.backbones import file_sha256, state_fingerprint


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVLP_BENCH_CACHE", str(tmp_path / "cache"))
    # the mechanics, not the recipe, are under test: two short epochs
    short = dataclasses.replace(sup.RECIPES["tiny"].config, epochs=2, batch_size=8)
    monkeypatch.setitem(sup.RECIPES, "tiny", dataclasses.replace(sup.RECIPES["tiny"], config=short))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path / "cache"
    torch.set_num_threads(before)


def test_label_policy_masks_uncertain_and_negates_blank():
    out = sup.label_targets(np.array([[1.0, 0.0, np.nan, -1.0]]))
    assert out[0, :3].tolist() == [1.0, 0.0, 0.0] and math.isnan(out[0, 3])


def test_masked_bce_ignores_masked_pairs():
    logits = torch.tensor([[5.0, -3.0]])
    full = sup.masked_bce(logits, torch.tensor([[1.0, 1.0]]))
    masked = sup.masked_bce(logits, torch.tensor([[1.0, float("nan")]]))
    assert masked < full and masked == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(-5.0))))


def test_pretrains_once_per_corpus_and_loads_strictly(micro_mimic, cache):
    folder = sup.train_supervised("tiny", str(micro_mimic), device="cpu")
    weights = folder / sup.WEIGHTS_FILE
    meta = json.loads((folder / sup.META_FILE).read_text())
    assert folder.parent == cache / "pretrained" / "supervised"
    assert meta["key"]["source_kind"] == "synthetic" and meta["train_images"] > 0
    assert [row["epoch"] for row in meta["history"]] == list(range(1, sup.recipe("tiny").config.epochs + 1))
    assert not list(folder.parent.glob("*.work")) and not list(folder.parent.glob("*.partial"))

    stamp = weights.stat().st_mtime_ns
    assert sup.train_supervised("tiny", str(micro_mimic), device="cpu") == folder     # reused, not retrained
    assert weights.stat().st_mtime_ns == stamp

    enc = METHODS.get("supervised").factory("tiny", weights, 0, data="/somewhere/real")
    assert enc.card.weights_sha256 == file_sha256(weights)
    assert enc.card.image_size == 64 and "channels=32-64-128-256" in enc.card.backbone
    random = METHODS.get("random").factory("tiny", None, 0)
    assert state_fingerprint(enc.model) != state_fingerprint(random.model)            # really trained weights

    # a second fresh pretraining gives bit-identical weights (CPU determinism)
    again = sup.train_supervised("tiny", str(micro_mimic), out_dir=cache / "again", device="cpu")
    assert file_sha256(again / sup.WEIGHTS_FILE) == file_sha256(weights)

    # a checkpoint that leaves a backbone tensor out is refused, with the key named
    state = load_file(str(weights))
    dropped = sorted(state)[0]
    del state[dropped]
    partial = cache / "partial.safetensors"
    save_file(state, str(partial))
    with pytest.raises(CheckpointError, match="missing backbone keys"):
        METHODS.get("supervised").factory("tiny", partial, 0)


def test_real_data_without_checkpoint_says_how_to_pretrain(tmp_path):
    with pytest.raises(CheckpointError, match="bench pretrain --method supervised"):
        METHODS.get("supervised").factory("tiny", None, 0, data=str(tmp_path))
