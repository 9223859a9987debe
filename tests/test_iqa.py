"""The offline ensemble: calibration against pyiqa's table, normalisation, blocks, reward."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import numpy as np
import torch

from qualiteacher.imageio import read_image, to_tensor, write_png
from qualiteacher.iqa.ensemble import IQAEnsemble, normalize_score
from qualiteacher.iqa.registry import METRICS, get_spec
from qualiteacher.iqa.weights import MissingWeightsError, status

# pyiqa's calibration rows (ResultsCalibra/calibration_summary.csv in pyiqa's repository).
CALIBRATION = {
    "brisque": {"I03": 94.6443, "I04": -0.1068, "I06": 1.0732, "I08": 5.1447, "I19": 66.8415},
    "niqe": {"I03": 15.6538, "I04": 3.6549, "I06": 3.2342, "I08": 3.1922, "I19": 9.0722},
    "piqe": {"I03": 100.0, "I04": 21.62, "I06": 35.86, "I08": 41.15, "I19": 76.95},
}


def _close(value: float, expected: float) -> bool:
    return abs(value - expected) <= max(0.01 * abs(expected), 0.05)


def _score_cli(files: list[str]) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "qualiteacher.pipelines.cli", "score", "--metrics", "brisque,niqe,piqe", "--json", *files],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout)


def test_cli_score_json_reproduces_calibration(weights_dir, calibration_dir, tmp_path):
    files = [str(calibration_dir / f"{name}.bmp") for name in CALIBRATION["brisque"]]
    results = _score_cli(files)
    assert [r["file"] for r in results] == files
    # NIQE reads whole 96 px blocks: pyiqa's table scores the top-left 480 x 384 of these
    # 512 x 384 images, which the ensemble scores as pyiqa does (on the full image it
    # averages that window with the top-right one: `covering_windows`).
    crops = []
    for f in files:
        crops.append(str(tmp_path / f"{f.rsplit('/', 1)[-1][:-4]}.png"))
        write_png(crops[-1], read_image(f)[:, :480])
    niqe_on_blocks = {r["file"].rsplit("/", 1)[-1][:-4]: r["raw"]["niqe"] for r in _score_cli(crops)}
    for r in results:
        name = r["file"].rsplit("/", 1)[-1][:-4]
        assert set(r) == {"file", "raw", "normalized", "ensemble"}
        r["raw"]["niqe"] = niqe_on_blocks[name]
        for metric, rows in CALIBRATION.items():
            assert _close(r["raw"][metric], rows[name]), (metric, name, r["raw"][metric], rows[name])
            assert 0.0 <= r["normalized"][metric] <= 1.0
        assert 0.0 <= r["ensemble"] <= 10.0
    # I03 is the most distorted image of the five: lowest ensemble.
    by_name = {r["file"].rsplit("/", 1)[-1]: r["ensemble"] for r in results}
    assert min(by_name, key=by_name.get) == "I03.bmp"


def test_cli_score_reports_bad_file_and_scores_the_rest(weights_dir, calibration_dir, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    good = calibration_dir / "I04.bmp"
    out = subprocess.run(
        [sys.executable, "-m", "qualiteacher.pipelines.cli", "score", "--metrics", "piqe", "--json", str(bad), str(good)],
        capture_output=True, text=True,
    )
    assert out.returncode == 1
    results = json.loads(out.stdout)
    assert "broken.png" in results[0]["error"]
    assert _close(results[1]["raw"]["piqe"], CALIBRATION["piqe"]["I04"])
    assert "Traceback" not in out.stderr


def test_normalisation_clips_and_inverts():
    brisque = get_spec("brisque")
    raw = torch.tensor([-5.0, 0.0, 75.0, 150.0, 400.0])
    assert torch.allclose(normalize_score(brisque, raw), torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0]))
    musiq = get_spec("musiq")
    assert torch.allclose(normalize_score(musiq, torch.tensor([25.0, 120.0])), torch.tensor([0.25, 1.0]))


def test_ensemble_is_weighted_mean(offline_ensemble, calibration_dir):
    """Eq. 4 on I06, expected from pyiqa's published raw scores and the metrics' ranges written
    out here (lower is better for all three: 1 - raw / high), not from the ensemble's own
    normalised values. NIQE's whole-label windows move its raw score by under 1 %."""
    x = to_tensor(read_image(calibration_dir / "I06.bmp"))
    scores = offline_ensemble.score(x)
    raw, high = CALIBRATION, {"brisque": 150.0, "niqe": 100.0, "piqe": 100.0}
    weights = {"brisque": 0.4, "niqe": 0.3, "piqe": 0.3}  # the offline_ensemble fixture's
    expected = sum(w * (1 - raw[n]["I06"] / high[n]) for n, w in weights.items())  # 0.87986
    assert abs(float(scores.ensemble) - expected) < 1e-3
    assert torch.allclose(scores.ensemble10, scores.ensemble * 10)


