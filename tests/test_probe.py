"""The linear probes (train.probe, train.probe_fit): solved to the optimum, tuned without the
test labels, standardised with train statistics, on unmasked tokens, split by drive, with
hand-checked bootstrap intervals, and the free-space target."""

from __future__ import annotations

import json

import numpy as np
import pytest

from train import probe_fit as pf


# --------------------------------------------------------------------------- the solvers
def _ill_conditioned(n=3000, d=12, seed=0, spread=4):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d))
    logits = z @ rng.normal(size=d) * 1.5 - 1.0
    y = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(float)
    # mix the columns so that they are strongly correlated (condition number 10^(2·spread)
    # of XᵀX)
    u, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mix = u @ np.diag(np.logspace(0, -spread, d)) @ u.T
    return z @ mix, y


def test_logistic_is_solved_to_the_optimum_on_ill_conditioned_features():
    x, y = _ill_conditioned()
    st = pf.Standardizer.fit(x)
    w = pf.fit_logistic(st(x), y, lam=1e-6)
    g = pf.logistic_gradient(w, st(x), y, 1e-6)
    assert np.abs(g).max() < 1e-8
    # the optimum: no direction lowers the objective
    f0 = pf.logistic_objective(w, st(x), y, 1e-6)
    rng = np.random.default_rng(1)
    for _ in range(20):
        assert pf.logistic_objective(w + 1e-3 * rng.normal(size=w.shape), st(x), y, 1e-6) > f0


def test_logistic_probe_predictions_do_not_depend_on_how_the_features_are_mixed():
    """A linear probe solved to the optimum predicts the same through any invertible linear map
    of the features (a probe stopped early scores the conditioning instead)."""
    x, y = _ill_conditioned(seed=2, spread=2)  # weights ~1e2: a 1e-10 penalty is negligible
    rng = np.random.default_rng(3)
    a = rng.normal(size=(x.shape[1], x.shape[1]))
    p = []
    for feats in (x, x @ a):
        st = pf.Standardizer.fit(feats)
        w = pf.fit_logistic(st(feats), y, lam=1e-10)
        p.append(pf.predict_logistic(w, st(feats)))
    np.testing.assert_allclose(p[0], p[1], atol=1e-4)


def test_features_are_standardised_with_the_training_statistics():
    """Rescaling and shifting a feature (train and test alike) changes nothing: the probe
    standardises with the fitting rows' mean and std, and the test rows reuse them."""
    x, y = _ill_conditioned(seed=4)
    groups = np.arange(len(y)) // 300
    scale = np.logspace(-4, 4, x.shape[1])
    shift = np.linspace(-1e3, 1e3, x.shape[1])
    fits = [pf.cv_logistic(f, y, groups, k=3) for f in (x, x * scale + shift)]
    xt = x[:200]
    np.testing.assert_allclose(fits[0].predict(xt), fits[1].predict(xt * scale + shift),
                               atol=1e-6)
    assert fits[0].lam == fits[1].lam and fits[0].threshold == pytest.approx(fits[1].threshold)
    st = pf.Standardizer.fit(x[:100])
    np.testing.assert_allclose(st(x[:100]).mean(0), 0, atol=1e-9)
    assert not np.allclose(st(x[100:]).mean(0), 0, atol=1e-3)  # test rows keep train stats


def test_ridge_path_matches_the_normal_equations():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 5)), rng.normal(size=(200, 3))
    w, b = pf.fit_ridge(x, y, 0.1)
    xc, yc = x - x.mean(0), y - y.mean(0)
    w_ref = np.linalg.solve(xc.T @ xc / 200 + 0.1 * np.eye(5), xc.T @ yc / 200)
    np.testing.assert_allclose(w, w_ref, atol=1e-10)
    np.testing.assert_allclose(b, y.mean(0) - x.mean(0) @ w_ref, atol=1e-10)


