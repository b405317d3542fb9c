"""The pretraining study (rl.study): the arms differ only in their initialisation, the report's
intervals are right on a hand-checked example, a missing run is named in the report, the loop
resumes by skipping what its markers say is done. No training here: fake runs on disk and a
stub unit runner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rl.study_config import (
    ARMS,
    INIT_KEYS,
    REFERENCE,
    Layout,
    arm_config,
    check_base,
    conditions,
    config_diff,
    load_study,
    run_name,
    units,
)

ROOT = Path(__file__).resolve().parents[1]
STUDIES = [ROOT / "configs/study_cpu.toml", ROOT / "configs/study_cluster.toml"]


# --------------------------------------------------------------------------- the arms
@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_arms_differ_from_scratch_only_in_initialisation(path):
    cfg = load_study(path)
    assert set(cfg.arms) == set(ARMS) and len(cfg.seeds) >= 5
    for seed in cfg.seeds[:2]:
        scratch = arm_config(cfg, "scratch", seed)
        assert scratch.model.policy == "multimodal" and scratch.seed == seed
        assert scratch.finetune.freeze_encoders is False  # trained end to end
        for arm in cfg.arms:
            diff = config_diff(scratch, arm_config(cfg, arm, seed))
            if arm == "scratch":
                assert diff == {}
                continue
            assert diff.pop("run_name") == (run_name("scratch", seed), run_name(arm, seed))
            allowed = set(INIT_KEYS)
            if arm == REFERENCE:  # another policy: its own [model], nothing else
                assert diff.pop("model.policy") == ("multimodal", "lidar_mlp")
                allowed |= {k for k in diff if k.startswith("model.")}
            assert set(diff) <= allowed, f"{arm}: {sorted(set(diff) - allowed)}"
    s0 = {a: arm_config(cfg, a, cfg.seeds[0]) for a in cfg.arms}
    assert (s0["pretrained_frozen"].finetune.init, s0["pretrained_frozen"].finetune.freeze_encoders
            ) == ("pretrained", True)  # fmt: skip
    ft = s0["pretrained_finetuned"]
    assert (ft.finetune.init, ft.finetune.freeze_encoders) == ("pretrained", False)
    assert ft.ppo.encoder_lr_scale == cfg.rl.encoder_lr_scale < 1.0
    assert (s0["random_frozen"].finetune.init, s0["random_frozen"].finetune.freeze_encoders
            ) == ("scratch", True)  # fmt: skip
    # every arm builds its encoders from the same checkpoint (weights or architecture)
    assert len({c.finetune.pretrained_ckpt for c in s0.values()}) == 1
    # seeds differ in the seed and the run name only
    other = config_diff(arm_config(cfg, "scratch", cfg.seeds[0]),
                        arm_config(cfg, "scratch", cfg.seeds[1]))
    assert set(other) == {"seed", "run_name"}


def test_study_config_errors():
    from etl import configlib

    with pytest.raises(configlib.ConfigError, match="arms:.*scratch"):
        load_study(None, ["arms=['pretrained_frozen']"])
    with pytest.raises(configlib.ConfigError, match="arms:"):
        load_study(None, ["arms=['scratch', 'bogus']"])
    with pytest.raises(configlib.ConfigError, match=r"rl.reference:.*\[model\] keys only"):
        load_study(None, ["rl.reference=['ppo.learning_rate=1.0']"])
    with pytest.raises(configlib.ConfigError, match="eval.lidar_drop"):
        load_study(None, ["eval.lidar_drop=[1.5]"])
    with pytest.raises(configlib.ConfigError, match="seeds"):
        load_study(None, ["seeds=[1, 1]"])
    cfg = load_study(None, ["rl.config='configs/rl_tiny.toml'"])  # a lidar policy as the base
    with pytest.raises(configlib.ConfigError, match="model.policy must be 'multimodal'"):
        check_base(cfg)
    from rl.study import Study

    with pytest.raises(configlib.ConfigError, match="nope.toml: config file not found"):
        Study(load_study(None, ["pretrain.config='nope.toml'"]))


def test_encoder_lr_scale_scales_only_the_encoders_updates():
    """ppo.encoder_lr_scale: the parameters under the policy's ``mae`` move that fraction of
    what the heads move (Adam's step on the same gradient)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from rl.ppo_core import PPOConfig, make_optimizer

    class Policy(nnx.Module):
        def __init__(self, rngs):
            self.mae = nnx.Linear(3, 3, rngs=rngs)
            self.policy = nnx.Linear(3, 2, rngs=rngs)

    params = nnx.state(Policy(nnx.Rngs(0)), nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)

    def step(scale):
        tx = make_optimizer(PPOConfig(encoder_lr_scale=scale, anneal_lr=False), 10)
        u, _ = tx.update(grads, tx.init(params), params)
        return {jax.tree_util.keystr(p): float(jnp.abs(x).max())
                for p, x in jax.tree_util.tree_leaves_with_path(u)}

    full, tenth = step(1.0), step(0.1)
    for k in full:
        ratio = tenth[k] / full[k]
        assert ratio == pytest.approx(0.1 if "mae" in k else 1.0, rel=1e-4), k


# --------------------------------------------------------------------------- statistics
def test_intervals_against_a_hand_computed_example():
    """Five runs scoring 0, 0, 0, 0, 10. IQM = the mean of the middle three = 0. A bootstrap
    resample holding k copies of 10 (k ~ Binomial(5, 0.2)) has IQM 0 (k ≤ 1, probability
    0.737), 10/3 (k = 2, 0.205), 20/3 (k = 3, 0.051), 10 (k ≥ 4, 0.007): the 2.5 % percentile
    is 0 and the 97.5 % one 20/3 (the CDF passes 0.975 inside k = 3: 0.942 → 0.993)."""
    from rl.study_report import improvement_interval, iqm_interval, probability_of_improvement

    s = iqm_interval(np.array([[0.0], [0.0], [0.0], [0.0], [10.0]]), reps=1000)
    assert (s["iqm"], s["runs"], s["tasks"]) == (0.0, 5, 1)
    assert s["lo"] == 0.0 and s["hi"] == pytest.approx(20 / 3)
    # IQM of 1..4: the middle two, (2 + 3) / 2; of two tasks: over all eight scores
    assert iqm_interval(np.array([[1.0], [2.0], [3.0], [4.0]]), 500)["iqm"] == 2.5
    two = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    assert iqm_interval(two, 500)["iqm"] == pytest.approx(np.mean([3.0, 4.0, 10.0, 20.0]))
    # P(X > Y), ties one half: X = 3, 4, 5 against Y = 1, 2, 4 wins 2 + 2.5 + 3 of 9 pairs
    x, y = np.array([[3.0], [4.0], [5.0]]), np.array([[1.0], [2.0], [4.0]])
    p = improvement_interval(x, y, reps=1000)
    assert p["p"] == pytest.approx(7.5 / 9)
    assert 0.0 <= p["lo"] < p["p"] < p["hi"] == 1.0  # X's best resample beats every Y
    assert improvement_interval(x, x, 200)["p"] == 0.5
    # the vectorised P(X > Y) is rliable's (Mann-Whitney U / (n m), averaged over tasks)
    from rliable import metrics

    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 4, (int(rng.integers(1, 6)), 3)).astype(float)
        b = rng.integers(0, 4, (int(rng.integers(1, 6)), 3)).astype(float)
        assert probability_of_improvement(a, b) == pytest.approx(
            metrics.probability_of_improvement(a, b))


