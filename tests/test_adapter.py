"""The seam (rl/envs/adapter.py): simulator observations → ETL samples, checked against the
ETL's own functions and its schema."""

from __future__ import annotations

import numpy as np
import pytest

from etl.config import BEVGrid, ImageConfig, PreprocessConfig
from etl.preprocess import G, bev_lidar, preprocess_rgb, scan_to_points
from etl.schema import MODALITY_INDEX, sample_spec, validate_sample
from rl.envs import spec
from rl.envs.adapter import ObservationAdapter, preprocess_rgb_jax

PRE = PreprocessConfig(
    lidar=BEVGrid(x_min=-16, x_max=16, y_min=-16, y_max=16, resolution=0.5),
    image=ImageConfig(rgb_size=(96, 96), ir_size=(32, 32)),
    max_boxes=8,
)


def _obs(rng, camera=True, batch=None):
    lead = () if batch is None else (batch,)
    lidar = rng.uniform(0.3, 4.0, lead + (spec.LIDAR_RAYS,)).astype(np.float32)
    lidar[..., ::7] = spec.LIDAR_MAX  # misses
    pose = np.zeros(lead + (6,), np.float32)
    pose[..., :2] = rng.uniform(-5, 5, lead + (2,))
    pose[..., 2] = spec.START_Z
    pose[..., 3:5] = rng.uniform(-0.05, 0.05, lead + (2,))
    pose[..., 5] = rng.uniform(-3, 3, lead)
    obs = {
        "pose": pose,
        "velocity": rng.normal(size=lead + (6,)).astype(np.float32),
        "acceleration": rng.normal(size=lead + (6,)).astype(np.float32),
        "lidar": lidar,
        "time": np.full(lead + (1,), 1.25, np.float32),
    }
    if camera:
        obs["rgb_camera"] = rng.integers(0, 256, lead + (128, 128, 3), dtype=np.uint8)
    return obs


def test_matches_schema_and_etl_functions():
    rng = np.random.default_rng(0)
    obs = _obs(rng)
    ad = ObservationAdapter(PRE, world_scale=10.0)
    s = ad(obs)
    validate_sample(s, PRE, where="adapter")
    assert set(s) == set(sample_spec(PRE))
    # lidar: exactly the ETL's functions on the scaled scan, misses dropped
    pts, valid = scan_to_points(obs["lidar"], spec.lidar_angles().astype(np.float32), z=0.0,
                                scale=10.0, max_range=spec.LIDAR_MAX)
    np.testing.assert_array_equal(s["lidar"], bev_lidar(pts, PRE.lidar, valid=valid))
    assert valid.sum() == spec.LIDAR_RAYS - len(range(0, spec.LIDAR_RAYS, 7))
    assert s["lidar"][..., 0].max() > 0
    np.testing.assert_array_equal(s["rgb"], preprocess_rgb(obs["rgb_camera"], PRE.image))
    # presence: lidar, rgb, gps, imu; radar and ir absent with zero placeholders
    want = {"lidar": 1, "radar": 0, "rgb": 1, "ir": 0, "gps": 1, "imu": 1}
    assert {m: int(s["present"][i]) for m, i in MODALITY_INDEX.items()} == want
    assert not s["radar"].any() and not s["ir"].any()
    assert not s["offset"].any() and not s["boxes"].any() and (s["box_class"] == -1).all()
    assert s["has_labels"] == 0 and s["time"] == pytest.approx(1.25)


def test_lidar_geometry_front_is_row_zero():
    """A wall 1 m ahead of the 1:10 car lands 10 m ahead in the BEV: upper half, centre col."""
    ranges = np.full(spec.LIDAR_RAYS, spec.LIDAR_MAX, np.float32)
    ranges[535:545] = 1.0  # around 0°
    s = ObservationAdapter(PRE, world_scale=10.0)({"lidar": ranges})
    rows, cols = np.nonzero(s["lidar"][..., 0])
    assert rows.min() == rows.max() == int((PRE.lidar.x_max - 10.0) / PRE.lidar.resolution)
    assert abs(cols.mean() - PRE.lidar.shape[1] / 2) < 1.5
    ranges[535:545] = spec.LIDAR_MAX
    ranges[179] = 1.0  # +90° (left): small col
    s = ObservationAdapter(PRE, world_scale=10.0)({"lidar": ranges})
    rows, cols = np.nonzero(s["lidar"][..., 0])
    assert cols.max() < PRE.lidar.shape[1] / 2 - 10
    assert s["present"][MODALITY_INDEX["gps"]] == 0 and s["present"][MODALITY_INDEX["rgb"]] == 0


