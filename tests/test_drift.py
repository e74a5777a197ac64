"""Drift check on a fake fast task: passes when unchanged, fails on drift or missing golden files."""
from __future__ import annotations

import json

import pytest

from bench import cli, drift
from bench.results import load_result
from engine_fakes import FAKE_METHOD, FAKE_TASK, add_task, world  # noqa: F401  (fixture)

CELLS = (drift.GoldenCell(FAKE_METHOD, FAKE_TASK, 0.1), drift.GoldenCell(FAKE_METHOD, FAKE_TASK, 1.0, seed=1))


@pytest.fixture
def golden(world, monkeypatch, tmp_path):
    monkeypatch.setattr(drift, "GOLDEN_CELLS", CELLS)
    monkeypatch.setattr(drift, "TOLERANCES", {})
    report = drift.check(update=True)
    assert report.ok and len(report.updated) == 2
    return tmp_path / "results" / "golden"


def test_update_writes_golden_files_outside_the_results_tree(golden, tmp_path):
    names = sorted(p.name for p in golden.iterdir())
    assert names == [f"{c.name}.json" for c in sorted(CELLS, key=lambda c: c.name)]
    # the fresh runs went to a temporary folder, not into results/
    assert [p for p in (tmp_path / "results").rglob("*.json") if "golden" not in p.parts] == []
    assert load_result(golden / f"{CELLS[0].name}.json").spec["fraction"] == 0.1


def test_passes_when_nothing_moved(golden):
    report = drift.check()
    assert report.ok, report.table()
    mains = [r for r in report.rows if r.metric == "score (main)"]
    assert len(mains) == 2 and all(r.delta == 0 for r in mains)
    assert "(2 other metrics)" in report.table()        # aux and undefined (NaN == NaN) compared too


def test_fails_when_a_golden_value_is_altered(golden):
    path = golden / f"{CELLS[1].name}.json"
    d = json.loads(path.read_text())
    d["metrics"]["score"] += 1e-3
    path.write_text(json.dumps(d))
    report = drift.check()
    assert not report.ok
    (bad,) = report.failures
    assert bad.cell == CELLS[1].name and bad.metric == "score (main)" and bad.status == "MOVED"
    assert bad.delta == pytest.approx(-1e-3, abs=1e-9)
    assert "MOVED" in report.table() and "1e-04" in report.table()


def test_small_change_within_tolerance_passes_and_tolerance_is_configurable(golden, monkeypatch):
    path = golden / f"{CELLS[0].name}.json"
    d = json.loads(path.read_text())
    d["metrics"]["aux"] += 5e-5
    path.write_text(json.dumps(d))
    assert drift.check().ok
    monkeypatch.setitem(drift.TOLERANCES, "aux", 1e-5)
    report = drift.check()
    assert [r.metric for r in report.failures] == ["aux"]
    assert drift.check(tolerance=1e-3).ok is False       # per-metric tolerance wins over the default


def test_fails_when_the_code_drifts(golden, world):
    world.offset = 0.01                                  # every metric moves
    report = drift.check()
    assert not report.ok
    assert {r.metric for r in report.failures} == {"score (main)", "aux"}


def test_missing_golden_file_is_a_failure_not_a_skip(golden):
    (golden / f"{CELLS[0].name}.json").unlink()
    report = drift.check()
    assert not report.ok
    (bad,) = report.failures
    assert bad.status.startswith("MISSING golden file") and "--update" in bad.status


def test_manifest_and_task_version_changes_are_reported(golden, world, monkeypatch):
    world.manifest = "manifest-2"
    add_task(monkeypatch, world, version=2)
    report = drift.check()
    statuses = {r.status for r in report.failures}
    assert statuses == {"MANIFEST CHANGED", "TASK VERSION CHANGED"}


def test_cell_that_cannot_run_fails(golden, monkeypatch):
    monkeypatch.setattr(drift, "GOLDEN_CELLS", CELLS + (drift.GoldenCell("no-such-method", FAKE_TASK, 1.0),))
    report = drift.check()
    assert not report.ok and report.failures[0].status.startswith("ERROR: unknown method 'no-such-method'")