def test_best_iou_threshold_is_the_best_cut():
    rng = np.random.default_rng(0)
    p, y = rng.random(400), rng.random(400) < 0.3
    p = np.where(y, p + 0.3, p)
    t, score = pf.best_iou_threshold(p, y)
    brute = max(pf.iou(p > c, y) for c in np.unique(p))
    assert score == pytest.approx(brute) and pf.iou(p > t, y) == pytest.approx(brute)


def test_group_folds_keep_groups_whole():
    groups = np.repeat(["d0", "d1", "d2", "d3", "d4"], 7)
    folds = pf.group_folds(groups, k=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(35))
    for f in folds:
        inside = set(groups[f].tolist())
        outside = set(np.delete(groups, f).tolist())
        assert not inside & outside
    with pytest.raises(pf.ProbeFitError, match="at least 2 groups"):
        pf.group_folds(["a"] * 5)


# --------------------------------------------------------------------------- the bootstrap
def test_paired_bootstrap_hand_checked():
    """Two units. a: (I, U) = (1, 2) and (3, 4); b: (1, 4) twice. Resampling two units gives
    {0,0} (1/4), {0,1} or {1,0} (1/2), {1,1} (1/4): IoU(a) − IoU(b) = 0.25, 4/6 − 0.25 or 0.5;
    so the estimate is 4/6 − 1/4 and the 95 % interval [0.25, 0.5]."""
    iou_of = pf.iou_of
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[1.0, 4.0], [1.0, 4.0]])
    ci = pf.paired_bootstrap(lambda i: iou_of(a[i]) - iou_of(b[i]), 2, n_boot=4000, seed=0)
    assert ci["estimate"] == pytest.approx(4 / 6 - 0.25)
    assert ci["low"] == pytest.approx(0.25) and ci["high"] == pytest.approx(0.5)
    same = pf.paired_bootstrap(lambda i: iou_of(a[i]) - iou_of(a[i]), 2, n_boot=100)
    assert same["low"] == same["high"] == 0.0


def test_bootstrap_units_are_drives_or_frame_blocks():
    drives = np.repeat([f"d{i}" for i in range(5)], 4)
    u, kind = pf.unit_ids(drives, np.tile(np.arange(4), 5), min_drives=5)
    assert kind == "drive" and len(set(u.tolist())) == 5
    u, kind = pf.unit_ids(np.repeat(["a", "b"], 25), np.tile(np.arange(25), 2), block=10)
    assert kind.startswith("block") and len(set(u.tolist())) == 6  # 3 blocks per drive
    assert len(set(u[:10].tolist())) == 1  # frames 0–9 of a drive: one unit


# --------------------------------------------------------------------------- targets
def test_distance_targets_measure_to_the_nearest_obstacle_cell():
    from etl.config import BEVGrid
    from train.probe import distance_targets, obstacle_cells

    grid = BEVGrid(x_min=-8, x_max=8, y_min=-8, y_max=8, resolution=0.5)  # 32×32
    bev = np.zeros((2, 32, 32, 2), np.float32)
    tall = (-1.0 - grid.z_min) / (grid.z_max - grid.z_min)  # a return 1 m below the sensor
    road = (-1.8 - grid.z_min) / (grid.z_max - grid.z_min)  # the road surface
    bev[0, 10, 12] = (0.5, tall)
    bev[0, :, 0] = (0.5, road)  # ground returns: not obstacles
    bev[1, :, :] = (0.5, road)  # only road: no obstacle at all
    assert obstacle_cells(bev, grid, -1.3)[0].sum() == 1
    d = distance_targets(bev, grid, patch=8, obstacle_z=-1.3, max_dist=6.0)
    assert d.shape == (2, 16, 64)
    # back to the grid (patchify's layout) and compare with the exact distance
    full = d[0].reshape(4, 4, 8, 8).transpose(0, 2, 1, 3).reshape(32, 32)
    r, c = np.mgrid[0:32, 0:32]
    exact = np.minimum(0.5 * np.hypot(r - 10, c - 12), 6.0)
    np.testing.assert_allclose(full, exact, atol=0.02)
    assert (d[1] == 6.0).all()