def test_subsampled_scan():
    ranges = np.full(spec.LIDAR_RAYS // 4, 2.0, np.float32)
    s = ObservationAdapter(PRE)({"lidar": ranges})
    full = ObservationAdapter(PRE)({"lidar": np.full(spec.LIDAR_RAYS, 2.0, np.float32)})
    assert (s["lidar"][..., 0] > 0).sum() > 0.5 * (full["lidar"][..., 0] > 0).sum()


def test_gps_imu_units():
    ad = ObservationAdapter(PRE, world_scale=10.0)
    obs = {
        "pose": np.array([1.0, -2.0, spec.START_Z, 0.0, 0.0, 0.7], np.float32),
        "velocity": np.array([2.0, 0.0, 0.0, 0.0, 0.0, 1.5], np.float32),
        "acceleration": np.array([0.5, -0.2, 0.0, 0.0, 0.0, 0.0], np.float32),
    }
    s = ad(obs)
    np.testing.assert_allclose(s["gps"], [10.0, -20.0, 0.0], atol=1e-5)  # ENU, real-car metres
    np.testing.assert_allclose(s["imu"], [0, 0, 1.5, 0.5, -0.2, G], atol=1e-5)  # + gravity
    s = ObservationAdapter(PRE, world_scale=1.0, gravity=False, accel_scale=10.0)(obs)
    np.testing.assert_allclose(s["imu"][3:], [5.0, -2.0, 0.0], atol=1e-5)
    obs["pose"][4] = 0.1  # nose up: gravity's specific force tilts toward -x
    s = ad(obs)
    np.testing.assert_allclose(s["imu"][3:], [0.5 - G * np.sin(0.1), -0.2, G * np.cos(0.1)],
                               atol=1e-5)


def test_batched_equals_per_item():
    rng = np.random.default_rng(1)
    obs = _obs(rng, batch=3)
    ad = ObservationAdapter(PRE)
    b = ad(obs)
    for i in range(3):
        one = ad({k: v[i] for k, v in obs.items()})
        for k in one:
            np.testing.assert_array_equal(b[k][i], one[k])
    assert b["lidar"].shape == (3, *sample_spec(PRE)["lidar"].shape)


def test_jax_path_matches_numpy():
    jax = pytest.importorskip("jax")
    rng = np.random.default_rng(2)
    obs = _obs(rng, batch=2)
    ad = ObservationAdapter(PRE)
    ref = ad(obs)
    out = jax.jit(jax.vmap(ad.jax))({k: jax.numpy.asarray(v) for k, v in obs.items()})
    for k, v in ref.items():
        got = np.asarray(out[k])
        assert got.shape == v.shape, k
        if k == "time":
            np.testing.assert_allclose(got, v)
        elif k == "rgb":
            # OpenCV's fixed-point weights vs float ones: ≤ 1 uint8 level on a few pixels
            np.testing.assert_allclose(got, v, atol=1.01 / 255 / 0.224)
            assert np.mean(np.abs(got - v)) < 2e-3
        elif k == "lidar":  # the same bev_lidar, xp=jnp: float rounding only
            np.testing.assert_allclose(got, v, atol=1e-6)
        else:
            np.testing.assert_allclose(got, v, atol=1e-4, rtol=1e-5)
        if k not in ("time",):
            assert got.dtype == v.dtype, k


def test_rgb_jax_shrink_close_to_opencv():
    jax = pytest.importorskip("jax")
    img = np.random.default_rng(3).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    img = np.asarray(np.repeat(np.repeat(img[::8, ::8], 8, 0), 8, 1))  # smooth-ish content
    small = ImageConfig(rgb_size=(64, 64))
    ref = preprocess_rgb(img, small)
    got = np.asarray(jax.jit(lambda x: preprocess_rgb_jax(x, (64, 64)))(img))
    np.testing.assert_allclose(got, ref, atol=1.01 / 255 / 0.224)  # INTER_AREA: ≤ 1 level


def test_on_a_bullet_observation():
    from rl.envs.bullet import BulletRacecarEnv

    e = BulletRacecarEnv("procedural:0", camera=True)
    try:
        obs, _ = e.reset(seed=0)
        seq = [e.step({"motor": np.array([0.3]), "steering": np.array([0.0])})[0]
               for _ in range(60)]
    finally:
        e.close()
    ad = ObservationAdapter(PRE)
    s = ad(seq[-1])
    validate_sample(s, PRE, where="bullet")
    assert s["lidar"][..., 0].sum() > 0  # the side walls are inside ±16 m at scale 10
    assert s["present"].tolist() == [1, 0, 1, 0, 1, 1]
    imu = np.array([ad(o)["imu"] for o in seq[10:]])
    assert abs(imu[:, 5].mean() - G) < 2.0  # contact bounce averages out around gravity
    assert imu[:, 3].mean() > 1.0  # launching forward