def test_cli_exit_codes(golden, capsys):
    assert cli.main(["check"]) == 0
    assert "drift check passed" in capsys.readouterr().out
    path = golden / f"{CELLS[0].name}.json"
    d = json.loads(path.read_text())
    d["metrics"]["score"] = 0.0
    path.write_text(json.dumps(d))
    assert cli.main(["check"]) == 1
    out = capsys.readouterr()
    assert "MOVED" in out.out and "FAILED" in out.err
    assert cli.main(["check", "--update"]) == 0
    assert cli.main(["check"]) == 0


def test_default_suite_is_small_and_named():
    assert 1 <= len(drift.GOLDEN_CELLS) <= 5
    assert all(c.preset == "tiny" for c in drift.GOLDEN_CELLS)
    assert len({c.name for c in drift.GOLDEN_CELLS}) == len(drift.GOLDEN_CELLS)


def test_runs_use_a_fresh_cache_sharing_only_the_corpus(golden, world, monkeypatch, tmp_path):
    import os

    seen = []
    real_prepare = world.prepare

    def spy(*a, **kw):
        seen.append(os.environ["MEDVLP_BENCH_CACHE"])
        return real_prepare(*a, **kw)

    from bench import runner
    monkeypatch.setattr(runner, "prepare_data", spy)
    assert drift.check().ok
    assert len(seen) == 2 and all(s != str(tmp_path / "cache") for s in seen)
    assert os.environ["MEDVLP_BENCH_CACHE"] == str(tmp_path / "cache")      # restored
    assert not any(os.path.exists(s) for s in seen)                          # removed afterwards
    seen.clear()
    assert drift.check(fresh_cache=False).ok and seen == [str(tmp_path / "cache")] * 2


def test_runs_read_the_check_corpus_scale_and_restore_the_default(golden, world, monkeypatch):
    from bench import runner
    from bench.data.synth.corpus import DEFAULT_SCALE, default_scale
    from bench.paths import synth_root

    seen = []
    real_prepare = world.prepare

    def spy(*a, **kw):
        seen.append((default_scale(), synth_root().name))
        return real_prepare(*a, **kw)

    monkeypatch.setattr(runner, "prepare_data", spy)
    assert drift.check().ok
    assert seen == [(drift.CORPUS_SCALE, f"{drift.CORPUS_SCALE}-seed0")] * 2
    assert drift.CORPUS_SCALE != DEFAULT_SCALE and default_scale() == DEFAULT_SCALE   # restored after the check


def test_using_scale_nests_restores_and_refuses_unknown_scales():
    from bench.data.synth.corpus import DEFAULT_SCALE, default_scale, using_scale

    with using_scale("tiny"):
        with using_scale("micro"):
            assert default_scale() == "micro"
        assert default_scale() == "tiny"
        with pytest.raises(RuntimeError), using_scale("small"):
            raise RuntimeError("a failing run inside the block")
        assert default_scale() == "tiny"
    assert default_scale() == DEFAULT_SCALE
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        with using_scale("huge"):
            pass


def test_isolated_cache_links_the_corpus(world, tmp_path):
    (tmp_path / "cache" / "synth" / "tiny-seed0").mkdir(parents=True)
    with drift.isolated_cache() as c:
        from bench.paths import cache_dir, synth_root
        assert cache_dir() == c and synth_root("tiny", 0).is_dir()
        assert synth_root("tiny", 0).resolve() == (tmp_path / "cache" / "synth" / "tiny-seed0").resolve()


def _with_learning(result, prior, last):
    import dataclasses

    details = dict(result.details, prior_loss=prior, history=[{"epoch": 1, "train_loss": 2 * prior},
                                                               {"epoch": 2, "train_loss": last}])
    return dataclasses.replace(result, details=details)


