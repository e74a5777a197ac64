"""``python -m bench data synth|summary|show|verify``: the data command group.

:func:`add_data_commands` adds the group to the main parser; every command is a function
``(argparse.Namespace) -> int`` (exit code) set as ``func`` on its sub-parser.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from bench.data.synth.corpus import DEFAULT_SCALE, SCALES
from bench.errors import DataError

log = logging.getLogger(__name__)


# -- helpers -----------------------------------------------------------------------------------------
def _add_source(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--dataset", required=True, help="registered dataset name (see `python -m bench list`)")
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--root", type=Path, default=None, help="dataset root holding the official files")
    src.add_argument("--data", default=None, help="'synth' for the SYNTHETIC corpus, or a dataset root")
    p.add_argument("--scale", choices=SCALES, default=DEFAULT_SCALE,
                   help="synthetic corpus scale (with --data synth; default tiny)")
    p.add_argument("--synth-seed", type=int, default=0, help="synthetic corpus seed (with --data synth)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient-level splits (default 0)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed rows instead of failing")


def _source(args: argparse.Namespace) -> str | Path:
    return args.root if args.root is not None else (args.data or "synth")


def _load(args: argparse.Namespace):
    from bench.data.prepare import load_table, resolve_dataset

    spec, root, kind = resolve_dataset(args.dataset, _source(args), scale=args.scale, synth_seed=args.synth_seed)
    table = load_table(spec, root, skip_bad=args.skip_bad)
    return spec, root, kind, table


def _print_table(rows, headers) -> None:
    from tabulate import tabulate

    print(tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True))


# -- data synth ----------------------------------------------------------------------------------------
def cmd_synth(args: argparse.Namespace) -> int:
    from bench.data.synth.corpus import _is_complete, ensure_corpus, generate_corpus, read_corpus_manifest
    from bench.paths import synth_root

    root = Path(args.root) if args.root else synth_root(args.scale, args.seed)
    root = root.expanduser().resolve()
    reused = not args.force and _is_complete(root, args.scale, args.seed)
    if args.force:
        generate_corpus(root, args.scale, args.seed, workers=args.workers)
    else:
        ensure_corpus(root, args.scale, args.seed, workers=args.workers)
    meta = read_corpus_manifest(root) or {}
    rows = [[k, v["subdir"], v["images"], f"{v['seconds']:.1f}"] for k, v in meta.get("datasets", {}).items()]
    rows.append(["total", "", meta.get("images", 0), f"{meta.get('seconds', 0.0):.1f}"])
    _print_table(rows, ["dataset", "subdir", "images", "seconds"])
    state = "reused existing corpus" if reused else f"generated in {meta.get('seconds', 0.0):.1f}s"
    print(f"SYNTHETIC corpus ({meta.get('scale')}, seed {meta.get('seed')}, generator {meta.get('version')}) "
          f"at {root}: {state}")
    return 0


# -- data summary --------------------------------------------------------------------------------------
#: Label-space function names in tasks.classification before they moved to bench.data.labels.
_OLD_LABEL_FUNCS = {"chexpert": "chexpert_labels", "rsna": "rsna_labels", "covidx": "covidx_labels",
                    "nih": "nih_labels"}


def task_label_space(table):
    """The dataset's classification label space (targets, rows kept, policy), or None.

    Imported lazily: the label spaces live in ``bench.data.labels``; the fallback to their former
    place in ``tasks.classification`` is for working trees from before the move."""
    try:
        from bench.data.labels import LABEL_SPACES

        fn = LABEL_SPACES.get(table.dataset)
    except ImportError:
        import importlib

        fn = getattr(importlib.import_module("tasks.classification"), _OLD_LABEL_FUNCS.get(table.dataset, ""), None)
    return None if fn is None else fn(table)


def split_label_counts(table, manifest) -> dict:
    """Per split and label fraction (``train@0.01`` ... ``test``): rows, images the task uses,
    their patients, and patients with at least one positive image per main label.

    Main labels are the dataset's classification label space after its policy and row filter
    (CheXpert: 5 competition labels, U-ones/U-zeros, frontal only); datasets without one count
    their raw labels (code 1) over every row."""
    space = task_label_space(table)
    if space is None:
        classes = tuple(table.classes)
        positive = np.asarray(table.labels) == 1
        keep = np.ones(len(table), dtype=bool)
        policy = "no classification task: raw label code 1, every row"
    else:
        classes, keep, policy = tuple(space.classes), np.asarray(space.keep, dtype=bool), space.policy
        targets = np.asarray(space.targets)
        if space.kind == "multiclass":
            positive = targets[:, None] == np.arange(len(classes))[None, :]
        else:
            positive = targets == 1
    patients = table.frame["patient_id"].to_numpy(dtype=object)
    out = {}
    for key in manifest.sizes():
        split, _, frac = key.partition("@")
        if split not in ("train", "val", "test"):
            continue
        rows = manifest.rows(split, float(frac) if frac else 1.0)
        used = rows[keep[rows]]
        out[key] = {"rows": int(len(rows)), "images": int(len(used)),
                    "patients": int(len(set(patients[used]))),
                    "positive_patients": {c: int(len(set(patients[used[positive[used, j]]])))
                                          for j, c in enumerate(classes)}}
    return {"classes": list(classes), "policy": policy, "splits": out}


def summarize(spec, root: Path, kind: str, table, split_seed: int = 0, skip_bad: bool = False) -> dict:
    """Counts of a loaded dataset and its split manifest (the ``data summary`` numbers)."""
    from bench.data.splits import build_splits

    frame = table.frame
    n_extra = int(sum(len(e or ()) for e in frame["extra_image_paths"]))
    manifest = build_splits(table, spec.split, seed=split_seed, skip_bad=skip_bad)
    labels = np.asarray(table.labels)
    out = {
        "dataset": spec.name, "title": spec.title, "source": kind, "root": str(root),
        "rows": len(table), "images": len(table) + n_extra,
        "patients": int(frame["patient_id"].nunique()),
        "studies": int(frame.loc[frame["study_id"] != "", "study_id"].nunique()),
        "views": {str(k or "?"): int(v) for k, v in frame["view"].value_counts().sort_index().items()},
        "official_splits": {str(k or "-"): int(v) for k, v in frame["split"].value_counts().sort_index().items()},
        "positives": table.positives(),
        "uncertain": {c: int(np.sum(labels[:, j] == -1)) for j, c in enumerate(table.classes)},
        "boxes": int(sum(len(b) for b in table.boxes)) if table.has_boxes else 0,
        "images_with_boxes": int(sum(len(b) > 0 for b in table.boxes)) if table.has_boxes else 0,
        "mask_pixels": int(sum(table.mask_area(i) for i in range(len(table)))) if table.has_masks else 0,
        "images_with_masks": int(sum(m is not None for m in table.masks)) if table.has_masks else 0,
        "splits": manifest.sizes(),
        "split_labels": split_label_counts(table, manifest),
        "split_seed": int(split_seed),
        "manifest_sha256": manifest.sha256,
        "skipped_rows": int(table.skipped_rows),
        "split_note": spec.split.note,
    }
    return out


def cmd_summary(args: argparse.Namespace) -> int:
    spec, root, kind, table = _load(args)
    s = summarize(spec, root, kind, table, args.split_seed, args.skip_bad)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    kind_word = "SYNTHETIC" if kind == "synthetic" else "REAL"
    print(f"{s['title']} ({s['dataset']}): {kind_word} data at {s['root']}")
    general = [[k, s[k]] for k in ("rows", "images", "patients", "studies", "boxes", "images_with_boxes",
                                   "mask_pixels", "images_with_masks", "skipped_rows")]
    general.append(["views", ", ".join(f"{k} {v}" for k, v in s["views"].items())])
    general.append(["official splits", ", ".join(f"{k} {v}" for k, v in s["official_splits"].items())])
    _print_table(general, ["", "count"])
    if s["positives"]:
        print()
        _print_table([[c, s["positives"][c], s["uncertain"][c]] for c in s["positives"]],
                     ["label", "positive", "uncertain"])
    print()
    _print_table([[k, v] for k, v in s["splits"].items()], [f"split (seed {s['split_seed']})", "images"])
    per = s["split_labels"]
    if per["splits"]:
        print()
        keys = list(per["splits"])
        rows = [[what] + [per["splits"][k][field] for k in keys]
                for what, field in (("rows", "rows"), ("images used", "images"), ("patients", "patients"))]
        rows += [[f"{c}: positive patients"] + [per["splits"][k]["positive_patients"][c] for k in keys]
                 for c in per["classes"]]
        _print_table(rows, [f"seed {s['split_seed']}"] + keys)
        print(f"labels: {per['policy']}")
    print(f"manifest sha256 {s['manifest_sha256']}")
    if s["split_note"]:
        print(f"split convention: {s['split_note']}")
    return 0


# -- data show -----------------------------------------------------------------------------------------
def render_row(table, index: int, size: int, out: Path) -> Path:
    """Save row ``index`` as models see it (letterboxed at ``size``) with boxes and mask drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from bench.data.images import letterbox, letterbox_mask, read_image

    if not 0 <= index < len(table):
        raise DataError(f"--index {index} is out of range: the table has {len(table)} rows", path=table.root)
    row = table.frame.iloc[index]
    img, geom = letterbox(read_image(row["image_path"]), size)
    fig, ax = plt.subplots(figsize=(5, 5.4), dpi=100)
    ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    if table.has_masks and table.masks[index] is not None:
        mask = letterbox_mask(table.mask(index), size)
        overlay = np.zeros((size, size, 4), dtype=np.float32)
        overlay[mask > 0] = (1.0, 0.1, 0.1, 0.4)
        ax.imshow(overlay, interpolation="nearest")
    if table.has_boxes:
        names = table.box_classes
        for b, lab in zip(geom.boxes(table.boxes[index]),
                          table.box_labels[index] if table.box_labels else [None] * len(table.boxes[index])):
            ax.add_patch(Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False,
                                   edgecolor="yellow", linewidth=1.2))
            if lab is not None and names:
                ax.text(b[0], b[1] - 2, names[int(lab)], color="yellow", fontsize=7, va="bottom")
    labels = table.labels[index] if len(table.classes) else []
    pos = [c for c, v in zip(table.classes, labels) if v == 1]
    unc = [c + "?" for c, v in zip(table.classes, labels) if v == -1]
    text = ", ".join(pos + unc) or ("no positive label" if len(table.classes) else "")
    ax.set_title(f"{table.dataset} #{index} {row['image_id']}\n{text}", fontsize=8)
    ax.set_axis_off()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