def test_learning_curve_area_and_first_lap(tmp_path):
    from rl.study_report import first_lap_steps, learning_auc

    # 0 laps up to 100 steps, then rising to 1 at 200: the area is 50 of a 200-step budget
    assert learning_auc(np.array([100.0, 200.0]), np.array([0.0, 1.0]), 200) == \
        pytest.approx(0.25, abs=1e-3)
    assert learning_auc(np.array([50.0]), np.array([0.4]), 100) == pytest.approx(0.4)
    assert learning_auc(np.zeros(0), np.zeros(0), 100) is None
    mj = tmp_path / "metrics.jsonl"
    _write_metrics(mj, [(100, 0.1, None), (200, 0.6, 31.0), (300, 1.2, 29.0)])
    assert first_lap_steps(mj) == 200.0
    _write_metrics(mj, [(100, 0.1, None)])
    assert first_lap_steps(mj) is None


# --------------------------------------------------------------------------- fake runs
def _write_metrics(path: Path, rows):
    """rows of (env_steps, laps per episode, lap time or None)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for steps, laps, lt in rows:
            f.write(json.dumps({"env_steps": steps, "episode/laps": laps,
                                "episode/ep_return": 10 * laps,
                                "episode/lap_time": float("nan") if lt is None else lt}) + "\n")


def _write_eval(path: Path, per_track: dict[str, tuple[float, float, float | None]]):
    """rl.evaluate's metrics.json: per track (laps, collision-free fraction, lap time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tracks = {t: {"aggregate": {"laps_mean": laps, "collision_free_fraction": clean,
                                "lap_time_mean": lt}}
              for t, (laps, clean, lt) in per_track.items()}
    path.write_text(json.dumps({"results": {"terminate": {"tracks": tracks}}}))


def _tiny_study(tmp_path, *extra):
    return load_study(None, [
        "name='fake'", f"runs_dir='{tmp_path}'", "seeds=[0, 1, 2]",
        "arms=['scratch', 'pretrained_frozen']", "rl.config='configs/rl_study.toml'",
        "eval.lidar_noise=[2.0]", "eval.lidar_drop=[]", "eval.imu_absent=false",
        "eval.unseen=['procedural:wide:900']", "report.reps=300", "report.curve_reps=100",
        "report.curve_points=5", "pretrain.probe=false", "pretrain.domain_gap=false",
        "pretrain.config='configs/pretrain_tiny.toml'", *extra])  # fmt: skip


