"""Small environments for testing the PPO runners, each as a functional JAX env (the calling
convention of :class:`rl.runners.FunctionalEnv`, auto-resetting) and as a gymnasium env:

* :class:`PointMass` — drive a 2-D point mass to a target: an optimal policy reaches it in
  ~20 steps and holds it; a random policy drifts;
* :class:`Clock` — observations that depend only on the time in the episode (never on the
  actions or the RNG), so both runners see exactly the same observation sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class PointMassState(NamedTuple):
    pos: jax.Array
    vel: jax.Array
    target: jax.Array
    t: jax.Array


class PointMass:
    obs_dim = 6
    action_dim = 2

    def __init__(self, max_steps: int = 64, dt: float = 0.1):
        self.max_steps = max_steps
        self.dt = dt

    def _obs(self, s: PointMassState) -> jax.Array:
        return jnp.concatenate([s.pos, s.vel, s.target - s.pos])

    def reset(self, key: jax.Array, params=None) -> tuple[jax.Array, PointMassState]:
        k1, k2 = jax.random.split(key)
        s = PointMassState(
            pos=jax.random.uniform(k1, (2,), minval=-1.0, maxval=1.0),
            vel=jnp.zeros(2),
            target=jax.random.uniform(k2, (2,), minval=-1.0, maxval=1.0),
            t=jnp.zeros((), jnp.int32),
        )
        return self._obs(s), s

    def step(self, key: jax.Array, s: PointMassState, action: jax.Array, params=None):
        a = jnp.clip(action, -1.0, 1.0)
        vel = 0.9 * s.vel + a * self.dt * 5.0
        pos = jnp.clip(s.pos + vel * self.dt, -2.0, 2.0)
        t = s.t + 1
        ns = PointMassState(pos, vel, s.target, t)
        reward = -jnp.linalg.norm(pos - s.target) - 0.01 * jnp.sum(a**2)
        terminated = jnp.zeros((), bool)
        truncated = t >= self.max_steps
        final_obs = self._obs(ns)
        obs_r, s_r = self.reset(key)
        done = jnp.logical_or(terminated, truncated)
        ns = jax.tree.map(lambda r, c: jnp.where(done, r, c), s_r, ns)
        obs = jnp.where(done, obs_r, final_obs)
        return obs, ns, reward, terminated, truncated, final_obs, {}


class PointMassGym:
    """The same task as a gymnasium.Env (numpy, for the host-side runner's tests)."""

    def __new__(cls, *args, **kwargs):
        import gymnasium as gym
        import numpy as np

        class _Env(gym.Env):
            metadata = {"render_modes": []}

            def __init__(self, max_steps: int = 64, dt: float = 0.1):
                self.max_steps, self.dt = max_steps, dt
                self.observation_space = gym.spaces.Box(-np.inf, np.inf, (6,), np.float32)
                self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

            def _obs(self):
                return np.concatenate([self.pos, self.vel, self.target - self.pos]).astype(
                    np.float32
                )

            def reset(self, *, seed=None, options=None):
                super().reset(seed=seed)
                self.pos = self.np_random.uniform(-1, 1, 2)
                self.vel = np.zeros(2)
                self.target = self.np_random.uniform(-1, 1, 2)
                self.t = 0
                return self._obs(), {}

            def step(self, action):
                a = np.clip(action, -1.0, 1.0)
                self.vel = 0.9 * self.vel + a * self.dt * 5.0
                self.pos = np.clip(self.pos + self.vel * self.dt, -2.0, 2.0)
                self.t += 1
                reward = -np.linalg.norm(self.pos - self.target) - 0.01 * np.sum(a**2)
                info = {"distance": float(np.linalg.norm(self.pos - self.target))}
                return self._obs(), float(reward), False, self.t >= self.max_steps, info

        return _Env(*args, **kwargs)


class Clock:
    """obs = [t, t², 1] / length for t = 0 … length − 1, then the episode is truncated."""

    obs_dim = 3
    action_dim = 2

    def __init__(self, length: int = 5):
        self.length = length

    def _obs(self, t):
        t = jnp.asarray(t, jnp.float32)
        return jnp.stack([t, t * t, jnp.ones_like(t)]) / self.length

    def reset(self, key: jax.Array, params=None):
        return self._obs(0), jnp.zeros((), jnp.int32)

    def step(self, key: jax.Array, t, action, params=None):
        t = t + 1
        truncated = t >= self.length
        final_obs = self._obs(t)
        t = jnp.where(truncated, 0, t)
        return (self._obs(t), t, -jnp.sum(action**2), jnp.zeros((), bool), truncated, final_obs,
                {})


def clock_gym(length: int = 5):
    """:class:`Clock` as a gymnasium.Env (numpy, for the host-side runner)."""
    import gymnasium as gym
    import numpy as np

    clock = Clock(length)

    class _Env(gym.Env):
        metadata = {"render_modes": []}
        observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
        action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return np.asarray(clock._obs(0)), {}

        def step(self, action):
            self.t += 1
            reward = -float(np.sum(np.asarray(action) ** 2))
            return np.asarray(clock._obs(self.t)), reward, False, self.t >= length, {}

    return _Env()