def test_learning_cell_fails_when_its_training_stops_learning(golden):
    cell = drift.GoldenCell(FAKE_METHOD, FAKE_TASK, 0.1, learns=True)
    result = load_result(drift.golden_path(CELLS[0], golden))
    assert drift.learning_row(cell, _with_learning(result, 0.6, 0.3)).ok
    stalled = drift.learning_row(cell, _with_learning(result, 0.6, 0.58))     # 0.97 of the prior
    assert not stalled.ok and stalled.status == "DOES NOT LEARN" and stalled.delta == pytest.approx(0.58 / 0.6)
    missing = drift.learning_row(cell, result)                                 # no prior_loss recorded
    assert not missing.ok and missing.status.startswith("NO LEARNING RECORD")


def test_the_default_suite_has_learning_cells():
    assert any(c.learns and c.task.endswith("-ft") for c in drift.GOLDEN_CELLS)
    assert any(c.method != "random" and c.task.endswith("-cls") for c in drift.GOLDEN_CELLS)


def _as_if_from(path, cpu_model):
    d = json.loads(path.read_text())
    d["host"]["cpu_model"] = cpu_model
    return d


def test_golden_files_record_the_numerics_of_their_machine(golden):
    host = json.loads((golden / f"{CELLS[0].name}.json").read_text())["host"]
    assert host["cpu_model"] and host["cpu_capability"]
    assert isinstance(host["numerics"], dict)


def test_on_other_hardware_metrics_are_compared_within_the_golden_ci(golden):
    path = golden / f"{CELLS[0].name}.json"
    d = _as_if_from(path, "another CPU")
    d["metrics"]["score"] += 0.03                     # the fake task's CI half-width is 0.05
    path.write_text(json.dumps(d))
    report = drift.check()
    assert report.ok, report.table()
    hw = [r for r in report.rows if r.metric == "hardware" and r.cell == CELLS[0].name]
    assert hw and hw[0].golden == "another CPU" and "CI half-width" in hw[0].status
    main = next(r for r in report.rows if r.cell == CELLS[0].name and r.metric == "score (main)")
    assert main.tolerance == pytest.approx(0.05)
    d["metrics"]["score"] += 0.03                      # 0.06 away: beyond its own uncertainty
    path.write_text(json.dumps(d))
    (bad,) = drift.check().failures
    assert bad.metric == "score (main)" and bad.status == "MOVED"


def test_on_the_golden_hardware_a_change_inside_the_ci_still_fails(golden):
    path = golden / f"{CELLS[0].name}.json"
    d = json.loads(path.read_text())
    d["metrics"]["score"] += 0.03
    path.write_text(json.dumps(d))
    report = drift.check()
    assert [r.metric for r in report.failures] == ["score (main)"]
    assert not any(r.metric == "hardware" for r in report.rows)


def test_a_golden_file_without_a_hardware_record_counts_as_other_hardware(golden):
    path = golden / f"{CELLS[0].name}.json"
    d = json.loads(path.read_text())
    for key in ("cpu_model", "cpu_capability", "numerics"):
        d["host"].pop(key)
    path.write_text(json.dumps(d))
    report = drift.check()
    assert report.ok and any(r.metric == "hardware" and r.golden == "not recorded" for r in report.rows)


def test_importing_bench_caps_the_cpu_numerics_at_avx2():
    import os
    import platform
    import subprocess
    import sys

    code = ("import os, bench, torch; torch.ones(3).sum(); "
            "print(os.environ.get('ATEN_CPU_CAPABILITY'), torch.backends.cpu.get_cpu_capability())")
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MEDVLP_BENCH_CPU_ISA")}

    def run(**extra):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**clean, **extra}).stdout.split()

    capped = run()
    if platform.machine() == "x86_64":
        assert capped[0] == "avx2" and capped[1] in ("AVX2", "DEFAULT")     # never AVX512
    assert run(MEDVLP_BENCH_CPU_ISA="native")[0] == "None"
    assert run(ATEN_CPU_CAPABILITY="default")[1] == "DEFAULT"              # what the user set stays