def _marker(lay: Layout, unit: str, status: str, error: str | None = None,
            wall_s: float = 12.0, finished: str | None = None):
    p = lay.markers / f"{unit}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    rec = {"unit": unit, "status": status, "error": error, "wall_s": wall_s}
    if finished:
        rec["finished"] = finished
    p.write_text(json.dumps(rec))


LAPS = {("scratch", 0): 1.0, ("scratch", 1): 2.0, ("scratch", 2): 4.0,
        ("pretrained_frozen", 0): 3.0, ("pretrained_frozen", 1): 5.0}


@pytest.fixture
def fake_study(tmp_path):
    """Two arms × three seeds on disk: pretrained_frozen s2's training failed; scratch s1's
    unseen-track evaluation never ran; everything else is there."""
    cfg = _tiny_study(tmp_path)
    base = check_base(cfg)
    lay = Layout.of(cfg)
    conds = conditions(cfg, base)
    assert [c.name for c in conds] == ["train", "lidar_noise_x2", "unseen"]
    _marker(lay, "pretrain", "done")
    for (arm, seed), laps in LAPS.items():
        name = run_name(arm, seed)
        _write_metrics(lay.run(arm, seed) / "metrics.jsonl",
                       [(100_000, 0.0, None), (300_000, laps / 2, 30.0), (600_000, laps, 28.0)])
        _marker(lay, f"train/{name}", "done")
        for c in conds:
            if (arm, seed, c.name) == ("scratch", 1, "unseen"):
                continue
            k = 0.5 if c.name == "lidar_noise_x2" else 1.0
            _write_eval(lay.eval(arm, seed, c.name) / "metrics.json",
                        {t: (laps * k, 1.0 if laps > 2 else 0.0, 30.0 if laps >= 1 else None)
                         for t in c.tracks})
    _marker(lay, "train/pretrained_frozen_s2", "failed", "RuntimeError: out of memory")
    return cfg, base, lay


def test_report_on_fake_runs(fake_study):
    from rl.study_report import build_report

    cfg, base, lay = fake_study
    rec = build_report(cfg, base, {"command": "test", "data": {"kind": "synthetic"}})
    agg = rec["aggregate"]["arms"]
    # scratch: 1, 2, 4 laps. A 25 % trim of three scores cuts int(0.75) = 0 from each end:
    # the IQM of three runs is their mean; the interval spans the resamples' IQMs
    s = agg["scratch"]["laps"]
    assert (s["iqm"], s["runs"]) == (pytest.approx(7 / 3), 3)
    assert 1.0 <= s["lo"] < 7 / 3 < s["hi"] <= 4.0
    p = agg["pretrained_frozen"]["laps"]  # only two runs: 3 and 5
    assert (p["iqm"], p["runs"]) == (4.0, 2)
    assert agg["scratch"]["conditions"]["lidar_noise_x2"]["laps"]["iqm"] == pytest.approx(3.5 / 3)
    assert agg["scratch"]["conditions"]["unseen"]["laps"]["runs"] == 2  # s1's is missing
    assert agg["scratch"]["clean"]["iqm"] == pytest.approx(1 / 3)
    assert agg["pretrained_frozen"]["clean"]["iqm"] == 1.0
    # every pretrained run beats every scratch run but scratch's 4 (beaten by 5 only)
    imp = rec["aggregate"]["improvement_over_scratch"]["pretrained_frozen"]["laps"]
    assert imp["p"] == pytest.approx(5 / 6)
    # learning curves: laps 0 → L/2 → L over 100 k … 600 k steps of a 600 k budget
    a = agg["scratch"]["auc"]
    assert a["runs"] == 3 and 0 < a["lo"] <= a["iqm"] <= a["hi"]
    assert rec["runs"]["scratch"][0]["first_lap"] == 300_000
    assert agg["pretrained_frozen"]["first_lap"]["reached"] == 2

    # the missing are named, with their reasons; nothing is dropped silently
    missing = {m["unit"]: m["reason"] for m in rec["missing"]}
    assert "out of memory" in missing["train/pretrained_frozen_s2"]
    for c in ("train", "lidar_noise_x2", "unseen"):
        assert "train/pretrained_frozen_s2 failed" in missing[f"eval/pretrained_frozen_s2/{c}"]
    assert missing["eval/scratch_s1/unseen"] == "eval/scratch_s1/unseen not run"
    assert len(missing) == 5
    md = (lay.root / "report.md").read_text()
    # one line a reason: the failed run with its 3 evaluations, the lone missing evaluation
    assert "- `train/pretrained_frozen_s2` and its 3 evaluations: train/pretrained_frozen_s2 " \
        "failed" in md and "out of memory" in md
    assert "- `eval/scratch_s1/unseen`: eval/scratch_s1/unseen not run" in md
    assert "| pretrained, frozen | 2/3 |" in md
    assert "## Where the time went" in md  # the fake markers carry no end time: none timed
    assert rec["timing"]["untimed_units"] == len(units(cfg, base)) and rec["timing"]["total_s"] == 0
    assert json.loads((lay.root / "report.json").read_text())["aggregate"] == json.loads(
        json.dumps(rec["aggregate"]))
    for f in rec["figures"].values():
        assert (lay.root / f).stat().st_size > 0
    assert {"learning curves", "performance profiles", "intervals", "robustness"} <= set(
        rec["figures"])


