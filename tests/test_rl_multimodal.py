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
