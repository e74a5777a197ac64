"""Leaderboard: built from hand-made result files; deterministic; sections; ranks; n/a and `—` cells;
column sizes; data roots never pooled; which columns compare with the quoted paper table."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import leaderboard as L
from bench.api import RunSpec
from bench.paths import REPO_ROOT
from bench.results import Result, ResultError, data_tag, load_results, write_result

GLOBAL = ("image_global",)
DENSE = ("image_dense", "image_global")
NONE = L.Registered()          # no registered methods: the hand-made results stand alone


def make(root: Path, method: str, task: str, fraction: float, seed: int, value: float | None, *,
         kind: str = "synthetic", preset: str = "tiny", caps=GLOBAL, requires=GLOBAL, hib: bool = True,
         ci: float | None = 0.05, metric: str = "auroc", version: int = 1, data: str | None = None,
         sizes: dict | None = None, anchor: tuple[str, ...] = (), manifest: str = "abc") -> Path:
    data = data or ("synth" if kind == "synthetic" else "/data/real")
    spec = RunSpec(method=method, task=task, fraction=fraction, seed=seed, preset=preset, data=data)
    r = Result(
        spec=spec.to_dict(),
        task={"name": task, "version": version, "family": "linear-probe", "dataset": "rsna",
              "requires": list(requires), "protocol": "default", "main_metric": metric, "higher_is_better": hib,
              "settings": {}, "anchor_differences": list(anchor)},
        dataset="rsna", main_metric=metric, main_value=value,
        main_ci=None if ci is None or value is None else [value - ci, value + ci], higher_is_better=hib,
        metrics={metric: value}, ci={}, details={} if sizes is None else {"sizes": sizes},
        data_source={"kind": kind, "root": "/x", "dataset": "rsna", "manifest_sha256": manifest},
        method_card={"name": method, "capabilities": list(caps)}, checkpoint_sha256=None,
        weights_sha256="0" * 64, weights_origin="state-fingerprint", weights_file=None,
        git={"commit": "0123456789abcdef", "dirty": False}, packages={"torch": "2.x"}, device="cpu", host={},
        started_at=f"2024-01-0{seed + 1}T00:00:00+00:00", wall_s=1.0 + seed,
    )
    tag = data_tag(spec)
    path = root / f"{kind}-{preset}" / task / method / f"frac{fraction!r}-seed{seed}{f'-root{tag}' if tag else ''}.json"
    write_result(r, path, None)
    return path


def section_text(md: str, heading_start: str) -> str:
    """The text of the top-level section whose heading starts with ``heading_start``."""
    parts = re.split(r"(?m)^## ", md)
    for p in parts:
        if p.startswith(heading_start):
            return p
    raise AssertionError(f"no section {heading_start!r} in:\n{md}")


def norm(text: str) -> str:
    return re.sub(r" +", " ", text)


def table_row(md: str, method: str) -> list[str]:
    for line in md.splitlines():
        if line.startswith(f"| `{method}`"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row for {method}")


@pytest.fixture
def results(tmp_path) -> Path:
    root = tmp_path / "results"
    for seed, v in enumerate([0.7, 0.8, 0.9]):
        make(root, "alpha", "rsna-cls", 0.1, seed, v)
    for seed, v in enumerate([0.6, 0.6]):
        make(root, "beta", "rsna-cls", 0.1, seed, v)
    make(root, "alpha", "rsna-cls", 1.0, 0, 0.95)
    make(root, "beta", "rsna-cls", 1.0, 0, 0.97)
    # a dense task that beta (global only) cannot run
    make(root, "alpha", "siim-seg", 1.0, 0, 0.5, caps=DENSE, requires=DENSE, metric="dice")
    # REAL data results for the same task must land in their own section
    make(root, "alpha", "rsna-cls", 1.0, 0, 0.123, kind="real", preset="paper")
    return root


def test_mean_std_ci_and_n(results, tmp_path):
    md, _ = L.render(load_results(results))
    syn = section_text(md, "SYNTHETIC")
    rsna = syn.split("### rsna-cls")[1].split("###")[0]
    row = table_row(rsna, "alpha")
    # mean 0.8, sample std 0.1, mean CI [0.75, 0.85], 3 seeds; best in the column is bold
    assert row[1] == "**0.800** ± 0.100 [0.750, 0.850] (n=3)"
    assert row[2] == "0.950 [0.900, 1.000] (n=1)"
    beta = table_row(rsna, "beta")
    assert beta[1] == "0.600 ± 0.000 [0.550, 0.650] (n=2)"
    assert beta[2] == "**0.970** [0.920, 1.020] (n=1)"
    assert "| Method | 10% | 100% |" in norm(rsna)
    assert "auroc ↑" in rsna


def test_na_for_capability_mismatch_and_dash_for_not_run(results, tmp_path):
    md, _ = L.render(load_results(results))
    syn = section_text(md, "SYNTHETIC")
    siim = syn.split("### siim-seg")[1].split("###")[0]
    assert table_row(siim, "beta")[1] == "n/a"
    assert table_row(siim, "alpha")[1] == "0.500 [0.450, 0.550] (n=1)"   # alone in its column: not bold
    # a method that could run a task but has no result shows a dash, not n/a
    make(results, "gamma", "siim-seg", 0.1, 0, 0.4, caps=DENSE, requires=DENSE, metric="dice")
    md, _ = L.render(load_results(results))
    siim = section_text(md, "SYNTHETIC").split("### siim-seg")[1].split("###")[0]
    assert table_row(siim, "gamma")[2] == L.MISSING
    assert table_row(siim, "beta")[1:] == ["n/a", "n/a"]


def test_synthetic_and_real_sections_are_separate_and_labelled(results):
    md, plots = L.render(load_results(results))
    syn = section_text(md, "SYNTHETIC data")
    real = section_text(md, "REAL data")
    assert "0.123" in real and "0.123" not in syn
    assert "preset `paper`" in real.splitlines()[0] and "preset `tiny`" in syn.splitlines()[0]
    # every task heading and caption names the data source
    for sec, label in ((syn, "SYNTHETIC"), (real, "REAL")):
        for line in sec.splitlines():
            if line.startswith("### "):
                assert label in line, line
            if line.startswith("*") and "task `" in line:
                assert line.startswith(f"*{label} data"), line
    assert md.index("## SYNTHETIC") < md.index("## REAL") < md.index("## Reference")
    assert set(plots) == {"synthetic-tiny-rsna-cls.png", "synthetic-tiny-siim-seg.png", "real-paper-rsna-cls.png"}
    assert "](leaderboard/synthetic-tiny-rsna-cls.png)" in md


def test_average_rank_with_ties_and_incomplete(tmp_path):
    root = tmp_path / "results"
    # two tasks x two fractions; a and b tie on t1@10%
    vals = {("t1", 0.1): {"a": 0.8, "b": 0.8, "c": 0.6},
            ("t1", 1.0): {"a": 0.9, "b": 0.7, "c": 0.8},
            ("t2", 0.1): {"a": 0.3, "b": 0.5, "c": 0.4},     # t2: lower is better
            ("t2", 1.0): {"a": 0.2, "b": 0.2, "c": 0.1}}
    for (task, frac), by in vals.items():
        for m, v in by.items():
            make(root, m, task, frac, 0, v, hib=(task == "t1"), metric="err" if task == "t2" else "auroc")
    make(root, "d", "t1", 0.1, 0, 0.99)                   # incomplete: best there, but never ranked
    sec = L.sections(L.frame(load_results(root)))[0]
    table, incomplete = L.rank_section(sec)
    got = dict(zip(table["variant"], table["avg_rank"]))
    # t1@10%: a,b tie -> 1.5,1.5, c 3 | t1@100%: a1 c2 b3 | t2@10% (low best): a1 c2 b3 | t2@100%: c1, a,b 2.5
    assert got == pytest.approx({"a": (1.5 + 1 + 1 + 2.5) / 4, "b": (1.5 + 3 + 3 + 2.5) / 4,
                                 "c": (3 + 2 + 2 + 1) / 4})
    assert list(table["variant"]) == ["a", "c", "b"]
    assert set(incomplete) == {"d"} and "t1 @ 100%" in incomplete["d"][0] and "t2" in incomplete["d"][1]
    md = L.rank_markdown(sec)
    assert "| 1 | `a` | 1.50 | 4 |" in norm(md)
    assert "Not ranked:" in md and "- `d`: not run: t1 @ 100%; not run: t2 @ 10%, 100%" in md
    assert "rule at the top" in md
    assert "tied means get the average of the tied ranks" in L.render(load_results(root))[0]


def test_equal_average_ranks_share_a_place(tmp_path):
    root = tmp_path / "results"
    for m, v in {"a": 0.5, "b": 0.5, "c": 0.4}.items():
        make(root, m, "t1", 1.0, 0, v)
    sec = L.sections(L.frame(load_results(root)))[0]
    table, _ = L.rank_section(sec)
    assert dict(zip(table["variant"], table["avg_rank"])) == {"a": 1.5, "b": 1.5, "c": 3.0}
    md = L.rank_markdown(sec)
    assert "| 1 | `a` | 1.50 |" in norm(md) and "| 1 | `b` | 1.50 |" in norm(md)
    assert "| 3 | `c` | 3.00 |" in norm(md)


def test_na_columns_do_not_make_a_method_incomplete(results):
    """beta cannot run siim-seg (n/a): it is ranked over the rsna-cls columns it can run."""
    sec = L.sections(L.frame(load_results(results)))[0]
    table, unranked = L.rank_section(sec)
    assert unranked == {}
    got = {v: (a, c, n) for v, a, c, n in zip(table["variant"], table["avg_rank"], table["columns"], table["na"])}
    # rsna 10%: alpha 0.8 > beta 0.6; rsna 100%: beta 0.97 > alpha 0.95; siim-seg has alpha alone: counts for no one
    assert got == {"alpha": (1.5, 2, 0), "beta": (1.5, 2, 1)}
    md = L.rank_markdown(sec)
    assert "| 1 | `alpha` | 1.50 | 2 | 0 |" in norm(md) and "| 1 | `beta` | 1.50 | 2 | 1 |" in norm(md)
    assert "Not ranked" not in md


def test_a_column_with_one_method_gives_no_free_rank(tmp_path):
    root = tmp_path / "results"
    make(root, "a", "t1", 1.0, 0, 0.9)
    make(root, "b", "t1", 1.0, 0, 0.5)
    make(root, "b", "ft", 1.0, 0, 0.5, requires=("trainable",), caps=("image_global", "trainable"))
    sec = L.sections(L.frame(load_results(root)))[0]
    table, unranked = L.rank_section(sec)
    # b alone in ft@100%: that column would hand it rank 1; a cannot run ft (n/a) and stays complete
    assert dict(zip(table["variant"], table["avg_rank"])) == {"a": 1.0, "b": 2.0}
    assert dict(zip(table["variant"], table["na"])) == {"a": 1, "b": 0} and unranked == {}


def test_regenerating_gives_identical_bytes(results, tmp_path):
    out1 = tmp_path / "one" / "leaderboard.md"
    out2 = tmp_path / "two" / "leaderboard.md"
    w1 = L.build(results, out1, registry=NONE)
    w2 = L.build(results, out2, registry=NONE)
    assert len(w1) == 4 and [p.name for p in w1] == [p.name for p in w2]
    for a, b in zip(w1, w2):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert w1[1].read_bytes().startswith(b"\x89PNG")
    assert b"Software" not in w1[1].read_bytes() and b"tIME" not in w1[1].read_bytes()
    # again into the same place: unchanged
    before = {p: p.read_bytes() for p in w1}
    L.build(results, out1, registry=NONE)
    assert {p: p.read_bytes() for p in w1} == before
    text = out1.read_text()
    assert "GENERATED by `python -m bench table`" in text and "Do not edit by hand" in text


def test_stale_plots_are_removed(results, tmp_path):
    out = tmp_path / "o" / "leaderboard.md"
    L.build(results, out, registry=NONE)
    plots = out.parent / L.PLOTS_DIRNAME
    (plots / "synthetic-tiny-old-task.png").write_bytes(b"x")
    (plots / "notes.txt").write_text("kept")
    L.build(results, out, registry=NONE)
    assert not (plots / "synthetic-tiny-old-task.png").exists() and (plots / "notes.txt").exists()


def test_empty_results_and_reference_section(tmp_path):
    md, plots = L.render({})
    assert plots == {} and "No results yet" in md
    ref = section_text(md, "Reference")
    assert "MGCA" in ref and "arXiv:2210.06044" in ref and "not produced by this harness" in ref.lower()
    assert "| Random | 56.1 / 62.6 / 65.7 | 58.9 / 69.4 / 74.1 | 50.5 / 60.3 / 70.0 |" in norm(ref)


def test_variants_get_their_own_rows(tmp_path):
    root = tmp_path / "results"
    make(root, "a", "t1", 1.0, 0, 0.5)
    spec = RunSpec(method="a", task="t1", fraction=1.0, seed=0, overrides=(("lr", 0.5),))
    r = load_results(root)
    only = next(iter(r.values()))
    import dataclasses
    write_result(dataclasses.replace(only, spec=spec.to_dict(), main_value=0.9, metrics={"auroc": 0.9}),
                 root / "synthetic-tiny" / "t1" / "a" / "frac1.0-seed0-deadbeef.json", None)
    md, _ = L.render(load_results(root))
    rows = [line for line in md.splitlines() if line.startswith("| `a")]
    assert len(rows) == 2 and any("`a #" in line and "0.900" in line for line in rows)
    # the hash is explained: the legend names the settings it stands for, and the tasks run with them
    label = next(line.split("`")[1] for line in rows if "`a #" in line)
    assert f"- `{label}`: `lr=0.5` (t1)" in md.splitlines()
    assert not any(line.startswith("- `a`:") for line in md.splitlines())      # a default run needs none


def test_committed_leaderboard_matches_results(tmp_path):
    """The committed leaderboard.md (and its plots) equal a fresh regeneration from results/."""
    committed = REPO_ROOT / "leaderboard.md"
    assert committed.exists(), "leaderboard.md is not committed yet: run `python -m bench table`"
    out = tmp_path / "leaderboard.md"
    L.build(REPO_ROOT / "results", out)
    assert out.read_text() == committed.read_text(), "leaderboard.md is stale: run `python -m bench table`"
    fresh = sorted(p.name for p in (out.parent / L.PLOTS_DIRNAME).glob("*.png")) \
        if (out.parent / L.PLOTS_DIRNAME).exists() else []
    mine = REPO_ROOT / L.PLOTS_DIRNAME
    have = sorted(p.name for p in mine.glob("*.png")) if mine.exists() else []
    assert fresh == have
    for name in fresh:
        assert (out.parent / L.PLOTS_DIRNAME / name).read_bytes() == (mine / name).read_bytes(), name


# --------------------------------------------------------------------------------------------
# registered methods, sizes, data roots, comparability with the quoted table


def test_registered_methods_without_results_get_rows(results):
    registry = L.Registered(methods={"alpha": frozenset(DENSE), "beta": frozenset(GLOBAL),
                                     "omega": frozenset(GLOBAL), "zeta": frozenset(DENSE)})
    md, _ = L.render(load_results(results), registry)
    syn = section_text(md, "SYNTHETIC")
    rsna = syn.split("### rsna-cls")[1].split("###")[0]
    siim = syn.split("### siim-seg")[1].split("###")[0]
    assert table_row(rsna, "omega")[1:] == [L.MISSING, L.MISSING]          # could run, has not
    assert table_row(siim, "omega")[1:] == [L.NA]                           # lacks image_dense
    assert table_row(siim, "zeta")[1:] == [L.MISSING]
    rank = syn.split("### Average rank")[1]
    assert "- `omega`: not run (no result in this section)" in rank and "- `zeta`: not run" in rank
    assert "| `omega`" not in rank.split("Not ranked")[0]                   # never in the ranked table
    # the REAL section gets the registered rows too
    real = section_text(md, "REAL")
    assert table_row(real, "omega")[1:] == [L.MISSING]
    # without a registry, only methods with results appear
    md, _ = L.render(load_results(results))
    with pytest.raises(AssertionError, match="no row"):
        table_row(md, "omega")


def test_a_method_with_results_is_not_duplicated_by_the_registry(tmp_path):
    root = tmp_path / "results"
    spec = RunSpec(method="a", task="t1", fraction=1.0, seed=0, protocol="augmented")
    path = make(root, "a", "t1", 1.0, 0, 0.5)
    only = load_results(root)[path]
    import dataclasses
    path.unlink()
    write_result(dataclasses.replace(only, spec=spec.to_dict()), path.with_name("frac1.0-seed0-augmented.json"), None)
    md, _ = L.render(load_results(root), L.Registered(methods={"a": frozenset(GLOBAL)}))
    rows = [line for line in md.splitlines() if line.startswith("| `a")]
    assert rows and all(line.startswith("| `a · augmented`") for line in rows)


def test_column_sizes(tmp_path):
    root = tmp_path / "results"
    test = {"images": 90, "patients": 80}
    make(root, "a", "t1", 0.1, 0, 0.5, sizes={"train": {"images": 42, "patients": 40}, "val": test, "test": test})
    make(root, "b", "t1", 0.1, 0, 0.6, sizes={"train": {"images": 42, "patients": 40}, "val": test, "test": test})
    make(root, "a", "t1", 1.0, 0, 0.5, sizes={"train": {"images": 420, "patients": 400}, "test": test})
    make(root, "b", "t1", 1.0, 0, 0.6, sizes={"train": {"images": 421, "patients": 401}, "test": test})
    make(root, "a", "t2", 1.0, 0, 0.5)                                      # no sizes recorded
    md, _ = L.render(load_results(root))
    t1 = md.split("### t1")[1].split("###")[0]
    assert ("Sizes (images / patients) · 10%: train 42 / 40, test 90 / 80 · 100%: train 420 / 400 or 421 / 401 "
            "(results differ: mixed splits, re-run the stale cells), test 90 / 80") in t1
    t2 = md.split("### t2")[1].split("###")[0]
    assert "100%: train not recorded, test not recorded" in t2


def test_two_data_roots_are_never_pooled(tmp_path):
    root = tmp_path / "results"
    a = make(root, "m", "rsna-cls", 1.0, 0, 0.8, kind="real", preset="paper", data="/data/rsna-a", ci=None)
    b = make(root, "m", "rsna-cls", 1.0, 0, 0.6, kind="real", preset="paper", data="/data/rsna-b", ci=None)
    assert a != b and a.name.endswith(f"-root{data_tag({'data': '/data/rsna-a'})}.json")
    make(root, "m", "chexpert-cls", 1.0, 0, 0.7, kind="real", preset="paper", data="/data/chexpert")
    md, plots = L.render(load_results(root))
    real = section_text(md, "REAL")
    ta, tb = data_tag({"data": "/data/rsna-a"}), data_tag({"data": "/data/rsna-b"})
    # one table per root, headed by the root's hash, each cell one seed (never n=2 from two roots)
    sec_a = real.split(f"### rsna-cls @ root #{ta}")[1].split("###")[0]
    sec_b = real.split(f"### rsna-cls @ root #{tb}")[1].split("###")[0]
    assert table_row(sec_a, "m")[1] == "0.800 (n=1)" and table_row(sec_b, "m")[1] == "0.600 (n=1)"
    assert "data root `/data/rsna-a`" in sec_a and "data root `/data/rsna-b`" in sec_b
    assert "(n=2)" not in md
    # a task on a single root keeps its plain heading; plots are distinct
    assert "### chexpert-cls: auroc" in real
    assert {f"real-paper-rsna-cls-root{ta}.png", f"real-paper-rsna-cls-root{tb}.png",
            "real-paper-chexpert-cls.png"} == set(plots)
    assert "never pooled into one cell" in md                                # the legend says how


def test_synthetic_corpus_by_path_is_its_own_table(tmp_path):
    root = tmp_path / "results"
    make(root, "m", "rsna-cls", 1.0, 0, 0.8)
    make(root, "m", "rsna-cls", 1.0, 0, 0.6, data="/corpora/micro/rsna-pneumonia")  # kind synthetic
    md, _ = L.render(load_results(root))
    syn = section_text(md, "SYNTHETIC")
    assert syn.count("### rsna-cls @ root #") == 1 and "(n=2)" not in syn
    assert "data `synth`" in syn and "data root `/corpora/micro/rsna-pneumonia`" in syn


def test_one_identity_in_two_files_is_an_error(results):
    path = next(iter(sorted(results.rglob("frac0.1-seed0.json"))))
    copy = path.with_name("frac0.1-seed0-copy.json")
    copy.write_bytes(path.read_bytes())
    with pytest.raises(ResultError, match="more than one result file") as e:
        L.render(load_results(results))
    assert str(path) in str(e.value) and str(copy) in str(e.value)


def test_a_table_scored_on_two_versions_of_its_data_is_an_error(tmp_path):
    """A dataset regenerated (or re-split) with some results left from before: one table would rank
    methods measured on different test sets."""
    root = tmp_path / "results"
    make(root, "alpha", "rsna-cls", 0.1, 0, 0.7, manifest="old-manifest")
    stale = make(root, "alpha", "rsna-cls", 0.1, 1, 0.7, manifest="old-manifest")
    make(root, "beta", "rsna-cls", 0.1, 0, 0.6, manifest="new-manifest")
    make(root, "beta", "covidx-cls", 0.1, 0, 0.6, manifest="other-dataset")   # another table: not compared
    with pytest.raises(ResultError, match="different versions of their data") as e:
        L.render(load_results(root))
    message = str(e.value)
    assert "rsna-cls" in message and "covidx-cls" not in message
    assert "old-manifest" in message and "2 file(s)" in message and str(stale) in message
    assert "new-manifest" in message and "1 file(s)" in message
    for path in root.rglob("*.json"):
        if "old-manifest" in path.read_text():
            path.unlink()
    md, _ = L.render(load_results(root))                   # once the stale results are gone it builds
    assert "rsna-cls" in md


def test_reference_section_says_which_columns_compare(tmp_path):
    root = tmp_path / "results"
    anchor = ("MGCA: the cached probe has neither the 256->224 crop nor augmentation", "BenchX: unrelated")
    make(root, "m", "rsna-cls", 0.01, 0, 0.8, kind="real", preset="paper", data="/data/rsna", anchor=anchor)
    make(root, "m", "rsna-cls", 1.0, 0, 0.9, kind="real", preset="paper", data="/data/rsna", anchor=anchor)
    make(root, "m", "covidx-cls", 1.0, 0, 0.9, anchor=("MGCA: synthetic only",), metric="accuracy")
    registry = L.Registered(anchor_differences={"chexpert-cls": ("MGCA: validation carved by patient",)})
    md, _ = L.render(load_results(root), registry)
    ref = section_text(md, "Reference").split("### Which of our columns compare")[1]
    lines = ref.splitlines()
    rsna = next(i for i, line in enumerate(lines) if line.startswith("- **RSNA**"))
    assert "REAL preset `paper`, rsna-cls (data `/data/rsna`): 1%, 100%" in lines[rsna]
    assert "(as recorded in the results)" in lines[rsna + 1]
    assert lines[rsna + 2] == "  - MGCA: the cached probe has neither the 256->224 crop nor augmentation"
    assert "BenchX" not in ref                                               # other anchors' sentences left out
    chex = next(line for line in lines if line.startswith("- **CheXpert**"))
    assert "none yet" in chex and "  - MGCA: validation carved by patient" in lines
    # a SYNTHETIC covidx-cls result is never a comparable column, but its differences are listed
    covidx = next(line for line in lines if line.startswith("- **COVIDx**"))
    assert "none yet" in covidx and "  - MGCA: synthetic only" in lines
    assert "SYNTHETIC columns, preset `tiny`" in ref and "are never comparable" in ref