def test_occupancy_targets_pool_vehicle_boxes_to_patches():
    from etl.config import BEVGrid
    from etl.schema import BOX_CLASSES
    from train.probe import occupancy_targets

    grid = BEVGrid(x_min=-8, x_max=8, y_min=-8, y_max=8, resolution=0.5)
    boxes = np.zeros((1, 2, 7), np.float32)
    boxes[0, 0] = [6.0, 6.0, 0, 2.0, 2.0, 1.5, 0.0]  # a car in the front-left corner
    boxes[0, 1] = [-6.0, -6.0, 0, 2.0, 2.0, 1.5, 0.0]  # a pedestrian: not a vehicle
    cls = np.array([[BOX_CLASSES.index("Car"), BOX_CLASSES.index("Pedestrian")]], np.int32)
    occ = occupancy_targets(boxes, cls, grid, patch=8).reshape(4, 4)
    assert occ[0, 0] == 1 and occ.sum() == 1


# --------------------------------------------------------------------------- run_probes
def _split(name, drives, frames_per, rng, w_occ, w_dist, d=6, p=4, cells=9):
    from train.probe import ProbeSplit

    n = len(drives) * frames_per
    x = rng.normal(size=(n, p, d)).astype(np.float32)
    occ = (x @ w_occ + 0.5 * rng.normal(size=(n, p)) > 1.0).astype(np.float32)
    dist = (x @ w_dist + rng.normal(size=(n, p, cells))).astype(np.float32)
    noise = rng.normal(size=(n, p, d)).astype(np.float32)
    return ProbeSplit(
        name=name, feats={"good": x, "noise": noise, "raw_bev_patch": x[..., :2]}, occ=occ,
        labelled=np.ones(n, bool), dist=dist, drive=np.repeat(drives, frames_per),
        frame=np.tile(np.arange(frames_per), len(drives)), examples={"index": np.array([])})


def test_test_labels_choose_neither_the_regularisation_nor_the_threshold():
    from train.probe import run_probes

    rng = np.random.default_rng(0)
    w_occ, w_dist = rng.normal(size=6), rng.normal(size=(6, 9))
    train = _split("train", [f"t{i}" for i in range(6)], 20, rng, w_occ, w_dist)
    test = _split("val", [f"v{i}" for i in range(5)], 20, rng, w_occ, w_dist)
    rep, _ = run_probes(train, test, ["good", "noise"], folds=3, n_boot=200,
                        references=[("good", "noise")])
    flipped = _split("val", [f"v{i}" for i in range(5)], 20, rng, w_occ, w_dist)
    flipped.feats = test.feats
    flipped.occ = 1.0 - test.occ  # the opposite labels
    flipped.dist = -test.dist
    rep2, _ = run_probes(train, flipped, ["good", "noise"], folds=3, n_boot=200,
                         references=[("good", "noise")])
    for name in ("good", "noise"):
        for probe, keys in (("occupancy", ("threshold", "lambda")), ("free_space", ("lambda",))):
            for k in keys:
                assert rep[probe][name][k] == rep2[probe][name][k], (probe, name, k)
    assert rep["occupancy"]["good"]["iou"] != rep2["occupancy"]["good"]["iou"]
    # the informative features beat the noise, with an interval that excludes zero
    diff_occ = rep["occupancy"]["differences"]["good - noise"]
    diff_fs = rep["free_space"]["differences"]["good - noise"]
    assert diff_occ["iou"]["low"] > 0
    assert diff_fs["r2"]["low"] > 0 and diff_fs["mae_m"]["high"] < 0
    assert rep["bootstrap"]["unit"] == "drive" and rep["bootstrap"]["n_units"] == 5


