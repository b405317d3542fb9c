"""etl.sync: nearest-frame matching, GPS/IMU interpolation, the per-sweep table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from etl.config import SyncConfig
from etl.errors import DriveError
from etl.preprocess import geodetic_to_enu, nmea_to_degrees
from etl.schema import MODALITY_INDEX
from etl.sources import Drive, Stream, TimeSeries
from etl.sync import (
    dedupe_repeats,
    default_tolerance,
    gps_to_enu,
    interpolate,
    nearest_within,
    sync_drive,
    synchronize,
)

R, C, IR, G, M = (MODALITY_INDEX[k] for k in ("radar", "rgb", "ir", "gps", "imu"))


def test_nearest_within_known_offsets():
    master = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    stream = np.array([0.01, 0.13, 0.19, 0.35, 0.41])
    idx, off = nearest_within(master, stream, 0.05)
    # 0.0 lies before the stream's first frame → absent even though within tolerance
    assert idx.tolist() == [-1, 1, 2, 3, 4]
    np.testing.assert_allclose(off, [0.0, 0.03, -0.01, 0.05, 0.01], atol=1e-12)


def test_nearest_within_tolerance_edge_is_inclusive():
    master = np.array([1.0, 2.0])
    stream = np.array([0.5, 1.25, 2.0 + 0.25 + 1e-9, 3.0])
    idx, off = nearest_within(master, stream, 0.25)
    assert idx.tolist() == [1, -1]  # exactly at tol: present; just beyond: absent
    assert off[0] == pytest.approx(0.25) and off[1] == 0.0


def test_nearest_within_outside_span_and_empty():
    idx, _ = nearest_within(np.array([0.0, 5.0, 10.0]), np.array([4.99, 5.01]), 1.0)
    assert idx.tolist() == [-1, 0, -1]  # before the first / after the last frame: absent
    idx, off = nearest_within(np.array([1.0, 2.0]), np.array([]), 1.0)
    assert idx.tolist() == [-1, -1] and off.tolist() == [0.0, 0.0]
    idx, _ = nearest_within(np.array([2.0]), np.array([2.0]), 0.0)
    assert idx.tolist() == [0]  # a single frame exactly on the sweep


def test_nearest_within_ties_and_never_far():
    idx, off = nearest_within(np.array([1.0]), np.array([0.9, 1.1]), 0.2)
    assert idx.tolist() == [0] and off[0] == pytest.approx(-0.1)
    # a dropped camera frame: the sweep in the hole gets nothing, not a far neighbour
    lidar = np.arange(10) * 0.1
    cam = np.delete(lidar + 0.01, 5)
    idx, _ = nearest_within(lidar, cam, default_tolerance(lidar))
    assert idx[0] == -1  # before the first camera frame
    assert idx[5] == -1 and idx[1:5].tolist() == [1, 2, 3, 4] and idx[6] == 5


def test_default_tolerance_is_half_median_period():
    t = np.cumsum([0, 0.1, 0.1, 0.3, 0.1, 0.1])  # one dropped sweep does not move the median
    assert default_tolerance(t) == pytest.approx(0.05)
    assert default_tolerance(np.array([3.0])) == pytest.approx(0.05)


def test_interpolate_linear_gap_and_span():
    t = np.array([0.0, 1.0, 2.0, 5.0, 6.0])
    v = np.stack([t * 2.0, -t], 1)
    m = np.array([-0.1, 0.0, 0.25, 1.5, 3.0, 5.5, 6.0, 6.1])
    out, ok, off = interpolate(m, t, v, max_gap=1.5)
    assert ok.tolist() == [False, True, True, True, False, True, True, False]
    np.testing.assert_allclose(out[ok, 0], 2 * m[ok])
    np.testing.assert_allclose(out[ok, 1], -m[ok])
    assert (out[~ok] == 0).all() and (off[~ok] == 0).all()
    # offset: signed time to the nearest raw sample
    np.testing.assert_allclose(off[ok], [0.0, -0.25, -0.5, -0.5, 0.0])


def test_interpolate_drops_non_finite_rows():
    t = np.array([0.0, 1.0, 2.0])
    v = np.array([[0.0], [np.nan], [2.0]])
    out, ok, _ = interpolate(np.array([0.5, 1.5]), t, v, max_gap=1.5)
    assert not ok.any()  # the NaN sample became a 2 s gap
    out, ok, _ = interpolate(np.array([0.5, 1.5]), t, v, max_gap=2.0)
    assert ok.all() and out[:, 0] == pytest.approx([0.5, 1.5])


def test_gps_enu_from_first_fix_not_ddmm():
    # two fixes straddling a whole degree of latitude: 43°59.99' → 44°00.01'
    nmea = np.array([4359.99, 4400.01])
    lat = nmea_to_degrees(nmea)
    lon = np.full(2, -79.9)
    gps = np.stack([lat, lon, np.zeros(2)], 1)
    table = synchronize(
        np.array([0.0, 0.5, 1.0]), {}, (np.array([0.0, 1.0]), gps), None, SyncConfig()
    )
    assert table.present[:, G].all()
    np.testing.assert_allclose(table.gps[0], 0.0, atol=1e-6)  # ENU origin = the first fix
    end = geodetic_to_enu(lat[1], lon[1], 0.0, lat[0], lon[0], 0.0)
    assert end[1] == pytest.approx(0.02 / 60 * 111_100, rel=0.01)  # ~37 m north
    np.testing.assert_allclose(table.gps[1], end / 2, atol=0.01)  # halfway, in metres
    # the trap: interpolating ddmm.mmmm gives 4380.0 = "43°80'", 40 minutes (~74 km) off
    wrong = geodetic_to_enu(nmea_to_degrees(nmea.mean()), -79.9, 0.0, lat[0], lon[0], 0.0)
    assert abs(wrong[1] - table.gps[1][1]) > 30_000


def test_gps_to_enu_skips_leading_nan():
    g = np.array([[np.nan, np.nan, np.nan], [43.0, -79.0, 0.0], [43.0001, -79.0, 0.0]])
    enu = gps_to_enu(g)
    assert np.isnan(enu[0]).all() and np.allclose(enu[1], 0.0)
    assert enu[2][1] == pytest.approx(11.1, rel=0.01)


def test_synchronize_table_against_known_offsets():
    rng = np.random.default_rng(0)
    lidar = 100.0 + np.arange(50) * 0.1 + rng.uniform(-0.002, 0.002, 50)
    true_cam = rng.uniform(-0.03, 0.03, 50)
    cam = lidar + true_cam
    keep = np.ones(50, bool)
    keep[[7, 8, 30]] = False  # dropped frames
    radar = 100.5 + np.arange(30) * 0.1  # starts late and ends early
    imu_t = 99.0 + np.arange(800) * 0.01
    imu_v = np.stack([np.sin(imu_t), np.cos(imu_t), imu_t, imu_t * 0, imu_t * 2, -imu_t], 1)
    gap = (imu_t > 102.0) & (imu_t < 103.5)
    tab = synchronize(
        lidar,
        {"rgb": cam[keep], "radar": radar, "ir": None},
        None,
        (imu_t[~gap], imu_v[~gap]),
        SyncConfig(tolerance_s=0.0, gps_imu_max_gap_s=1.0),
    )
    assert tab.tolerance == pytest.approx(0.05, abs=0.002)
    span = (lidar >= cam[keep][0]) & (lidar <= cam[keep][-1])
    want = keep & span
    assert (tab.present[:, C] == want).all() and want.sum() >= 45
    np.testing.assert_allclose(tab.offset[want, C], true_cam[want], atol=1e-12)
    assert (tab.offset[~want, C] == 0).all()
    assert not tab.present[:, IR].any() and not tab.present[:, G].any()
    inside = (lidar >= radar[0]) & (lidar <= radar[-1])
    assert (tab.present[:, R] == inside).all()
    in_gap = (lidar > imu_t[~gap][imu_t[~gap] <= 102.0].max()) & (lidar < 103.5)
    assert (tab.present[:, M] == ~in_gap).all()
    ok = tab.present[:, M]
    np.testing.assert_allclose(tab.imu[ok, 2], lidar[ok], atol=1e-9)  # linear channel exact
    np.testing.assert_allclose(tab.imu[ok, 0], np.sin(lidar[ok]), atol=1e-4)
    assert np.abs(tab.offset[ok, M]).max() <= 0.005 + 1e-12
    assert tab.index["lidar"].tolist() == list(range(50))


def _drive(lidar_t, **kw) -> Drive:
    return Drive("d", "/raw/d", Stream(np.asarray(lidar_t), lambda i: None), **kw)


def test_sync_drive_rejects_bad_timestamps():
    with pytest.raises(DriveError, match="no LiDAR"):
        sync_drive(Drive("d", "/raw/d", None), SyncConfig())
    with pytest.raises(DriveError, match=r"\[lidar\]: timestamps not strictly increasing"):
        sync_drive(_drive([0.0, 0.1, 0.1, 0.2]), SyncConfig())
    bad_imu = TimeSeries(np.array([0.0, 0.2, 0.1]), np.zeros((3, 6)))
    with pytest.raises(DriveError, match=r"\[imu\]"):
        sync_drive(_drive([0.0, 0.1], imu=bad_imu), SyncConfig())
    tab = sync_drive(
        _drive([0.0, 0.1], rgb=Stream(np.array([0.04, 0.12]), lambda i: 0)), SyncConfig()
    )
    assert tab.index["rgb"].tolist() == [-1, 1]


SAMPLE = (
    Path(__file__).resolve().parents[2] / "shared/data/cmht_sample/drive_dusk_clear_0/drive_dusk_1"
)


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="the real CMHT sample (../shared) is not here")
def test_real_sample_gps_imu_on_a_10hz_clock():
    from etl.scene import open_scene

    drive = open_scene(SAMPLE, "drive_dusk_clear_0/drive_dusk_1")
    t = drive.gps.times
    clock = np.arange(t[0], t[-1], 0.1) + 0.05  # sweeps between the GPS samples
    clock = clock[clock <= t[-1]]
    legacy = SyncConfig(gps_imu_max_gap_s=1.0, gps_dedupe_repeats=False, gps_max_gap_s=1.0)
    tab = synchronize(clock, {}, (t, drive.gps.values), (drive.imu.times, drive.imu.values),
                      legacy)  # fmt: skip
    ok = tab.present[:, G]
    gaps = np.diff(t)
    assert ok.mean() > 0.9 and bool((gaps > 1.0).any()) == (not ok.all())
    enu = tab.gps[ok]
    step = np.linalg.norm(np.diff(enu[:, :2], axis=0), axis=1)
    assert np.abs(enu[0, :2]).max() < 50  # near the first fix
    # Without dedupe (legacy): the real receiver holds its fix for ~4 s (the files repeat it),
    # so the interpolated track is a staircase; still, no step may exceed the largest jump
    # between raw fixes (~120 m), whereas interpolating ddmm.mmmm or wrapping degrees would
    # jump by kilometres.
    raw = gps_to_enu(drive.gps.values)
    assert step.max() <= np.linalg.norm(np.diff(raw[:, :2], axis=0), axis=1).max() + 1e-6
    assert np.abs(enu).max() < 20_000
    assert np.abs(tab.imu[tab.present[:, M], 5]).mean() > 5  # accel z in m/s², not G


# --------------------------------------------------------------------------- GPS held fixes
def test_dedupe_repeats_keeps_first_row_of_each_run():
    t = np.arange(8) * 0.1
    v = np.array([[1, 2, 0], [1, 2, 0], [1, 3, 0], [1, 3, 0], [1, 3, 0],
                  [np.nan, 3, 0], [np.nan, 3, 0], [1, 2, 0]], float)  # fmt: skip
    tt, vv = dedupe_repeats(t, v)
    np.testing.assert_allclose(tt, [0.0, 0.2, 0.5, 0.6, 0.7])  # NaN rows never form a run
    np.testing.assert_array_equal(vv[[0, 1, 4]], [[1, 2, 0], [1, 3, 0], [1, 2, 0]])
    assert dedupe_repeats([], np.zeros((0, 3)))[0].shape == (0,)


def _held_gps(hold_s: float, speed: float = 10.0, rate: float = 10.0, dur: float = 12.0):
    """Rows at ``rate`` Hz of a receiver that publishes a new fix every ``hold_s`` and repeats
    it in between; the car drives north at ``speed`` m/s. → (t, lat/lon/alt rows, true north)"""
    t = np.arange(0.0, dur, 1.0 / rate)
    t_fix = np.floor(t / hold_s + 1e-9) * hold_s  # time the held fix was taken
    lat0, lon0 = 43.2288, -79.9390
    lat = lat0 + np.degrees(speed * t_fix / 6_367_000.0)
    return t, np.stack([lat, np.full_like(lat, lon0), np.zeros_like(lat)], 1), speed * t


def test_gps_held_fix_dedupe_removes_the_staircase():
    t, gps, _ = _held_gps(hold_s=3.0)
    sweeps = np.arange(0.05, 9.0, 0.1)  # within the last new fix (t = 9 s)
    north_true = 10.0 * sweeps
    stairs = synchronize(sweeps, {}, (t, gps), None,
                         SyncConfig(gps_dedupe_repeats=False))  # fmt: skip
    smooth = synchronize(sweeps, {}, (t, gps), None, SyncConfig())  # dedupe on by default
    assert SyncConfig().gps_dedupe_repeats
    err_stairs = np.abs(stairs.gps[:, 1] - north_true)
    err_smooth = np.abs(smooth.gps[:, 1] - north_true)
    assert smooth.present[:, G].all() and stairs.present[:, G].all()
    assert err_stairs.max() > 25  # up to one hold × speed behind
    assert err_smooth.max() < 0.2  # linear between the times each fix appeared
    # steps: every sweep moves ~1 m, no flat runs and no 30 m jumps
    step = np.diff(smooth.gps[:, 1])
    np.testing.assert_allclose(step, 1.0, atol=0.05)
    # offsets point at the nearest *new* fix (up to half a hold away)
    assert np.abs(smooth.offset[:, G]).max() <= 1.5 + 1e-9


def test_gps_gap_limit_is_separate_from_imu():
    t, gps, _ = _held_gps(hold_s=3.0)
    imu_t = np.array([0.0, 0.5, 3.0, 3.5])  # a 2.5 s IMU gap
    imu = np.zeros((4, 6))
    sweeps = np.array([0.2, 1.0, 2.0, 4.0])
    tab = synchronize(sweeps, {}, (t, gps), (imu_t, imu), SyncConfig(gps_imu_max_gap_s=1.0))
    assert tab.present[:, G].all()  # new fixes 3 s apart < gps_max_gap_s
    assert tab.present[:, M].tolist() == [True, False, False, False]
    short = synchronize(sweeps, {}, (t, gps), None, SyncConfig(gps_max_gap_s=2.0))
    assert not short.present[:, G].any()  # fixes 3 s apart > 2 s: no interpolation
    # after the last new fix (t = 9 s) the held value is stale: GPS absent, not flat
    late = synchronize(np.array([9.5, 11.0]), {}, (t, gps), None, SyncConfig())
    assert not late.present[:, G].any()


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="the real CMHT sample (../shared) is not here")
def test_real_sample_gps_dedupe_via_open_scene():
    from etl.scene import open_scene

    drive = open_scene(SAMPLE, "drive_dusk_clear_0/drive_dusk_1")
    t, raw = drive.gps.times, drive.gps.values
    changes = np.any(np.diff(raw, axis=0) != 0, axis=1)
    assert changes.mean() < 0.1  # the quirk: most rows repeat the held fix
    clock = t  # one sweep per frame stamp (the sample has no LiDAR files)
    on = synchronize(clock, {}, (t, raw), (drive.imu.times, drive.imu.values), SyncConfig())
    off = synchronize(clock, {}, (t, raw), None, SyncConfig(gps_dedupe_repeats=False))
    ok = on.present[:, G]
    assert ok.mean() > 0.98  # absent only after the last new fix (a few seconds at the end)
    assert not ok[-1]
    assert on.present[:, M].mean() > 0.9  # IMU unchanged, still on its own 1 s gap limit
    step_on = np.linalg.norm(np.diff(on.gps[ok][:, :2], axis=0), axis=1)
    step_off = np.linalg.norm(np.diff(off.gps[:, :2], axis=0), axis=1)
    assert (step_off < 1e-9).mean() > 0.9  # staircase: almost every frame stands still
    assert (step_on < 1e-9).mean() < 0.05  # deduped: the track moves between fixes
    speed = step_on / np.diff(t[ok])
    assert 5 < np.median(speed) < 40  # m/s: a car on the road
    # a step never exceeds the largest jump between consecutive new fixes (the raw data has
    # a few ~120 m jumps between fixes that appear close together)
    first = np.flatnonzero(np.concatenate([[True], changes]))
    enu = gps_to_enu(raw)[first]
    assert step_on.max() <= np.linalg.norm(np.diff(enu[:, :2], axis=0), axis=1).max() + 1e-6
    # the deduped track passes through every new fix at the time it appeared
    first = first[ok[first]]
    np.testing.assert_allclose(on.gps[first], gps_to_enu(raw)[first], atol=1e-6)