def test_timing_sums_the_finished_units_per_stage_and_arm(tmp_path):
    from rl.study_report import timing, timing_section

    cfg = _tiny_study(tmp_path)
    base = check_base(cfg)
    lay = Layout.of(cfg)
    day = "2026-12-07T10:"
    _marker(lay, "pretrain", "done", wall_s=60.0, finished=day + "01:00+00:00")
    _marker(lay, "train/scratch_s0", "done", wall_s=100.0, finished=day + "03:00+00:00")
    _marker(lay, "eval/scratch_s0/train", "done", wall_s=5.0, finished=day + "03:05+00:00")
    _marker(lay, "train/pretrained_frozen_s0", "done", wall_s=30.0, finished=day + "10:00+00:00")
    _marker(lay, "train/scratch_s1", "failed", "boom", wall_s=50.0, finished=day + "11:00+00:00")
    _marker(lay, "train/scratch_s2", "running", wall_s=0.0, finished=day + "12:00+00:00")
    t = timing(cfg, base)
    assert t["by_stage_s"] == {"pretrain": 60.0, "train": 130.0, "evaluate": 5.0}
    assert t["train_by_arm_s"] == {"scratch": 100.0, "pretrained_frozen": 30.0}
    assert t["total_s"] == 195.0
    # from pretrain's start (10:00:00) to pretrained_frozen_s0's end (10:10:00)
    assert t["span_s"] == 600.0
    assert (t["first_start"], t["last_finish"]) == ("2026-12-07T10:00:00+00:00",
                                                    "2026-12-07T10:10:00+00:00")
    assert t["untimed_units"] == len(units(cfg, base)) - 4  # failed, running, absent: untimed
    md = "\n".join(timing_section(t))
    assert "| **all units** | **3.2** |" in md and "| train | 2.2 |" in md
    assert "10.0 min" in md


def test_report_shows_the_probe_differences_and_the_domain_gap(fake_study):
    from rl.study import Study
    from rl.study_report import build_report

    cfg, base, lay = fake_study
    ci = {"estimate": 0.031, "low": 0.004, "high": 0.058}
    neg = {"estimate": -0.02, "low": -0.05, "high": 0.01}
    probe = {"checkpoint_step": 1500, "data_note": "synthetic drives (etl.synth)",
             "feature_sets": ["pretrained", "random_init"],
             "occupancy": {"pretrained": {"iou": 0.51}, "random_init": {"iou": 0.48},
                           "differences": {"pretrained - random_init": {"iou": ci}}},
             "free_space": {"pretrained": {"r2": 0.42, "mae_m": 1.9},
                            "random_init": {"r2": 0.40, "mae_m": 1.95},
                            "differences": {"pretrained - random_init": {"r2": neg,
                                                                         "mae_m": ci}}}}
    (lay.pretrain / "probe").mkdir(parents=True)
    (lay.pretrain / "probe" / "probe.json").write_text(json.dumps(probe))
    (lay.pretrain / "probe" / "recon_lidar.png").write_bytes(b"\x89PNG recon")
    rel = {"etl": {"recon_relative": {"estimate": 0.74, "low": 0.71, "high": 0.77}},
           "sim": {"recon_relative": {"estimate": 4.6, "low": 4.4, "high": 4.9}},
           "frechet_ratio": 75.4, "domain_classifier_accuracy": 1.0}
    gap = {"n_etl": 60, "n_sim": 60, "tracks": ["procedural:0"], "modalities": ["lidar", "imu"],
           "data": "cache", "data_note": "synthetic drives (etl.synth)",
           "models": {"pretrained": rel}, "reading": ["- a sentence the numbers support"]}
    lay.domain_gap.mkdir(parents=True)
    (lay.domain_gap / "domain_gap.json").write_text(json.dumps(gap))
    (lay.domain_gap / "bev_side_by_side.png").write_bytes(b"\x89PNG fake")
    meta = Study(cfg).meta("test")
    assert meta["domain_gap"]["n_sim"] == 60 and meta["probe"]["checkpoint_step"] == 1500
    rec = build_report(cfg, base, meta)
    md = (lay.root / "report.md").read_text()
    assert ("| pretrained - random_init | +0.031 [+0.004, +0.058] (pretrained better) | "
            "-0.020 [-0.050, +0.010] (no difference shown (the interval holds 0)) | "
            "+0.031 [+0.004, +0.058] (pretrained worse) |") in md
    assert "| pretrained | 0.740 [0.710, 0.770] | 4.600 [4.400, 4.900] | 75.4 | 1.000 |" in md
    assert "- a sentence the numbers support" in md
    assert rec["figures"]["domain gap"] == "figures/domain_gap_bev.png"
    assert (lay.root / "figures" / "domain_gap_bev.png").read_bytes() == b"\x89PNG fake"
    # the held-out reconstructions the probe drew; its predictions' figure was not drawn
    assert rec["figures"]["reconstructions"] == "figures/probe_recon_lidar.png"
    assert (lay.root / "figures" / "probe_recon_lidar.png").read_bytes() == b"\x89PNG recon"
    assert "![reconstructions](figures/probe_recon_lidar.png)" in md
    assert "probe predictions" not in rec["figures"] and "probe predictions](" not in md
    # without the files: each section says it is missing and why
    (lay.domain_gap / "domain_gap.json").unlink()
    (lay.pretrain / "probe" / "probe.json").unlink()
    build_report(cfg, base, Study(cfg).meta("test"))
    md = (lay.root / "report.md").read_text()
    assert "Not measured (disabled (pretrain.domain_gap = false))." in md
    assert "No probe report (probe disabled (pretrain.probe = false))." in md