def cmd_show(args: argparse.Namespace) -> int:
    spec, root, kind, table = _load(args)
    out = render_row(table, args.index, args.size, args.out)
    kind_word = "SYNTHETIC" if kind == "synthetic" else "REAL"
    print(f"{spec.name} row {args.index} ({kind_word} data) at {args.size}px -> {out}")
    return 0


# -- data verify ---------------------------------------------------------------------------------------
def _decoded_sizes(paths: list[str], workers: int) -> dict[str, tuple[tuple[int, int] | None, str]]:
    """path -> ((h, w) or None, reason), every file decoded fully over ``workers`` processes."""
    from bench.data.images import decode_check
    from bench.data.parallel import run_jobs

    chunk = 256
    jobs = [(paths[s:s + chunk],) for s in range(0, len(paths), chunk)]
    out: dict[str, tuple[tuple[int, int] | None, str]] = {}
    for _, results in run_jobs(decode_check, jobs, workers if len(paths) >= 2000 else 1):
        out.update({p: (hw, reason) for p, hw, reason in results})
    return out


def verify_dataset(spec, root: Path, table, split_seed: int = 0, manifest_file: Path | None = None,
                   skip_bad: bool = False, *, decode: bool = False, workers: int = 2) -> list[tuple[str, str, str]]:
    """(kind, where, detail) problems: unreadable/missing images, size mismatches, split leaks,
    non-nesting or uncovered rows in the built manifest, the recorded one and ``manifest_file``.

    Files are checked by their headers (:func:`probe_image`), or with ``decode`` decoded fully as
    the image cache does, which also catches truncated JPEGs (problem kind "undecodable")."""
    from bench.data.images import probe_image
    from bench.data.prepare import manifest_path
    from bench.data.splits import SplitManifest, build_splits, check_manifest

    problems: list[tuple[str, str, str]] = []
    frame = table.frame
    decoded = {}
    if decode:
        every = [str(p) for path, extras in zip(frame["image_path"], frame["extra_image_paths"])
                 for p in (path, *tuple(extras or ()))]
        decoded = _decoded_sizes(every, workers)
    for image_id, path, extras, h, w in zip(frame["image_id"], frame["image_path"], frame["extra_image_paths"],
                                            frame["height"], frame["width"]):
        for j, p in enumerate((path, *tuple(extras or ()))):
            if decode:
                hw, reason = decoded[str(p)]
                if hw is None:
                    kind = "missing" if not Path(p).exists() else "undecodable"
                    problems.append((kind, str(image_id), reason))
                    continue
                hh, ww = hw
            else:
                try:
                    hh, ww = probe_image(p)
                except DataError as exc:
                    kind = "missing" if not Path(p).exists() else "unreadable"
                    problems.append((kind, str(image_id), str(exc)))
                    continue
            if j == 0 and h > 0 and w > 0 and (hh, ww) != (int(h), int(w)):
                problems.append(("size", str(image_id), f"{p}: file is {hh}x{ww}, table says {h}x{w}"))
    if table.has_boxes:
        for i, (b, h, w) in enumerate(zip(table.boxes, frame["height"], frame["width"])):
            b = np.asarray(b).reshape(-1, 4)
            if len(b) and (np.any(b[:, 2] <= b[:, 0]) or np.any(b[:, 3] <= b[:, 1])):
                problems.append(("box", str(frame["image_id"].iat[i]), "box with x2 <= x1 or y2 <= y1"))
            elif len(b) and h > 0 and w > 0 and (b.min() < 0 or np.any(b[:, 2] > w) or np.any(b[:, 3] > h)):
                problems.append(("box", str(frame["image_id"].iat[i]), f"box outside the {h}x{w} image"))

    def add(where: str, found: list[str]) -> None:
        for text in found:
            kind, _, detail = text.partition(": ")
            problems.append((kind, where, detail))

    try:
        manifest = build_splits(table, spec.split, seed=split_seed, skip_bad=skip_bad)
    except DataError as exc:
        problems.append(("leak", "official splits", str(exc)))
        manifest = None
    if manifest is not None:
        add("built manifest", check_manifest(table, manifest))
        try:
            recorded = manifest_path(table, split_seed)
        except DataError:  # an image is missing: reported above, and no manifest was recorded for it
            recorded = None
        if recorded is not None and recorded.is_file():
            try:
                old = SplitManifest.read(recorded)
                add(f"recorded {recorded.name}", check_manifest(table, old))
                if old.sha256 != manifest.sha256:
                    problems.append(("stale", str(recorded), f"recorded manifest {old.sha256[:12]} differs from "
                                     f"the one built now {manifest.sha256[:12]}"))
            except DataError as exc:
                problems.append(("manifest", str(recorded), str(exc)))
    if manifest_file is not None:
        try:
            add(str(manifest_file), check_manifest(table, SplitManifest.read(manifest_file)))
        except DataError as exc:
            problems.append(("manifest", str(manifest_file), str(exc)))
    return problems


