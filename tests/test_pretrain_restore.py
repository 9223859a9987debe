"""Paired/unpaired loading, stage-1 pretraining and folder restoration, on tiny models."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from qualiteacher.pipelines import cli
from qualiteacher.pipelines import pretrain as pretrain_mod
from qualiteacher.pipelines import restore as restore_mod

from qualiteacher.checkpoint import load_restorer, read_model_file, save_model_file
from qualiteacher.config import load_config
from qualiteacher.data.paired import ID_PATTERN, PairedImages, UnpairedImages
from qualiteacher.data.samples import make_task_sets
from qualiteacher.imageio import read_image, write_png
from qualiteacher.models.build import build_model

TINY = ["model.width=8", "model.enc_blocks=[1,1]", "model.dec_blocks=[1,1]", "model.middle_blocks=1",
        "data.crop_size=32", "loss.consistency.enabled=false", "pretrain.batch_size=4", "pretrain.lr=0.002", "seed=3"]


@pytest.fixture(scope="module")
def haze_sets(tmp_path_factory):
    return make_task_sets("haze", tmp_path_factory.mktemp("haze"), seed=1, size=48, crops_per_image=2)


def structured(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth gradients plus a few blocks: image-like, not white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([xx, yy, 0.5 * (xx + yy)], axis=2) * rng.uniform(0.5, 1.0, 3)
    for _ in range(3):
        top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[top : top + h // 3, left : left + w // 3] = rng.uniform(0, 1, 3)
    return np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)


# --------------------------------------------------------------------------- data


def test_paired_same_crop_and_padding(tmp_path):
    for i, (h, w) in enumerate([(40, 56), (20, 24)]):  # the second is smaller than the crop
        write_png(tmp_path / "in" / f"im{i}.png", structured(h, w, i))
    shutil.copytree(tmp_path / "in", tmp_path / "tg")
    data = PairedImages(tmp_path / "in", tmp_path / "tg")
    assert len(data) == 2 and data.errors == []
    x, y = data.sample_batch(16, 32, np.random.default_rng(0))
    assert x.shape == y.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, y)  # identical pairs: the crop and flip are shared
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_paired_levels_follow_the_sampled_pairs(tmp_path):
    for i, value in enumerate((40, 200)):  # flat targets: a crop tells which pair it came from
        write_png(tmp_path / "in" / f"im{i}.png", structured(32, 32, i))
        write_png(tmp_path / "tg" / f"im{i}.png", np.full((32, 32, 3), value, np.uint8))
    data = PairedImages(tmp_path / "in", tmp_path / "tg")
    with pytest.raises(ValueError, match="no target levels"):
        data.sample_batch(4, 16, np.random.default_rng(0), with_levels=True)
    data.levels = torch.tensor([3.0, 6.5])
    _, y, levels = data.sample_batch(32, 16, np.random.default_rng(0), with_levels=True)
    expected = torch.where(y.mean(dim=(1, 2, 3)) > 0.5, 6.5, 3.0)
    assert torch.equal(levels, expected) and set(levels.tolist()) == {3.0, 6.5}


def test_paired_reports_and_skips_bad_files(tmp_path):
    for name in ("a.png", "b.png", "only_in.png"):
        write_png(tmp_path / "in" / name, structured(32, 32, 1))
    for name in ("a.png", "only_tg.png"):
        write_png(tmp_path / "tg" / name, structured(32, 32, 2))
    (tmp_path / "tg" / "b.png").write_text("not an image")
    data = PairedImages(tmp_path / "in", tmp_path / "tg")
    assert data.names == ["a.png"]
    reasons = {p.name: r for p, r in data.errors}
    assert set(reasons) == {"b.png", "only_in.png", "only_tg.png"}
    assert "no target" in reasons["only_in.png"] and "no input" in reasons["only_tg.png"]
    (tmp_path / "in" / "a.png").unlink()
    with pytest.raises(ValueError, match="no usable image pairs"):
        PairedImages(tmp_path / "in", tmp_path / "tg")


def test_unpaired_ids_are_valid_and_unique(tmp_path):
    names = ["plain.png", "a b.png", "a_b.png", "x.png", "x.jpg", "-lead.png", "ünï.png", "y" * 140 + ".png"]
    for i, name in enumerate(names):
        write_png(tmp_path / name, structured(30 + i, 50, i))  # write_png writes PNG bytes under any name
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    data = UnpairedImages(tmp_path, size=24)
    assert len(data) == len(names) and [p.name for p, _ in data.errors] == ["broken.png"]
    assert len(set(data.ids)) == len(data.ids)
    assert all(ID_PATTERN.match(i) for i in data.ids)
    ids = dict(zip((p.name for p in data.paths), data.ids))
    assert ids["plain.png"] == "plain" and ids["a_b.png"] == "a_b" and ids["x.jpg"] == "x"
    assert ids["a b.png"].startswith("a_b-") and ids["x.png"].startswith("x-")
    assert all(img.shape == (24, 24, 3) and img.dtype == np.uint8 for img in data.images)
    assert UnpairedImages(tmp_path).images[0].shape[:2] != (24, 24)


# --------------------------------------------------------------------------- pretrain


def test_pretrain_reduces_l1(haze_sets, tmp_path):
    cfg = load_config(None, TINY + ["pretrain.steps=60"])
    data = PairedImages(haze_sets["paired/input"], haze_sets["paired/target"])
    x, y = data.sample_batch(8, 32, np.random.default_rng(123))  # fixed evaluation crops
    torch.manual_seed(cfg.seed)  # pretrain starts from the same init
    before_model = build_model(cfg.model).eval()
    logs: list[str] = []
    out = pretrain_mod.pretrain(cfg, haze_sets["paired/input"], haze_sets["paired/target"],
                                tmp_path / "pre.pt", log=logs.append)
    after_model, used_cfg = load_restorer(out)
    assert used_cfg == cfg.model
    with torch.no_grad():
        before = F.l1_loss(before_model(x, 7.0), y).item()
        after = F.l1_loss(after_model(x, 7.0), y).item()
    assert after < 0.8 * before, (before, after)
    raw = read_model_file(out)
    assert raw["steps"] == 60 and np.isfinite(raw["final_loss"]) and raw["stage"] == "pretrain"
    assert any("step 60/60" in line for line in logs)


def test_pretrain_use_gpu_runs_where_cuda_is_missing(haze_sets, tmp_path):
    cfg = load_config(None, TINY + ["pretrain.steps=2", "train.use_gpu=true"])
    logs: list[str] = []
    pretrain_mod.pretrain(cfg, haze_sets["paired/input"], haze_sets["paired/target"], tmp_path / "pre.pt",
                          log=logs.append)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert logs[0].endswith(f"device {expected}"), logs[0]


def test_pretrain_command(haze_sets, tmp_path, capsys):
    argv = ["--paired-input", str(haze_sets["paired/input"]), "--paired-target",
            str(haze_sets["paired/target"]), "--out", str(tmp_path / "m.pt")]
    sets = [a for item in TINY + ["pretrain.steps=2"] for a in ("--set", item)]
    assert cli.main(["pretrain", *sets, *argv]) == 0
    assert (tmp_path / "m.pt").is_file()
    assert cli.main(["pretrain", *sets, "--paired-input", str(tmp_path / "nowhere"), *argv[2:]]) == 2
    assert cli.main(["pretrain", "--set", "model.width=1", *argv]) == 2
    assert cli.main(["pretrain", *sets, "--out", str(tmp_path / "m2.pt")]) == 2  # no paired folders
    err = capsys.readouterr().err
    assert "nowhere" in err and "model.width" in err and "data.paired_input_dir" in err and "Traceback" not in err


def test_pretrain_command_takes_the_folders_from_the_config_and_reports_skipped_files(haze_sets, tmp_path, capsys):
    paired = tmp_path / "paired"
    shutil.copytree(haze_sets["paired/input"], paired / "input")
    shutil.copytree(haze_sets["paired/target"], paired / "target")
    (paired / "input" / "broken.png").write_text("not a PNG")
    (paired / "target" / "broken.png").write_text("not a PNG")
    sets = [a for item in [*TINY, "pretrain.steps=2", f"data.paired_input_dir={paired / 'input'}",
                           f"data.paired_target_dir={paired / 'target'}"] for a in ("--set", item)]
    assert cli.main(["pretrain", *sets, "--out", str(tmp_path / "m.pt")]) == 1  # trained; a file was skipped
    assert (tmp_path / "m.pt").is_file() and "broken.png" in capsys.readouterr().err


# --------------------------------------------------------------------------- restore


def tiny_model_file(path, inject_scale: float = 0.0, nan: bool = False):
    cfg = load_config(None, TINY).model
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.score_injection.parameters():
            p.add_(inject_scale * torch.randn_like(p))
        if nan:
            model.ending.bias.fill_(float("nan"))
    return save_model_file(path, model, cfg)


@pytest.fixture
def in_dir(tmp_path):
    folder = tmp_path / "in"
    for i, (h, w) in enumerate([(48, 48), (37, 53)]):
        write_png(folder / f"img{i}.png", structured(h, w, i))
    (folder / "bad.png").write_text("this is text, not a PNG")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return folder


def test_restore_folder_writes_good_and_reports_bad(tmp_path, in_dir):
    ckpt = tiny_model_file(tmp_path / "m.pt")
    results = restore_mod.restore_folder(ckpt, in_dir, tmp_path / "out", score=7.0, device="cpu")
    errors = {p.name: e for p, e in results}
    assert set(errors) == {"bad.png", "img0.png", "img1.png"}
    assert errors["img0.png"] is None and errors["img1.png"] is None and errors["bad.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img0.png", "img1.png"]
    assert read_image(tmp_path / "out" / "img1.png").shape == (37, 53, 3)


def test_restore_command_exit_codes(tmp_path, in_dir, capsys):
    ckpt = tiny_model_file(tmp_path / "m.pt")
    out = tmp_path / "out"
    restore = ["restore", "--device", "cpu", "--checkpoint"]
    assert cli.main([*restore, str(ckpt), "--score", "6", str(in_dir), str(out)]) == 1
    err = capsys.readouterr().err
    assert "bad.png" in err and "Traceback" not in err
    (in_dir / "bad.png").unlink()
    assert cli.main([*restore, str(ckpt), str(in_dir), str(out)]) == 0
    assert cli.main([*restore, str(tmp_path / "none.pt"), str(in_dir), str(out)]) == 2
    assert cli.main([*restore, str(ckpt), "--score", "11", str(in_dir), str(out)]) == 2
    assert cli.main([*restore, str(ckpt), str(in_dir), str(in_dir)]) == 2
    assert cli.main([*restore, str(ckpt), "--device", "nope", str(in_dir), str(out)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def _restored(ckpt, in_dir, out_dir, score: float, **kwargs) -> np.ndarray:
    results = restore_mod.restore_folder(ckpt, in_dir, out_dir, score=score, device="cpu", **kwargs)
    assert [p.name for p, e in results if e is None] == ["img0.png", "img1.png"]
    return np.stack([read_image(out_dir / "img0.png").astype(int)])


def test_score_changes_output_only_when_injection_is_trained(tmp_path, in_dir):
    (in_dir / "bad.png").unlink()
    init = tiny_model_file(tmp_path / "init.pt")
    a, b = (_restored(init, in_dir, tmp_path / f"i{s}", s) for s in (3.0, 7.0))
    assert np.array_equal(a, b)  # zero-init injection: the score has no effect yet
    trained = tiny_model_file(tmp_path / "trained.pt", inject_scale=1.0)
    a, b = (_restored(trained, in_dir, tmp_path / f"t{s}", s) for s in (3.0, 7.0))
    assert np.abs(a - b).max() > 2


def test_restore_rejects_nan_outputs(tmp_path, in_dir):
    ckpt = tiny_model_file(tmp_path / "nan.pt", nan=True)
    results = restore_mod.restore_folder(ckpt, in_dir, tmp_path / "out", device="cpu")
    assert all(e is not None for _, e in results)
    assert sum("NaN" in e for _, e in results) == 2
    assert list((tmp_path / "out").iterdir()) == []


def test_tiled_restore_matches_shape(tmp_path, in_dir):
    ckpt = tiny_model_file(tmp_path / "m.pt", inject_scale=0.5)
    model, _ = load_restorer(ckpt)
    x = torch.rand(1, 3, 70, 90)
    with torch.no_grad():
        whole = restore_mod.restore_tensor(model, x, 7.0)
        tiled = restore_mod.restore_tensor(model, x, 7.0, tile=32)
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    assert (tiled - whole).abs().mean() < 0.05  # tiles see less context, but stay close