def test_the_domain_gap_unit_follows_the_pretraining_with_the_training_tracks(tmp_path):
    from rl.study import Study

    study = Study(_tiny_study(tmp_path, "pretrain.domain_gap=true",
                              "pretrain.domain_gap_args=['--samples', '64']"))
    names = [u.name for u in study.units]
    gap = study.by_name["domain_gap"]
    assert names.index("domain_gap") == names.index("pretrain") + 1
    assert gap.stage == "gap" and gap.needs == ("pretrain",)
    assert study.domain_gap_args() == ["--tracks", study.base.env.track, "--world-scale",
                                       f"{study.base.env.world_scale:g}", "--samples", "64"]
    # its own arguments and the pretraining make its hash; a new one runs it again
    other = Study(_tiny_study(tmp_path, "pretrain.domain_gap=true"))
    assert study.unit_hash(gap) != other.unit_hash(other.by_name["domain_gap"])
    assert [u.name for u in study.select({"gap"})] == ["domain_gap"]


def test_a_broken_evaluation_file_fails_naming_it(fake_study):
    from rl.study_report import build_report

    cfg, base, lay = fake_study
    bad = lay.eval("scratch", 0, "train") / "metrics.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        build_report(cfg, base, {})


# --------------------------------------------------------------------------- resuming
class StubRunner:
    """Records the units it is asked to run; fails those in ``fail`` (exit 1)."""

    def __init__(self, fail=(), preempt=()):
        self.calls: list[str] = []
        self.fail, self.preempt = set(fail), set(preempt)

    def __call__(self, study, unit):
        self.calls.append(unit.name)
        if unit.name in self.preempt:
            return 3
        return 1 if unit.name in self.fail else 0


def test_resume_skips_completed_units(tmp_path):
    from rl.study import Study

    three = "arms=['scratch', 'pretrained_frozen', 'lidar_mlp']"
    cfg = _tiny_study(tmp_path, three)
    study = Study(cfg)
    names = [u.name for u in study.units]
    assert names[0] == "pretrain" and len(study.tasks()) == 9

    first = StubRunner(fail={"train/pretrained_frozen_s1"})
    assert study.execute(study.units, first) == 1
    blocked = {f"eval/pretrained_frozen_s1/{c}" for c in ("train", "lidar_noise_x2", "unseen")}
    assert set(first.calls) == set(names) - blocked  # what needs a failed unit is not run
    assert study.marker("train/pretrained_frozen_s1")["status"] == "failed"

    again = StubRunner()  # a second run: only the failed unit and what waited for it
    assert Study(cfg).execute(Study(cfg).units, again) == 0
    assert again.calls == ["train/pretrained_frozen_s1", *sorted(blocked, key=names.index)]

    nothing = StubRunner()
    assert Study(cfg).execute(Study(cfg).units, nothing) == 0 and nothing.calls == []

    # another evaluation protocol: every evaluation again, no training, no pretraining
    changed = Study(_tiny_study(tmp_path, three, "eval.episodes=2"))
    redo = StubRunner()
    assert changed.execute(changed.units, redo) == 0
    assert redo.calls == [n for n in names if n.startswith("eval/")]

    # another pretraining: it runs again, and so does every multimodal arm after it (its old
    # run folder set aside, not resumed) with its evaluations; the lidar MLP needs none of it
    old_run = Layout.of(cfg).run("scratch", 0)
    (old_run / "ckpt").mkdir(parents=True)
    newpre = Study(_tiny_study(tmp_path, three, "eval.episodes=2",
                               "pretrain.set=['training.steps=7']"))
    re = StubRunner()
    assert newpre.execute(newpre.units, re) == 0
    assert re.calls == [n for n in names if "lidar_mlp" not in n]
    assert not old_run.exists() and len(list(old_run.parent.glob("scratch_s0.stale-*"))) == 1

    # a preempted unit stops the loop at once (exit 3, for the requeue) and is not done
    more = Study(_tiny_study(tmp_path, three, "eval.episodes=2",
                             "pretrain.set=['training.steps=7']", "seeds=[0, 1, 2, 3]"))
    pre = StubRunner(preempt={"train/scratch_s3"})
    assert more.execute(more.units, pre) == 3
    assert pre.calls == ["train/scratch_s3"]
    assert more.marker("train/scratch_s3")["status"] == "running"
    assert not more.is_done(more.by_name["train/scratch_s3"])


