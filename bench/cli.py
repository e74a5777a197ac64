"""``python -m bench``: run cells, list what is registered, regenerate the leaderboard, check drift.

Errors a user can act on (:class:`bench.errors.BenchError`, unknown registry names) are printed as
one ``error: ...`` line with exit code 2; anything else is a bug and keeps its traceback.
Progress goes to the log (stderr); results go to stdout.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from bench.api import FRACTIONS, PRESETS, RunSpec
from bench.errors import BenchError
from bench.registry import RegistryError

log = logging.getLogger("bench")

EXIT_USER_ERROR = 2


# --------------------------------------------------------------------------------------------
# Argument types


def fraction_arg(text: str) -> float:
    """``0.01``, ``0.1``, ``1``, ``1.0`` or ``1%``/``10%``/``100%`` -> one of FRACTIONS."""
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    for f in FRACTIONS:
        if abs(v - f) < 1e-9:
            return f
    raise argparse.ArgumentTypeError(f"{text!r} is not a supported label fraction "
                                     f"({', '.join(repr(f) for f in FRACTIONS)})")


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def override_arg(text: str) -> tuple[str, Any]:
    """``key=value``; the value is read as JSON when it parses (numbers, true/false, null, lists), else a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, _freeze(value)


def _rel(p: Path) -> str:
    """``p`` relative to the working directory when it lies below it, else as given."""
    try:
        rel = os.path.relpath(p)
    except ValueError:
        return str(p)
    return str(p) if rel.startswith("..") else rel


# --------------------------------------------------------------------------------------------
# Commands


