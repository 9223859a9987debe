"""Image I/O: every awkward input is generated here, inside tmp_path."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from qualiteacher.imageio import (
    ImageReadError,
    decode_png,
    encode_png,
    list_images,
    read_image,
    to_tensor,
    to_uint8,
    write_png,
)


def _noise(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _quadrants(h: int = 32, w: int = 64) -> np.ndarray:
    """Four flat colours (red, green / blue, white): survive JPEG and show orientation."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[: h // 2, w // 2 :] = (0, 255, 0)
    img[h // 2 :, : w // 2] = (0, 0, 255)
    img[h // 2 :, w // 2 :] = (255, 255, 255)
    return img


def _with_png_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite a PNG's IHDR size (with a valid CRC): a tiny file that claims a huge image."""
    assert data[12:16] == b"IHDR"
    body = struct.pack(">II", width, height) + data[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF)
    return data[:16] + body + crc + data[33:]


# --------------------------------------------------------------------------- good inputs


@pytest.mark.parametrize("ext", ["png", "bmp", "tiff", "webp"])
def test_lossless_roundtrip(tmp_path: Path, ext: str) -> None:
    img = _noise()
    path = tmp_path / f"x.{ext}"
    Image.fromarray(img).save(path, **({"lossless": True} if ext == "webp" else {}))
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == img.shape
    np.testing.assert_array_equal(out, img)
    assert out.flags.writeable  # callers may edit in place


def test_one_by_one_image(tmp_path: Path) -> None:
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
    out = read_image(path)
    assert out.shape == (1, 1, 3)
    assert out[0, 0].tolist() == [10, 20, 30]


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (16, 16, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_one_bit_image(tmp_path: Path) -> None:
    bits = Image.new("1", (8, 4), 0)
    bits.putpixel((3, 1), 1)
    bits.save(tmp_path / "b.png")
    out = read_image(tmp_path / "b.png")
    assert out.shape == (4, 8, 3)
    assert out[1, 3].tolist() == [255, 255, 255]
    assert out.sum() == 3 * 255


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (200, 0, 0)
    rgba[0, 0, 3] = 255  # opaque red
    rgba[0, 1, 3] = 0  # fully transparent: white, not the hidden red
    rgba[0, 2, 3] = 128  # half: halfway between red and white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png").astype(int)
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert np.allclose(out[0, 2], [228, 127, 127], atol=2)


def test_la_is_composited_on_white(tmp_path: Path) -> None:
    la = np.zeros((2, 2, 2), np.uint8)
    la[..., 0] = 40
    la[0, 0, 1] = 255
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    assert out[0, 0].tolist() == [40, 40, 40]
    assert out[1, 1].tolist() == [255, 255, 255]


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 2), 0)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert out[0, 1].tolist() == [10, 200, 30]
    assert out[0, 0].tolist() == [0, 0, 0]

    pal.save(tmp_path / "pt.png", transparency=0)  # index 0 (black) is transparent
    out = read_image(tmp_path / "pt.png")
    assert out[0, 1].tolist() == [10, 200, 30]
    assert out[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = read_image(tmp_path / "g16.png")
    assert out.shape == (1, 5, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255, 4]  # 1000/257 = 3.9 -> 4


def test_cmyk_jpeg_colours(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red
    cmyk.paste((255, 0, 255, 0), (8, 0, 16, 8))  # pure green
    cmyk.save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = read_image(tmp_path / "c.jpg").astype(int)
    assert np.abs(out[4, 2] - [255, 0, 0]).max() < 20
    assert np.abs(out[4, 13] - [0, 255, 0]).max() < 20


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = _quadrants(32, 64)  # H=32, W=64
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(img).save(tmp_path / "r.jpg", quality=95, exif=exif)
    out = read_image(tmp_path / "r.jpg").astype(int)
    assert out.shape == (64, 32, 3)
    expected = np.rot90(img, k=-1).astype(int)  # clockwise
    for y, x in [(8, 8), (8, 24), (56, 8), (56, 24)]:
        assert np.abs(out[y, x] - expected[y, x]).max() < 20, (y, x)
    # Top-left after a clockwise turn is the old bottom-left (blue).
    assert np.abs(out[8, 8] - [0, 0, 255]).max() < 20


# --------------------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"nope\.png.*does not exist"):
        read_image(tmp_path / "nope.png")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path / "dir.png")


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.png.*0 bytes"):
        read_image(tmp_path / "empty.png")


def test_text_file_named_png(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("this is not an image\n")
    with pytest.raises(ImageReadError, match=r"notes\.png.*not a recognised image"):
        read_image(tmp_path / "notes.png")


@pytest.mark.parametrize("ext", ["png", "jpg"])
@pytest.mark.parametrize("keep", [0.3, 0.8])
def test_truncated_file(tmp_path: Path, ext: str, keep: float) -> None:
    good = tmp_path / f"good.{ext}"
    Image.fromarray(_noise(64, 64)).save(good)
    data = good.read_bytes()
    bad = tmp_path / f"cut.{ext}"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageReadError, match=r"cut\.(png|jpg).*truncated"):
        read_image(bad)


def test_truncated_rejected_even_if_caller_enabled_pillow_flag(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    good = tmp_path / "good.jpg"
    Image.fromarray(_noise(64, 64)).save(good)
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:-400])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(tmp_path / "cut.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_decompression_bomb_rejected_before_decoding(tmp_path: Path) -> None:
    Image.fromarray(_noise(8, 8)).save(tmp_path / "small.png")
    data = (tmp_path / "small.png").read_bytes()
    # Claims 20000x20000 (over Pillow's hard limit) in a file of a few hundred bytes.
    (tmp_path / "huge.png").write_bytes(_with_png_size(data, 20000, 20000))
    with pytest.raises(ImageReadError, match=r"huge\.png.*decompression bomb"):
        read_image(tmp_path / "huge.png")
    # 6000x6000 = 36M: under Pillow's limits, over ours -> refused from the header alone.
    (tmp_path / "big.png").write_bytes(_with_png_size(data, 6000, 6000))
    with pytest.raises(ImageReadError, match=r"big\.png.*exceeds the limit of 1000000"):
        read_image(tmp_path / "big.png", max_pixels=1_000_000)


# Ignoring Pillow's warning shows the refusal does not depend on warning filters.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_warning_is_an_error(tmp_path: Path) -> None:
    Image.fromarray(_noise(8, 8)).save(tmp_path / "small.png")
    data = (tmp_path / "small.png").read_bytes()
    # 10000x10000 is between Pillow's warning and error thresholds: Pillow alone only warns.
    (tmp_path / "warn.png").write_bytes(_with_png_size(data, 10000, 10000))
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(tmp_path / "warn.png", max_pixels=10**9)


def test_real_image_over_max_pixels(tmp_path: Path) -> None:
    Image.fromarray(_noise(40, 40)).save(tmp_path / "x.png")
    assert read_image(tmp_path / "x.png", max_pixels=1600).shape == (40, 40, 3)
    with pytest.raises(ImageReadError, match="exceeds"):
        read_image(tmp_path / "x.png", max_pixels=1599)


# --------------------------------------------------------------------------- tensors


def test_tensor_roundtrip_is_exact() -> None:
    img = _noise(5, 7)
    img.flags.writeable = False  # e.g. a view of PIL memory: must not warn or fail
    t = to_tensor(img)
    assert t.shape == (1, 3, 5, 7) and t.dtype == torch.float32
    assert 0.0 <= t.min() and t.max() <= 1.0
    assert float(t[0, 0, 2, 3]) == pytest.approx(img[2, 3, 0] / 255.0)
    np.testing.assert_array_equal(to_uint8(t), img)
    np.testing.assert_array_equal(to_uint8(t[0]), img)


def test_to_uint8_clamps_and_rounds() -> None:
    t = torch.tensor([-0.5, 0.0, 0.5 / 255, 1.49 / 255, 1.51 / 255, 1.0, 3.0, float("nan")])
    t = t.view(1, 1, 8).expand(3, 1, 8)
    out = to_uint8(t)
    assert out.shape == (1, 8, 3)
    assert out[0, :, 0].tolist() == [0, 0, 0, 1, 2, 255, 255, 0]  # 0.5 rounds half to even


def test_tensor_shape_errors() -> None:
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        to_tensor(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        to_tensor(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="batch of one"):
        to_uint8(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="3xHxW"):
        to_uint8(torch.zeros(4, 4, 3))


# --------------------------------------------------------------------------- writing / bytes


def test_write_png_atomic_and_creates_parents(tmp_path: Path) -> None:
    img = _noise()
    target = tmp_path / "a" / "b" / "out.png"
    assert write_png(target, img) == target
    np.testing.assert_array_equal(read_image(target), img)
    write_png(target, img[::-1].copy())  # overwrite in place
    np.testing.assert_array_equal(read_image(target), img[::-1])
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png"]  # no temp files left


def test_write_png_failure_leaves_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    write_png(target, _noise())
    before = target.read_bytes()
    with pytest.raises(ValueError):
        write_png(target, np.zeros((4, 4), np.uint8))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_png_bytes_roundtrip() -> None:
    img = _noise(33, 17, seed=3)
    data = encode_png(img)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(decode_png(data), img)


def test_decode_png_rejects_bad_bytes() -> None:
    data = encode_png(_noise(32, 32))
    with pytest.raises(ImageReadError, match="truncated"):
        decode_png(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="not PNG"):
        decode_png(b"definitely not a png")
    with pytest.raises(ImageReadError, match="0 bytes"):
        decode_png(b"")


# --------------------------------------------------------------------------- folders


def test_list_images(tmp_path: Path) -> None:
    for name in ["b.PNG", "a.jpg", "c.JPEG", "d.tif", "e.TIFF", "f.webp", "g.bmp", "notes.txt", "._a.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    (tmp_path / "sub.png" / "inner.png").write_bytes(b"x")
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.jpg", "b.PNG", "c.JPEG", "d.tif", "e.TIFF", "f.webp", "g.bmp"]


def test_list_images_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "file.png")
