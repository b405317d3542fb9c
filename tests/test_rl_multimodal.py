"""The multimodal policy: Phase-1 checkpoint → encoders in PPO, frozen or not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_fixtures import TINY_PRE, random_sample, write_shards
from flax import nnx

from etl import configlib
from rl.config import load_config

PRETRAIN_TOML = """\
run_name = "phase1"
runs_dir = "{runs}"
[model]
embed_dim = 16
depth = 1
num_heads = 2
patch_size = 8
fusion_depth = 1
decoder_dim = 16
decoder_depth = 1
decoder_heads = 2
modalities = ["lidar", "radar", "gps", "imu"]
[training]
batch_size = 4
steps = 2
warmup_steps = 1
log_every = 1
ckpt_every = 2
image_metrics_every = 0
progress = false
[data]
path = "{data}"
read_threads = 1
prefetch = 4
"""


@pytest.fixture(scope="module")
def phase1(tmp_path_factory):
    from train import pretrain

    tmp = tmp_path_factory.mktemp("phase1")
    data = write_shards(tmp / "data", n_train=8, n_val=4, shards=1)
    cfg = tmp / "pretrain.toml"
    cfg.write_text(PRETRAIN_TOML.format(runs=tmp / "runs", data=data))
    assert pretrain.main(["--config", str(cfg)]) == 0
    return tmp / "runs/phase1/ckpt"


def _rl_cfg(tmp_path, ckpt, *extra):
    return load_config(
        None,
        [
            f"runs_dir='{tmp_path}'", "run_name='mm'", "model.policy='multimodal'",
            "finetune.init='pretrained'", f"finetune.pretrained_ckpt='{ckpt}'",
            "model.hidden=[16]", "ppo.num_envs=4", "ppo.num_steps=4", "ppo.num_minibatches=2",
            "ppo.update_epochs=1", "ppo.total_timesteps=16", "env.time_limit=2.0",
            "env.track='procedural:0'", *extra,
        ],
    )  # fmt: skip


def _encode(model, batch, modalities):
    tokens, valid = model.encode(batch, modalities)
    return np.asarray(tokens, np.float32), np.asarray(valid)


def test_pretrained_encoders_load_and_stay_frozen(tmp_path, phase1):
    from rl.factory import make_agent, make_runner
    from train.pretrain import load_trained

    phase1_model, _, pre, _ = load_trained(phase1)
    assert pre == TINY_PRE
    cfg = _rl_cfg(tmp_path, phase1)
    model, featurize, trainable = make_agent(cfg, 0)
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(np.stack([random_sample(rng, pre, i)[k] for i in range(2)]))
             for k in random_sample(rng, pre)}  # fmt: skip
    mods = ("lidar", "gps", "imu")
    a = _encode(phase1_model, batch, mods)
    b = _encode(model.mae, batch, mods)
    np.testing.assert_array_equal(a[0], b[0])  # the same encoder outputs as Phase 1
    np.testing.assert_array_equal(a[1], b[1])

    runner = make_runner(cfg)
    state = runner.init(jax.random.PRNGKey(cfg.seed))
    enc_before = jax.tree.map(np.asarray, nnx.state(runner.model(state).mae, nnx.Param))
    head_before = np.asarray(runner.model(state).policy.mlp.out.kernel[...]).copy()
    state, metrics = runner.run(state, 1)
    after = runner.model(state)
    enc_after = jax.tree.map(np.asarray, nnx.state(after.mae, nnx.Param))
    for x, y in zip(jax.tree.leaves(enc_before), jax.tree.leaves(enc_after), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(np.asarray(after.policy.mlp.out.kernel[...]), head_before)
    paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)
    ]
    assert paths and not any("mae" in p for p in paths)  # no optimizer state for the encoders
    assert np.isfinite(metrics["loss/total"]).all()
    # the adapter's sample matches the contract the encoders were pretrained on
    obs = {"lidar": jnp.full((1080,), 3.0), "pose": jnp.zeros(6), "velocity": jnp.zeros(6),
           "acceleration": jnp.zeros(6), "time": jnp.zeros(1)}  # fmt: skip
    sample = featurize(obs)
    assert sample["lidar"].shape == (*pre.lidar.shape, 2)
    assert int(sample["present"][0]) == 1 and int(sample["present"][1]) == 0  # radar absent


def test_unfrozen_finetuning_trains_encoders_not_decoder(tmp_path, phase1):
    from rl.factory import make_agent

    cfg = _rl_cfg(tmp_path, phase1, "finetune.freeze_encoders=false")
    model, _, trainable = make_agent(cfg, 0)
    trained = nnx.state(model, trainable)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trained)]
    assert any("encoders" in p for p in paths) and any("fusion" in p for p in paths)
    assert not any("decoder" in p for p in paths)


def test_multimodal_config_errors(tmp_path, phase1):
    from rl.factory import make_agent

    cfg = _rl_cfg(tmp_path, phase1, "finetune.absent='token'")
    with pytest.raises(configlib.ConfigError, match="finetune.absent"):
        make_agent(cfg, 0)
    with pytest.raises(configlib.ConfigError, match="needs env.camera"):
        _rl_cfg(tmp_path, phase1, "model.modalities=['lidar', 'rgb']")


# ---------------------------------------------------------------- frozen features, reused
def _raw_obs(rng, n):
    """n random raw observations of the JAX backend (a batch of racecar_gym's dict)."""
    return {"lidar": jnp.asarray(rng.uniform(0.3, 16.0, (n, 1080)), jnp.float32),
            "pose": jnp.asarray(rng.normal(size=(n, 6)), jnp.float32),
            "velocity": jnp.asarray(rng.normal(size=(n, 6)), jnp.float32),
            "acceleration": jnp.asarray(rng.normal(size=(n, 6)), jnp.float32),
            "time": jnp.zeros((n, 1))}  # fmt: skip


def _minibatch(rng, n):
    """A PPO minibatch of n samples but for its observations."""
    return {"action": jnp.asarray(rng.normal(size=(n, 2)), jnp.float32),
            "log_prob": jnp.asarray(rng.normal(-2.0, 0.5, n), jnp.float32),
            "value": jnp.asarray(rng.normal(size=n), jnp.float32),
            "adv": jnp.asarray(rng.normal(size=n), jnp.float32),
            "ret": jnp.asarray(rng.normal(size=n), jnp.float32)}  # fmt: skip


@pytest.mark.parametrize(("tokens", "proprio", "pooling"),
                         [(0, "none", "mean"), (5, "none", "mean"), (5, "planar", "mean"),
                          (0, "none", "grid"), (5, "planar", "grid")])
def test_reused_frozen_features_give_the_same_loss_and_gradients(tmp_path, phase1, tokens,
                                                                  proprio, pooling):
    """The PPO loss of the heads on features computed once equals the loss of the whole agent
    recomputing them from the observations, and so do the heads' gradients (float32 rounding:
    rtol 1e-5); with the full BEV and with its sparse patches (model.lidar_tokens), with the
    car's motion beside the features (model.proprio), and with the tokens kept in place
    (model.pooling = "grid", whose token projection trains in the heads)."""
    from rl.agent import split_agent
    from rl.factory import make_agent
    from rl.ppo_core import make_loss

    cfg = _rl_cfg(tmp_path, phase1, f"model.lidar_tokens={tokens}", f"model.proprio='{proprio}'",
                  f"model.pooling='{pooling}'")
    model, featurize, trainable = make_agent(cfg, 0)
    agent = split_agent(model, trainable)
    assert agent.frozen_features
    rng = np.random.default_rng(1)
    n = 6
    raw = _raw_obs(rng, n)
    obs = jax.vmap(featurize)(raw)
    assert ("lidar_ids" in obs) == bool(tokens) and ("lidar" in obs) != bool(tokens)
    z = jax.jit(agent.features)(agent.params, agent.frozen, obs)
    e = model.mae.cfg.embed_dim
    pooled = e if pooling == "mean" else sum(
        model.mae.layout[m].n_patches for m in model.mae.token_layout(model.modalities)) * e
    assert z.shape == (n, pooled + (3 if proprio == "planar" else 0))
    recompute = jax.jit(jax.value_and_grad(make_loss(agent.apply, cfg.ppo), has_aux=True))
    reuse = jax.jit(jax.value_and_grad(make_loss(agent.heads, cfg.ppo), has_aux=True))
    mb = _minibatch(rng, n)
    (la, ia), ga = recompute(agent.params, agent.frozen, {**mb, "obs": obs})
    (lb, ib), gb = reuse(agent.params, agent.frozen, {**mb, "obs": z})
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)
    for k in ("policy", "value", "entropy", "approx_kl"):
        np.testing.assert_allclose(float(getattr(ib, k)), float(getattr(ia, k)), rtol=1e-5,
                                   atol=1e-7)
    leaves_a, leaves_b = jax.tree.leaves(ga), jax.tree.leaves(gb)
    assert len(leaves_a) == len(leaves_b) > 0
    assert any(float(jnp.abs(g).max()) > 1e-4 for g in leaves_a)  # a gradient to compare
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tokens", [0, 5])
def test_frozen_runner_reuses_features_and_matches_todays_path(tmp_path, phase1, tokens):
    """The runner the factory builds for frozen encoders (the adapter in the runner, features
    computed once per step and reused by the update) learns exactly what the path that
    recomputes the encoders in the update, with the adapter in the environment, learns: the
    same losses and the same heads after an update (rtol 1e-5). Its rollout buffer holds the
    features, and the update never reads the encoders: NaN encoder weights leave it unchanged
    (they poison the recomputing path's)."""
    from rl import factory
    from rl.runners import FastRunner

    # time_limit 0.1 s: episodes are truncated within the 4-step rollout (the bootstrap path)
    cfg = _rl_cfg(tmp_path, phase1, "env.time_limit=0.1", "ppo.update_epochs=2",
                  f"model.lidar_tokens={tokens}")
    new = factory.make_runner(cfg)
    assert new.reuse_features and new.featurize is not None
    model, featurize, trainable = factory.make_agent(cfg)
    env, params = factory.make_functional(cfg, featurize)
    old = FastRunner(env, model, cfg.ppo, trainable, env_params=params, reuse_features=False)
    assert not old.reuse_features

    key = jax.random.PRNGKey(0)
    rs_new, traj, _ = jax.jit(new.rollout)(new.init(key))
    d = model.mae.cfg.embed_dim
    assert traj.obs.shape == (cfg.ppo.num_steps, cfg.ppo.num_envs, d)  # features, not samples
    assert bool(traj.truncated.any()) and bool((traj.final_value != 0).any())

    out = {}
    for name, runner in (("new", new), ("old", old)):
        state, metrics = runner.run(runner.init(key), 1)
        out[name] = (jax.tree.map(np.asarray, state.params), metrics)
    for k in ("loss/total", "loss/policy", "loss/value", "reward_mean"):
        np.testing.assert_allclose(out["new"][1][k], out["old"][1][k], rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(out["new"][0]), jax.tree.leaves(out["old"][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # no encoder in the update: the learning step on the stored rollout ignores the encoders
    rs = new.init(key)
    rs_new, traj, _ = jax.jit(new.rollout)(rs)
    last = jax.jit(new._inputs)(rs_new, rs_new.obs)
    poisoned = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan)
                            if jnp.issubdtype(x.dtype, jnp.floating) else x, rs.frozen)
    learn = jax.jit(new.learn)
    _, _, m_ok = learn(rs.params, rs.opt_state, rs.frozen, None, traj, last, key)
    _, _, m_nan = learn(rs.params, rs.opt_state, poisoned, None, traj, last, key)
    assert np.isfinite(m_ok["loss/total"]) and m_nan["loss/total"] == m_ok["loss/total"]
    raw_traj = traj._replace(obs=jax.tree.map(
        lambda x: jnp.broadcast_to(x, (cfg.ppo.num_steps, *x.shape)),
        jax.vmap(featurize)(rs_new.obs)))
    _, _, m_old = jax.jit(old.learn)(rs.params, rs.opt_state, poisoned, None, raw_traj,
                                     jax.vmap(featurize)(rs_new.obs), key)
    assert not np.isfinite(m_old["loss/total"])  # recomputing reads the (poisoned) encoders


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for sub in v if isinstance(v, list | tuple) else (v,):
            if hasattr(sub, "eqns"):
                yield sub
            elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                yield sub.jaxpr


def _primitives(jaxpr) -> set[str]:
    out = set()
    for eqn in jaxpr.eqns:
        out.add(eqn.primitive.name)
        for sub in _subjaxprs(eqn):
            out |= _primitives(sub)
    return out


def test_bev_is_built_in_the_compiled_rollout(tmp_path, phase1):
    """One jitted chunk of updates holds the whole rollout as a scan whose body builds the
    simulator's BEV (the adapter's scatter-add and scatter-max) and runs the encoders
    (dot_general), with no host callback anywhere: the observation never leaves the device."""
    from rl import factory

    cfg = _rl_cfg(tmp_path, phase1)
    runner = factory.make_runner(cfg)
    state = runner.init(jax.random.PRNGKey(0))
    jaxpr = jax.make_jaxpr(runner._run_chunk, static_argnums=(1,))(state, 1).jaxpr
    everything = _primitives(jaxpr)
    assert not [p for p in everything if "callback" in p], everything
    updates = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(updates) == 1
    body = next(_subjaxprs(updates[0]))
    bev_and_encoders = {"scatter-add", "scatter-max", "dot_general"}
    rollouts = [e for e in body.eqns if e.primitive.name == "scan"
                and bev_and_encoders <= _primitives(next(_subjaxprs(e)))]
    assert rollouts, "no scan in the update builds the BEV and runs the encoders"


def _scans(rng, n, rays=1080):
    """Scans with near walls (inside the BEV), far returns and misses (max range)."""
    from rl.envs import spec

    r = rng.uniform(0.1, 4.0, (n, rays))
    r[:, ::7] = spec.LIDAR_MAX  # misses
    r[:, 3::11] = rng.uniform(4.0, 15.0, (n, (rays - 3 + 10) // 11))  # outside the grid
    return jnp.asarray(r, jnp.float32)


@pytest.mark.parametrize("k", [1, 7, 64])
def test_sparse_lidar_patches_are_the_bevs_patches(k):
    """ObservationAdapter.jax_patches' lidar: the k patches with the most points, each exactly
    the full BEV's patch (bev_lidar, then patchify) at its id; every other patch of the BEV
    holds no more points than the fewest kept; the rest of the sample is the full path's."""
    from etl.config import PreprocessConfig
    from rl.envs.adapter import ObservationAdapter
    from train.encoders import gather_tokens, patchify

    pre = PreprocessConfig()
    ad = ObservationAdapter(pre, world_scale=10.0)
    rng = np.random.default_rng(0)
    n, p = 3, 16
    raw = {"lidar": _scans(rng, n), "pose": jnp.asarray(rng.normal(size=(n, 6)), jnp.float32),
           "velocity": jnp.asarray(rng.normal(size=(n, 6)), jnp.float32),
           "acceleration": jnp.asarray(rng.normal(size=(n, 6)), jnp.float32)}
    full = jax.jit(jax.vmap(ad.jax))(raw)
    sparse = jax.jit(jax.vmap(lambda o: ad.jax_patches(o, p, k)))(raw)
    assert "lidar" not in sparse
    assert sparse["lidar_patches"].shape == (n, k, p * p * 2)
    assert sparse["lidar_patches"].dtype == jnp.float32
    ids = np.asarray(sparse["lidar_ids"])
    assert all(len(set(row)) == k for row in ids)
    want = gather_tokens(patchify(full["lidar"], p), jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(sparse["lidar_patches"]), np.asarray(want))
    nonempty = np.asarray(patchify(full["lidar"], p)[..., 0::2].max(-1) > 0)  # (n, patches)
    assert nonempty.sum(1).min() > 1
    for b in range(n):  # never an empty patch kept while a non-empty one is left out
        assert nonempty[b, ids[b]].sum() == min(k, nonempty[b].sum())
    for key in ("imu", "gps", "present"):
        np.testing.assert_array_equal(np.asarray(sparse[key]), np.asarray(full[key]))


def test_sparse_lidar_patches_error_names_k():
    from etl.config import BEVGrid
    from rl.envs.adapter import lidar_patches

    with pytest.raises(ValueError, match="k = 65"):
        lidar_patches(jnp.zeros((4, 3)), BEVGrid(), 16, 65)
    with pytest.raises(ValueError, match="not divisible by patch 24"):
        lidar_patches(jnp.zeros((4, 3)), BEVGrid(), 24, 4)


def test_sparse_policy_features_are_the_encoders_on_the_kept_patches(tmp_path, phase1):
    """The policy's features from the sparse lidar equal the pretrained encoders run as in
    pretraining on those visible patches: ModalityViT(bev, ids_keep) → fusion → mean."""
    from rl.envs.adapter import ObservationAdapter
    from rl.factory import make_agent
    from train.heads import masked_mean

    cfg = _rl_cfg(tmp_path, phase1, "model.lidar_tokens=6", "model.modalities=['lidar', 'imu']")
    model, featurize, _ = make_agent(cfg, 0)
    rng = np.random.default_rng(2)
    n = 4
    raw = {"lidar": _scans(rng, n), "pose": jnp.asarray(rng.normal(size=(n, 6)), jnp.float32),
           "velocity": jnp.asarray(rng.normal(size=(n, 6)), jnp.float32),
           "acceleration": jnp.asarray(rng.normal(size=(n, 6)), jnp.float32)}
    obs = jax.vmap(featurize)(raw)
    assert set(obs) == {"lidar_patches", "lidar_ids", "imu", "present"}
    got = model.features(obs)
    full = jax.vmap(ObservationAdapter(model.mae.pre, world_scale=10.0).jax)(raw)
    mae = model.mae
    tokens = {"lidar": mae.encoders["lidar"](full["lidar"], obs["lidar_ids"]),
              "imu": mae.encoders["imu"](full["imu"])}
    fused, valid = mae.fusion(tokens, full["present"])
    want = masked_mean(fused.astype(jnp.float32), valid)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # and not the features of all patches
    assert float(jnp.abs(got - model.features(full)).max()) > 1e-4


def test_grid_pooling_keeps_each_token_in_its_place(tmp_path, phase1):
    """model.pooling = "grid": the features are the fused tokens in fixed slots — each kept
    lidar patch's token at its patch, zeros at the patches left out, then the IMU's tokens
    (zeros when the IMU is absent) — and the mean of the valid ones is the "mean" pooling's
    feature; the heads read the places: the same tokens in other slots act differently."""
    from rl.factory import make_agent

    mods = "model.modalities=['lidar', 'imu']"
    k = 6
    cfg = _rl_cfg(tmp_path, phase1, f"model.lidar_tokens={k}", mods, "model.pooling='grid'")
    model, featurize, _ = make_agent(cfg, 0)
    mean_model, mean_featurize, _ = make_agent(
        _rl_cfg(tmp_path, phase1, f"model.lidar_tokens={k}", mods), 0)
    rng = np.random.default_rng(4)
    n = 3
    raw = _raw_obs(rng, n)
    raw["lidar"] = _scans(rng, n)
    obs = jax.vmap(featurize)(raw)
    mae = model.mae
    e, n_lidar = mae.cfg.embed_dim, mae.layout["lidar"].n_patches
    n_imu = mae.layout["imu"].n_patches
    assert model.slots == n_lidar + n_imu
    grid = np.asarray(model.features(obs)).reshape(n, model.slots, e)
    tokens = {"lidar": mae.encoders["lidar"](
                  jax.vmap(_full_bev(mae))(raw), obs["lidar_ids"]),
              "imu": mae.encoders["imu"](obs["imu"])}  # fmt: skip
    fused, valid = mae.fusion(tokens, obs["present"])
    fused = np.asarray(fused, np.float32)
    ids = np.asarray(obs["lidar_ids"])
    for b in range(n):
        np.testing.assert_allclose(grid[b, ids[b]], fused[b, :k], rtol=1e-5, atol=1e-6)
        left_out = np.setdiff1d(np.arange(n_lidar), ids[b])
        assert len(left_out) == n_lidar - k
        np.testing.assert_array_equal(grid[b, left_out], 0.0)
    np.testing.assert_allclose(grid[:, n_lidar:], fused[:, k:], rtol=1e-5, atol=1e-6)
    # the mean of the placed valid tokens is the "mean" pooling's feature (same encoders)
    mean_model.mae = model.mae
    want = np.asarray(mean_model.features(jax.vmap(mean_featurize)(raw)))
    np.testing.assert_allclose(grid.sum(1) / (k + n_imu), want, rtol=1e-4, atol=1e-5)
    # an absent IMU: its slots are zeros (its tokens are not valid)
    no_imu = {key: v for key, v in raw.items() if key not in ("velocity", "acceleration")}
    g0 = np.asarray(model.features(jax.vmap(featurize)(no_imu))).reshape(n, model.slots, e)
    np.testing.assert_array_equal(g0[:, n_lidar:], 0.0)
    assert np.abs(g0[:, :n_lidar]).max() > 0
    # the heads read places: the lidar tokens rolled to other patches change the action
    z = model.features(obs)
    moved = jnp.roll(z.reshape(n, model.slots, e)[:, :n_lidar], 1, axis=1)
    z2 = jnp.concatenate([moved.reshape(n, -1), z[:, n_lidar * e:]], axis=1)
    assert float(jnp.abs(model.heads(z2)[0] - model.heads(z)[0]).max()) > 1e-6


def _full_bev(mae):
    """The full lidar BEV of one raw observation, as the adapter builds it."""
    from rl.envs.adapter import ObservationAdapter

    adapter = ObservationAdapter(mae.pre, world_scale=10.0)
    return lambda obs: adapter.jax(obs)["lidar"]


def test_load_trained_restores_the_saved_weights_not_an_init(phase1):
    """load_trained restores into abstract shapes; its parameters must be the checkpoint's
    (as restored into a live initialised state) and not the architecture's initialisation."""
    from train import checkpoint as ckptlib
    from train.pretrain import default_model, init_state, load_trained, make_optimizer

    model, cfg, pre, step = load_trained(phase1)
    tx = make_optimizer(cfg.training)
    graphdef, init, _ = init_state(cfg, pre, default_model()[0], tx)
    c = ckptlib.Checkpointer(phase1, async_save=False)
    try:
        saved, _, _ = c.restore(init, model_cfg=cfg.model, step=step)
    finally:
        c.close()
    got = jax.tree.leaves(nnx.state(model, nnx.Param))
    want = jax.tree.leaves(saved["params"])
    fresh = jax.tree.leaves(init["params"])
    assert len(got) == len(want) == len(fresh) > 0
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert any(not np.array_equal(np.asarray(g), np.asarray(f))
               for g, f in zip(got, fresh, strict=True))


def test_proprio_reaches_the_heads_and_only_from_the_velocity(tmp_path, phase1):
    """model.proprio = "planar": the features end in the body-frame (vx, vy, yaw rate), scaled
    by rl.agent.PROPRIO_SCALE, after the encoders' pooled tokens (which are those of the
    policy without it); the policy's output changes with the speed alone; without the
    velocity (the IMU-absent evaluation) the three are 0; "none" is the policy of before."""
    from rl.agent import PROPRIO_SCALE, split_agent
    from rl.factory import make_agent

    rng = np.random.default_rng(3)
    n = 4
    raw = _raw_obs(rng, n)
    base = _rl_cfg(tmp_path, phase1, "model.lidar_tokens=5")
    cfg = _rl_cfg(tmp_path, phase1, "model.lidar_tokens=5", "model.proprio='planar'")
    out = {}
    for name, c in (("none", base), ("planar", cfg)):
        model, featurize, trainable = make_agent(c, 0)
        agent = split_agent(model, trainable)
        assert agent.frozen_features
        out[name] = (model, featurize, agent)
    model, featurize, agent = out["planar"]
    z = np.asarray(agent.features(agent.params, agent.frozen, jax.vmap(featurize)(raw)))
    m0, f0, a0 = out["none"]
    z0 = np.asarray(a0.features(a0.params, a0.frozen, jax.vmap(f0)(raw)))
    d = m0.mae.cfg.embed_dim
    np.testing.assert_allclose(z[:, :d], z0, rtol=1e-6, atol=1e-6)
    want = np.asarray(raw["velocity"])[:, [0, 1, 5]] / np.asarray(PROPRIO_SCALE["planar"])
    np.testing.assert_allclose(z[:, d:], want, rtol=1e-6)

    faster = {**raw, "velocity": raw["velocity"].at[:, 0].add(2.0)}
    mean, _, value = model(jax.vmap(featurize)(raw))
    mean2, _, value2 = model(jax.vmap(featurize)(faster))
    assert float(jnp.abs(value2 - value).max()) > 1e-6
    assert float(jnp.abs(mean2 - mean).max()) > 1e-7

    no_imu = {k: v for k, v in raw.items() if k not in ("velocity", "acceleration")}
    z_abs = np.asarray(agent.features(agent.params, agent.frozen, jax.vmap(featurize)(no_imu)))
    np.testing.assert_array_equal(z_abs[:, d:], 0.0)


def test_feature_norm_is_fitted_on_a_rollout_kept_fixed_and_saved(tmp_path, phase1,
                                                                   monkeypatch):
    """model.feature_norm: make_runner fits FeatureStats to the pooled features of a first
    rollout (the same stats for the same seed), features are then (pooled - mean) / std,
    training leaves the stats as fitted (not trained), and the checkpoint gives them back to
    the evaluation (restore_policy), to a resume and to a warm start (which fit none)."""
    from rl import factory, ppo
    from rl.agent import FeatureStats

    extra = ("model.lidar_tokens=5", "model.proprio='planar'", "model.feature_norm=true",
             "ppo.total_timesteps=32", "ckpt_every=1")
    cfg = _rl_cfg(tmp_path, phase1, *extra)
    runner = factory.make_runner(cfg)
    model = runner.model(runner.init(jax.random.PRNGKey(0)))
    mean, std = np.asarray(model.feature_mean[...]), np.asarray(model.feature_std[...])
    assert mean.shape == std.shape == (model.mae.cfg.embed_dim,)
    assert np.abs(mean).max() > 1e-3 and not np.allclose(std, 1.0)  # fitted, not the init
    again = factory.make_runner(cfg).model(runner.init(jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(np.asarray(again.feature_mean[...]), mean)

    # the fit's own statistics: a fresh fit returns them and they are what the model holds
    m2, featurize, _ = factory.make_agent(cfg, 0)
    env, params = factory.make_functional(cfg, lambda o: o)
    got = factory.fit_feature_norm(m2, featurize, env, params, jax.random.PRNGKey(1),
                                   num_envs=4, steps=8, every=2)
    assert got["samples"] == 16
    np.testing.assert_allclose(np.asarray(m2.feature_std[...]), got["std"], rtol=1e-6)
    rng = np.random.default_rng(0)
    raw = {"lidar": jnp.asarray(rng.uniform(0.3, 16.0, (3, 1080)), jnp.float32),
           "velocity": jnp.zeros((3, 6)), "acceleration": jnp.zeros((3, 6)),
           "pose": jnp.zeros((3, 6)), "time": jnp.zeros((3, 1))}  # fmt: skip
    x = jax.vmap(featurize)(raw)
    d = m2.mae.cfg.embed_dim
    want = (np.asarray(m2.pooled(x)) - got["mean"]) / got["std"]
    np.testing.assert_allclose(np.asarray(m2.features(x))[:, :d], want, rtol=1e-4, atol=1e-4)

    # training keeps them; the checkpoint restores them
    sets = [f"runs_dir='{tmp_path}'", "run_name='fn'", "model.policy='multimodal'",
            "finetune.init='pretrained'", f"finetune.pretrained_ckpt='{phase1}'",
            "model.hidden=[16]", "ppo.num_envs=4", "ppo.num_steps=4", "ppo.num_minibatches=2",
            "ppo.update_epochs=1", "env.time_limit=2.0", "env.track='procedural:0'", *extra]
    assert ppo.main([arg for s in sets for arg in ("--set", s)]) == 0
    # resumed (one more update) and warm-started runs take the checkpoint's statistics and
    # fit none of their own
    fitted = []
    monkeypatch.setattr(factory, "fit_feature_norm", lambda *a, **k: fitted.append(1))
    more = [*sets, "ppo.total_timesteps=48"]
    assert ppo.main([arg for s in more for arg in ("--set", s)]) == 0
    warm = [*sets, "run_name='fn_warm'", f"finetune.init_policy='{tmp_path / 'fn' / 'ckpt'}'"]
    assert ppo.main([arg for s in warm for arg in ("--set", s)]) == 0
    assert not fitted
    for run in ("fn", "fn_warm"):
        _, m, _ = factory.restore_policy(tmp_path / run / "ckpt")
        np.testing.assert_array_equal(np.asarray(m.feature_mean[...]), mean)
    _, restored, _ = factory.restore_policy(tmp_path / "fn" / "ckpt")
    np.testing.assert_array_equal(np.asarray(restored.feature_mean[...]), mean)
    np.testing.assert_array_equal(np.asarray(restored.feature_std[...]), std)
    assert isinstance(restored.feature_mean, FeatureStats)
    params, frozen, _ = factory.warm_start_policy(
        _rl_cfg(tmp_path, phase1, *extra, f"finetune.init_policy='{tmp_path / 'fn' / 'ckpt'}'"))
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(frozen)}
    assert any("feature_mean" in k for k in flat)
    np.testing.assert_array_equal(
        np.asarray(next(v for k, v in flat.items() if "feature_mean" in k)), mean)


def test_feature_geometry_probe_r2_tells_signal_from_noise():
    """benchmarks.feature_geometry's held-out R²: ~1 for targets linear in the features, ~0
    (never much above) for targets independent of them, and between for a partial signal."""
    from benchmarks.feature_geometry import ridge_r2

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1200, 20))
    w = rng.normal(size=(20, 5))
    assert ridge_r2(x, x @ w, 1000) > 0.999
    assert ridge_r2(x, rng.normal(size=(1200, 5)), 1000) < 0.05
    half = x[:, :10] @ w[:10] + rng.normal(size=(1200, 5)) * np.std(x[:, :10] @ w[:10], 0)
    assert 0.3 < ridge_r2(x, half, 1000) < 0.7