def cmd_run(args: argparse.Namespace) -> int:
    from bench import runner

    keys = [k for k, _ in args.set]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise BenchError(f"--set given more than once for {', '.join(dup)}")
    spec = RunSpec(method=args.method, task=args.task, fraction=args.fraction, seed=args.seed,
                   preset=args.preset, data=args.data, protocol=args.protocol, checkpoint=args.checkpoint,
                   split_seed=args.split_seed, overrides=tuple(args.set))
    if spec.data == "synth":
        log.info("--data synth (default): running on the SYNTHETIC corpus; pass --data ROOT for real data")
    t0 = time.perf_counter()
    result, path, skipped = runner.run(spec, device=args.device, force=args.force, skip_bad=args.skip_bad)
    value = result.main_value
    metric = f"{result.main_metric} {'nan' if value is None else f'{value:.4f}'}"
    if result.main_ci:
        lo, hi = result.main_ci
        metric += f" (95% CI {lo:.4f}-{hi:.4f})" if lo is not None and hi is not None else ""
    source = "SYNTHETIC" if result.data_kind == "synthetic" else "REAL"
    n_skipped = int((result.data_source or {}).get("skipped_rows") or 0)
    if n_skipped:  # a result on part of the dataset says so where it is read
        source += f" ({n_skipped} rows skipped)"
    state = ("cached: finished result exists, --force to re-run" if skipped
             else f"ran in {time.perf_counter() - t0:.1f} s, task {result.wall_s:.1f} s")
    print(f"{result.task_name} | {result.method} | fraction {result.fraction:g} | seed {result.seed} | "
          f"{metric} | data {source} | {_rel(path)} ({state})")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from bench.api import METHODS

    _load_all()
    entry = METHODS.get(args.method)
    if entry.pretrain is None:
        trainable = [n for n, e in METHODS.items() if e.pretrain is not None]
        raise BenchError(f"method {args.method!r} has no pretraining in this harness "
                         f"(methods that do: {', '.join(trainable) or 'none'})")
    if args.data == "synth":
        log.info("--data synth (default): pretraining on the SYNTHETIC corpus's MIMIC-CXR")
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {}
    if args.set:
        from bench.api import resolve_options

        given = {(k[len(args.method) + 1:] if k.startswith(args.method + ".") else k): v for k, v in args.set}
        resolve_options(args.method, entry.options, given)
        kwargs["options"] = given
    if args.nproc > 1:
        return _torchrun_pretrain(args)
    from bench.pretrain import init_distributed

    init_distributed()       # under torchrun (WORLD_SIZE > 1): join the process group
    folder = entry.pretrain(args.preset, args.data, out_dir=args.out, resume=not args.restart, device=args.device,
                            **kwargs)
    from bench.pretrain import dist_info

    if dist_info()[0] != 0:
        return 0
    print(f"{args.method} | preset {args.preset} | data {'SYNTHETIC' if args.data == 'synth' else 'REAL'} | "
          f"weights {_rel(Path(folder))} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _torchrun_pretrain(args: argparse.Namespace) -> int:
    """``--nproc N``: the same command under ``torchrun`` with N processes (DDP; gloo on CPU, nccl on CUDA)."""
    import subprocess

    argv = [a for a in sys.argv[1:]]
    i = argv.index("--nproc")
    del argv[i:i + 2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "bench", *argv]
    log.info("launching %s", " ".join(cmd))
    return subprocess.call(cmd)


def _load_all() -> None:
    """Register methods, tasks and datasets."""
    from bench import runner

    runner.load_registries()
    import bench.data.loaders  # noqa: F401  (registers the datasets)


def cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bench.api import METHODS, TASKS
    from bench.data.spec import DATASETS

    _load_all()

    def caps(cs: Any) -> str:
        return ", ".join(sorted(str(c) for c in cs)) or "-"

    print("Methods")
    rows = [[n, caps(e.capabilities), "yes" if e.needs_weights else "no", e.description] for n, e in METHODS.items()]
    print(tabulate(rows, headers=["name", "capabilities", "needs weights", "description"], tablefmt="simple")
          if rows else "  (none registered)")
    print("\nTasks")
    rows = [[n, e.family, e.dataset, caps(e.requires), f"{e.main_metric} {'↑' if e.higher_is_better else '↓'}",
             e.version, ", ".join(e.protocols)] for n, e in TASKS.items()]
    print(tabulate(rows, headers=["name", "family", "dataset", "requires", "main metric", "version", "protocols"],
                   tablefmt="simple") if rows else "  (none registered)")
    print("\nDatasets")
    rows = [[n, s.synth_subdir, s.title] for n, s in DATASETS.items()]
    print(tabulate(rows, headers=["name", "synthetic subdir", "title"], tablefmt="simple")
          if rows else "  (none registered)")
    print("\nCompatibility (method x task): yes, or n/a with the missing capabilities")
    tasks = list(TASKS.items())
    if METHODS.names() and tasks:
        rows = []
        for n, m in METHODS.items():
            row = [n]
            for _, t in tasks:
                missing = sorted(str(c) for c in t.requires - m.capabilities)
                row.append("yes" if not missing else f"n/a ({', '.join(missing)})")
            rows.append(row)
        print(tabulate(rows, headers=["method"] + [n for n, _ in tasks], tablefmt="simple"))
    else:
        print("  (nothing to match)")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from bench import leaderboard

    written = leaderboard.build(args.results, args.out)
    print(f"leaderboard: {_rel(written[0])} ({len(written) - 1} plots in "
          f"{_rel(written[0].parent / leaderboard.PLOTS_DIRNAME)})")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from bench import drift

    report = drift.check(update=args.update, tolerance=args.tolerance, device=args.device,
                         fresh_cache=not args.reuse_cache)
    print(report.table())
    if args.update:
        if not report.ok:
            print(f"\ncheck --update: FAILED for {len(report.failures)} cell(s); golden files of the others "
                  f"were rewritten", file=sys.stderr)
            return 1
        print(f"\nrewrote {len(report.updated)} golden file(s) in {_rel(drift.golden_dir())} "
              f"({report.wall_s:.1f} s). Review the diff before committing.")
        return 0
    if report.ok:
        print(f"\ndrift check passed: {len(report.rows)} rows within tolerance ({report.wall_s:.1f} s)")
        return 0
    print(f"\ndrift check FAILED: {len(report.failures)} of {len(report.rows)} rows ({report.wall_s:.1f} s)",
          file=sys.stderr)
    return 1


def cmd_demo(args: argparse.Namespace) -> int:
    from bench import demo

    return demo.main(seeds=args.seeds, device=args.device, force=args.force, methods=args.methods,
                     tasks=args.tasks, results_root=args.results, leaderboard_out=args.out)


def _call_with_supported(fn: Callable[..., Any], options: dict[str, Any]) -> Any:
    """Call ``fn`` with the options it accepts (set ones only); it owns its own defaults."""
    params = inspect.signature(fn).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {k: v for k, v in options.items() if v is not None}
    unsupported = sorted(k for k in given if k not in params and not takes_kwargs)
    if unsupported:
        raise BenchError(f"{fn.__module__}.{fn.__name__} does not take option(s) "
                         f"{', '.join('--' + k.replace('_', '-') for k in unsupported)}")
    return fn(**given)


def _print_value(value: Any) -> None:
    if value is None:
        return
    from tabulate import tabulate

    def is_table(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(r, dict) for r in v)

    def is_lines(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(r, str) for r in v)

    if hasattr(value, "to_string"):
        print(value.to_string())
    elif isinstance(value, dict):
        # scalars as key/value rows; a list of dicts as its own table and a list of strings as lines, below
        print(tabulate([[k, v] for k, v in value.items() if not (is_table(v) or is_lines(v))],
                       headers=["key", "value"], tablefmt="simple"))
        for k, v in value.items():
            if is_table(v):
                print(f"\n{k}:")
                print(tabulate(v, headers="keys", tablefmt="simple"))
            elif is_lines(v):
                print(f"\n{k}:")
                for line in v:
                    print(f"  - {line}")
    elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        print(tabulate(value, headers="keys", tablefmt="simple"))
    else:
        print(value)


def cmd_perf(args: argparse.Namespace) -> int:
    options = {k: getattr(args, k) for k in ("dataset", "data", "method", "fraction", "seed", "preset", "device",
                                             "checkpoint", "image_size", "batch_size", "limit", "repeats", "workers",
                                             "methods", "steps", "warmup", "threads", "gpu_preset")}
    options["skip_bad"] = True if args.skip_bad else None  # passed only when given (None = not set)
    if options["device"] is not None and args.perf_what != "pretrain":   # pretrain: "auto" = CPU and GPU parts
        from bench.env import resolve_device

        options["device"] = str(resolve_device(options["device"]))
    if args.perf_what == "data":
        from bench.data.perf import perf_data as fn
    elif args.perf_what == "pretrain":
        from methods.vlp.perf import perf_pretrain as fn
    elif args.perf_what in ("seg", "det"):
        from functools import partial

        from tasks.dense.perf import perf_dense

        fn = partial(perf_dense, args.perf_what)
    else:
        from tasks.classification import perf_probe as fn
    _print_value(_call_with_supported(fn, options))
    return 0


# --------------------------------------------------------------------------------------------
# Parser


def _add_data_group(sub: argparse._SubParsersAction) -> None:
    from bench.data.cli import add_data_commands

    add_data_commands(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="medvlp-bench: benchmark harness for medical vision-language pretraining on chest X-rays.",
        epilog="Without --data ROOT every command uses the SYNTHETIC corpus (generated on first use).")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run one cell (method x task x fraction x seed) and write its result",
                       description="Run one cell and write "
                                   "results/<data>-<preset>/<task>/<method>/frac<f>-seed<s>.json. "
                                   "A finished, current result is reused unless --force.")
    p.add_argument("--method", required=True, help="method name (see `list`)")
    p.add_argument("--task", required=True, help="task name (see `list`)")
    p.add_argument("--fraction", required=True, type=fraction_arg,
                   help="label fraction of the training split: 0.01, 0.1 or 1.0 (or 1%%, 10%%, 100%%)")
    p.add_argument("--seed", type=int, default=0,
                   help="run seed (model init, training order, bootstrap); default 0")
    p.add_argument("--preset", choices=PRESETS, default="tiny",
                   help="tiny (CPU, small) or paper (published protocol); default tiny")
    p.add_argument("--protocol", default=None, help="task protocol (default: the task's first protocol)")
    p.add_argument("--checkpoint", default=None, help="weights file for the method")
    p.add_argument("--data", default="synth", help="'synth' (default: the SYNTHETIC corpus) or a real dataset root")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the train/val/test split and fraction subsets; default 0")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="default auto (cuda if available)")
    p.add_argument("--force", action="store_true", help="re-run even if a finished result exists")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed rows and missing or undecodable images instead of stopping; they are "
                        "counted in the split manifest (so in its hash) and in the result's data_source")
    p.add_argument("--set", dest="set", metavar="KEY=VALUE", type=override_arg, action="append", default=[],
                   help="override a protocol setting (repeatable); recorded in the spec and the result path")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("pretrain", help="pretrain a method's encoder (image-label or image-report pairs of MIMIC-CXR)",
                       description="Pretrain METHOD on MIMIC-CXR (the synthetic corpus by default, or a "
                                   "MIMIC-CXR-JPG root) and write its weights folder. A finished folder is "
                                   "reused; an interrupted run resumes from its last finished epoch.")
    p.add_argument("--method", required=True, help="method name (see `list`)")
    p.add_argument("--data", default="synth", help="'synth' (default) or a MIMIC-CXR-JPG 2.0.0 root")
    p.add_argument("--preset", choices=PRESETS, default="tiny")
    p.add_argument("--out", type=Path, default=None,
                   help="weights folder (default: the cache folder `bench run` reads on the synthetic corpus)")
    p.add_argument("--restart", action="store_true", help="discard an interrupted run instead of resuming it")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--set", dest="set", metavar="KEY=VALUE", type=override_arg, action="append", default=[],
                   help="method option (repeatable), e.g. mgca.official_quirks=true; part of the weights' identity")
    p.add_argument("--nproc", type=int, default=1,
                   help="DDP processes on this machine (relaunches under torchrun; or run under torchrun yourself)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("list", help="list methods, tasks, datasets and which method can run which task")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("table", help="regenerate leaderboard.md and its plots from results/")
    p.add_argument("--results", type=Path, default=None, help="results folder (default: results/)")
    p.add_argument("--out", type=Path, default=None, help="markdown file (default: leaderboard.md at the repo root)")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("check", help="re-run the golden suite and compare with results/golden (exit 1 on drift)",
                       description="Re-run the golden cells (tiny preset, synthetic corpus) into a temporary "
                                   "folder and compare their metrics with results/golden/*.json. --update "
                                   "rewrites the golden files: a deliberate act, only when a change is meant "
                                   "to move the numbers.")
    p.add_argument("--update", action="store_true", help="rewrite the golden files from a fresh run (deliberate!)")
    p.add_argument("--tolerance", type=float, default=None, help="absolute tolerance for every metric (default 1e-4)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="default cpu (golden numbers are CPU numbers)")
    p.add_argument("--reuse-cache", action="store_true",
                   help="reuse the image/feature caches (faster, but a cache written by older code can hide drift)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("demo", help="the reference methods and MGCA x one task per family x 3 fractions on the "
                                    "synthetic corpus, then the leaderboard")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods (default: pixels random imagenet supervised mgca; 'all': every registered one)")
    p.add_argument("--tasks", nargs="+", default=None, help="tasks (default: one per family)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--force", action="store_true", help="re-run finished cells")
    p.add_argument("--results", type=Path, default=None, help="results folder (default: results/)")
    p.add_argument("--out", type=Path, default=None, help="leaderboard file (default: leaderboard.md)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("perf", help="throughput: data pipeline (decode vs cache), linear probe (cached vs augmented) "
                                    "or vision-language pretraining (pairs/s, peak memory, MGCA loss time, MFU)",
                       description="Options left out take the measuring function's defaults; an option the "
                                   "function does not take is an error.")
    p.add_argument("perf_what", choices=("data", "probe", "pretrain", "seg", "det"),
                   metavar="{data,probe,pretrain,seg,det}",
                   help="data: bench.data.perf.perf_data; probe: tasks.classification.perf_probe; pretrain: "
                        "methods.vlp.perf.perf_pretrain (each method's optimiser steps at the tiny preset on CPU, "
                        "in its own process; the paper preset in bf16 with MFU on a GPU; MGCA's loss alone at "
                        "the paper's shapes); seg / det: tasks.dense.perf.perf_dense (training images/s of the "
                        "tiny U-Net / YOLOv3 on our wrapped encoder and on mmdet's ResNet-18, side by side)")
    p.add_argument("--dataset", default=None, help="dataset name (e.g. rsna)")
    p.add_argument("--data", default=None, help="'synth' or a dataset root")
    p.add_argument("--method", default=None, help="probe: method name")
    p.add_argument("--fraction", type=fraction_arg, default=None, help="probe: label fraction")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="probe: preset; pretrain: preset of the CPU part (tiny)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="probe: device; pretrain: cpu, cuda or auto (the CPU part, plus the CUDA part when a GPU "
                        "is there)")
    p.add_argument("--checkpoint", default=None, help="probe: weights file")
    p.add_argument("--image-size", type=int, default=None, help="data: image size")
    p.add_argument("--batch-size", type=int, default=None,
                   help="data: batch size; pretrain: pairs per step (tiny 64, paper 72)")
    p.add_argument("--limit", type=int, default=None, help="data: number of images")
    p.add_argument("--repeats", type=int, default=None,
                   help="data: repetitions; pretrain: repeats of the MGCA loss timing")
    p.add_argument("--workers", type=int, default=None, help="data: worker processes")
    p.add_argument("--skip-bad", action="store_true",
                   help="data: skip malformed rows and missing or undecodable images instead of stopping")
    p.add_argument("--methods", default=None, help="pretrain: comma-separated methods (default convirt,gloria,mgca)")
    p.add_argument("--steps", type=int, default=None, help="pretrain: timed optimiser steps per method")
    p.add_argument("--warmup", type=int, default=None, help="pretrain: untimed steps before them")
    p.add_argument("--threads", type=int, default=None,
                   help="pretrain: CPU threads (default $MEDVLP_BENCH_THREADS or 2)")
    p.add_argument("--gpu-preset", choices=PRESETS, default=None, help="pretrain: preset of the CUDA part (paper)")
    p.set_defaults(func=cmd_perf)

    _add_data_group(sub)
    return parser


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger().setLevel(level)
    for noisy in ("matplotlib", "PIL", "urllib3"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    try:
        rc = args.func(args)
    except (BenchError, RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0 if rc is None else int(rc)
