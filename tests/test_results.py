"""Results store: path identity, atomic writes, skip and stale logic, malformed files."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from bench import results as R
from bench import runner
from bench.api import RunSpec
from bench.errors import CheckpointError
from engine_fakes import FAKE_METHOD, FAKE_TASK, add_task, score, world  # noqa: F401  (fixture)


def spec(**kw) -> RunSpec:
    base = dict(method=FAKE_METHOD, task=FAKE_TASK, fraction=0.1, seed=0)
    base.update(kw)
    return RunSpec(**base)


def run(s: RunSpec, **kw):
    return runner.run(s, device="cpu", **kw)


# --------------------------------------------------------------------------------------------
# path identity


def test_result_path_identity(world, tmp_path):
    task = runner.TASKS.get(FAKE_TASK)
    root = tmp_path / "results"
    p = R.result_path(spec(), task)
    assert p == root / "synthetic-tiny" / FAKE_TASK / FAKE_METHOD / "frac0.1-seed0.json"
    assert R.result_path(spec(fraction=0.01, seed=3), task).name == "frac0.01-seed3.json"
    assert R.result_path(spec(fraction=1.0), task).name == "frac1.0-seed0.json"
    assert R.result_path(spec(preset="paper", data="/some/root"), task).parts[-4] == "real-paper"
    # non-default protocol appears; the default one does not
    assert R.result_path(spec(protocol="other"), task).name == "frac0.1-seed0-other.json"
    assert R.result_path(spec(protocol=None), task).name == "frac0.1-seed0.json"
    # overrides / checkpoint / split seed add a short hash that depends on their values
    a = R.result_path(spec(overrides=(("lr", 0.1),)), task).name
    b = R.result_path(spec(overrides=(("lr", 0.2),)), task).name
    c = R.result_path(spec(overrides=(("lr", 0.1),)), task).name
    assert a != b and a == c and a.startswith("frac0.1-seed0-") and len(a) == len("frac0.1-seed0-12345678.json")
    assert R.result_path(spec(checkpoint="/w/a.pt"), task) != R.result_path(spec(checkpoint="/w/b.pt"), task)
    assert R.result_path(spec(split_seed=1), task) != R.result_path(spec(), task)
    # explicit root
    assert R.result_path(spec(), task, tmp_path / "x").is_relative_to(tmp_path / "x")


def test_default_protocol_spelled_out_is_the_same_run(world):
    r1, p1, skipped1 = run(spec(protocol="default"))
    r2, p2, skipped2 = run(spec())
    assert p1 == p2 and not skipped1 and skipped2
    assert r1.spec["protocol"] is None and r1.task["protocol"] == "default"


# --------------------------------------------------------------------------------------------
# what a result holds


def test_result_contents_and_rounding(world, tmp_path):
    result, path, skipped = run(spec())
    assert not skipped and path.exists()
    d = json.loads(path.read_text())
    assert d["schema_version"] == R.SCHEMA_VERSION and d["status"] == "finished"
    assert d["spec"] == {"method": FAKE_METHOD, "task": FAKE_TASK, "fraction": 0.1, "seed": 0, "preset": "tiny",
                         "data": "synth", "protocol": None, "checkpoint": None, "split_seed": 0, "overrides": []}
    assert d["task"]["name"] == FAKE_TASK and d["task"]["version"] == 1 and d["task"]["family"] == "test-family"
    assert d["task"]["settings"] == {"lr": 0.1, "epochs": 2}
    assert d["main_metric"] == "score"
    assert d["main_value"] == round(score(spec()), 6) != score(spec())       # rounded to 6 digits
    assert d["metrics"]["undefined"] is None                                  # NaN -> null (strict JSON)
    assert d["main_ci"] == [round(score(spec()) - 0.05, 6), round(score(spec()) + 0.05, 6)]
    assert d["data_source"]["kind"] == "synthetic" and d["data_source"]["manifest_sha256"] == "manifest-1"
    assert d["method_card"]["name"] == FAKE_METHOD and d["method_card"]["capabilities"] == ["image_global"]
    assert d["git"]["commit"] and "dirty" in d["git"]
    assert {"torch", "numpy", "python", "sklearn"} <= set(d["packages"])
    assert d["device"] == "cpu" and d["wall_s"] >= 0 and d["started_at"].endswith("+00:00")
    text = path.read_text()
    assert text == R.dumps(d)                                                 # sorted keys, stable layout
    assert list(d) == sorted(d)
    # predictions: a sibling file, written by identity, named in the result
    assert d["predictions"] == "frac0.1-seed0.predictions.jsonl.gz"
    rows = R.read_predictions(path)
    assert rows == [{"image_id": "img0", "prob": 0.0}, {"image_id": "img1", "prob": 0.1},
                    {"image_id": "img2", "prob": 0.2}]
    assert d["predictions_sha256"] == R.sha256_file(R.predictions_path(path))
    with gzip.open(R.predictions_path(path)) as fh:
        assert fh.read().count(b"\n") == 3


def test_predictions_are_written_before_the_json(world, monkeypatch):
    order: list[str] = []
    real = R.atomic_write

    def spy(path, write):
        order.append(Path(path).name)
        return real(path, write)

    monkeypatch.setattr(R, "atomic_write", spy)
    run(spec())
    assert order == ["frac0.1-seed0.predictions.jsonl.gz", "frac0.1-seed0.json"]


# --------------------------------------------------------------------------------------------
# atomic writing


def _finished_files(d: Path) -> list[Path]:
    return [p for p in d.rglob("*.json")]


def test_failure_while_writing_json_leaves_nothing_finished(world, tmp_path, monkeypatch):
    _, path, _ = run(spec())
    assert path.exists()
    real = R.atomic_write

    def crash_half_way(p, write):
        if not Path(p).name.endswith(".json"):
            return real(p, write)

        def half(fh):
            fh.write(b'{"schema_version": 1, "status": "finished"')   # looks like a start ...
            raise OSError("disk full")                                 # ... then the disk fills up
        return real(p, half)

    monkeypatch.setattr(R, "atomic_write", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        run(spec(), force=True)
    # the old result was un-finished before writing, the new one never appeared, no temp files remain
    assert _finished_files(tmp_path / "results") == []
    assert sorted(p.name for p in path.parent.iterdir()) == ["frac0.1-seed0.predictions.jsonl.gz"]


def test_failure_in_fsync_leaves_no_temp_file(tmp_path, monkeypatch):
    def failing_fsync(fd):
        raise OSError("io error")

    monkeypatch.setattr(R.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="io error"):
        R.atomic_write(tmp_path / "a.json", lambda fh: fh.write(b"{}"))
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_predictions_leaves_no_json(world, tmp_path, monkeypatch):
    class NotJson:
        pass

    def bad_run(encoder, data, s, device):
        out = world.task_run(encoder, data, s, device)
        out.predictions = [{"ok": 1}, {"bad": NotJson()}]
        return out

    add_task(monkeypatch, world, run=bad_run)
    with pytest.raises(TypeError, match="cannot store"):
        run(spec())
    assert _finished_files(tmp_path / "results") == []
    leftovers = list((tmp_path / "results").rglob("*"))
    assert not [p for p in leftovers if p.is_file()]


def test_write_result_roundtrip_without_predictions(world, tmp_path):
    result, path, _ = run(spec())
    other = tmp_path / "copy" / "x.json"
    stored = R.write_result(result, other, None)
    assert stored.predictions is None and not R.predictions_path(other).exists()
    assert R.load_result(other) == stored
    assert stored.metrics == result.metrics and stored.spec == result.spec


# --------------------------------------------------------------------------------------------
# skip and stale logic


def test_second_run_is_skipped_and_force_reruns(world):
    r1, p1, s1 = run(spec())
    r2, p2, s2 = run(spec())
    assert (s1, s2) == (False, True) and p1 == p2 and r1 == r2
    assert len(world.task_calls) == 1
    r3, _, s3 = run(spec(), force=True)
    assert not s3 and len(world.task_calls) == 2


def test_different_spec_is_a_different_run(world):
    run(spec())
    _, p, skipped = run(spec(seed=1))
    assert not skipped and p.name == "frac0.1-seed1.json"
    _, p, skipped = run(spec(overrides=(("lr", 0.5),)))
    assert not skipped and len(world.task_calls) == 3


def test_stale_task_version_is_rerun(world, monkeypatch):
    _, path, _ = run(spec())
    add_task(monkeypatch, world, version=2)
    r, p, skipped = run(spec())
    assert not skipped and p == path and r.task_version == 2
    assert R.load_result(path).task_version == 2
    assert len(world.task_calls) == 2


def test_stale_manifest_is_rerun(world):
    run(spec())
    world.manifest = "manifest-2"
    r, _, skipped = run(spec())
    assert not skipped and r.manifest_sha256 == "manifest-2"
    _, _, skipped = run(spec())
    assert skipped and len(world.task_calls) == 2


def test_stale_checkpoint_content_is_rerun(world, tmp_path):
    ck = tmp_path / "w.pt"
    ck.write_bytes(b"one")
    r1, p1, _ = run(spec(checkpoint=str(ck)))
    assert r1.checkpoint_sha256 == R.sha256_file(ck) and r1.spec["checkpoint"] == str(ck.resolve())
    _, _, skipped = run(spec(checkpoint=str(ck)))
    assert skipped
    ck.write_bytes(b"two")
    r2, p2, skipped = run(spec(checkpoint=str(ck)))
    assert not skipped and p2 == p1 and r2.checkpoint_sha256 != r1.checkpoint_sha256


def test_missing_checkpoint_is_refused_before_work(world, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        run(spec(checkpoint=str(tmp_path / "absent.pt")))
    assert world.factory_calls == [] and world.prepare_calls == []


def test_unreadable_existing_result_is_replaced(world):
    _, path, _ = run(spec())
    path.write_text("{ not json")
    _, _, skipped = run(spec())
    assert not skipped and R.load_result(path).status == "finished"


# --------------------------------------------------------------------------------------------
# reading


def test_malformed_result_files_are_named(world, tmp_path):
    run(spec())
    root = tmp_path / "results"
    bad = root / "synthetic-tiny" / "x" / "y" / "broken.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{ oops")
    old = root / "synthetic-tiny" / "x" / "y" / "old.json"
    old.write_text(json.dumps({"schema_version": 0}))
    with pytest.raises(R.ResultError) as e:
        R.load_results(root)
    msg = str(e.value)
    assert "2 malformed" in msg and str(bad) in msg and str(old) in msg
    assert "not valid JSON" in msg and "unsupported schema_version 0" in msg


def test_missing_keys_are_reported(world, tmp_path):
    _, path, _ = run(spec())
    d = json.loads(path.read_text())
    del d["metrics"]
    d["surprise"] = 1
    path.write_text(json.dumps(d))
    with pytest.raises(R.ResultError) as e:
        R.load_result(path)
    assert str(path) in str(e.value) and "missing keys ['metrics']" in str(e.value)
    assert "unknown keys ['surprise']" in str(e.value)


def test_load_results_is_sorted_and_skips_golden(world, tmp_path):
    for seed in (2, 0, 1):
        run(spec(seed=seed))
    root = tmp_path / "results"
    golden = root / "golden"
    golden.mkdir()
    (golden / "whatever.json").write_text("not even json")
    loaded = R.load_results(root)
    assert [r.seed for r in loaded.values()] == [0, 1, 2]
    assert list(loaded) == sorted(loaded)
    assert R.load_results(tmp_path / "nowhere") == {}


def test_run_spec_roundtrip(world):
    s = spec(overrides=(("epochs", [1, 2]), ("lr", 0.5)))
    r, _, _ = run(s)
    assert r.run_spec() == runner.normalise_spec(s, runner.TASKS.get(FAKE_TASK))