def cmd_verify(args: argparse.Namespace) -> int:
    from bench.data.prepare import load_table, resolve_dataset

    spec, root, kind = resolve_dataset(args.dataset, _source(args), scale=args.scale, synth_seed=args.synth_seed)
    problems: list[tuple[str, str, str]] = []
    skip_bad = args.skip_bad
    try:
        table = load_table(spec, root, skip_bad=skip_bad)
    except DataError as exc:
        if skip_bad:
            raise
        # Report what the loader refused, then check everything else with the bad rows skipped.
        problems.append(("load", str(exc.path or root), str(exc)))
        skip_bad = True
        try:
            table = load_table(spec, root, skip_bad=True)
        except DataError as exc2:
            problems.append(("load", str(exc2.path or root), f"with --skip-bad too: {exc2}"))
            _print_table([list(p) for p in problems], ["problem", "where", "detail"])
            return 1
    if table.skipped_rows and skip_bad:
        problems.append(("skipped", str(root), f"{table.skipped_rows} malformed row(s) skipped by the loader"))
    problems += verify_dataset(spec, root, table, args.split_seed, args.manifest, skip_bad, decode=args.decode,
                               workers=args.workers)
    n_files = len(table) + int(sum(len(e or ()) for e in table.frame["extra_image_paths"]))
    kind_word = "SYNTHETIC" if kind == "synthetic" else "REAL"
    if problems:
        _print_table([list(p) for p in problems], ["problem", "where", "detail"])
        print(f"{spec.name} ({kind_word} data at {root}): {len(problems)} problem(s) in {len(table)} rows, "
              f"{n_files} image files")
        return 1
    how = "decoded fully" if args.decode else "checked by their headers (--decode to decode them fully)"
    print(f"{spec.name} ({kind_word} data at {root}): OK: {len(table)} rows, {n_files} image files {how}, "
          f"splits patient-level and nested")
    return 0