def test_batch_scoring_matches_single(offline_ensemble, calibration_dir):
    images = torch.cat([to_tensor(read_image(calibration_dir / f"{n}.bmp")) for n in ("I04", "I19")])
    batched = offline_ensemble.raw_scores(images)
    for i in range(2):
        single = offline_ensemble.raw_scores(images[i : i + 1])
        for name in batched:
            # + 3e-3: BRISQUE's fit reads a gamma table in 0.001 steps, and batch-size rounding
            # can land it one step over (I04's BRISQUE, near 0, moves by 0.0024 so)
            assert abs(batched[name][i].item() - single[name].item()) < 1e-3 * max(1, abs(single[name].item())) + 3e-3


def test_pixel_cap_is_chosen_per_device_type(weights_dir):
    """`iqa.max_batch_pixels` may hold one cap per device type; the ensemble takes its own."""
    from pathlib import Path

    from qualiteacher.config import load_config

    quickstart = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
    cfg = load_config(quickstart, [f"paths.weights_dir={weights_dir}", "iqa.device=cpu"])
    assert cfg.iqa.max_batch_pixels == {"cpu": 82944, "cuda": None}
    assert (cfg.iqa.batch_pixels_for("cpu"), cfg.iqa.batch_pixels_for("cuda")) == (82944, None)
    assert IQAEnsemble.from_config(cfg).max_batch_pixels == 82944
    only_gpu = load_config(quickstart, ["iqa.max_batch_pixels={cuda: 4096}"]).iqa
    assert (only_gpu.batch_pixels_for("cpu"), only_gpu.batch_pixels_for("cuda")) == (None, 4096)
    assert load_config(quickstart, ["iqa.max_batch_pixels=4096"]).iqa.batch_pixels_for("cuda") == 4096


def test_pixel_limited_calls_give_the_same_scores(offline_ensemble, calibration_dir):
    """`max_batch_pixels` splits each metric call into chunks; the scores do not change."""
    import copy

    images = torch.cat([to_tensor(read_image(calibration_dir / f"{n}.bmp"))[:, :, :192, :192]
                        for n in ("I03", "I04", "I08", "I19")])
    limited = copy.copy(offline_ensemble)
    limited.max_batch_pixels = 2 * 192 * 192 + 5  # 2 images per call; 8 blocks of 96 px
    calls = []
    model = limited.models["piqe"].net  # what `_call` runs
    hook = model.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        chunked, blocks_chunked = limited.raw_scores(images), limited.block_scores(images, grid=2)
    finally:
        hook.remove()
    assert calls == [2, 2, 8, 8]
    whole, blocks_whole = offline_ensemble.raw_scores(images), offline_ensemble.block_scores(images, grid=2)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-3, atol=1e-4)  # batch-size rounding
    torch.testing.assert_close(blocks_chunked, blocks_whole, rtol=1e-4, atol=1e-4)


def test_block_weights_mark_corrupted_quadrant(offline_ensemble, calibration_dir):
    """The weights the scorer stores with every label: a noisy quadrant weighs less."""
    x = to_tensor(read_image(calibration_dir / "I04.bmp"))[:, :, :256, :256].clone()
    gen = torch.Generator().manual_seed(0)
    x[:, :, :128, 128:] = (x[:, :, :128, 128:] + 0.35 * torch.randn(1, 3, 128, 128, generator=gen)).clamp(0, 1)
    weights = offline_ensemble.block_weights(x, grid=2)
    assert weights.shape == (1, 2, 2)
    corrupted = weights[0, 0, 1]
    for clean in (weights[0, 0, 0], weights[0, 1, 0], weights[0, 1, 1]):
        assert corrupted < clean - 0.1
    # relative to the image's mean block, as documented
    blocks = offline_ensemble.block_scores(x, grid=2)
    torch.testing.assert_close(weights, (blocks / blocks.mean()).clamp_min(0.1))


