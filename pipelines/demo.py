"""The main job on the embedded default: bundled images, local Ray, embedded Redis, offline metrics.

Prepares metric parameters, synthesises a task's paired / unpaired / test sets from the
bundled sample photos, pretrains the stage-1 teacher, trains with QualiTeacher, restores
the held-out test images at several score conditions and prints what came out and where.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from qualiteacher.config import Config
from qualiteacher.imageio import list_images, read_image
from qualiteacher.run_dir import RunDir

DEMO_SCORES = (3.0, 5.0, 7.0)
CONTROL_SCORES = tuple(float(s) for s in range(8))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def mean_psnr(pred_dir: Path, gt_dir: Path) -> float:
    values = [psnr(read_image(p), read_image(gt_dir / p.name)) for p in list_images(pred_dir)
              if (gt_dir / p.name).exists()]
    return float(np.mean(values)) if values else float("nan")


def run_demo(cfg: Config, run_dir: Path) -> int:
    from qualiteacher.pipelines.restore import restore_folder
    from qualiteacher.pipelines.train import headline_line, run

    from qualiteacher.iqa.ensemble import IQAEnsemble
    from qualiteacher.iqa.weights import prepare
    from qualiteacher.scoring import score_files

    prepare(cfg.paths.resolved_weights_dir(), log=lambda m: print(f"[weights] {m}"))
    print(f"[demo] training on task '{cfg.data.task}' in {run_dir} (local Ray, embedded Redis)")
    summary = run(cfg, run_dir)
    print(f"[demo] trained {headline_line(summary)}")
    run_folder = RunDir(run_dir)
    test_in, test_gt = run_folder.data_split("test/input"), run_folder.data_split("test/target")
    ensemble = IQAEnsemble.from_config(cfg)
    rows = [("degraded input", test_in)]
    teacher_out = run_folder.restored("stage1_teacher")
    restore_folder(run_folder.pretrain, test_in, teacher_out, score=cfg.model.score_cap)
    rows.append(("stage-1 teacher", teacher_out))
    swept = {score: restored_at(summary, test_in, run_folder, score) for score in CONTROL_SCORES}
    rows += [(f"student @ score {score:g}", swept[score]) for score in DEMO_SCORES]
    print(f"\n{'images':<22} {'PSNR vs hidden GT':>18} {'NR ensemble (0-10)':>20}  folder")
    for label, folder in rows:
        results = [r for r in score_files(list_images(folder), ensemble) if "error" not in r]
        nr = float(np.mean([r["ensemble"] for r in results])) if results else float("nan")
        print(f"{label:<22} {mean_psnr(folder, test_gt):>18.2f} {nr:>20.2f}  {folder}")
    print(controllability_line(swept, test_gt))
    print(f"\n[demo] summary: {run_folder.summary}")
    print(f"[demo] training curves and probe images: tensorboard --logdir {run_folder.tensorboard}")
    return 0


def restored_at(summary: dict, test_in: Path, run_folder: RunDir, score: float) -> Path:
    """The test inputs restored by the trained student at `score` (restored/score_<s>)."""
    from qualiteacher.pipelines.restore import restore_folder

    out = run_folder.restored(f"score_{score:g}")
    restore_folder(Path(summary["checkpoint"]), test_in, out, score=score)
    return out


def controllability_line(swept: dict[float, Path], test_gt: Path) -> str:
    """Does the condition control quality? Spearman of condition against the mean PSNR of the
    test images restored at it (+1: each higher condition restores better)."""
    from scipy.stats import spearmanr

    scores = sorted(swept)
    curve = [mean_psnr(swept[s], test_gt) for s in scores]
    rho = float(spearmanr(scores, curve).statistic)
    return (f"{'controllability':<22} Spearman(condition {scores[0]:g}..{scores[-1]:g}, PSNR) {rho:+.2f}; "
            f"PSNR at each: "
            + " ".join(f"{v:.2f}" for v in curve))
