"""`qualiteacher evaluate` and the Colabator-style baseline's model and preflight (its config
rule: tests/test_config_errors.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from qualiteacher.config import load_config
from qualiteacher.imageio import write_png


def test_evaluate_reports_psnr_ssim_and_bad_files(weights_dir, tmp_path):
    rng = np.random.default_rng(0)
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    ramp = np.linspace(0, 255, 128)[None, :, None] * np.ones((128, 1, 3))
    for name, noise in (("a.png", 0.0), ("b.png", 20.0)):
        clean = (ramp + rng.normal(0, 5, ramp.shape)).clip(0, 255).astype(np.uint8)
        write_png(gt / name, clean)
        write_png(pred / name, (clean + rng.normal(0, noise, clean.shape)).clip(0, 255).astype(np.uint8)
                  if noise else clean)
    (pred / "broken.png").write_text("nope")
    out = subprocess.run([sys.executable, "-m", "qualiteacher.pipelines.cli", "evaluate", "--pred", str(pred),
                          "--gt", str(gt), "--metrics", "brisque,piqe", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "broken.png" in out.stderr and "Traceback" not in out.stderr
    result = json.loads(out.stdout)
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in result["per_image"]}
    assert rows["a.png"]["psnr"] == 100.0 and abs(rows["a.png"]["ssim"] - 1.0) < 1e-9
    assert 20 < rows["b.png"]["psnr"] < 30 and rows["b.png"]["ssim"] < 0.9
    assert result["mean"]["count"] == 2
    assert abs(result["mean"]["psnr"] - (100.0 + rows["b.png"]["psnr"]) / 2) < 1e-6
    assert set(result["mean"]["raw"]) == {"brisque", "piqe"}


def test_baseline_starts_from_a_conditioned_stage1_model(tmp_path):
    import torch

    from qualiteacher.checkpoint import load_restorer, save_model_file
    from qualiteacher.models.build import build_model

    qt = load_config("configs/smoke.yaml")
    stage1 = build_model(qt.model)
    save_model_file(tmp_path / "pretrain.pt", stage1, qt.model)
    baseline = load_config("configs/smoke.yaml", ["train.mode=baseline"])
    model, cfg = load_restorer(tmp_path / "pretrain.pt", model_cfg=baseline.model)
    assert not cfg.score_condition
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():  # zero-init injection: the conditioned stage-1 output equals the backbone's
        assert torch.allclose(model(x), stage1(x, 7.0), atol=1e-6)


def test_preflight_rejects_images_smaller_than_a_metric_needs():
    import pytest
    from qualiteacher.pipelines.train import preflight

    from qualiteacher.config import ConfigError

    with pytest.raises(ConfigError, match=r"labelling\.image_size=64.*niqe needs 96"):
        preflight(load_config("configs/smoke.yaml", ["labelling.image_size=64"]))


def test_preflight_rejects_crops_smaller_than_the_reward_needs():
    import pytest
    from qualiteacher.pipelines.train import preflight

    from qualiteacher.config import ConfigError

    with pytest.raises(ConfigError, match=r"loss\.consistency: .*at least 96 px"):  # Eq. 9: the config's own rule
        load_config("configs/smoke.yaml", ["iqa.reward_metrics={niqe: 1}", "data.crop_size=64"])
    overrides = ["iqa.reward_metrics={niqe: 1}", "data.crop_size=64", "loss.consistency.enabled=false"]
    with pytest.raises(ConfigError, match=r"data\.crop_size=64 .*needs 96 px"):  # Eq. 8
        preflight(load_config("configs/smoke.yaml", overrides))
    preflight(load_config("configs/smoke.yaml", overrides + ["train.mode=baseline"]))  # no reward there