def test_block_weights_flat_block_is_neutral(offline_ensemble, calibration_dir):
    """A flat block has no BRISQUE / PIQE score: it gets weight 1 and stays out of the mean,
    so the other blocks keep their weights relative to each other."""
    x = to_tensor(read_image(calibration_dir / "I04.bmp"))[:, :, :256, :256].clone()
    x[:, :, 128:, :128] = 0.5
    weights = offline_ensemble.block_weights(x, grid=2, floor=0.1)
    assert torch.isfinite(weights).all()
    assert weights[0, 1, 0].item() == 1.0
    blocks = offline_ensemble.block_scores(x, grid=2)
    assert torch.isnan(blocks[0, 1, 0])
    others = torch.stack([blocks[0, 0, 0], blocks[0, 0, 1], blocks[0, 1, 1]])
    expected = (others / others.mean()).clamp_min(0.1)
    torch.testing.assert_close(torch.stack([weights[0, 0, 0], weights[0, 0, 1], weights[0, 1, 1]]), expected)


def test_upsampled_block_weights_follow_the_grid():
    from qualiteacher.method.bank_batch import upsample_block_weights

    wmap = upsample_block_weights(np.array([[0.5, 1.5], [1.0, 1.0]], np.float32), (64, 64))
    assert wmap.shape == (1, 64, 64)
    assert wmap[0, :16, 32:].mean() > wmap[0, :16, :32].mean() + 0.5  # the 1.5 block stays heavier
    assert torch.equal(upsample_block_weights(np.zeros((0, 0), np.float32), (8, 8)), torch.ones(1, 8, 8))


def test_niqe_sees_the_whole_label(offline_ensemble, calibration_dir):
    """pyiqa's NIQE reads whole 96 px blocks from the top-left; on a 128 px label the ensemble
    averages the four corner windows, so a defect anywhere in the label moves the score, and
    a label of whole blocks keeps pyiqa's own number."""
    from qualiteacher.iqa.ensemble import covering_windows

    x = to_tensor(read_image(calibration_dir / "I04.bmp"))[:, :, :128, :128].clone()
    net = offline_ensemble.models["niqe"].net
    windows, count = covering_windows(x, 96)
    assert count == 4 and windows.shape == (4, 3, 96, 96)
    covered = torch.zeros(128, 128)
    for t, l in ((0, 0), (0, 32), (32, 0), (32, 32)):
        covered[t:t + 96, l:l + 96] += 1
    assert covered.min() >= 1  # every pixel in some window
    corner = x.clone()
    gen = torch.Generator().manual_seed(0)
    corner[:, :, 100:, 100:] = (corner[:, :, 100:, 100:] + 0.4 * torch.randn(1, 3, 28, 28, generator=gen)).clamp(0, 1)
    with torch.no_grad():
        assert net(corner).item() == pytest.approx(net(x).item())  # pyiqa alone does not see it
    scores = offline_ensemble.raw_scores(torch.cat([x, corner]), ["niqe"])["niqe"]
    assert scores[1] > scores[0] + 0.1
    with torch.no_grad():
        expected = torch.stack([net(w[None]) for w in windows]).mean()
    assert scores[0].item() == pytest.approx(expected.item(), rel=1e-5)
    whole = x[:, :, :96, :96]
    with torch.no_grad():
        assert offline_ensemble.raw_scores(whole, ["niqe"])["niqe"].item() == pytest.approx(net(whole).item(), rel=1e-6)


def test_reward_scores_clamped_outputs(offline_ensemble, calibration_dir):
    """Values outside [0, 1] are scored as the saved (clamped) image would be."""
    x = to_tensor(read_image(calibration_dir / "I06.bmp"))[:, :, :128, :128]
    wild = x * 1.6 - 0.3  # over- and under-shoots
    with torch.no_grad():
        assert offline_ensemble.reward(wild).item() == pytest.approx(offline_ensemble.reward(wild.clamp(0, 1)).item())
        assert offline_ensemble.reward(wild).item() != pytest.approx(offline_ensemble.reward(x).item())


def test_block_scores_unfold_matches_crops(offline_ensemble, calibration_dir):
    x = to_tensor(read_image(calibration_dir / "I08.bmp"))[:, :, :192, :288]
    blocks = offline_ensemble.block_scores(x, grid=2)
    # The top-right block scored on its own gives the same ensemble as in the batched grid.
    names = offline_ensemble.block_metric_names(96)
    crop = x[:, :, :96, 144:]
    alone = offline_ensemble.combine(offline_ensemble.normalize(offline_ensemble.raw_scores(crop, names)))
    assert abs(blocks[0, 0, 1].item() - alone.item()) < 1e-4