def test_a_test_split_sharing_a_drive_is_refused():
    from train.probe import ProbeError, check_disjoint

    rng = np.random.default_rng(0)
    w_occ, w_dist = rng.normal(size=6), rng.normal(size=(6, 9))
    train = _split("train", ["a", "b"], 5, rng, w_occ, w_dist)
    test = _split("val", ["b", "c"], 5, rng, w_occ, w_dist)
    with pytest.raises(ProbeError, match=r"share 1 drive\(s\) \(e\.g\. b\).*output\.split=drive"):
        check_disjoint(train, test, "cache")


# --------------------------------------------------------------------------- the model side
def test_probe_tokens_are_every_lidar_patch_of_the_unmasked_input():
    import jax
    from flax import nnx

    from tests._train_fixtures import TINY_PRE, random_sample
    from train import data as datalib
    from train.config import ModelConfig
    from train.mae import MultimodalMAE
    from train.probe import token_fn

    cfg = ModelConfig(embed_dim=16, depth=1, num_heads=2, patch_size=8, fusion_depth=1,
                      decoder_dim=16, decoder_depth=1, decoder_heads=2,
                      modalities=("lidar", "imu"))
    model = MultimodalMAE(cfg, TINY_PRE, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    s = [random_sample(rng, index=i) for i in range(2)]
    batch = {k: np.stack([x[k] for x in s]) for k in datalib.MODEL_KEYS}
    feats = token_fn(model)(batch)
    n_lidar = model.layout["lidar"].n_patches
    assert feats.shape == (2, n_lidar, 16)  # every patch: nothing masked at probe time
    tokens = jax.jit(lambda b: model.encode(b)[0])(batch)
    np.testing.assert_allclose(feats, np.asarray(tokens[:, model.token_layout()["lidar"]]),
                               atol=1e-5)
    alone = token_fn(model, modalities=("lidar",))(batch)  # the imu is fused in, or not
    assert alone.shape == feats.shape and not np.allclose(alone, feats)


# --------------------------------------------------------------------------- end to end
def _cache(out, pre, members, frames):
    """A miniature etl.build output with drive/frame meta; ``members``: (drive, split) pairs."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from etl import codec, configlib
    from etl.config import ETLConfig
    from etl.schema import SCHEMA_VERSION
    from tests._train_fixtures import random_sample

    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split in ("train", "val"):
        path = f"{split}-00000.array_record"
        w = ArrayRecordWriter(str(out / path), "group_size:1")
        count = 0
        for d in [d for d, s in members if s == split]:
            for f in range(frames):
                s = random_sample(rng, pre, count)
                w.write(codec.encode(s, meta={"drive": d, "frame": f, "time": f * 0.1}))
                count += 1
        w.close()
        splits[split] = {"shards": [{"path": path, "count": count}], "samples": count}
    manifest = {"schema_version": SCHEMA_VERSION, "codec_version": codec.CODEC_VERSION,
                "config": configlib.to_dict(ETLConfig(preprocess=pre)), "splits": splits}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_probe_cli_writes_the_report(tmp_path, capsys):
    from tests._train_fixtures import TINY_PRE, untrained_checkpoint
    from train import probe

    members = [(f"d{i}", "val" if i >= 4 else "train") for i in range(7)]
    data = _cache(tmp_path / "cache", TINY_PRE, members, 12)
    # a checkpoint of a freshly initialised model (the probe does not care how it was trained;
    # training it here would only add a compilation)
    untrained_checkpoint(tmp_path / "runs", data)
    out = tmp_path / "rep"
    rc = probe.main(["--ckpt", str(tmp_path / "runs" / "r"), "--boot", "50", "--folds", "2",
                     "--out", str(out), "--batch-size", "4"])
    assert rc == 0
    rep = json.loads((out / "probe.json").read_text())
    assert rep["test"]["drives"] == 3 and rep["train"]["drives"] == 4
    for probe_name, metric in (("occupancy", "iou"), ("free_space", "r2")):
        for of in ("pretrained - random_init", "pretrained+pos - random_init+pos"):
            d = rep[probe_name]["differences"][of][metric]
            assert d["low"] <= d["estimate"] <= d["high"]
        for n in ("pretrained", "random_init", "raw_bev_pca", "pretrained+pos"):
            assert np.isfinite(rep[probe_name][n][metric])
    md = (out / "probe.md").read_text()
    assert "pretrained - random_init" in md and "recon_lidar.png" in md
    assert (out / "recon_lidar.png").is_file() and (out / "probe_examples.png").is_file()
    # a test split that shares a drive with the train split: one line, exit 1
    bad = _cache(tmp_path / "c2", TINY_PRE, [*members, ("d0", "val")], 12)
    capsys.readouterr()
    rc = probe.main(["--ckpt", str(tmp_path / "runs" / "r"), "--data", str(bad), "--boot", "20",
                     "--out", str(tmp_path / "rep2"), "--batch-size", "4"])
    err = capsys.readouterr().err
    assert rc == 1 and "share 1 drive(s) (e.g. d0)" in err and "output.split=drive" in err


def test_position_features_append_the_patch_index_to_every_set():
    from train.probe import add_position

    rng = np.random.default_rng(0)
    w_occ, w_dist = rng.normal(size=6), rng.normal(size=(6, 9))
    train = _split("train", ["a", "b"], 3, rng, w_occ, w_dist)
    names = add_position([train], ["good", "noise"])
    assert names == ["good+pos", "noise+pos"]
    f = train.feats["good+pos"]
    assert f.shape == (6, 4, 6 + 4)
    np.testing.assert_array_equal(f[..., :6], train.feats["good"])
    np.testing.assert_array_equal(f[2, :, 6:], np.eye(4))


def test_pca_baseline_is_as_wide_as_the_tokens_and_fitted_on_train():
    from train.probe import add_pca_baseline

    rng = np.random.default_rng(0)
    w_occ, w_dist = rng.normal(size=6), rng.normal(size=(6, 9))
    train = _split("train", ["a", "b"], 10, rng, w_occ, w_dist)
    test = _split("val", ["c"], 10, rng, w_occ, w_dist)
    raw = rng.normal(size=(20, 4, 12)) @ rng.normal(size=(12, 12))
    train.feats["raw_bev_patch"], test.feats["raw_bev_patch"] = raw, raw[:10] + 5.0
    add_pca_baseline(train, test, dim=3)
    x = train.feats["raw_bev_pca"].reshape(-1, 3).astype(np.float64)
    assert "raw_bev_patch" not in train.feats and test.feats["raw_bev_pca"].shape == (10, 4, 3)
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
    cov = np.cov(x.T)
    np.testing.assert_allclose(cov - np.diag(np.diag(cov)), 0, atol=1e-3)  # decorrelated
    assert np.all(np.diff(np.diag(cov)) <= 1e-6)  # leading components first
    # the test rows are projected with the train mean (not re-centred)
    assert abs(test.feats["raw_bev_pca"].mean()) > 0.1 or not np.allclose(
        test.feats["raw_bev_pca"], train.feats["raw_bev_pca"][:10])


def test_data_note_says_synthetic_only_when_the_synth_truth_is_there(tmp_path):
    from train.probe import data_note

    raw = tmp_path / "raw"
    (raw / "drive_a" / "x").mkdir(parents=True)
    cache = tmp_path / "cache"
    cache.mkdir()
    drives = {"drive_a/x": {"path": str(raw / "drive_a" / "x")}}
    from etl import codec
    from etl.schema import SCHEMA_VERSION

    (cache / "manifest.json").write_text(json.dumps(
        {"drives": drives, "splits": {}, "schema_version": SCHEMA_VERSION,
         "codec_version": codec.CODEC_VERSION}))
    assert data_note(str(cache)) == "recorded drives"
    (raw / "_truth" / "drive_a").mkdir(parents=True)
    (raw / "_truth" / "drive_a" / "x.json").write_text("{}")
    assert data_note(str(cache)) == "synthetic drives (etl.synth)"
