"""Results and the leaderboard resolve to a project checkout by configuration, never to site-packages."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench import paths
from bench.errors import BenchError


def checkout(folder: Path, name: str = "medvlp-bench") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(f'[project]\nname = "{name}"\nversion = "0"\n')
    return folder


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(paths.RESULTS_ENV, raising=False)
    monkeypatch.delenv(paths.LEADERBOARD_ENV, raising=False)


@pytest.fixture
def installed(monkeypatch, tmp_path):
    """The package as a non-editable install sees it: its parent folder is site-packages."""
    site = tmp_path / "venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.setattr(paths, "REPO_ROOT", site)
    return site


def test_environment_variable_wins(monkeypatch, tmp_path, installed):
    monkeypatch.setenv(paths.RESULTS_ENV, str(tmp_path / "elsewhere"))
    monkeypatch.setenv(paths.LEADERBOARD_ENV, str(tmp_path / "board"))
    monkeypatch.chdir(checkout(tmp_path / "proj"))
    assert paths.results_dir() == tmp_path / "elsewhere"
    assert paths.leaderboard_dir() == tmp_path / "board"


def test_checkout_found_from_a_subfolder_of_the_current_directory(monkeypatch, tmp_path, installed):
    root = checkout(tmp_path / "proj")
    (root / "results" / "deep").mkdir(parents=True)
    monkeypatch.chdir(root / "results" / "deep")
    assert paths.results_dir() == root.resolve() / "results"
    assert paths.leaderboard_dir() == root.resolve()
    assert installed not in paths.results_dir().parents


def test_a_foreign_pyproject_is_not_a_checkout(monkeypatch, tmp_path, installed):
    other = checkout(tmp_path / "other", name="someone-else")
    (other / "broken").mkdir()
    (other / "broken" / "pyproject.toml").write_text("[project\nname=")   # unparsable: skipped, not an error
    monkeypatch.chdir(other / "broken")
    with pytest.raises(BenchError, match="MEDVLP_BENCH_RESULTS"):
        paths.results_dir()
    with pytest.raises(BenchError, match="MEDVLP_BENCH_LEADERBOARD"):
        paths.leaderboard_dir()


def test_normalised_project_name_counts(monkeypatch, tmp_path, installed):
    root = checkout(tmp_path / "proj", name="MedVLP_Bench")
    monkeypatch.chdir(root)
    assert paths.project_root() == root.resolve()


def test_falls_back_to_the_source_checkout(monkeypatch, tmp_path):
    src = checkout(tmp_path / "src")
    monkeypatch.setattr(paths, "REPO_ROOT", src)
    outside = tmp_path / "somewhere"
    outside.mkdir()
    monkeypatch.chdir(outside)
    assert paths.results_dir() == src / "results"


def test_this_repository_is_a_checkout():
    assert paths.is_project_checkout(Path(__file__).resolve().parent.parent)
