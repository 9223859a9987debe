"""What a run prints: the demo's controllability line (pipelines/demo.py) and the summary
headline shared by the CLI, the train job, the demo and the quality benchmark."""

from __future__ import annotations

import json

import numpy as np
from qualiteacher.pipelines.demo import controllability_line
from qualiteacher.pipelines.train import headline_json, headline_line

from qualiteacher.imageio import write_png


def test_controllability_line_reads_the_sweep(tmp_path):
    """Folders whose images get closer to the ground truth as the condition rises: +1; the
    same folders in the reverse order of conditions: -1."""
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    for i, image in enumerate(gt):
        write_png(tmp_path / "gt" / f"{i}.png", image)
    swept = {}
    for level in range(8):
        noise = rng.normal(0, 40.0 / (level + 1), size=gt.shape)
        folder = tmp_path / f"score_{level}"
        for i, image in enumerate(gt):
            write_png(folder / f"{i}.png", np.clip(image + noise[i], 0, 255).astype(np.uint8))
        swept[float(level)] = folder
    line = controllability_line(swept, tmp_path / "gt")
    assert "Spearman(condition 0..7, PSNR) +1.00" in line
    reverse = {7.0 - s: folder for s, folder in swept.items()}
    assert "-1.00" in controllability_line(reverse, tmp_path / "gt")


def test_summary_headline():
    summary = {"steps": 12, "teacher_version": 3, "bank_images": 5, "bank_entries": 14,
               "max_entries_per_image": 3, "dropped": {"aug": 2}, "checkpoint": "/r/ckpt",
               "elapsed_s": 41.6, "bank_stats": {"images": 5}, "labelling": {}}
    assert json.loads(headline_json(summary)) == {
        "steps": 12, "teacher_version": 3, "bank_images": 5, "bank_entries": 14, "max_entries_per_image": 3,
        "dropped": {"aug": 2}, "checkpoint": "/r/ckpt", "elapsed_s": 41.6}
    assert headline_line(summary) == "12 steps, teacher version 3, bank 5 images / 14 entries, dropped {'aug': 2}, 42 s"


def test_demo_without_config_runs_the_quickstart(tmp_path, monkeypatch):
    """`qualiteacher demo` with no --config takes the checkout's quickstart.yaml (the ladder and
    200 steps the README's numbers come from), not the built-in defaults; where there is no
    checkout the error names the file and --config."""
    import pytest
    from qualiteacher.pipelines import cli

    from qualiteacher.config import load_config

    config = cli.demo_config()
    assert config.parts[-2:] == ("configs", "quickstart.yaml")
    cfg = load_config(config)
    assert cfg.train.steps == 200 and list(cfg.labelling.ladder) == [0.0, 0.5]
    assert load_config(None).train.steps != cfg.train.steps  # the defaults would be another run

    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "pipelines" / "cli.py"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cli.UsageError, match="configs/quickstart.yaml.*--config"):
        cli.demo_config()
