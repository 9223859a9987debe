"""Messy folders: every command reports each bad file once, by name, and processes the rest.

The corpus is generated here (nothing binary is committed): broken files (zero bytes,
truncated PNG and JPEG, text named .png, a decompression bomb header, an image over the
pixel limit) mixed with odd but valid ones (1x1, smaller than the training crop, 16-bit
grey and RGB PNG, CMYK JPEG, palette with and without transparency, RGBA, greyscale,
EXIF-rotated JPEG, a flat grey image) and good photos from ``write_samples``.

The CLI runs as a subprocess, as a user would run it: no ``Traceback`` on stderr, one
``error:`` line per failed file naming it with its reason, exit code 1 when anything
failed and 0 when nothing did. A short training run over the same folder (about 20 s) logs
and skips the bad files and completes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qualiteacher.imageio import DEFAULT_MAX_PIXELS, read_image

REPO = Path(__file__).resolve().parent.parent
GOOD_SAMPLES = ("astronaut", "camera", "chelsea", "coffee")

# Unreadable for every command: file name -> the reason the message must give.
UNREADABLE = {
    "bad_zero.png": r"empty \(0 bytes\)",
    "bad_trunc.png": r"truncated",
    "bad_trunc.jpg": r"truncated",  # same stem as bad_trunc.png: neither may hide the other
    "bad_text.png": r"not a recognised image format",
    "bad_bomb.png": r"decompression bomb",
    "bad_huge.png": r"exceeds the limit of 64000000",
}
# Readable, but too small for the NR metrics (NIQE needs 96 px): score/evaluate report them.
TOO_SMALL = {"odd_1x1.png": r"1x1, too small to score", "odd_small.png": r"40x40, too small to score"}
# NIQE has no defined value on a flat image (zero variance): score/evaluate report it.
UNSCORABLE = {"odd_flat.png": r"niqe|scoring failed"}
ODD_GOOD = ("odd_16bit_gray.png", "odd_16bit_rgb.png", "odd_cmyk.jpg", "odd_palette.png", "odd_palette_trns.png",
            "odd_rgba.png", "odd_gray.png", "odd_exif.jpg")
HUGE_SIDE = 8200  # 67.2 M pixels: over the default 64 M limit, under Pillow's own 89 M


# ---------------------------------------------------------------------------- corpus
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_raw(width: int, height: int, bit_depth: int, color_type: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand: lets the header claim anything and the data be 16-bit RGB."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\0" + row for row in rows))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _photo(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    """Smooth, image-like content (so the NR metrics have something to measure)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([xx, yy, 0.5 * (xx + yy)], axis=2) * 200 + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def make_corpus(folder: Path) -> dict[str, str]:
    """Write the odd and broken files; returns {name: what it is}."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = _photo()
    png, jpg = _encode(Image.fromarray(photo), "PNG"), _encode(Image.fromarray(photo), "JPEG", quality=90)
    (folder / "bad_zero.png").write_bytes(b"")
    (folder / "bad_trunc.png").write_bytes(png[: len(png) // 2])
    (folder / "bad_trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "bad_text.png").write_text("this is not an image\n")
    # 40000 x 40000 RGB in the header, a few bytes of data: refused before any decoding.
    (folder / "bad_bomb.png").write_bytes(_png_raw(40000, 40000, 8, 2, [b""]))
    # A real (flat, so small on disk) image over the 64 M pixel default limit.
    Image.new("L", (HUGE_SIDE, HUGE_SIDE), 128).save(folder / "bad_huge.png", compress_level=1)

    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "odd_1x1.png")
    Image.fromarray(photo[:40, :40]).save(folder / "odd_small.png")  # smaller than the 64 px crop
    Image.new("RGB", (128, 128), (128, 128, 128)).save(folder / "odd_flat.png")
    Image.fromarray(photo[:, :, 0].astype(np.uint16) * 257).save(folder / "odd_16bit_gray.png")
    rgb16 = photo.astype(">u2") * 257
    (folder / "odd_16bit_rgb.png").write_bytes(_png_raw(160, 120, 16, 2, [r.tobytes() for r in rgb16]))
    Image.fromarray(photo).convert("CMYK").save(folder / "odd_cmyk.jpg", quality=90)
    Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "odd_palette.png")
    Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "odd_palette_trns.png",
                                                                             transparency=0)
    alpha = np.tile(np.linspace(0, 255, 160, dtype=np.uint8), (120, 1))
    Image.fromarray(np.dstack([photo, alpha])).save(folder / "odd_rgba.png")
    Image.fromarray(photo).convert("L").save(folder / "odd_gray.png")
    exif_img = Image.fromarray(photo)
    exif = exif_img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    exif_img.save(folder / "odd_exif.jpg", exif=exif.tobytes(), quality=90)
    return {p.name: p.suffix for p in folder.iterdir()}


def add_good(folder: Path, tmp: Path, size: int = 128) -> list[str]:
    from qualiteacher.data.samples import write_samples

    written = {p.stem: p for p in write_samples(tmp, size=size)}
    names = []
    for stem in GOOD_SAMPLES:
        shutil.copy(written[stem], folder / f"good_{stem}.png")
        names.append(f"good_{stem}.png")
    return names


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, weights_dir) -> Path:
    folder = tmp_path_factory.mktemp("messy")
    make_corpus(folder)
    add_good(folder, tmp_path_factory.mktemp("samples"))
    return folder


@pytest.fixture(scope="module")
def good_only(tmp_path_factory, corpus) -> Path:
    folder = tmp_path_factory.mktemp("good")
    for p in corpus.iterdir():
        if p.name.startswith("good_") or p.name in ODD_GOOD:
            shutil.copy(p, folder / p.name)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from qualiteacher.checkpoint import save_model_file
    from qualiteacher.config import ModelConfig
    from qualiteacher.models.build import build_model

    cfg = ModelConfig(width=4, enc_blocks=[1], dec_blocks=[1], middle_blocks=1)
    return save_model_file(tmp_path_factory.mktemp("model") / "tiny.pt", build_model(cfg), cfg)


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    # One intra-op thread: the images are small, and on a busy 2-core machine torch's default
    # thread pool spins against the test runner (a 3 s restore took 30 s).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qualiteacher.pipelines.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False, env=env)


def _main(capsys, *args: str) -> subprocess.CompletedProcess:
    """The CLI in this process (cheap: no new interpreter, no second torch import), as a
    CompletedProcess so that _check_report applies; an uncaught exception fails the test."""
    from qualiteacher.pipelines.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def _check_report(proc: subprocess.CompletedProcess, expected: dict[str, str], everything: list[str]) -> None:
    """One ``error:`` line per expected failure (naming the file, with its reason); nothing
    about any other file; no traceback; exit code 1 (or 0 when nothing was expected)."""
    err = proc.stderr
    assert "Traceback" not in err, err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    for name, reason in expected.items():
        mentions = [line for line in error_lines if re.search(rf"(?<![\w.-]){re.escape(name)}\b", line)]
        assert len(mentions) == 1, (name, error_lines)
        assert re.search(reason, mentions[0]), (name, mentions[0])
    for name in set(everything) - set(expected):
        assert not [line for line in error_lines if name in line], (name, error_lines)
    assert len(error_lines) == len(expected), error_lines
    assert proc.returncode == (1 if expected else 0), (proc.returncode, err[-2000:])


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------- the corpus itself
def test_corpus_reads_as_intended(corpus):
    """The odd-but-valid files decode to sensible RGB; the broken ones fail in read_image."""
    for name in UNREADABLE:
        with pytest.raises(ValueError):
            read_image(corpus / name)
    assert HUGE_SIDE**2 > DEFAULT_MAX_PIXELS
    for name in ODD_GOOD:
        img = read_image(corpus / name)
        assert img.dtype == np.uint8 and img.shape[2] == 3
        assert img.shape[:2] == ((160, 120) if name == "odd_exif.jpg" else (120, 160)), name
    photo = _photo()
    np.testing.assert_allclose(read_image(corpus / "odd_16bit_rgb.png"), photo, atol=1)
    np.testing.assert_allclose(read_image(corpus / "odd_16bit_gray.png")[:, :, 0], photo[:, :, 0], atol=1)
    assert read_image(corpus / "odd_1x1.png").shape == (1, 1, 3)


# ---------------------------------------------------------------------------- score
def test_score_reports_bad_files_and_scores_the_rest(corpus):
    t0 = time.monotonic()
    proc = _cli("score", "--json", str(corpus))
    expected = {**UNREADABLE, **TOO_SMALL, **UNSCORABLE}
    _check_report(proc, expected, _names(corpus))
    rows = {Path(r["file"]).name: r for r in json.loads(proc.stdout)}
    assert set(rows) == set(_names(corpus))
    for name, row in rows.items():
        if name in expected:
            assert "error" in row and name in row["error"], row
        else:
            assert "error" not in row, row
            assert 0.0 <= row["ensemble"] <= 10.0 and set(row["raw"]) == {"brisque", "niqe", "piqe"}
    print(f"score over {len(rows)} files: {time.monotonic() - t0:.1f} s")


def test_score_all_good_exits_0(good_only, capsys):
    proc = _main(capsys, "score", str(good_only))
    _check_report(proc, {}, _names(good_only))


def test_score_pixel_limit_comes_from_config(good_only, capsys):
    """data.max_image_pixels is the limit (128x128 = 16384 px > 10000)."""
    proc = _main(capsys, "score", "--set", "data.max_image_pixels=10000", str(good_only / "good_coffee.png"),
                 str(good_only / "odd_gray.png"))
    _check_report(proc, {"good_coffee.png": r"16384 pixels exceeds the limit of 10000",
                         "odd_gray.png": r"19200 pixels exceeds the limit of 10000"}, _names(good_only))


# ---------------------------------------------------------------------------- evaluate
def test_evaluate_reports_bad_files_and_scores_the_rest(corpus, tmp_path):
    gt = tmp_path / "gt"
    shutil.copytree(corpus, gt)
    proc = _cli("evaluate", "--json", "--pred", str(corpus), "--gt", str(gt))
    expected = {**UNREADABLE, **TOO_SMALL, **UNSCORABLE}
    _check_report(proc, expected, _names(corpus))
    result = json.loads(proc.stdout)
    assert result["failed"] == len(expected)
    assert result["mean"]["count"] == len(_names(corpus)) - len(expected)
    assert result["mean"]["psnr"] == 100.0 and result["mean"]["ssim"] == pytest.approx(1.0)


def test_evaluate_pixel_limit_comes_from_config(good_only, capsys):
    proc = _main(capsys, "evaluate", "--pred", str(good_only), "--set", "data.max_image_pixels=10000")
    expected = {name: r"exceeds the limit of 10000" for name in _names(good_only)}
    _check_report(proc, expected, _names(good_only))


# ---------------------------------------------------------------------------- degrade
def test_degrade_reports_bad_files_and_writes_the_rest(corpus, tmp_path):
    out = tmp_path / "out"
    proc = _cli("degrade", "--task", "rain", "--seed", "3", str(corpus), str(out))
    _check_report(proc, UNREADABLE, _names(corpus))
    good = [n for n in _names(corpus) if n not in UNREADABLE]
    assert _names(out) == sorted(f"{Path(n).stem}.png" for n in good)
    assert f"degraded {len(good)} of {len(_names(corpus))} images" in proc.stdout
    assert read_image(out / "odd_exif.png").shape == (160, 120, 3)  # EXIF rotation applied
    assert read_image(out / "odd_1x1.png").shape == (1, 1, 3)


def test_degrade_all_good_exits_0(good_only, tmp_path):
    proc = _cli("degrade", "--task", "haze", str(good_only), str(tmp_path / "out"))
    _check_report(proc, {}, _names(good_only))
    assert len(_names(tmp_path / "out")) == len(_names(good_only))


# ---------------------------------------------------------------------------- restore
def test_restore_reports_bad_files_and_writes_the_rest(corpus, tiny_model, tmp_path):
    out = tmp_path / "out"
    proc = _cli("restore", "--checkpoint", str(tiny_model), str(corpus), str(out))
    _check_report(proc, UNREADABLE, _names(corpus))
    good = [n for n in _names(corpus) if n not in UNREADABLE]
    assert _names(out) == sorted(f"{Path(n).stem}.png" for n in good)
    for name in good:
        shape = read_image(out / f"{Path(name).stem}.png").shape
        assert shape == read_image(corpus / name).shape, name  # same size as the input


def test_restore_all_good_exits_0(good_only, tiny_model, tmp_path):
    proc = _cli("restore", "--checkpoint", str(tiny_model), str(good_only), str(tmp_path / "out"))
    _check_report(proc, {}, _names(good_only))
    assert len(_names(tmp_path / "out")) == len(_names(good_only))


@pytest.mark.parametrize("args, message", [
    (["--score", "11"], r"score must be in \[0, 10"),
    (["--checkpoint-is-an-image"], r"cannot load checkpoint .*good_coffee.png"),
    (["--same-folder"], r"is the input folder"),
])
def test_restore_usage_errors_exit_2(good_only, tiny_model, tmp_path, capsys, args, message):
    checkpoint, out = str(tiny_model), str(tmp_path / "out")
    if args == ["--checkpoint-is-an-image"]:
        checkpoint, args = str(good_only / "good_coffee.png"), []
    if args == ["--same-folder"]:
        out, args = str(good_only), []
    proc = _main(capsys, "restore", "--checkpoint", checkpoint, *args, str(good_only), out)
    assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr
    assert proc.stderr.count("\n") == 1  # one line, no traceback
    assert not (tmp_path / "out").exists()  # refused before any work


# ---------------------------------------------------------------------------- training
def test_training_over_a_messy_folder(ray_cluster, weights_dir, corpus, tmp_path, caplog):
    """The smoke job with the messy folder as its unpaired data (and broken files among the
    paired ones): each bad file is logged once, by name, and skipped; the run completes."""
    from qualiteacher.pipelines.train import run

    from qualiteacher.config import load_config
    from qualiteacher.data.samples import make_task_sets

    sets = make_task_sets("haze", tmp_path / "sets", seed=2, size=96, crops_per_image=1)
    paired_in, paired_tg = sets["paired/input"], sets["paired/target"]
    for name in ("bad_zero.png", "bad_trunc.png", "bad_text.png"):  # broken on both sides of a pair
        shutil.copy(corpus / name, paired_in / name)
        shutil.copy(corpus / name, paired_tg / name)
    cfg = load_config(REPO / "configs/smoke.yaml", [
        f"data.unpaired_dir={corpus}", f"data.paired_input_dir={paired_in}", f"data.paired_target_dir={paired_tg}",
        "ray.namespace=bad-input", "train.steps=4", "labelling.teachers=1",
    ])
    run_dir = tmp_path / "run"
    caplog.set_level(logging.INFO)
    t0 = time.monotonic()
    summary = run(cfg, run_dir)
    print(f"training over the messy folder: {time.monotonic() - t0:.1f} s")
    assert (run_dir / "summary.json").is_file()
    assert summary["steps"] == 4 and summary["bank_images"] > 0
    messages = [r.getMessage() for r in caplog.records]
    for name, reason in UNREADABLE.items():  # unpaired folder: skipped by the labeller set-up
        hits = [m for m in messages if str(corpus / name) in m]
        assert len(hits) == 1 and re.search(reason, hits[0]), (name, hits)
    for name in ("bad_zero.png", "bad_trunc.png", "bad_text.png"):  # paired folders: skipped by pretraining
        hits = [m for m in messages if str(paired_in / name) in m or str(paired_tg / name) in m]
        assert len(hits) == 1, (name, hits)
    assert summary["labelling"]["failed"] == 0
    # Every readable file (odd ones included) became a labelling input: reopen the run's bank.
    from qualiteacher.services.bank.inputs import InputStore
    from qualiteacher.services.redis_server import EmbeddedRedis

    readable = [Path(n).stem for n in _names(corpus) if n not in UNREADABLE]
    with EmbeddedRedis(run_dir / "redis") as server:
        client = server.client()
        stored = InputStore(client, "qt").get_many(readable)
        client.close()
    assert sorted(stored) == sorted(readable)
    assert all(img.shape == (96, 96, 3) for img in stored.values())  # labelling.image_size of smoke.yaml


# ---------------------------------------------------------------------------- scorer
@pytest.mark.parametrize("size", [96, 192])
def test_scorer_drops_an_unscorable_pl_set_and_keeps_the_rest(weights_dir, redis_server, size):
    """Flat pseudo-labels (a saturated or black frame) in a scoring batch: NIQE raises on them
    and BRISQUE gives NaN. The scorer drops that set (counted as non_finite) and gates the
    others; before, the whole batch failed and the labeller retried it for minutes.
    At 192 px the 2x2 blocks are 96 px, so NIQE scores blocks too and raises on the flat ones."""
    from qualiteacher.services.bank.store import MemoryBank
    from qualiteacher.services.scorer import ScorerWorker

    from qualiteacher.config import load_config
    from tests.redis_fixtures import unique_prefix

    prefix = unique_prefix()
    cfg = load_config(REPO / "configs/smoke.yaml", ["drop.enabled=false", f"redis.prefix={prefix}"])
    scorer = ScorerWorker(cfg.model_dump(mode="json"), redis_server.url)
    photo = np.stack([_photo(size, size, seed=s) for s in range(3)])  # (3, size, size, 3): one image's 3 PLs
    flat = np.full_like(photo, 255)
    half_flat = photo.copy()
    half_flat[:, :size // 2] = 0  # two of its four blocks are flat: BRISQUE / NIQE have no score for them
    report = scorer.process(["good", "flat", "half"], np.stack([photo, flat, half_flat]), np.ones(3, bool), 1)
    bank = MemoryBank(redis_server.client(), prefix, 3)
    try:
        assert report["images"] == 3 and report["dropped"] == {"non_finite": 1}, report
        assert sorted(i for i, _, _ in bank.list_images(0, 10, sort="id")) == ["good", "half"]
        assert bank.stats()["drops"] == {"non_finite": 1}
        for entry in bank.entries("half"):
            weights = np.array(entry.weights.values)
            assert np.isfinite(weights).all() and np.isfinite(entry.ensemble), weights
        assert bank.check_invariants() == []
    finally:
        bank.clear()
        bank.client.close()
