"""Actor-critic agents (Flax NNX).

Every agent maps an observation to ``(mean, log_std, value)``: a diagonal Gaussian over the
pre-clip action and a state value. ``log_std`` is a state-independent parameter.

* :class:`MLPActorCritic` — separate tanh MLPs for actor and critic over a flat feature vector
  (the quick lidar-only policy uses it on :func:`lidar_features`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _dense(din: int, dout: int, scale: float, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        kernel_init=nnx.initializers.orthogonal(scale),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


class MLP(nnx.Module):
    def __init__(self, din: int, hidden: Sequence[int], dout: int, out_scale: float, *, rngs):
        dims = [din, *hidden]
        self.layers = nnx.List(
            [
                _dense(a, b, float(np.sqrt(2.0)), rngs)
                for a, b in zip(dims[:-1], dims[1:], strict=True)
            ]
        )
        self.out = _dense(dims[-1], dout, out_scale, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.out(x)


class MLPActorCritic(nnx.Module):
    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (256, 256),
        init_log_std: float = -0.5,
        *,
        rngs: nnx.Rngs,
    ):
        self.actor = MLP(obs_dim, hidden, action_dim, 0.01, rngs=rngs)
        self.critic = MLP(obs_dim, hidden, 1, 1.0, rngs=rngs)
        self.log_std = nnx.Param(jnp.full((action_dim,), init_log_std, jnp.float32))

    def __call__(self, obs: jax.Array):
        mean = self.actor(obs)
        value = self.critic(obs)[..., 0]
        log_std = jnp.broadcast_to(self.log_std[...], mean.shape)
        return mean, log_std, value


def lidar_features(obs: dict, num_beams: int = 108, max_range: float = 15.25) -> jax.Array:
    """The quick policy's input: every k-th ray of the scan (``num_beams`` of them, k = rays /
    num_beams, starting at the first ray) scaled to [0, 1], plus the body-frame velocity (6).

    Subsampling rather than pooling means a backend that casts only those rays (the JAX
    backend's ``lidar_rays = 108``, ~10× cheaper) feeds the policy exactly what a full
    1080-ray scan does. Works on one or a batch of observations.
    """
    scan = jnp.asarray(obs["lidar"], jnp.float32)
    n = scan.shape[-1]
    if n % num_beams:
        raise ValueError(f"lidar has {n} rays, not a multiple of lidar_beams = {num_beams}")
    sub = scan[..., :: n // num_beams]
    vel = jnp.asarray(obs["velocity"], jnp.float32)
    return jnp.concatenate([sub / max_range, vel], axis=-1)


class MultimodalActorCritic(nnx.Module):
    """The pretrained modality encoders and fusion (a :class:`train.mae.MultimodalMAE`, its
    decoder unused) → mean of the valid fused tokens → ``PolicyHead`` (Dense → tanh: the
    Gaussian mean) and ``ValueHead``; a state-independent log-std.

    Input: an ETL-contract sample dict (batched), i.e. the observation adapter's output.
    ``modalities``: those the simulator provides (radar and IR are absent there); with the
    checkpoint's ``absent = "token"`` the absent ones can be included and then enter as the
    model's learned absent tokens.
    """

    def __init__(
        self,
        mae,
        modalities: tuple[str, ...],
        action_dim: int = 2,
        hidden: Sequence[int] = (256,),
        init_log_std: float = -0.5,
        *,
        rngs: nnx.Rngs,
    ):
        from train.heads import PolicyHead, ValueHead

        self.mae = mae
        self.modalities = tuple(modalities)
        d = mae.cfg.embed_dim
        self.policy = PolicyHead(d, action_dim, hidden=tuple(hidden), rngs=rngs)
        self.value = ValueHead(d, hidden=tuple(hidden), rngs=rngs)
        self.log_std = nnx.Param(jnp.full((action_dim,), init_log_std, jnp.float32))

    def features(self, batch: dict) -> jax.Array:
        from train.heads import masked_mean

        tokens, valid = self.mae.encode(batch, self.modalities)
        return masked_mean(tokens.astype(jnp.float32), valid)

    def __call__(self, batch: dict):
        z = self.features(batch)
        mean = self.policy(z)
        log_std = jnp.broadcast_to(self.log_std[...], mean.shape)
        return mean, log_std, self.value(z)


def build_multimodal_agent(cfg, rngs: nnx.Rngs):
    """(model, featurize, trainable) of the multimodal policy for an :class:`rl.config.RLConfig`.

    ``init = "pretrained"`` restores encoders + fusion from ``finetune.pretrained_ckpt``;
    ``"scratch"`` builds the same architecture (from that checkpoint's saved config, or from
    ``finetune.pretrain_config``) with random weights, so the two compare fairly.
    ``featurize`` is the observation adapter (one observation, jax; vmap it for batches).
    """
    from etl import configlib
    from etl.config import PreprocessConfig
    from rl.envs.adapter import ObservationAdapter
    from train.config import load_pretrain_config
    from train.mae import MultimodalMAE
    from train.pretrain import load_trained

    ft = cfg.finetune
    if ft.init == "pretrained":
        mae, pcfg, pre, _ = load_trained(ft.pretrained_ckpt)
    elif ft.pretrained_ckpt:
        _, pcfg, pre, _ = load_trained(ft.pretrained_ckpt)  # architecture only
        mae = MultimodalMAE(pcfg.model, pre, rngs=rngs)
    elif ft.pretrain_config:
        pcfg = load_pretrain_config(ft.pretrain_config)
        pre = PreprocessConfig()
        mae = MultimodalMAE(pcfg.model, pre, rngs=rngs)
    else:
        raise configlib.ConfigError(
            "finetune: the multimodal policy needs pretrained_ckpt or pretrain_config "
            "(the architecture to build)"
        )
    modalities = tuple(cfg.model.modalities)
    missing = [m for m in modalities if m not in pcfg.model.modalities]
    if missing:
        raise configlib.ConfigError(
            f"model.modalities: {missing} not in the pretrained model's {pcfg.model.modalities}"
        )
    if ft.absent == "token":
        if pcfg.model.absent != "token":
            raise configlib.ConfigError(
                "finetune.absent: 'token' needs a model pretrained with model.absent = 'token' "
                f"(this one has {pcfg.model.absent!r})"
            )
        modalities = tuple(
            m for m in pcfg.model.modalities if m in modalities or m in ("radar", "ir")
        )
    model = MultimodalActorCritic(
        mae, modalities, 2, cfg.model.hidden, cfg.ppo.init_log_std, rngs=rngs
    )
    adapter = ObservationAdapter(pre, world_scale=cfg.env.world_scale)
    trained = nnx.Not(nnx.PathContains("decoder"))
    if ft.freeze_encoders:
        trained = nnx.Not(nnx.PathContains("mae"))
    return model, adapter.jax, nnx.All(nnx.Param, trained)
