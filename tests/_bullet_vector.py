"""Vectorized PyBullet racecar environments.

    envs = make_bullet_vector_env(8, track="procedural:0")          # 8 worker processes
    obs, info = envs.reset(seed=0)                                  # env i seeded 0 + i
    obs, reward, terminated, truncated, info = envs.step(envs.action_space.sample())

:func:`make_bullet_vector_env` returns gymnasium's ``AsyncVectorEnv`` (one process per env,
observations through shared memory) or, with ``asynchronous=False``, a ``SyncVectorEnv`` in this
process (each env has its own PyBullet client, so they do not interfere) — the one tests use.
Workers start with ``forkserver`` by default: forking a process that already runs JAX's thread
pool is unsafe, and ``spawn`` pays a full interpreter start per worker.

The track is passed to workers by name or path (each worker loads it; compiled maps are cached
on disk), never pickled by us; a :class:`rl.tracks.Track` object is accepted for the sync
vector env only.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import gymnasium as gym

from rl.envs.bullet import BulletRacecarEnv


def _make_env(track: Any, env_kwargs: dict[str, Any]) -> gym.Env:
    return BulletRacecarEnv(track, **env_kwargs)


def make_bullet_vector_env(
    num_envs: int,
    track: Any = "procedural:0",
    *,
    asynchronous: bool = True,
    context: str | None = "forkserver",
    shared_memory: bool = True,
    autoreset_mode: gym.vector.AutoresetMode = gym.vector.AutoresetMode.NEXT_STEP,
    **env_kwargs: Any,
) -> gym.vector.VectorEnv:
    """``num_envs`` :class:`BulletRacecarEnv` on ``track``; ``env_kwargs`` go to each env
    (``task``, ``camera``, ``lidar``, ``actuator``, ``reset_mode``, ...). A list of tracks
    (one per env) gives each env its own track."""
    tracks = list(track) if isinstance(track, list | tuple) else [track] * num_envs
    tracks = [os.fspath(t) if isinstance(t, os.PathLike) else t for t in tracks]
    if len(tracks) != num_envs:
        raise ValueError(f"{len(tracks)} tracks for {num_envs} envs")
    fns = [functools.partial(_make_env, t, dict(env_kwargs)) for t in tracks]
    if not asynchronous:
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=autoreset_mode)
    if any(not isinstance(t, str) for t in tracks):
        raise TypeError(
            "the async vector env takes tracks by name or path (workers load them); "
            "pass asynchronous=False to use Track objects"
        )
    return gym.vector.AsyncVectorEnv(
        fns, shared_memory=shared_memory, context=context, autoreset_mode=autoreset_mode
    )
