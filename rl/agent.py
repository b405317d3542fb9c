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
