"""A result's identity covers everything that moves a number: the weights the encoder was built
with (for every method), and the data root (two roots never share a file; a synthetic corpus given
by path is filed as synthetic)."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import timm
import torch

from bench import identity, runner
from bench import results as R
from bench.api import METHODS, MethodEntry, RunSpec
from bench.errors import BenchError, CheckpointError
from engine_fakes import FAKE_METHOD, FAKE_TASK, GLOBAL, FakeEncoder, add_task, card, world  # noqa: F401
from methods import imagenet
from methods.backbones import file_sha256, state_fingerprint


def spec(**kw) -> RunSpec:
    base = dict(method=FAKE_METHOD, task=FAKE_TASK, fraction=0.1, seed=0)
    base.update(kw)
    return RunSpec(**base)


def run(s: RunSpec, **kw):
    return runner.run(s, device="cpu", **kw)


class WeightedEncoder(FakeEncoder):
    """A fake encoder with one real parameter, so its state fingerprint follows its weights."""

    def __init__(self, value: float, card_sha: str | None = None) -> None:
        super().__init__(dataclasses.replace(card(), weights_sha256=card_sha))
        self.w = torch.nn.Parameter(torch.full((3,), float(value)))


def add_weighted_method(monkeypatch, knobs: dict) -> None:
    def factory(preset, checkpoint, seed, **_):
        return WeightedEncoder(knobs["value"], knobs.get("card_sha"))
    monkeypatch.setitem(METHODS._items, FAKE_METHOD,
                        MethodEntry(name=FAKE_METHOD, factory=factory, capabilities=GLOBAL, description="weighted"))


# --------------------------------------------------------------------------------------------
# weights


def test_every_result_records_its_weights(world):
    r, path, _ = run(spec())
    assert r.weights_origin == identity.ORIGIN_STATE and r.weights_file is None
    assert r.weights_sha256 == state_fingerprint(FakeEncoder(card())) and len(r.weights_sha256) == 64
    d = json.loads(path.read_text())
    assert d["schema_version"] == 2 and d["weights_sha256"] == r.weights_sha256


def test_changed_weights_of_a_fake_method_rerun(world, monkeypatch, caplog):
    knobs = {"value": 1.0}
    add_weighted_method(monkeypatch, knobs)
    r1, path, _ = run(spec())
    _, _, skipped = run(spec())
    assert skipped
    knobs["value"] = 2.0                                     # e.g. a changed init: same spec, other weights
    with caplog.at_level(logging.INFO, logger="bench.runner"):
        r2, path2, skipped = run(spec())
    assert not skipped and path2 == path and r2.weights_sha256 != r1.weights_sha256
    assert any("stale result" in m and "weights changed" in m for m in caplog.messages)
    # each run prepares the data once (the skip needs the manifest); the stale one runs the task again
    assert len(world.prepare_calls) == 3 and len(world.task_calls) == 2


def test_card_hash_is_the_identity_when_the_method_read_a_file(world, monkeypatch):
    knobs = {"value": 1.0, "card_sha": "a" * 64}
    add_weighted_method(monkeypatch, knobs)
    r1, _, _ = run(spec())
    assert (r1.weights_sha256, r1.weights_origin) == ("a" * 64, identity.ORIGIN_CARD)
    knobs["card_sha"] = "b" * 64                             # e.g. a re-pretrained cached checkpoint
    r2, _, skipped = run(spec())
    assert not skipped and r2.weights_sha256 == "b" * 64


def test_random_init_fingerprint_follows_the_seed():
    import methods.random_init as random_init

    a = identity.weights_identity(random_init.factory("tiny", None, 0), None, None)
    b = identity.weights_identity(random_init.factory("tiny", None, 0), None, None)
    c = identity.weights_identity(random_init.factory("tiny", None, 1), None, None)
    assert a == b and a.sha256 != c.sha256 and a.origin == identity.ORIGIN_STATE


def test_result_from_the_old_schema_is_refused_by_name(world):
    _, path, _ = run(spec())
    d = json.loads(path.read_text())
    d["schema_version"] = 1
    path.write_text(json.dumps(d))
    with pytest.raises(R.ResultError, match=r"unsupported schema_version 1 \(this harness reads 2") as e:
        R.load_result(path)
    assert str(path) in str(e.value)


# -- imagenet: a real method whose weights come from files ----------------------------------------

@pytest.fixture
def no_caches(tmp_path, monkeypatch):
    home = tmp_path / "home"
    for var in ("HF_HUB_CACHE", "HF_HOME", "TORCH_HOME", imagenet.ENV_VAR):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    return home


def write_resnet18(path: Path, seed: int) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = timm.create_model("resnet18", pretrained=False).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def add_imagenet(monkeypatch) -> None:
    monkeypatch.setitem(METHODS._items, "imagenet", MethodEntry(
        name="imagenet", factory=imagenet.factory, capabilities=imagenet.CAPABILITIES, description="imagenet"))


def test_imagenet_checkpoint_rewritten_with_other_tensors_reruns(world, monkeypatch, no_caches, tmp_path):
    add_imagenet(monkeypatch)
    ck = write_resnet18(tmp_path / "w" / "resnet18.pth", seed=1)
    r1, path, _ = run(spec(method="imagenet", checkpoint=str(ck)))
    assert r1.weights_sha256 == file_sha256(ck) and r1.weights_origin == identity.ORIGIN_CARD
    assert r1.weights_file == str(ck.resolve())
    assert run(spec(method="imagenet", checkpoint=str(ck)))[2]              # skipped
    write_resnet18(ck, seed=2)
    r2, path2, skipped = run(spec(method="imagenet", checkpoint=str(ck)))
    assert not skipped and path2 == path and r2.weights_sha256 == file_sha256(ck) != r1.weights_sha256


def test_imagenet_env_file_replaced_reruns(world, monkeypatch, no_caches, tmp_path, caplog):
    """No --checkpoint: only the weights hash can notice that the file behind the variable changed."""
    add_imagenet(monkeypatch)
    f = write_resnet18(tmp_path / "env" / "resnet18.pth", seed=1)
    monkeypatch.setenv(imagenet.ENV_VAR, str(f))
    r1, path, _ = run(spec(method="imagenet"))
    assert r1.checkpoint_sha256 is None and r1.weights_sha256 == file_sha256(f)
    assert run(spec(method="imagenet"))[2]
    write_resnet18(f, seed=3)
    with caplog.at_level(logging.INFO, logger="bench.runner"):
        r2, _, skipped = run(spec(method="imagenet"))
    assert not skipped and r2.weights_sha256 == file_sha256(f) != r1.weights_sha256
    assert any("weights changed" in m for m in caplog.messages)


def test_env_weights_failing_strict_loading_are_an_error_not_a_fall_through(no_caches, monkeypatch, tmp_path):
    # a valid hub-cache file exists: the broken named file must still not be skipped for it
    hub = no_caches / ".cache" / "torch" / "hub" / "checkpoints"
    write_resnet18(hub / "resnet18-f37072fd.pth", seed=1)
    bad = tmp_path / "env" / "resnet18-broken.pth"
    state = torch.load(write_resnet18(bad, seed=1), weights_only=True)
    del state["layer2.0.conv1.weight"]
    torch.save(state, bad)
    monkeypatch.setenv(imagenet.ENV_VAR, str(bad))
    with pytest.raises(CheckpointError) as e:
        imagenet.factory("tiny", None, 0)
    msg = str(e.value)
    assert str(bad) in msg and imagenet.ENV_VAR in msg and "layer2.0.conv1.weight" in msg
    # a named path that does not exist is an error too
    monkeypatch.setenv(imagenet.ENV_VAR, str(tmp_path / "nowhere.pth"))
    with pytest.raises(CheckpointError, match="nowhere.pth: file not found"):
        imagenet.factory("tiny", None, 0)
    # unset, the hub cache is used
    monkeypatch.delenv(imagenet.ENV_VAR)
    assert imagenet.factory("tiny", None, 0).card.weights_sha256 == file_sha256(hub / "resnet18-f37072fd.pth")


def test_hub_cache_candidates_still_fall_through(no_caches):
    hub = no_caches / ".cache" / "torch" / "hub" / "checkpoints"
    bad = write_resnet18(hub / "resnet18-00000000.pth", seed=1)
    state = torch.load(bad, weights_only=True)
    del state["layer1.0.conv1.weight"]
    torch.save(state, bad)
    good = write_resnet18(hub / "resnet18-ffffffff.pth", seed=1)           # sorted after the broken one
    assert imagenet.factory("tiny", None, 0).card.weights_sha256 == file_sha256(good)


# --------------------------------------------------------------------------------------------
# data roots


def test_two_real_roots_never_share_a_file(world, tmp_path):
    task = runner.TASKS.get(FAKE_TASK)
    a, b = tmp_path / "rsna-a", tmp_path / "rsna-b"
    a.mkdir()
    b.mkdir()
    pa = R.result_path(runner.normalise_spec(spec(data=str(a)), task), task)
    pb = R.result_path(runner.normalise_spec(spec(data=str(b)), task), task)
    assert pa != pb and pa.parent == pb.parent and pa.parts[-4] == "real-tiny"
    assert pa.name == f"frac0.1-seed0-root{R.data_tag({'data': str(a)})}.json"
    # the same root spelled differently is the same identity
    assert R.result_path(runner.normalise_spec(spec(data=str(a / ".." / "rsna-a")), task), task) == pa
    r1, p1, _ = run(spec(data=str(a)))
    r2, p2, skipped = run(spec(data=str(b)))
    assert not skipped and (p1, p2) == (pa, pb) and p1.exists() and p2.exists()
    assert run(spec(data=str(a)))[2] and run(spec(data=str(b)))[2]          # both stay current
    assert R.load_result(p1).spec["data"] == str(a) and R.load_result(p2).spec["data"] == str(b)


def make_corpus(root: Path) -> Path:
    """A folder that ``corpus_of`` recognises as a synthetic corpus's RSNA dataset."""
    root.mkdir(parents=True)
    (root / "corpus.json").write_text(json.dumps({"scale": "micro", "seed": 0}))
    ds = root / "rsna-pneumonia"
    ds.mkdir()
    return ds