def _fake_study_toml(tmp_path: Path, pretrain_extra: str = "") -> Path:
    """Two arms × three seeds of the real base config; one sensor fault, one unseen track."""
    toml = tmp_path / "fake.toml"
    toml.write_text(
        f'name = "fake"\nruns_dir = "{tmp_path}"\nseeds = [0, 1, 2]\n'
        'arms = ["scratch", "pretrained_frozen"]\n'
        '[rl]\nconfig = "configs/rl_study.toml"\n'
        '[pretrain]\nconfig = "configs/pretrain_tiny.toml"\nprobe = false\n'
        f'{pretrain_extra}'
        '[eval]\nlidar_noise = [2.0]\nlidar_drop = []\nimu_absent = false\n'
        'unseen = ["procedural:wide:900"]\n'
        '[report]\nreps = 200\ncurve_reps = 200\ncurve_points = 5\n')
    return toml


def test_cli_task_list_count_and_report_stage(tmp_path, capsys):
    from rl import study as st

    toml = _fake_study_toml(tmp_path)
    assert st.main(["--config", str(toml), "--count"]) == 0
    assert capsys.readouterr().out.strip() == "6"
    lay = Layout.of(load_study(toml))
    blocked = StubRunner()
    assert st.main(["--config", str(toml), "--task", "2"], runner=blocked) == 0
    assert blocked.calls == []  # its training needs the pretraining, not done yet
    stub = StubRunner()
    assert st.main(["--config", str(toml), "--stage", "pretrain"], runner=stub) == 0
    assert stub.calls == ["pretrain"]
    task = StubRunner()
    assert st.main(["--config", str(toml), "--task", "2"], runner=task) == 0  # scratch_s1
    assert task.calls == ["train/scratch_s1", *(f"eval/scratch_s1/{c}" for c in
                                                 ("train", "lidar_noise_x2", "unseen"))]
    assert not (lay.root / "report.md").exists()  # a task builds no report
    assert st.main(["--config", str(toml), "--task", "6"]) == 2  # out of range
    assert st.main(["--config", str(toml), "--stage", "bogus"]) == 2
    # the report of a study with no result on disk: every run named as missing, no crash
    assert st.main(["--config", str(toml), "--stage", "report"], runner=StubRunner()) == 0
    md = (lay.root / "report.md").read_text()
    assert ("`train/pretrained_frozen_s2` and its 3 evaluations: train/pretrained_frozen_s2 "
            "not run") in md
    rec = json.loads((lay.root / "report.json").read_text())
    assert rec["meta"]["config_hash"] and rec["meta"]["commit"]
    assert st.main(["--config", str(toml), "--list"]) == 0
    listing = capsys.readouterr().out
    assert "train/scratch_s1" in listing and "pending" in listing


_WORKER = (
    "import os, sys, time\n"
    "d, i, code = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
    "open(os.path.join(d, 'run_' + i), 'w').close()\n"
    "n = sum(x.startswith('run_') for x in os.listdir(d))\n"
    "open(os.path.join(d, 'seen_' + i), 'w').write(str(n))\n"
    "print('task', i, 'says hello')\n"
    "time.sleep(1.5)\n"
    "os.remove(os.path.join(d, 'run_' + i))\n"
    "sys.exit(code)\n")


def test_workers_run_tasks_side_by_side_and_report_their_exit_codes(tmp_path):
    import sys

    from rl.study import run_workers

    def cmds(codes):
        return {i: [sys.executable, "-c", _WORKER, str(tmp_path), str(i), str(c)]
                for i, c in enumerate(codes)}

    logs = tmp_path / "logs"
    assert run_workers(cmds([0, 0, 0, 0]), 2, logs, poll_s=0.05) == 0
    seen = [int((tmp_path / f"seen_{i}").read_text()) for i in range(4)]
    assert max(seen) == 2  # two at a time, never three
    assert "task 3 says hello" in (logs / "task_3.log").read_text()
    for f in tmp_path.glob("seen_*"):
        f.unlink()
    assert run_workers(cmds([0, 1, 0]), 3, logs, poll_s=0.05) == 1  # one failed
    for f in tmp_path.glob("seen_*"):
        f.unlink()
    # a preempted task: nothing new starts, the study exits 3 to be requeued
    assert run_workers(cmds([3, 0, 0]), 1, logs, poll_s=0.05) == 3
    assert (tmp_path / "seen_0").exists() and not (tmp_path / "seen_1").exists()
    for f in tmp_path.glob("seen_*"):
        f.unlink()
    # a str key (the shared units beside the tasks) starts first, with its own log
    both = {**cmds([0, 0]), "shared": cmds([0])[0]}
    assert run_workers(both, 1, logs, poll_s=0.05) == 0
    assert "task 0 says hello" in (logs / "shared.log").read_text()
    first = logs / "shared.log"
    assert first.stat().st_mtime <= (logs / "task_0.log").stat().st_mtime


