"""rl.domain_gap: the statistics against hand-checked values, the simulator's samples through the
policy's seam, and the command end to end on a miniature cache and checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rl import domain_gap as dg


def test_frechet_distance_hand_checked():
    # 1-D: (μa − μb)² + (σa − σb)², with the sample (ddof 1) variances np.cov uses
    a = np.array([[-1.0], [0.0], [1.0]])  # mean 0, var 1
    b = np.array([[0.0], [2.0], [4.0]])  # mean 2, var 4
    assert dg.frechet_distance(a, b) == pytest.approx(4.0 + (1.0 - 2.0) ** 2)
    assert dg.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # a rotation of both sets leaves it unchanged; a shift of one adds |shift|² exactly
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, 3)), rng.normal(size=(300, 3)) @ np.diag([2.0, 1.0, 0.5])
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    d = dg.frechet_distance(x, y)
    assert dg.frechet_distance(x @ q, y @ q) == pytest.approx(d, rel=1e-9)
    shift = np.array([1.0, -2.0, 0.5])
    moved = dg.frechet_distance(x, y + shift - (y.mean(0) - x.mean(0)))
    assert moved == pytest.approx(d - np.sum((x.mean(0) - y.mean(0)) ** 2) + shift @ shift,
                                  rel=1e-9)


def test_standardised_mean_difference_hand_checked():
    a = np.array([[0.0, 0.0], [2.0, 0.0]])  # means (1, 0), vars (1, 0)
    b = np.array([[2.0, 1.0], [4.0, 3.0]])  # means (3, 2), vars (1, 1)
    # dim 0: |1 − 3| / 1 = 2; dim 1: |0 − 2| / sqrt(0.5) = 2.828…
    assert dg.standardised_mean_difference(a, b) == pytest.approx((2.0 + 2.0 / np.sqrt(0.5)) / 2)


def test_domain_classifier_tells_shifted_sets_apart_and_not_identical_ones():
    rng = np.random.default_rng(1)
    n = 200
    groups = np.array([f"g{i // 10}" for i in range(2 * n)])
    y = np.r_[np.zeros(n), np.ones(n)]
    same = rng.normal(size=(2 * n, 4))
    shifted = same + y[:, None] * np.array([3.0, 0, 0, 0])
    # the Bayes accuracy of two unit Gaussians 3 apart: Phi(1.5) = 0.933
    assert 0.90 < dg.domain_accuracy(shifted, y, groups) < 0.97
    assert 0.35 < dg.domain_accuracy(same, y, groups) < 0.65


def test_group_interval_resamples_whole_groups():
    values = np.array([1.0, 1.0, 3.0, 3.0])
    groups = np.array(["a", "a", "b", "b"])
    d = dg.group_interval(values, groups, n_boot=200, seed=0)
    assert d["estimate"] == pytest.approx(2.0) and d["n_units"] == 2
    assert d["low"] == pytest.approx(1.0) and d["high"] == pytest.approx(3.0)


def test_restrict_marks_the_other_modalities_absent_and_zero():
    from etl.schema import MODALITY_INDEX
    from tests._train_fixtures import TINY_PRE, random_sample
    from train import data as datalib

    rng = np.random.default_rng(0)
    samples = [random_sample(rng, TINY_PRE, i) for i in range(3)]
    batch = {k: np.stack([s[k] for s in samples]) for k in datalib.MODEL_KEYS}
    batch["present"][:] = 1
    out = dg.restrict(batch, ("lidar", "imu"))
    for m, i in MODALITY_INDEX.items():
        keep = m in ("lidar", "imu")
        assert (out["present"][:, i] == (1 if keep else 0)).all(), m
        if m in out:
            assert np.array_equal(out[m], batch[m]) if keep else not out[m].any(), m
    assert batch["present"].all()  # the input is left as it was


def test_simulator_samples_come_through_the_policy_seam():
    from etl.schema import MODALITY_INDEX, sample_spec
    from tests._train_fixtures import TINY_PRE

    batch, tracks = dg.sim_samples(["procedural:0"], TINY_PRE, 4, world_scale=2.0, warmup=5)
    spec = sample_spec(TINY_PRE)
    assert list(tracks) == ["procedural:0"] * 4
    assert batch["lidar"].shape == (4, *spec["lidar"].shape)
    assert (batch["lidar"][..., 0] > 0).any(axis=(1, 2)).all()  # every scan hit a wall
    for m in ("lidar", "imu", "gps"):
        assert (batch["present"][:, MODALITY_INDEX[m]] == 1).all(), m
    for m in ("radar", "rgb", "ir"):
        assert (batch["present"][:, MODALITY_INDEX[m]] == 0).all(), m
    # a level car's accelerometer reads gravity's specific force on z
    assert np.allclose(batch["imu"][:, 5], 9.81, atol=3.0)
    # independent random starts: the scans differ
    assert not np.array_equal(batch["lidar"][0], batch["lidar"][1])


def test_domain_gap_cli_writes_the_report(tmp_path, capsys):
    from tests._train_fixtures import TINY_PRE, untrained_checkpoint
    from tests.test_probe import _cache

    members = [(f"d{i}", "val" if i >= 3 else "train") for i in range(6)]
    data = _cache(tmp_path / "cache", TINY_PRE, members, 6)
    untrained_checkpoint(tmp_path / "runs", data)
    out = tmp_path / "gap"
    common = ["--ckpt", str(tmp_path / "runs" / "r"), "--tracks", "procedural:0",
              "--samples", "12", "--warmup", "3", "--world-scale", "2", "--boot", "50",
              "--mask-draws", "1", "--block", "3", "--batch-size", "4"]
    assert dg.main([*common, "--out", str(out)]) == 0
    rep = json.loads((out / "domain_gap.json").read_text())
    assert rep["n_etl"] == 12 and rep["n_etl_groups"] == 3 and rep["n_sim"] == 12
    assert rep["modalities"] == ["lidar", "imu"]
    for name in ("pretrained", "random_init"):
        m = rep["models"][name]
        for dom in ("etl", "sim"):
            for k in ("recon_mse", "recon_relative", "token_norm"):
                d = m[dom][k]
                assert d["low"] <= d["estimate"] <= d["high"], (name, dom, k)
        assert m["frechet_sim_vs_etl"] >= 0 and 0.0 <= m["domain_classifier_accuracy"] <= 1.0
        assert m["frechet_ratio"] == pytest.approx(
            m["frechet_sim_vs_etl"] / m["frechet_etl_train_vs_heldout"])
    assert rep["inputs"]["sim"]["occupied_fraction"] > 0
    md = (out / "domain_gap.md").read_text()
    assert "bev_side_by_side.png" in md and "What this shows, and what not" in md
    assert (out / "bev_side_by_side.png").is_file()
    # a modality the simulator cannot give: one line, exit 2, nothing written
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert dg.main([*common, "--modalities", "lidar,rgb", "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "rgb" in err and len(err.splitlines()) == 1 and not bad.exists()