def test_reward_has_gradients(offline_ensemble, calibration_dir):
    x = to_tensor(read_image(calibration_dir / "I06.bmp"))[:, :, :128, :128].clone().requires_grad_(True)
    q = offline_ensemble.reward(x)
    q.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert offline_ensemble.reward_names == ["brisque", "niqe"]


def test_reward_metrics_choose_what_the_reward_climbs(offline_ensemble, weights_dir, calibration_dir):
    """A NIQE-only reward is NIQE's bounded score alone; BRISQUE still counts in the ensemble."""
    from qualiteacher.iqa.ensemble import soft_unit

    niqe_only = IQAEnsemble({"brisque": 0.4, "niqe": 0.3, "piqe": 0.3}, weights_dir, device="cpu",
                            reward_weights={"niqe": 2.0})
    assert niqe_only.reward_weights == {"niqe": 1.0} and niqe_only.weights == offline_ensemble.weights
    x = to_tensor(read_image(calibration_dir / "I06.bmp"))[:, :, :128, :128]
    raw = offline_ensemble.raw_scores(x)
    expected = soft_unit(1.0 - raw["niqe"] / 100.0)
    torch.testing.assert_close(niqe_only.reward(x), expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(niqe_only.quality_from_raw(raw), expected)
    assert not torch.allclose(offline_ensemble.quality_from_raw(raw), expected)  # BRISQUE counts there
    with pytest.raises(ValueError, match="no reward metric \\(niqe\\) can score 64 px"):
        niqe_only.reward(x[:, :, :64, :64])
    with pytest.raises(ValueError, match="'piqe' is not a differentiable metric"):
        IQAEnsemble({"piqe": 1.0}, weights_dir, device="cpu", reward_weights={"piqe": 1.0})


def test_missing_weights_error_names_file(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        IQAEnsemble({"musiq": 1.0}, tmp_path, device="cpu")
    assert "musiq_koniq_ckpt-e95806b9.pth" in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_weights_status_lists_every_metric(weights_dir, tmp_path):
    rows = {r.name: r for r in status(weights_dir)}
    assert {"brisque", "niqe", "piqe", "musiq", "clipiqa", "topiq_nr"} <= set(rows)
    assert rows["brisque"].ready and rows["niqe"].ready and rows["piqe"].ready
    empty = {r.name: r for r in status(tmp_path)}
    assert not empty["brisque"].ready and "weights prepare" in empty["brisque"].detail
    assert not empty["clipiqa"].ready and "RN50.pt" in empty["clipiqa"].files[0]
    assert all(spec.name in rows for spec in METRICS.values())


def test_pyiqa_loader_uses_weights_folder(tmp_path):
    """A MUSIQ file in the weights folder is what pyiqa loads (random init saved by the test)."""
    import pyiqa
    from qualiteacher.iqa.weights import configure_pyiqa

    net = pyiqa.create_metric("musiq", pretrained=False, device="cpu").net
    target = tmp_path / "hub" / "pyiqa" / "musiq_koniq_ckpt-e95806b9.pth"
    target.parent.mkdir(parents=True)
    torch.save(net.state_dict(), target)
    ensemble = IQAEnsemble({"musiq": 1.0}, tmp_path, device="cpu")
    loaded = ensemble.models["musiq"].net.state_dict()
    first = next(iter(loaded))
    assert torch.equal(loaded[first], net.state_dict()[first])
    configure_pyiqa(tmp_path)


def test_hand_crafted_metrics_run_without_cudnn_or_tf32(offline_ensemble, calibration_dir):
    """BRISQUE / NIQE / PIQE calls (scores and reward) run with cuDNN and TF32 off, whatever
    pyiqa's forward would set; the caller's settings come back afterwards (tests/test_gpu.py
    checks the numbers on a GPU)."""
    import torch

    from qualiteacher.iqa.ensemble import metric_backend

    seen = []
    hooks = [offline_ensemble.models[n].net.register_forward_pre_hook(
        lambda _m, _a, n=n: seen.append((n, torch.backends.cudnn.enabled, torch.backends.cudnn.allow_tf32,
                                         torch.backends.cuda.matmul.allow_tf32)))
        for n in offline_ensemble.names]
    before = (torch.backends.cudnn.enabled, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True  # a caller that allows TF32 matmuls
    try:
        x = to_tensor(read_image(calibration_dir / "I04.bmp"))[:, :, :128, :128]
        offline_ensemble.raw_scores(x)
        offline_ensemble.reward(x.clone().requires_grad_(True))
        assert torch.backends.cuda.matmul.allow_tf32 is True  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before[2]
        for h in hooks:
            h.remove()
    assert {n for n, *_ in seen} == set(offline_ensemble.names)
    assert all(tuple(flags) == (False, False, False) for _, *flags in seen), seen
    assert (torch.backends.cudnn.enabled, torch.backends.cudnn.allow_tf32) == before[:2]
    with metric_backend(exact=False):  # learned metrics: cuDNN, deterministic, as pyiqa sets it
        assert torch.backends.cudnn.enabled and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark


def test_tf32_convolutions_move_brisque_and_piqe_but_not_the_ensemble(offline_ensemble, calibration_dir,
                                                                       monkeypatch):
    """The GPU bug, emulated on the CPU. Every conv2d that cuDNN would run in TF32 (cuDNN on,
    its TF32 allowed) gets its operands rounded to TF32's 10 mantissa bits. Through pyiqa's
    own forward (which turns cuDNN's TF32 on) BRISQUE and PIQE move by whole points, as on
    the H100 (up to 25 and 56); NIQE runs in float64 and does not move. The ensemble's calls
    (`metric_backend`: no cuDNN, no TF32 for these metrics) give the exact scores."""
    import torch
    import torch.nn.functional as F

    def tf32(t):
        if t.dtype != torch.float32:
            return t
        return ((t.contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)

    def cudnn_tf32_would_apply():
        return torch.backends.cudnn.enabled and torch.backends.cudnn.allow_tf32

    images = torch.cat([to_tensor(read_image(calibration_dir / f"{n}.bmp"))[:, :, :192, :192]
                        for n in ("I03", "I04", "I08", "I19")])
    blocks = F.unfold(images, (96, 96), stride=(96, 96)).transpose(1, 2).reshape(16, 3, 96, 96)
    exact = offline_ensemble.raw_scores(blocks)
    exact_conv = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda x, w, *a, **k: exact_conv(
        *((tf32(x), tf32(w)) if cudnn_tf32_would_apply() else (x, w)), *a, **k))
    with torch.no_grad():
        through_pyiqa = {n: offline_ensemble.models[n](blocks).reshape(-1) for n in exact}
    moved = {n: float((through_pyiqa[n] - exact[n]).abs().max()) for n in exact}
    assert moved["brisque"] > 1 and moved["piqe"] > 1 and moved["niqe"] < 1e-3, moved
    ours = offline_ensemble.raw_scores(blocks)
    for name in exact:
        torch.testing.assert_close(ours[name], exact[name], rtol=0, atol=0, msg=name)


def test_exact_backward_gives_the_same_gradient_under_exact_settings(offline_ensemble, calibration_dir):
    """The reward's GPU path for hand-crafted metrics: the backward pass recomputes the metric
    with cuDNN and TF32 off (autograd would otherwise run it under the caller's settings).
    Same value and gradient as plain autograd; the recomputation sees the exact settings."""
    import torch

    from qualiteacher.iqa.ensemble import differentiable_score

    net = offline_ensemble.models["brisque"].net
    x = to_tensor(read_image(calibration_dir / "I04.bmp"))[:, :, :128, :128]
    plain_x, exact_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    plain = differentiable_score(net, plain_x, exact=True, exact_backward=False)
    plain.sum().backward()
    seen = []
    hook = net.register_forward_pre_hook(
        lambda _m, _a: seen.append((torch.is_grad_enabled(), torch.backends.cudnn.enabled)))
    try:
        exact = differentiable_score(net, exact_x, exact=True, exact_backward=True)
        assert seen == [(False, False)]  # the forward: no graph kept, exact settings
        exact.sum().backward()
    finally:
        hook.remove()
    assert seen[1] == (True, False)  # recomputed in the backward pass, exact settings
    assert torch.backends.cudnn.enabled  # restored
    torch.testing.assert_close(exact, plain.detach())
    torch.testing.assert_close(exact_x.grad, plain_x.grad, rtol=1e-5, atol=1e-7)
    assert exact_x.grad.abs().sum() > 0
