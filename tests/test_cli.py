"""The CLI: listing, running (and skipping), one-line user errors, capability refusal."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import cli
from bench.api import Capability
from bench.errors import DataError
from bench.paths import REPO_ROOT
from engine_fakes import DENSE, FAKE_METHOD, FAKE_TASK, add_method, add_task, world  # noqa: F401  (fixture)

RUN = ["run", "--method", FAKE_METHOD, "--task", FAKE_TASK, "--fraction", "0.1", "--device", "cpu"]


def test_list_mentions_registered_names_and_compatibility(world, monkeypatch, capsys):
    add_method(monkeypatch, world, "test-fake-dense", caps=DENSE)
    add_task(monkeypatch, world, "test-fake-dense-task", requires=DENSE, family="dense-family")
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in (FAKE_METHOD, FAKE_TASK, "test-fake-dense", "test-fake-dense-task", "test-family", "dense-family"):
        assert name in out
    assert "Compatibility" in out
    matrix = out.split("Compatibility")[1]
    fake_row = next(line for line in matrix.splitlines() if line.startswith(FAKE_METHOD + " "))
    dense_row = next(line for line in matrix.splitlines() if line.startswith("test-fake-dense "))
    assert "n/a (image_dense)" in fake_row and "n/a" not in dense_row


def test_run_writes_a_result_then_skips_it(world, capsys, tmp_path):
    assert cli.main(RUN) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line                              # one final line
    for part in (FAKE_TASK, FAKE_METHOD, "fraction 0.1", "seed 0", "score 0.5101", "95% CI", "data SYNTHETIC",
                 "frac0.1-seed0.json", "ran in"):
        assert part in line, (part, line)
    path = tmp_path / "results" / "synthetic-tiny" / FAKE_TASK / FAKE_METHOD / "frac0.1-seed0.json"
    assert json.loads(path.read_text())["data_source"]["kind"] == "synthetic"
    assert cli.main(RUN) == 0
    assert "cached" in capsys.readouterr().out
    assert len(world.task_calls) == 1
    assert cli.main(RUN + ["--force"]) == 0 and len(world.task_calls) == 2


def test_run_real_data_is_labelled_real(world, capsys, tmp_path):
    assert cli.main(RUN + ["--data", str(tmp_path / "rsna-root")]) == 0
    out = capsys.readouterr().out
    assert "data REAL" in out and "real-tiny" in out


def test_run_accepts_percent_fractions_and_overrides(world, capsys):
    assert cli.main(["run", "--method", FAKE_METHOD, "--task", FAKE_TASK, "--fraction", "100%",
                     "--set", "lr=0.5", "--set", "epochs=3", "--device", "cpu"]) == 0
    spec = world.task_calls[-1]
    assert spec.fraction == 1.0 and dict(spec.overrides) == {"lr": 0.5, "epochs": 3}
    assert "frac1.0-seed0-" in capsys.readouterr().out


def test_unknown_setting_is_a_user_error(world, capsys):
    assert cli.main(RUN + ["--set", "lrr=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no setting 'lrr'" in err and "did you mean 'lr'" in err


def test_bad_fraction_is_an_argparse_error(world, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--method", FAKE_METHOD, "--task", FAKE_TASK, "--fraction", "0.5"])
    assert e.value.code == 2 and "not a supported label fraction" in capsys.readouterr().err


def test_bench_error_is_one_line_exit_2(world, monkeypatch, capsys, tmp_path):
    def broken(encoder, data, spec, device):
        raise DataError("bad label 'maybe'", path=tmp_path / "labels.csv", line=7)

    add_task(monkeypatch, world, run=broken)
    assert cli.main(RUN) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {tmp_path / 'labels.csv'}, line 7: bad label 'maybe'"]
    assert "Traceback" not in err


def test_unknown_name_is_one_line_exit_2_with_suggestion(world, capsys):
    assert cli.main(["run", "--method", "test-fake-methd", "--task", FAKE_TASK, "--fraction", "1.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown method 'test-fake-methd'") and f"did you mean '{FAKE_METHOD}'" in err
    assert "\n" not in err


def test_other_exceptions_propagate(world, monkeypatch):
    def buggy(encoder, data, spec, device):
        raise ZeroDivisionError("a bug")

    add_task(monkeypatch, world, run=buggy)
    with pytest.raises(ZeroDivisionError):
        cli.main(RUN)


def test_capability_mismatch_refused_before_any_work(world, monkeypatch, capsys, tmp_path):
    add_task(monkeypatch, world, requires=frozenset({Capability.IMAGE_GLOBAL, Capability.TEXT}))
    assert cli.main(RUN) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: method 'test-fake-method' cannot run task 'test-fake-task': it lacks text")
    assert world.factory_calls == [] and world.prepare_calls == [] and world.task_calls == []
    assert not (tmp_path / "results").exists()


def test_encoder_card_capabilities_are_checked_too(world, monkeypatch, capsys):
    # the registry entry claims DENSE but the built encoder's card does not
    from bench.api import METHODS, MethodEntry
    monkeypatch.setitem(METHODS._items, FAKE_METHOD, MethodEntry(FAKE_METHOD, world.factory(), DENSE, "liar"))
    add_task(monkeypatch, world, requires=DENSE)
    assert cli.main(RUN) == 2
    assert "lacks image_dense" in capsys.readouterr().err and world.task_calls == []


def test_table_command_writes_leaderboard(world, capsys, tmp_path):
    assert cli.main(RUN) == 0
    out = tmp_path / "board" / "leaderboard.md"
    assert cli.main(["table", "--results", str(tmp_path / "results"), "--out", str(out)]) == 0
    text = out.read_text()
    assert FAKE_TASK in text and "SYNTHETIC" in text
    assert (out.parent / "leaderboard" / f"synthetic-tiny-{FAKE_TASK}.png").exists()


def test_demo_runs_every_method_and_reports_skips(world, monkeypatch, capsys, tmp_path):
    from bench import demo
    from bench.errors import CheckpointError

    def no_weights(preset, checkpoint, seed, data="synth"):
        raise CheckpointError("ImageNet weights not found (set MEDVLP_IMAGENET_WEIGHTS)")

    from bench.api import METHODS, MethodEntry
    monkeypatch.setitem(METHODS._items, "test-fake-noweights",
                        MethodEntry("test-fake-noweights", no_weights, DENSE, "needs weights", needs_weights=True))
    out = tmp_path / "lb.md"
    kw = dict(methods=[FAKE_METHOD, "test-fake-noweights"], tasks=[FAKE_TASK], device="cpu",
              results_root=tmp_path / "demo", committed_root=tmp_path / "committed", leaderboard_out=out, corpus=False)
    assert demo.main(**kw) == 0
    text = capsys.readouterr().out
    assert text.count("skipped: ImageNet weights not found") == 3
    assert text.count("(ran in") == 3 and "3 ran, 0 reused, 3 skipped" in text
    assert "0 equal, 0 differ, 3 not committed" in text
    assert out.exists()

    # the demo's cells, committed: a fresh demo computes them again and finds them equal
    import shutil
    shutil.copytree(tmp_path / "demo", tmp_path / "committed")
    shutil.rmtree(tmp_path / "demo")
    assert demo.main(**kw) == 0
    text = capsys.readouterr().out
    assert "3 ran, 0 reused" in text and "3 equal, 0 differ" in text and "all equal to the committed" in text

    # a committed number that differs is reported, and the demo exits 1
    world.offset = 0.01
    shutil.rmtree(tmp_path / "demo")
    assert demo.main(**kw) == 1
    text = capsys.readouterr().out
    assert "DIFFERS from committed" in text and "3 DIFFER" in text

    # a second demo reuses its own cells
    assert demo.main(**kw) == 1
    assert "0 ran, 3 reused" in capsys.readouterr().out

    # a sweep into the committed results themselves (how results/ is made) overwrites each file it would
    # compare with: it says so instead of calling every changed cell "= committed"
    world.offset = 0.02
    assert demo.main(**dict(kw, results_root=tmp_path / "committed", force=True)) == 0
    text = capsys.readouterr().out
    assert text.count("written into the committed results") == 4 and "3 ran" in text
    assert "= committed" not in text and "DIFFER" not in text


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for cmd in ("run", "list", "table", "check", "demo", "perf", "data"):
        assert cmd in out.stdout


def test_demo_defaults_to_the_references_and_mgca_and_all_means_every_method(monkeypatch):
    from bench import demo
    from bench.api import METHODS

    registered = {name: object() for name in ("random", "mgca", "pixels", "gloria", "supervised")}
    monkeypatch.setattr(METHODS, "_items", registered)
    assert demo.DEFAULT_METHODS == ("pixels", "random", "imagenet", "supervised", "mgca")
    # the defaults in their order, those registered; "all" is the registry; a list is taken as given
    assert demo.selected_methods(None) == ["pixels", "random", "supervised", "mgca"]
    assert demo.selected_methods(["all"]) == METHODS.names() and "gloria" in demo.selected_methods(["all"])
    assert demo.selected_methods(["gloria", "random"]) == ["gloria", "random"]
