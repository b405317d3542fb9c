"""rl.compare: variants × seeds trained, evaluated and aggregated; reuse of complete runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from etl import configlib
from rl.compare import aggregate, main, parse_variant

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
        assert agg["seeds"] == [0, 1]
    # seeds differ, so the two runs of a variant are not the same run
    fast = res["runs"]["fast"]
    l0 = fast["0"]["eval"]["results"]["terminate"]["tracks"]["procedural:0"]["episodes"]
    l1 = fast["1"]["eval"]["results"]["terminate"]["tracks"]["procedural:0"]["episodes"]
    assert l0 != l1
    md = (tmp_path / "out/compare.md").read_text()
    assert "| fast | 2 |" in md and "| slow | 2 |" in md
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
    assert out["tracks"]["t"]["laps"] == {"mean": 2.0, "std": 1.0, "n": 2}
    assert out["final_return"]["mean"] == 20.0
