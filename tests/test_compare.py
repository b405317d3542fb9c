"""rl.compare: variants × seeds trained, evaluated and aggregated; reuse of complete runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from etl import configlib
from rl.compare import aggregate, main, markdown, parse_variant, seed_stats

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "ppo.num_envs=8", "ppo.num_steps=16", "ppo.num_minibatches=2", "ppo.update_epochs=1",
    "ppo.total_timesteps=256", "model.hidden=[16]", "env.time_limit=2.0",
    "updates_per_log=1", "ckpt_every=2",
]  # fmt: skip


def test_parse_variant():
    assert parse_variant("scratch:finetune.init=scratch,ppo.learning_rate=1e-4") == (
        "scratch", ["finetune.init=scratch", "ppo.learning_rate=1e-4"])
    assert parse_variant("base") == ("base", [])
    assert parse_variant("dr:env.randomize.lidar_noise=[0.0,0.03],stages=[],x='a,b'") == (
        "dr", ["env.randomize.lidar_noise=[0.0,0.03]", "stages=[]", "x='a,b'"])
    with pytest.raises(configlib.ConfigError, match="name"):
        parse_variant("a b:x=1")
    with pytest.raises(configlib.ConfigError, match="not KEY=VALUE"):
        parse_variant("a:ppo.learning_rate")


def test_two_variants_two_seeds_end_to_end(tmp_path):
    sets = [*TINY, f"runs_dir='{tmp_path}/runs'", "run_name='cmp'"]
    argv = ["--config", str(ROOT / "configs/rl_tiny.toml"),
            *[a for s in sets for a in ("--set", s)],
            "--variant", "fast:ppo.learning_rate=1e-3", "--variant", "slow:ppo.learning_rate=1e-5",
            "--seeds", "0,1", "--tracks", "procedural:0", "--episodes", "1",
            "--time-limit", "1.0", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    res = json.loads((tmp_path / "out/compare.json").read_text())
    assert set(res["runs"]) == {"fast", "slow"} and res["seeds"] == [0, 1]
    for v in ("fast", "slow"):
        for s in (0, 1):
            assert (tmp_path / f"runs/cmp_{v}_s{s}/ckpt").is_dir()
        agg = res["aggregate"]["terminate"][v]
        assert agg["tracks"]["procedural:0"]["laps"]["n"] == 2
        assert agg["tracks"]["procedural:0"]["laps"]["median"] is not None
        assert agg["tracks"]["procedural:0"]["clean"]["episodes"] == 2  # 1 episode × 2 seeds
        assert agg["seeds"] == [0, 1]
    # seeds differ, so the two runs of a variant are not the same run
    fast = res["runs"]["fast"]
    l0 = fast["0"]["eval"]["results"]["terminate"]["tracks"]["procedural:0"]["episodes"]
    l1 = fast["1"]["eval"]["results"]["terminate"]["tracks"]["procedural:0"]["episodes"]
    assert l0 != l1
    md = (tmp_path / "out/compare.md").read_text()
    assert "| fast | 2 |" in md and "| slow | 2 |" in md
    assert md.count("| variant | seeds |") == 2 and "nan" not in md.lower()
    # complete runs are reused, not retrained: metrics.jsonl is left as it was
    before = (tmp_path / "runs/cmp_fast_s0/metrics.jsonl").read_text()
    assert main([*argv, "--no-train"]) == 0
    assert main(argv) == 0
    assert (tmp_path / "runs/cmp_fast_s0/metrics.jsonl").read_text() == before


def test_missing_run_with_no_train_fails_loudly(tmp_path, capsys):
    argv = ["--config", str(ROOT / "configs/rl_tiny.toml"),
            "--set", f"runs_dir='{tmp_path}'", "--variant", "a", "--seeds", "0",
            "--no-train", "--out", str(tmp_path / "out")]
    assert main(argv) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_aggregate_mean_and_std_over_seeds():
    def rec(laps):
        agg = {"laps_mean": laps, "lap_time_mean": 30.0, "collisions_per_km": 2.0,
               "collision_free_fraction": 1.0}
        return {"eval": {"results": {"m": {"tracks": {"t": {"aggregate": agg}}}}},
                "final_return": 10.0 * laps}

    out = aggregate({"v": {0: rec(1.0), 1: rec(3.0)}}, "m")["v"]
    laps = out["tracks"]["t"]["laps"]
    assert (laps["mean"], laps["std"], laps["n"]) == (2.0, 1.0, 2)
    assert out["final_return"]["mean"] == 20.0


def test_seed_stats_by_hand_and_against_numpy():
    # None (a seed without a completed lap) and NaN are left out: 4 values remain
    s = seed_stats([3.0, 1.0, None, float("nan"), 2.0, 10.0])
    a = np.array([3.0, 1.0, 2.0, 10.0])
    # by hand: sorted 1, 2, 3, 10; linear interpolation at positions 0.75, 1.5, 2.25
    assert s["n"] == 4
    assert s["mean"] == pytest.approx(4.0)
    assert s["std"] == pytest.approx(np.sqrt((9 + 4 + 1 + 36) / 4))
    assert s["median"] == pytest.approx(2.5)
    assert s["q25"] == pytest.approx(1.75) and s["q75"] == pytest.approx(4.75)
    assert s["iqr"] == pytest.approx(3.0)
    # and numpy agrees
    assert s["median"] == pytest.approx(np.median(a))
    assert s["iqr"] == pytest.approx(np.subtract(*np.percentile(a, [75, 25])))
    assert s["std"] == pytest.approx(a.std())
    one = seed_stats([5.0])
    assert (one["median"], one["iqr"], one["std"]) == (5.0, 0.0, 0.0)
    assert seed_stats([None, float("nan")]) == {
        "mean": None, "std": None, "median": None, "q25": None, "q75": None, "iqr": None,
        "n": 0}  # fmt: skip


def _run(laps: list[float], clean: list[bool], lap_time: float | None, cpk: float) -> dict:
    """One seed's evaluation of one track, as rl.evaluate's metrics.json has it."""
    eps = [{"laps": x, "collision_free": c} for x, c in zip(laps, clean, strict=True)]
    agg = {"episodes": len(eps), "laps_mean": float(np.mean(laps)), "lap_time_mean": lap_time,
           "collisions_per_km": cpk, "collision_free_fraction": float(np.mean(clean))}
    return {"eval": {"results": {"m": {"tracks": {"t": {"episodes": eps, "aggregate": agg}}}}},
            "final_return": 1.0}  # fmt: skip


def test_aggregate_median_iqr_and_pooled_clean_fraction():
    runs = {"v": {
        0: _run([1.0, 2.0, 3.0], [True, True, False], 30.0, 0.0),  # laps 2, clean 2/3
        1: _run([0.5, 0.5], [False, False], None, 8.0),  # no lap completed; clean 0/2
        2: _run([4.0], [True], 28.0, 2.0),  # laps 4, clean 1/1
    }}  # fmt: skip
    t = aggregate(runs, "m")["v"]["tracks"]["t"]
    per_seed_laps = np.array([2.0, 0.5, 4.0])
    assert t["laps"]["median"] == pytest.approx(np.median(per_seed_laps)) == 2.0
    assert t["laps"]["q25"] == pytest.approx(1.25) and t["laps"]["q75"] == pytest.approx(3.0)
    assert t["laps"]["iqr"] == pytest.approx(1.75)
    assert t["lap_time"]["n"] == 2 and t["lap_time"]["median"] == pytest.approx(29.0)
    assert t["collisions_per_km"]["median"] == 2.0
    # pooled over the seeds' episodes: 3 clean of 6 — not the mean of per-seed fractions (5/9)
    assert t["clean"] == {"episodes": 6, "clean_episodes": 3, "fraction": 0.5}
    assert t["collision_free_fraction"]["mean"] == pytest.approx((2 / 3 + 0 + 1) / 3)


def test_markdown_two_tables_no_nan():
    runs = {"a": {0: _run([1.0], [True], None, 0.0), 1: _run([3.0], [False], None, 4.0)},
            "b": {0: _run([2.0], [True], 20.0, 0.0)}}  # fmt: skip
    agg = aggregate(runs, "m")
    agg["b"]["final_return"] = seed_stats([None])
    md = markdown(agg, "m", "# x")
    assert md.count("| variant | seeds |") == 2
    assert "median [Q1, Q3]" in md
    assert "| a | 2 | 2.00 [1.50, 2.50] / — / 2 [1, 3] / 1/2 (50%) |" in md
    assert "nan" not in md.lower() and "none" not in md.lower()
