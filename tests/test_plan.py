"""rl.plan: the clean-lap planner and its speed profile; rl.drivers' line-following driver."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rl.drivers import LineFollower
from rl.evaluate import evaluate_policy
from rl.plan import (
    footprint_clearance,
    plan_lap,
    smooth_line,
    speed_profile,
)


@pytest.fixture(scope="module")
def plan(track):
    return plan_lap(track)


def test_planned_lap_is_drivable_and_clean(track, plan):
    assert plan.feasible and plan.best_progress == 1.0
    path = plan.path
    steps = np.hypot(*np.diff(path[:, :2], axis=0).T)
    np.testing.assert_allclose(steps, plan.step_m, atol=1e-4)  # chords of 0.1 m arcs
    # no turn tighter than the car's: heading change per step <= step / turn radius
    dyaw = np.abs(np.angle(np.exp(1j * np.diff(path[:, 2]))))
    assert dyaw.max() <= plan.step_m / plan.turn_radius_m + 1e-6
    # the footprint keeps the clearance everywhere (checked again here, not taken from plan)
    cl = footprint_clearance(track, path[:, 0], path[:, 1], path[:, 2])
    assert cl.min() >= plan.clearance_m - 1e-9
    # a closed lap: back at the grid start, heading the same way
    sx, sy, syaw = np.asarray(track.starts[0])[[0, 1, 5]]
    assert math.hypot(path[-1, 0] - sx, path[-1, 1] - sy) < 0.3
    assert abs(math.remainder(path[-1, 2] - syaw, 2 * math.pi)) < 0.25
    assert 0.8 * track.lap_length_m < plan.length_m < 1.3 * track.lap_length_m


def test_footprint_clearance_sign(track):
    sx, sy, syaw = np.asarray(track.starts[0])[[0, 1, 5]]
    assert footprint_clearance(track, sx, sy, syaw) > 0.3
    r, c = np.argwhere(~track.drivable)[0]
    wx, wy = track.pixel_to_world(r, c)
    assert footprint_clearance(track, wx, wy, 0.0) < 0


def test_a_car_that_cannot_turn_finds_no_lap(track):
    plan = plan_lap(track, turn_radius=40.0)
    assert not plan.feasible and plan.best_progress < 1.0 and plan.where_stuck is not None
    assert plan.path.shape == (0, 3)
    with pytest.raises(ValueError, match="procedural_0: no feasible line"):
        LineFollower(plan)


def test_speed_profile_corners_and_braking():
    # a circle of radius 2 m: the cornering limit everywhere
    n = 200
    th = np.linspace(0, 2 * np.pi, n, endpoint=False)
    circle = np.column_stack([2 * np.cos(th), 2 * np.sin(th), th + np.pi / 2])
    v = speed_profile(circle, 2 * np.pi * 2 / n, v_max=5.0, a_lat=2.0)
    np.testing.assert_allclose(v, 2.0, rtol=0.02)
    # a straight then a hairpin of radius 1 m: slowing down before the corner
    straight = np.column_stack([np.arange(100) * 0.1, np.zeros(100), np.zeros(100)])
    phi = 0.1 * np.arange(1, 31)  # 0.1 m steps on a 1 m radius
    turn = np.column_stack([9.9 + np.sin(phi), 1 - np.cos(phi), phi])
    line = np.concatenate([straight, turn])
    v = speed_profile(line, 0.1, v_max=3.5, a_lat=1.0, a_brake=2.0)
    assert v[110] == pytest.approx(1.0, rel=0.05)  # sqrt(a_lat * 1 m)
    assert v[99] < 1.3 and v[90] > v[99] and v[60] >= v[90] > 1.5
    smooth = smooth_line(circle, 0.5, 2 * np.pi * 2 / n)
    np.testing.assert_allclose(np.hypot(smooth[:, 0], smooth[:, 1]), 2.0, rtol=0.01)


def test_line_follower_laps_cleanly_in_the_jax_backend(track, plan):
    res = evaluate_policy(LineFollower(plan), track, "jax", episodes=1, time_limit=45.0,
                          terminate_on_collision=True)
    ep = res["episodes"][0]
    assert res["rollout"] == "scan"  # the driver is traceable
    assert ep["laps"] >= 1.0, ep
    assert ep["collision_free"] and ep["end"] != "collision", ep


def test_line_driver_passes_the_turn_radius_to_the_planner(track):
    from rl.drivers import line_driver

    with pytest.raises(ValueError, match="no feasible line"):  # 40 m: no lap (test above)
        line_driver(track, turn_radius=40.0)
    wide = line_driver(track, turn_radius=2.5)
    tight = line_driver(track)
    assert not np.array_equal(np.asarray(wide.xy), np.asarray(tight.xy))