def test_synthetic_corpus_given_by_path_is_filed_as_synthetic(world, monkeypatch, tmp_path):
    ds = make_corpus(tmp_path / "corpus")
    assert R.data_label(str(ds)) == "synthetic" and R.data_label("synth") == "synthetic"
    assert R.data_label(str(tmp_path)) == "real"

    def prepare(dataset, data, **kw):            # the real data layer says synthetic for such a folder
        out = world.prepare(dataset, data, **kw)
        out.source["kind"] = R.data_label(data)
        return out

    monkeypatch.setattr(runner, "prepare_data", prepare)
    r, path, _ = run(spec(data=str(ds)))
    assert path.parts[-4] == "synthetic-tiny" and "-root" in path.name
    assert r.data_kind == "synthetic"
    # and it never replaces the default corpus's result
    _, default_path, _ = run(spec())
    assert default_path != path and path.exists() and default_path.exists()


def test_data_layer_and_results_store_must_agree_on_the_kind(world, tmp_path):
    ds = make_corpus(tmp_path / "corpus")        # the fake data layer calls every path "real"
    with pytest.raises(BenchError, match="mislabelled"):
        run(spec(data=str(ds)))
    assert not list((tmp_path / "results").rglob("*.json"))


# --------------------------------------------------------------------------------------------
# anchor differences travel into the result


def test_anchor_differences_are_copied_into_the_result(world, monkeypatch):
    entry = add_task(monkeypatch, world)
    sentences = ("MGCA: the cached probe has neither the 256->224 crop nor augmentation",)
    object.__setattr__(entry, "anchor_differences", sentences)   # works with or without the field
    r, _, _ = run(spec())
    assert r.task["anchor_differences"] == list(sentences)