# -- registration ----------------------------------------------------------------------------------------
def add_data_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data synth|summary|show|verify`` to the main parser's sub-commands."""
    data = subparsers.add_parser("data", help="dataset commands: synth, summary, show, verify",
                                 description="Dataset commands. Real data: --root DIR; the SYNTHETIC corpus: "
                                             "--data synth.")
    sub = data.add_subparsers(dest="data_command", metavar="{synth,summary,show,verify}", required=True)

    p = sub.add_parser("synth", help="generate (or reuse) the SYNTHETIC corpus of all eight datasets")
    p.add_argument("--root", type=Path, default=None, help="corpus root (default: the cache's synth/<scale>-seed<s>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", choices=SCALES, default=DEFAULT_SCALE)
    p.add_argument("--workers", type=int, default=2, help="parallel writer processes (default 2)")
    p.add_argument("--force", action="store_true", help="regenerate even when a complete corpus is there")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("summary", help="counts: images, patients, labels, boxes, masks, splits, manifest hash")
    _add_source(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("show", help="save one row as models see it, with boxes and mask drawn")
    _add_source(p)
    p.add_argument("--index", type=int, required=True, help="row of the canonical table")
    p.add_argument("--out", type=Path, required=True, help="output PNG")
    p.add_argument("--size", type=int, default=256, help="letterbox size (default 256)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("verify", help="check files (decode every header), patient leaks, nesting, coverage")
    _add_source(p)
    p.add_argument("--manifest", type=Path, default=None, help="also check this split manifest file")
    p.add_argument("--decode", action="store_true",
                   help="decode every image fully, as the image cache does (catches truncated JPEGs, which the "
                        "header check misses); slower")
    p.add_argument("--workers", type=int, default=2, help="processes for --decode (default 2)")
    p.set_defaults(func=cmd_verify)
    return data
