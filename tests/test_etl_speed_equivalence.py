"""The ETL's fast paths give the same numbers as the plain ones (or, for reduced-scale JPEG
decoding, numbers within a documented tolerance of them).

* ``preprocess_rgb`` normalizes uint8 through a table (``cv2.LUT``): bit-identical to the
  float32 arithmetic ``(x / 255 − mean) / std``.
* ``codec`` casts float32 → float16 through OpenCV: bit-identical to ``ndarray.astype``.
* ``output.reduced_jpeg_decode``: JPEGs decoded by libjpeg at 1/2 (…1/8) scale, then
  INTER_AREA, vs full decode + INTER_AREA. Tolerance in uint8 levels of the resized image
  (1 level = 1/255/std ≈ 0.017 in normalized units): mean |Δ| ≤ 2, 99th percentile ≤ 12 on a
  deliberately hard image (sharp-edged rectangles + σ = 20 noise: measured mean ≈ 1.3,
  p99 ≈ 10, max ≈ 35 at edges); on the synthetic camera frames mean ≈ 0.3, p99 ≈ 3.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from etl import build as B
from etl import codec
from etl.config import ImageConfig, OutputConfig, load_config
from etl.images import decode_at_least, decode_image, jpeg_info, jpeg_reduction
from etl.preprocess import _resize, preprocess_ir, preprocess_rgb
from etl.schema import IMAGENET_MEAN, IMAGENET_STD


# --------------------------------------------------------------------------- RGB table
@pytest.mark.parametrize(
    "shape,size",
    [
        ((720, 1280, 3), (224, 224)),
        ((40, 30, 3), (64, 48)),
        ((37, 91, 3), (12, 20)),
        ((16, 16, 3), (16, 16)),
    ],  # fmt: skip
)
def test_rgb_lut_is_bit_identical_to_the_arithmetic(shape, size):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    got = preprocess_rgb(img, ImageConfig(rgb_size=size))
    x = _resize(img, size).astype(np.float32) / 255.0
    want = ((x - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    assert got.dtype == np.float32 and got.shape == (*size, 3) and got.flags.c_contiguous
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    every_level = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    got = preprocess_rgb(every_level, ImageConfig(rgb_size=(16, 16)))
    want = (every_level.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


# --------------------------------------------------------------------------- float16 cast
def test_codec_float16_cast_is_bit_identical_to_numpy():
    bits = np.random.default_rng(1).integers(0, 2**32, 2_000_000, dtype=np.uint64)
    a = bits.astype(np.uint32).view(np.float32)
    special = [0.0, -0.0, 65504, 65519.99, 65520, 1e9, -1e9, 6e-8, -6e-8, 2.98e-8, 5.96e-8]
    special = np.array([*special, 1e-40, -1e-40, np.inf, -np.inf, 0.1, 2 / 3], np.float32)
    a = np.concatenate([a[np.isfinite(a)], special])
    with np.errstate(over="ignore"):
        want = a.astype(np.float16)
    got = codec._cast(a, "float16")
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    img = np.random.default_rng(2).normal(0, 2, (224, 224, 3)).astype(np.float32)
    got = codec._cast(img, "float16")
    assert got.shape == img.shape and got.dtype == np.float16
    np.testing.assert_array_equal(got.view(np.uint16), img.astype(np.float16).view(np.uint16))
    nan = codec._cast(np.array([np.nan, 1.0], np.float32), "float16")
    assert np.isnan(nan[0]) and nan[1] == 1.0
    assert codec._cast(np.zeros((0, 3), np.float32), "float16").shape == (0, 3)
    assert codec._cast(img, "float32").dtype == np.float32


# --------------------------------------------------------------------------- reduced decode
def _hard_image(seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((720, 1280, 3), np.uint8)
    for _ in range(200):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, x1 = (int(v) for v in rng.integers(0, 1280, 2))
        y0, y1 = (int(v) for v in rng.integers(0, 720, 2))
        cv2.rectangle(img, (x0, y0), (x1, y1), c, -1)
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


def _smooth_image(seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (9, 16, 3), dtype=np.uint8)
    img = cv2.resize(small, (1280, 720), interpolation=cv2.INTER_CUBIC)
    return cv2.GaussianBlur(img, (0, 0), 3)


def test_jpeg_info_and_reduction():
    data = cv2.imencode(".jpg", _smooth_image())[1].tobytes()
    assert jpeg_info(data) == (720, 1280, 3, 8)
    gray = cv2.imencode(".jpg", np.zeros((48, 64), np.uint8))[1].tobytes()
    assert jpeg_info(gray) == (48, 64, 1, 8)
    assert jpeg_info(cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes()) is None
    assert jpeg_info(b"\xff\xd8\xff") is None
    assert jpeg_reduction((720, 1280), (224, 224)) == 2
    assert jpeg_reduction((480, 640), (224, 224)) == 2
    assert jpeg_reduction((720, 1280), (90, 160)) == 8
    assert jpeg_reduction((720, 1280), (180, 320)) == 4
    assert jpeg_reduction((300, 400), (224, 224)) == 1
    assert jpeg_reduction((720, 1280), (361, 100)) == 1  # more than half on one axis


def test_reduced_decode_only_inside_the_context_and_only_for_jpeg():
    img = _smooth_image()
    jpg = cv2.imencode(".jpg", img)[1].tobytes()
    png = cv2.imencode(".png", img)[1].tobytes()
    assert decode_image(jpg, "rgb").shape == (720, 1280, 3)
    with decode_at_least(rgb=(224, 224)):
        assert decode_image(jpg, "rgb").shape == (360, 640, 3)
        assert decode_image(png, "rgb").shape == (720, 1280, 3)  # PNG: always in full
        assert decode_image(jpg, "ir").shape == (720, 1280)  # no IR size given
    with decode_at_least(rgb=(16, 16), ir=(224, 224)):
        assert decode_image(jpg, "rgb").shape == (90, 160, 3)
        ir = decode_image(jpg, "ir")
        assert ir.shape == (360, 640) and ir.dtype == np.uint8
    assert decode_image(jpg, "rgb").shape == (720, 1280, 3)


def test_reduced_decode_never_below_target_with_exif_rotation():
    img = _smooth_image()
    jpg = cv2.imencode(".jpg", img)[1].tobytes()
    # an APP1 Exif segment saying "rotate 90°" (orientation 6), right after SOI
    tiff = b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00"
    tiff += b"\x00\x00\x00\x00"
    app1 = b"Exif\x00\x00" + tiff
    exif = jpg[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + jpg[2:]
    full = decode_image(exif, "rgb")
    with decode_at_least(rgb=(224, 400)):
        small = decode_image(exif, "rgb")
        plain = decode_image(jpg, "rgb")
    assert plain.shape == (360, 640, 3)  # no EXIF: 224 ≤ 360 and 400 ≤ 640
    assert full.shape == (1280, 720, 3)  # OpenCV applied the rotation
    # 1/2 scale would give 640 × 360 after rotation: too narrow for 400 → decoded in full
    assert small.shape[0] >= 224 and small.shape[1] >= 400


@pytest.mark.parametrize("quality", [75, 95])
@pytest.mark.parametrize("kind,mean_max,p99_max", [("smooth", 0.5, 3), ("hard", 2.0, 12)])
def test_reduced_decode_within_tolerance_of_full_decode(kind, mean_max, p99_max, quality):
    img = _smooth_image() if kind == "smooth" else _hard_image()
    jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
    full = _resize(decode_image(jpg, "rgb"), (224, 224)).astype(np.int16)
    with decode_at_least(rgb=(224, 224)):
        small = decode_image(jpg, "rgb")
    assert small.shape == (360, 640, 3)
    red = _resize(small, (224, 224)).astype(np.int16)
    d = np.abs(full - red)
    assert d.mean() <= mean_max and np.percentile(d, 99) <= p99_max, (d.mean(), d.max())
    assert abs(float((full - red).mean())) < 0.5  # no brightness bias
    # the same bound after normalization, as the sample stores it
    cfg = ImageConfig()
    a = preprocess_rgb(decode_image(jpg, "rgb"), cfg)
    with decode_at_least(rgb=cfg.rgb_size):
        b = preprocess_rgb(decode_image(jpg, "rgb"), cfg)
    assert np.abs(a - b).mean() <= mean_max / 255 / IMAGENET_STD.min()


def test_reduced_decode_ir_within_tolerance():
    ir = cv2.cvtColor(_smooth_image(3), cv2.COLOR_RGB2GRAY)[:480, :640]
    jpg = cv2.imencode(".jpg", ir)[1].tobytes()
    cfg = ImageConfig()
    a = preprocess_ir(decode_image(jpg, "ir"), cfg)
    with decode_at_least(ir=cfg.ir_size):
        small = decode_image(jpg, "ir")
        b = preprocess_ir(small, cfg)
    assert small.shape == (240, 320)
    assert np.abs(a - b).mean() * 255 <= 0.5 and np.abs(a - b).max() * 255 <= 6


# --------------------------------------------------------------------------- writer options
def test_writer_options():
    assert B.writer_options(OutputConfig()) == "group_size:1,snappy"
    for comp in ("zstd:1", "zstd", "uncompressed", "brotli:2", "zstd:-1"):
        assert B.writer_options(OutputConfig(compression=comp)) == f"group_size:1,{comp}"
    for bad in ("lz4", "zstd:x", "group_size:4"):
        with pytest.raises(ValueError, match="output.compression"):
            B.writer_options(OutputConfig(compression=bad))


def test_build_records_independent_of_compression(tmp_path):
    """The compression only changes the chunks on disk; every decoded record is identical."""
    from array_record.python.array_record_module import ArrayRecordReader

    from tests.test_build import make_drives, small_cfg

    refs = make_drives(tmp_path / "src", {"a": {"n": 12, "seed": 1}})
    recs = {}
    for comp in ("snappy", "zstd:1", "uncompressed"):
        out = tmp_path / comp.replace(":", "")
        cfg = small_cfg(f"output.compression={comp}", "output.val_fraction=0")
        B.build(refs, out, cfg, progress=False)
        rs = []
        for p in sorted((out / "drives").glob("*/*.array_record")):
            r = ArrayRecordReader(str(p))
            rs += r.read_all()
            r.close()
        recs[comp] = rs
    assert recs["snappy"] and recs["snappy"] == recs["zstd:1"] == recs["uncompressed"]


def test_bad_compression_is_a_config_error(tmp_path, capsys):
    rc = B.main(["--src", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--set", "output.compression=lz4"])  # fmt: skip
    assert rc == 2 and "output.compression" in capsys.readouterr().err
    cfg = load_config(None, ["output.reduced_jpeg_decode=false"])
    assert cfg.output.reduced_jpeg_decode is False


# --------------------------------------------------------------------------- LiDAR BEV
def _bev_lidar_reference(points, grid, valid=None):
    """bev_lidar as first written: weighted bincount and a masked maximum.at."""
    from etl.preprocess import _cell_index, _log_density, _scatter

    h, w = grid.shape
    flat, inside = _cell_index(points, grid, valid, np)
    count = _scatter(flat, inside.astype(np.float32), h * w, "add", np)
    zmax = _scatter(flat, np.where(inside, points[:, 2], -np.inf), h * w, "max", np)
    height = np.where(count > 0, (zmax - grid.z_min) / (grid.z_max - grid.z_min), 0.0)
    out = np.stack([_log_density(count, grid, np), np.clip(height, 0.0, 1.0)], axis=-1)
    return out.reshape(h, w, 2).astype(np.float32)


def test_bev_lidar_fast_path_is_bit_identical():
    from etl.config import BEVGrid
    from etl.preprocess import bev_lidar

    rng = np.random.default_rng(4)
    p = rng.uniform(-40, 40, (20000, 4)).astype(np.float32)
    p[:, 2] = rng.uniform(-4, 4, len(p))
    bad = p.copy()
    bad[::7, 0], bad[::11, 2], bad[::13, 1] = np.nan, np.inf, -np.inf
    for pts in (p, bad, p.astype(np.float64), np.zeros((0, 3), np.float32)):
        for grid in (BEVGrid(), BEVGrid(resolution=0.25, z_min=-1, z_max=1, density_max=4)):
            for valid in (None, rng.random(len(pts)) > 0.3):
                got, want = bev_lidar(pts, grid, valid), _bev_lidar_reference(pts, grid, valid)
                np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