def test_cli_workers_run_the_shared_units_here_and_the_pending_tasks_as_processes(
        tmp_path, monkeypatch, capsys):
    from rl import study as st

    toml = _fake_study_toml(tmp_path)  # the domain gap on: a shared unit no task needs
    for bad in (["--workers", "2", "--task", "1"], ["--workers", "0"]):
        assert st.main(["--config", str(toml), *bad]) == 2
        assert "rl.study: config error: --workers" in capsys.readouterr().err
    study = st.Study(load_study(toml), str(toml))
    for u in study.select(None, 2):  # task 2 (scratch_s1) is done already
        study.write_marker(u, "done", 0, 1.0)
    launched = {}

    def fake_pool(commands, workers, log_dir, poll_s=0.5, names=None):
        launched.update(commands=commands, workers=workers, log_dir=log_dir, names=names)
        return 0

    monkeypatch.setattr(st, "run_workers", fake_pool)
    stub = StubRunner()
    assert st.main(["--config", str(toml), "--workers", "2", "--set", "report.reps=300"],
                   runner=stub) == 0
    assert stub.calls == ["pretrain"]  # the shared unit the tasks need here, no task's unit
    tasks = sorted(k for k in launched["commands"] if isinstance(k, int))
    assert tasks == [0, 1, 3, 4, 5] and launched["workers"] == 2
    assert launched["names"][4] == "scratch_s2"
    # the domain gap, which no task needs, runs as a process beside the tasks
    assert launched["commands"]["shared"][-2:] == ["--stage", "gap"]
    assert launched["names"]["shared"] == "gap"
    cmd = launched["commands"][4]
    assert cmd[1:] == ["-m", "rl.study", "--config", str(toml), "--set", "report.reps=300",
                       "--task", "4"]
    assert (study.layout.root / "report.md").exists()  # the report, after the tasks
    only_eval = st.study_command("c.toml", [], {"evaluate"}, 3)
    assert only_eval[-4:] == ["--stage", "evaluate", "--task", "3"]
    assert {u.stage for u in study.select({"evaluate"}, 3)} == {"evaluate"}  # no training


_CACHE_PROBE = """
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from rl.study import use_compilation_cache

hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
print(use_compilation_cache(Path(sys.argv[1])))
x = jax.jit(lambda a: jnp.tanh(a @ a.T).sum())(jnp.ones((64, 64)))
print(len(hits), float(x))
"""


