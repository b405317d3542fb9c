"""The data contract: config loading, the preprocessing functions, the record codec."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from etl import codec, configlib, preprocess, schema
from etl.config import BEVGrid, ETLConfig, ImageConfig, PreprocessConfig, RadarConfig


# --------------------------------------------------------------------------- config
def test_config_defaults_and_override(tmp_path):
    p = tmp_path / "etl.toml"
    p.write_text("[output]\nshard_size = 32\n[preprocess.lidar]\nresolution = 0.25\n")
    cfg = configlib.load(
        ETLConfig, p, ["output.split='drive'", "preprocess.image.rgb_size=[64, 96]"]
    )
    assert cfg.output.shard_size == 32
    assert cfg.output.split == "drive"
    assert cfg.preprocess.lidar.shape == (256, 256)
    assert cfg.preprocess.image.rgb_size == (64, 96)
    assert dataclasses.is_dataclass(cfg) and isinstance(cfg.preprocess.image.rgb_size, tuple)


def test_config_unknown_key_is_named(tmp_path):
    p = tmp_path / "etl.toml"
    p.write_text("[output]\nshard_sise = 32\n")
    with pytest.raises(configlib.ConfigError, match=r"output\.shard_sise: unknown key"):
        configlib.load(ETLConfig, p)


def test_config_wrong_type_is_named(tmp_path):
    p = tmp_path / "etl.toml"
    p.write_text("[preprocess.lidar]\nresolution = 'fine'\n")
    with pytest.raises(
        configlib.ConfigError, match=r"preprocess\.lidar\.resolution: expected float"
    ):
        configlib.load(ETLConfig, p)
    with pytest.raises(configlib.ConfigError, match=r"output\.shard_size: expected int"):
        configlib.load(ETLConfig, None, ["output.shard_size=1.5"])
    with pytest.raises(
        configlib.ConfigError, match=r"preprocess\.image\.rgb_size: expected 2 items"
    ):
        configlib.load(ETLConfig, None, ["preprocess.image.rgb_size=[1,2,3]"])


def test_config_hash_tracks_content():
    a = ETLConfig()
    b = configlib.load(ETLConfig, None, ["output.shard_size=7"])
    assert configlib.config_hash(a) == configlib.config_hash(ETLConfig())
    assert configlib.config_hash(a) != configlib.config_hash(b)


# --------------------------------------------------------------------------- BEV
def test_bev_lidar_cell_and_channels():
    g = BEVGrid(
        x_min=-4, x_max=4, y_min=-4, y_max=4, resolution=1.0, z_min=-2, z_max=2, density_max=3
    )
    pts = np.array(
        [
            [3.5, 3.5, 1.0, 0],  # front-left corner cell → row 0, col 0
            [3.5, 3.5, -1.0, 0],
            [-3.5, -3.5, 0.0, 0],  # back-right corner → row 7, col 7
            [100.0, 0, 0, 0],  # outside the grid
            [0.5, 0.5, 5.0, 0],  # above z_max → dropped
            [np.nan, 0, 0, 0],  # NaN → dropped
        ],
        np.float32,
    )
    bev = preprocess.bev_lidar(pts, g)
    assert bev.shape == (8, 8, 2) and bev.dtype == np.float32
    assert bev[0, 0, 0] == pytest.approx(np.log1p(2) / np.log1p(3))
    assert bev[0, 0, 1] == pytest.approx((1.0 + 2) / 4)  # max height of the two
    assert bev[7, 7, 0] == pytest.approx(np.log1p(1) / np.log1p(3))
    assert bev[7, 7, 1] == pytest.approx(0.5)
    assert np.count_nonzero(bev[..., 0]) == 2


def test_bev_numpy_and_jax_agree():
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(0)
    pts = rng.normal(0, 12, (5000, 4)).astype(np.float32)
    pts[:, 2] = rng.uniform(-4, 4, 5000)
    valid = rng.random(5000) > 0.1
    g = BEVGrid()
    a = preprocess.bev_lidar(pts, g, valid=valid)
    b = np.asarray(preprocess.bev_lidar(pts, g, valid=valid, xp=jnp))
    np.testing.assert_allclose(a, b, atol=1e-6)
    rc = RadarConfig()
    v = rng.uniform(-40, 40, 5000).astype(np.float32)
    np.testing.assert_allclose(
        preprocess.bev_radar(pts, v, rc, valid=valid),
        np.asarray(preprocess.bev_radar(pts, v, rc, valid=valid, xp=jnp)),
        atol=1e-6,
    )


def test_bev_radar_doppler_mean_and_empty_cells():
    rc = RadarConfig(
        grid=BEVGrid(x_min=0, x_max=4, y_min=-2, y_max=2, resolution=1.0),
        velocity_min=-10,
        velocity_max=10,
    )
    pts = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]], np.float32)
    bev = preprocess.bev_radar(pts, np.array([4.0, 8.0]), rc)
    r, c = 3, 1
    assert bev[r, c, 1] == pytest.approx((6.0 + 10) / 20)
    assert bev[..., 1].sum() == pytest.approx(bev[r, c, 1])  # empty cells are 0


def test_scan_to_points_scale_and_misses():
    ranges = np.array([1.0, 2.0, 15.25])
    angles = np.array([0.0, np.pi / 2, 0.0])
    pts, valid = preprocess.scan_to_points(ranges, angles, z=0.1, scale=10.0, max_range=15.0)
    np.testing.assert_allclose(pts[0], [10.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(pts[1], [0.0, 20.0, 1.0], atol=1e-6)
    assert valid.tolist() == [True, True, False]


# --------------------------------------------------------------------------- images
def test_rgb_imagenet_normalization():
    img = np.full((72, 128, 3), 255, np.uint8)
    out = preprocess.preprocess_rgb(img, ImageConfig(rgb_size=(36, 64)))
    assert out.shape == (36, 64, 3) and out.dtype == np.float32
    np.testing.assert_allclose(
        out[0, 0], (1 - schema.IMAGENET_MEAN) / schema.IMAGENET_STD, rtol=1e-5
    )


def test_ir_min_max():
    img = np.array([[0, 100], [200, 400]], np.uint16)
    out = preprocess.preprocess_ir(img, ImageConfig(ir_size=(2, 2), ir16_min=0, ir16_max=200))
    np.testing.assert_allclose(out[..., 0], [[0, 0.5], [1, 1]])
    out = preprocess.preprocess_ir(img.astype(np.uint8) // 2,
                                   ImageConfig(ir_size=(2, 2), ir_min=0, ir_max=100))
    np.testing.assert_allclose(out[..., 0], [[0, 0.5], [1, 0.72]])  # 400 → uint8 144 → 72
    with pytest.raises(ValueError, match="ir image"):
        preprocess.preprocess_ir(np.zeros((2, 2, 2)), ImageConfig())


def test_16bit_ir_uses_its_own_range_not_the_8bit_one():
    """A uint16 thermal image (7000..8000 counts) is not saturated to 1.0 by the 8-bit range
    (issue 14): 16-bit images have their own range; pixels outside it are counted."""
    img = np.linspace(7000, 8000, 64).astype(np.uint16).reshape(8, 8)
    out = preprocess.preprocess_ir(img, ImageConfig(ir_size=(8, 8)))[..., 0]
    assert 0.1 < out.min() < out.max() < 0.13  # the default 0..65535: dim, never constant
    cam = ImageConfig(ir_size=(8, 8), ir16_min=7000, ir16_max=8000)
    out = preprocess.preprocess_ir(img, cam)[..., 0]
    assert out.min() == 0.0 and out.max() == 1.0 and len(np.unique(out)) > 32
    assert preprocess.ir_outside(img, cam) == (0, 7000.0, 8000.0)
    n, lo, hi = preprocess.ir_outside(img, ImageConfig(ir16_min=7000, ir16_max=7500))
    assert n == int((img > 7500).sum()) > 0 and hi == 8000.0
    assert preprocess.ir_range(np.uint8, cam) == (0.0, 255.0)


def test_ir_range_checked_when_loaded():
    from etl.config import load_config
    from etl.configlib import ConfigError

    with pytest.raises(ConfigError, match=r"^preprocess\.image\.ir_max: must be greater"):
        load_config(None, ["preprocess.image.ir_max=0.0"])
    with pytest.raises(ConfigError, match=r"^preprocess\.image\.ir16_max: must be greater"):
        load_config(None, ["preprocess.image.ir16_min=9000.0", "preprocess.image.ir16_max=8000.0"])


# --------------------------------------------------------------------------- GPS / IMU
def test_nmea_and_units():
    assert preprocess.nmea_to_degrees(4313.7196) == pytest.approx(43.228660, abs=1e-6)
    assert preprocess.nmea_to_degrees(-7956.343) == pytest.approx(-79.939050, abs=1e-6)
    assert preprocess.accel_g_to_si(1.0) == pytest.approx(9.80665)


def test_enu_small_offsets():
    lat0, lon0 = 43.2287, -79.9390
    # 0.001° of latitude ≈ 111.1 m north; of longitude ≈ 111.3·cos(lat) m east
    enu = preprocess.geodetic_to_enu(lat0 + 0.001, lon0 + 0.001, 0.0, lat0, lon0, 0.0)
    assert enu[1] == pytest.approx(111.1, rel=2e-3)
    assert enu[0] == pytest.approx(111.32 * np.cos(np.radians(lat0)), rel=3e-3)
    assert abs(enu[2]) < 0.01


def test_transform_and_boxes_to_bev():
    t = preprocess.rigid_transform((0, 0, np.pi / 2), (1, 0, 0))
    out = preprocess.transform_points(np.array([[1.0, 0, 0, 7]]), t)
    np.testing.assert_allclose(out[0], [1, 1, 0, 7], atol=1e-6)
    labels = [
        {
            "obj_type": "Car",
            "psr": {
                "position": {"x": 0, "y": 0, "z": 0},
                "scale": {"x": 4, "y": 2, "z": 1.5},
                "rotation": {"x": 0, "y": 0, "z": 0},
            },
        },
        {
            "obj_type": "Pedestrian",
            "psr": {
                "position": {"x": 10, "y": 10, "z": 0},
                "scale": {"x": 1, "y": 1, "z": 1.8},
                "rotation": {"x": 0, "y": 0, "z": 0},
            },
        },
    ]
    boxes, cls = preprocess.boxes_to_array(labels, 4)
    assert cls.tolist() == [
        schema.box_class_index("car"),
        schema.box_class_index("Pedestrian"),
        -1,
        -1,
    ]
    occ = preprocess.boxes_to_bev(boxes, cls, BEVGrid(resolution=1.0))
    assert occ.sum() == 4 * 2  # the car covers 4×2 one-metre cells; pedestrians are not vehicles


# --------------------------------------------------------------------------- codec
def _sample(cfg: PreprocessConfig, absent=("radar",)):
    rng = np.random.default_rng(1)
    s = schema.empty_sample(cfg)
    for i, m in enumerate(schema.MODALITIES):
        if m in absent:
            continue
        s[m] = rng.normal(size=s[m].shape).astype(np.float32)
        s["present"][i] = 1
    s["time"] = np.float64(12.5)
    return s


def test_codec_round_trip_and_absent_not_stored():
    cfg = PreprocessConfig(
        lidar=BEVGrid(resolution=2.0), image=ImageConfig(rgb_size=(16, 16), ir_size=(8, 8))
    )
    s = _sample(cfg)
    schema.validate_sample(s, cfg)
    rec = codec.encode(s, meta={"drive": "d0", "frame": 3})
    keys = [e[0] for e in codec.decode_header(rec)["arrays"]]
    assert "radar" not in keys and "lidar" in keys
    out = codec.decode(rec, cfg)
    assert out["meta"] == {"drive": "d0", "frame": 3}
    np.testing.assert_allclose(out["lidar"], s["lidar"], atol=2e-3)  # float16 storage
    np.testing.assert_array_equal(out["gps"], s["gps"])
    assert out["radar"].shape == s["radar"].shape and not out["radar"].any()
    assert out["present"].tolist() == s["present"].tolist()
    assert out["time"] == 12.5 and out["lidar"].dtype == np.float32


def test_codec_rejects_bad_records():
    cfg = PreprocessConfig(
        lidar=BEVGrid(resolution=2.0), image=ImageConfig(rgb_size=(16, 16), ir_size=(8, 8))
    )
    rec = codec.encode(_sample(cfg))
    with pytest.raises(codec.CodecError, match="magic"):
        codec.decode(b"XXXX" + rec[4:], cfg)
    with pytest.raises(codec.CodecError, match="truncated"):
        codec.decode(rec[: len(rec) // 2], cfg)
    other = PreprocessConfig(image=ImageConfig(rgb_size=(16, 16), ir_size=(8, 8)))
    with pytest.raises(codec.CodecError, match="lidar: stored shape"):
        codec.decode(rec, other)


def test_validate_sample_names_the_key():
    cfg = PreprocessConfig(
        lidar=BEVGrid(resolution=2.0), image=ImageConfig(rgb_size=(16, 16), ir_size=(8, 8))
    )
    s = _sample(cfg)
    s["rgb"] = s["rgb"][:8]
    with pytest.raises(ValueError, match="rgb has shape"):
        schema.validate_sample(s, cfg)
    s = _sample(cfg)
    s["gps"][0] = np.nan
    with pytest.raises(ValueError, match="gps is flagged present but holds NaN"):
        schema.validate_sample(s, cfg)
