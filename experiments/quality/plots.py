"""The report's PNG plots: before/after grids, controllability curves, per-task bars."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.quality.targets import LABELS, METHODS


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grid_plot(task: str, folders: dict[str, Path], gt_dir: Path, methods: dict[str, dict], path: Path,
              n: int) -> str:
    """Rows: the first ``n`` test images; columns: input, teacher, baseline, QualiTeacher, GT."""
    from qualiteacher.imageio import list_images, read_image

    plt = pyplot()
    names = [p.name for p in list_images(gt_dir)][:max(1, n)]
    columns = [*METHODS, "gt"]
    fig, axes = plt.subplots(len(names), len(columns), figsize=(2.6 * len(columns), 3.1 * len(names) + 0.4),
                             squeeze=False)
    for r, name in enumerate(names):
        for c, column in enumerate(columns):
            ax = axes[r][c]
            folder = gt_dir if column == "gt" else folders[column]
            ax.imshow(read_image(folder / name))
            ax.set_xticks([]), ax.set_yticks([])
            title = LABELS[column]
            if column != "gt":
                row = next(i for i in methods[column]["per_image"] if i["file"] == name)
                title += f"\n{row['psnr']:.2f} dB, NR {row['ensemble']:.2f}"
            ax.set_title(title, fontsize=8)
        axes[r][0].set_ylabel(name, fontsize=8)
    fig.suptitle(f"{task}: held-out test images (PSNR vs hidden GT, NR ensemble 0-10)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def controllability_plot(tasks: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    fig, (ax_nr, ax_psnr) = plt.subplots(1, 2, figsize=(10, 4))
    for task, res in tasks.items():
        scores = [s["score"] for s in res["sweep"]]
        line, = ax_nr.plot(scores, [s["ensemble"] for s in res["sweep"]], marker="o",
                           label=f"{task} (rho {res['spearman']['rho']:.2f})")
        ax_nr.axhline(res["methods"]["teacher"]["ensemble"], color=line.get_color(), ls=":", lw=1)
        ax_psnr.plot(scores, [s["psnr"] for s in res["sweep"]], marker="o", color=line.get_color(), label=task)
        ax_psnr.axhline(res["methods"]["teacher"]["psnr"], color=line.get_color(), ls=":", lw=1)
    ax_nr.set(xlabel="score condition", ylabel="mean NR ensemble of the output (0-10)",
              title="Controllability (dotted: stage-1 teacher)")
    ax_psnr.set(xlabel="score condition", ylabel="mean PSNR vs hidden GT (dB)", title="PSNR along the sweep")
    ax_nr.legend(fontsize=8)
    ax_psnr.legend(fontsize=8)
    for ax in (ax_nr, ax_psnr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bars_plot(tasks: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    names = list(tasks)
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 3 + 2.2 * len(names)), 4.4))
    width = 0.8 / len(METHODS)
    x = np.arange(len(names))
    for ax, metric, label in ((axes[0], "psnr", "PSNR vs hidden GT (dB)"), (axes[1], "ensemble", "NR ensemble (0-10)")):
        for k, method in enumerate(METHODS):
            values = [tasks[t]["methods"][method][metric] for t in names]
            bars = ax.bar(x + (k - (len(METHODS) - 1) / 2) * width, values, width, label=LABELS[method])
            ax.bar_label(bars, fmt="%.2f", fontsize=6, rotation=90, padding=2)
        if metric == "ensemble":
            ax.scatter(x, [tasks[t]["ground_truth"]["ensemble"] for t in names], marker="_", s=400, color="k",
                       label="ground truth", zorder=3)
        ax.set_xticks(x, names)
        ax.set_ylabel(label)
        lo = min(tasks[t]["methods"][m][metric] for t in names for m in METHODS)
        hi = max(tasks[t]["methods"][m][metric] for t in names for m in METHODS)
        if metric == "ensemble":
            hi = max(hi, max(tasks[t]["ground_truth"]["ensemble"] for t in names))
        pad = 0.15 * (hi - lo) + 1e-6
        ax.set_ylim(lo - pad, hi + 2 * pad)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("Per task: input, stage-1 teacher, baseline student, QualiTeacher student @7 (means over the test set)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