def test_the_study_shares_compiled_programs_between_processes(tmp_path):
    """rl.study's processes use JAX's persistent compilation cache (runs/<study>/jax_cache, or
    $JAX_COMPILATION_CACHE_DIR): a second process loads what the first compiled, and
    computes the same number."""
    import os
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(_CACHE_PROBE)
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    repo = Path(__file__).resolve().parents[1]

    def run(e):
        out = subprocess.run([sys.executable, str(script), str(tmp_path / "study")], env=e,
                             cwd=repo, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        folder, line = out.stdout.strip().splitlines()[-2:]
        hits, value = line.split()
        return folder, int(hits), value

    folder, hits, first = run(env)
    assert folder == str(tmp_path / "study" / "jax_cache") and hits == 0
    assert any(Path(folder).iterdir())
    folder2, hits2, second = run(env)
    assert folder2 == folder and hits2 >= 1 and second == first
    other = tmp_path / "elsewhere"
    folder3, hits3, _ = run({**env, "JAX_COMPILATION_CACHE_DIR": str(other)})
    assert folder3 == str(other) and hits3 == 0 and any(other.iterdir())


def test_a_field_added_at_its_default_keeps_the_units_hashes(tmp_path):
    """A config field declared with configlib.added (here env.speed_max) leaves the study's
    unit hashes as they were before it existed while it holds its default, so finished units
    stay done; set, it makes the units that use it stale."""
    import dataclasses

    from etl import configlib
    from rl import study as study_mod

    @dataclasses.dataclass(frozen=True)
    class Old:
        a: int = 1

    @dataclasses.dataclass(frozen=True)
    class New:
        a: int = 1
        b: float = configlib.added(3.5, "2026-12-06")

    assert configlib.identity_dict(New()) == configlib.to_dict(Old()) == {"a": 1}
    assert configlib.identity_dict(New(b=2.0)) == {"a": 1, "b": 2.0}
    assert configlib.to_dict(New()) == {"a": 1, "b": 3.5}

    cfg = load_study(STUDIES[0], [f"runs_dir={tmp_path}"])
    st = study_mod.Study(cfg)
    unit = st.by_name["train/scratch_s0"]
    rl = configlib.to_dict(st.arm_cfgs[("scratch", 0)])
    from rl.config import EnvConfig, ModelConfig

    for section, dc, known in (("env", EnvConfig, {"speed_max", "stall_penalty"}),
                               ("model", ModelConfig, {"proprio", "feature_norm", "pooling"})):
        later = {f.name: f.default for f in dataclasses.fields(dc)
                 if configlib.ADDED in f.metadata}
        assert known <= set(later)
        for k, default in later.items():  # the config as it was before those fields existed;
            if rl[section][k] == default:  # a field the study sets stays in the hash
                del rl[section][k]
    needs = [st.unit_hash(st.by_name[n]) for n in unit.needs]
    assert st.unit_hash(unit) == study_mod._hash({"config": rl, "needs": needs})
    capped = dataclasses.replace(cfg, rl=dataclasses.replace(
        cfg.rl, set=(*cfg.rl.set, "env.speed_max=3.0")))
    st2 = study_mod.Study(capped)
    assert st2.unit_hash(st2.by_name["train/scratch_s0"]) != st.unit_hash(unit)


def test_the_number_of_etl_workers_leaves_every_hash_as_it_was(tmp_path):
    """data.etl_workers (etl.synth's and etl.build's processes) changes how fast the data
    units run, not what they write: no unit goes stale when it changes."""
    from rl.study import Study

    one = Study(_tiny_study(tmp_path, "data.kind='synthetic'", "data.synth_drives=4",
                            f"data.raw='{tmp_path}/raw'", f"data.cache='{tmp_path}/cache'"))
    two = Study(_tiny_study(tmp_path, "data.kind='synthetic'", "data.synth_drives=4",
                            f"data.raw='{tmp_path}/raw'", f"data.cache='{tmp_path}/cache'",
                            "data.etl_workers=2"))
    assert [u.name for u in one.units][:2] == ["data/synth", "data/etl"]
    assert [one.unit_hash(u) for u in one.units] == [two.unit_hash(u) for u in two.units]
    more = Study(_tiny_study(tmp_path, "data.kind='synthetic'", "data.synth_drives=5",
                             f"data.raw='{tmp_path}/raw'", f"data.cache='{tmp_path}/cache'"))
    assert one.unit_hash(one.units[0]) != more.unit_hash(more.units[0])  # what it writes


def test_a_track_pool_is_built_once_before_any_arm_trains(tmp_path, monkeypatch):
    """With env.track_pool the study's ``tracks`` unit builds every map its runs and
    evaluations use (the pool, env.track, each condition's), before any training, and every
    training needs it; without a pool there is no such unit (the CPU study's units stay as
    they were)."""
    from rl.study import LocalRunner, Study

    plain = Study(_tiny_study(tmp_path))
    assert "tracks" not in plain.by_name
    assert all("tracks" not in u.needs for u in plain.units)
    cpu = Study(load_study(STUDIES[0], [f"runs_dir={tmp_path}"]))
    assert "tracks" not in cpu.by_name

    pool = ["rl.set=['env.track_pool=\"procedural:1-2\"', 'env.pool_size=2', "
            "'env.pool_slot_m=48.0']"]
    study = Study(_tiny_study(tmp_path, *pool))
    names = [u.name for u in study.units]
    assert names.index("tracks") < names.index("pretrain")
    trains = [u for u in study.units if u.stage == "train"]
    assert trains and all("tracks" in u.needs for u in trains)
    assert study.by_name["train/scratch_s0"].needs == ("pretrain", "tracks")
    from rl.study_config import prebuilt_tracks

    assert prebuilt_tracks(study.cfg, study.base) == (
        "procedural:0", "procedural:1", "procedural:2", "procedural:wide:900")
    # another pool: the unit, and every training after it, runs again
    other = Study(_tiny_study(tmp_path, pool[0].replace("1-2", "1-3")))
    assert other.unit_hash(other.by_name["tracks"]) != study.unit_hash(study.by_name["tracks"])
    assert (other.unit_hash(other.by_name["train/scratch_s0"])
            != study.unit_hash(study.by_name["train/scratch_s0"]))

    # the runner builds them into the cache (here a fresh one), and says which one failed;
    # one worker, in this process: a fork of a pytest worker that ran JAX can hang
    import rl.tracks.__main__ as tracks_cli

    monkeypatch.setattr(tracks_cli, "available_cores", lambda: 1)
    monkeypatch.setenv("RACEFORMER_CACHE", str(tmp_path / "cache"))
    assert study.execute(study.select({"tracks"}), LocalRunner()) == 0
    built = sorted(p.name for p in (tmp_path / "cache").rglob("*.yml"))
    assert len(built) == 4, built
    monkeypatch.setattr(tracks_cli, "_build", _build_all_but_procedural_2)
    broken = Study(_tiny_study(tmp_path, pool[0].replace("1-2", "2-3")))
    assert broken.execute(broken.select({"tracks"}), LocalRunner()) == 1
    err = broken.marker("tracks")["error"]
    assert "1 of 4 tracks failed" in err and "procedural:2" in err


def _build_all_but_procedural_2(name: str):
    """rl.tracks' per-track builder as if procedural:2's maps could not be built."""
    return (name, "ValueError: broken", 0.0) if name == "procedural:2" else (name, None, 0.0)
