"""Actor-critic agents (Flax NNX) and how they travel through jit.

Every agent maps a (batched) observation to ``(mean, log_std, value)``: a diagonal Gaussian
over the pre-clip action and a state value; ``log_std`` is a state-independent parameter.

* :class:`MLPActorCritic` — separate tanh MLPs for actor and critic over a flat feature
  vector (the lidar policy, on :func:`lidar_features`);
* :class:`MultimodalActorCritic` — the pretrained encoders and fusion of train/, pooled,
  under a policy and a value head;
* :func:`split_agent` — an agent split once into its graph and its trained / frozen states
  (:class:`Agent`), so only arrays cross jit boundaries. An agent whose feature extractor
  (``FEATURES_FROM``) gets no gradient has *frozen features*: the runner computes them once
  per environment step and the PPO update trains the heads on them (no encoder in the update).

Which agent a config asks for, with which featurizer, is decided in rl/factory.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from train.heads import MLP, PolicyHead, ValueHead, masked_mean


class Agent(NamedTuple):
    """An NNX agent split for jit: ``apply(params, frozen, obs) -> (mean, log_std, value)``.

    With ``frozen_features`` (see :func:`split_agent`) ``apply`` is ``heads ∘ features``:
    ``features(params, frozen, obs) -> z`` reads only frozen state, so ``z`` can be computed
    once and ``heads(params, frozen, z)`` trained on it."""

    graphdef: Any
    params: nnx.State  # trained
    frozen: nnx.State  # everything else (frozen encoders, non-parameter state)
    frozen_features: bool = False

    def apply(self, params, frozen, obs):
        return nnx.merge(self.graphdef, params, frozen)(obs)

    def features(self, params, frozen, obs):
        return nnx.merge(self.graphdef, params, frozen).features(obs)

    def heads(self, params, frozen, z):
        return nnx.merge(self.graphdef, params, frozen).heads(z)


def split_agent(model: nnx.Module, trainable: Any = nnx.Param) -> Agent:
    """Split ``model`` into trained parameters (``trainable`` filter) and the rest.

    ``frozen_features`` is set when the model splits into ``features`` and ``heads`` (it names
    the submodule ``features`` reads in ``FEATURES_FROM``) and ``trainable`` selects nothing
    in that submodule: its features are then a function of frozen state and the observation
    only."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    name = getattr(model, "FEATURES_FROM", None)
    frozen_features = name is not None and not any(
        path[0] == name for path, _ in nnx.to_flat_state(params))
    return Agent(graphdef, params, frozen, frozen_features)


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
        self.actor = MLP(obs_dim, tuple(hidden), action_dim, 0.01, rngs=rngs)
        self.critic = MLP(obs_dim, tuple(hidden), 1, 1.0, rngs=rngs)
        self.log_std = nnx.Param(jnp.full((action_dim,), init_log_std, jnp.float32))

    def __call__(self, obs: jax.Array):
        mean = self.actor(obs)
        value = self.critic(obs)[..., 0]
        log_std = jnp.broadcast_to(self.log_std[...], mean.shape)
        return mean, log_std, value


# body-frame velocity components the lidar policy observes (racecar_gym's ``velocity``:
# vx, vy, vz, wx, wy, wz): "planar" = vx, vy and the yaw rate wz — all a car on a flat track
# has. "all" adds vz and the roll and pitch rates, which the JAX car holds at exactly 0:
# observation normalisation then divides them by ~1e-4, so PyBullet's chassis wobble
# (~1e-3 rad/s) reaches the policy as ±10 on inputs it never learned — and it weaves.
VELOCITY_COMPONENTS = {"planar": (0, 1, 5), "all": (0, 1, 2, 3, 4, 5)}


def lidar_feature_dim(num_beams: int, velocity: str = "planar", history: bool = False) -> int:
    """The length of :func:`lidar_features`' vector."""
    return num_beams + len(VELOCITY_COMPONENTS[velocity]) + (num_beams + 2 if history else 0)


def lidar_features(obs: dict, num_beams: int = 108, max_range: float = 15.25,
                   velocity: str = "planar", history: bool = False) -> jax.Array:
    """The quick policy's input: every k-th ray of the scan (``num_beams`` of them, k = rays /
    num_beams, starting at the first ray) scaled to [0, 1], plus the body-frame velocity's
    ``velocity`` components (:data:`VELOCITY_COMPONENTS`, ``model.velocity``); with
    ``history`` (``model.history``) then the previous step's scan, the same rays, and the
    previous action (the observation's ``lidar_prev`` and ``action_prev``).

    Subsampling rather than pooling means a backend that casts only those rays (the JAX
    backend's ``lidar_rays = 108``, ~10× cheaper) feeds the policy exactly what a full
    1080-ray scan does. Works on one or a batch of observations.
    """
    scan = jnp.asarray(obs["lidar"], jnp.float32)
    n = scan.shape[-1]
    if n % num_beams:
        raise ValueError(f"lidar has {n} rays, not a multiple of lidar_beams = {num_beams}")
    sub = scan[..., :: n // num_beams]
    vel = jnp.asarray(obs["velocity"], jnp.float32)[..., VELOCITY_COMPONENTS[velocity]]
    parts = [sub / max_range, vel]
    if history:
        missing = sorted({"lidar_prev", "action_prev"} - set(obs))
        if missing:
            raise KeyError(f"model.history: the observation has no {missing} (the "
                           "environment was made without history)")
        prev = jnp.asarray(obs["lidar_prev"], jnp.float32)[..., :: n // num_beams]
        parts += [prev / max_range, jnp.asarray(obs["action_prev"], jnp.float32)]
    return jnp.concatenate(parts, axis=-1)


class FeatureStats(nnx.Variable):
    """Fixed statistics a policy's features are standardized with (``model.feature_norm``):
    set once before training, saved with the policy, never trained."""


# the multimodal policy's proprioception (``model.proprio``): the same body-frame components as
# the lidar MLP's, scaled to O(1) (m/s over racecar_gym's top speed 3.5, rad/s over 3)
PROPRIO_SCALE = {"planar": (3.5, 1.0, 3.0)}


def proprio_features(obs: dict, kind: str = "planar") -> jax.Array:
    """The car's own motion for the multimodal policy's heads (``model.proprio``): the
    body-frame velocity's :data:`VELOCITY_COMPONENTS` ``kind`` scaled by
    :data:`PROPRIO_SCALE`. An observation without ``velocity`` (the evaluation's IMU-absent
    perturbation removes it) gives zeros, as the absent IMU modality itself is zeros."""
    idx, scale = VELOCITY_COMPONENTS[kind], jnp.asarray(PROPRIO_SCALE[kind], jnp.float32)
    if "velocity" not in obs:
        return jnp.zeros((len(idx),), jnp.float32)
    vel = jnp.asarray(obs["velocity"], jnp.float32)
    return vel[..., idx] / scale


class MultimodalActorCritic(nnx.Module):
    """The pretrained modality encoders and fusion (a :class:`train.mae.MultimodalMAE`, its
    decoder unused) → mean of the valid fused tokens → ``PolicyHead`` (Dense → tanh: the
    Gaussian mean) and ``ValueHead``; a state-independent log-std.

    Input: an ETL-contract sample dict (batched), i.e. the observation adapter's output.
    ``modalities``: those the simulator provides (radar and IR are absent there); with the
    checkpoint's ``absent = "token"`` the absent ones can be included and then enter as the
    model's learned absent tokens.

    ``features`` (the encoders' pooled tokens, (B, embed_dim) float32) reads only ``mae``
    (``FEATURES_FROM``); ``heads`` maps them to the policy's outputs. Frozen encoders: the
    runner stores the features in the rollout and the update trains the heads on them.
    ``proprio_dim`` > 0 (``model.proprio``): the batch's ``proprio`` vector (the car's own
    motion, :func:`proprio_features`) is appended to the pooled features, so the heads read
    it directly; it passes through ``features`` untouched (frozen features stay frozen).
    ``feature_norm`` (``model.feature_norm``): the pooled features are standardized,
    ``(z - feature_mean) / feature_std``, with fixed :class:`FeatureStats` (not trained;
    :func:`rl.factory.fit_feature_norm` sets them, the checkpoint keeps them).

    ``pooling`` (``model.pooling``): "mean" — the valid fused tokens' mean, (B, embed_dim);
    "grid" — every token in its own place, (B, slots · embed_dim): the lidar's at its BEV
    patch (patches the sparse adapter left out, and absent modalities' tokens, are zeros),
    then each other modality's tokens in the fusion's order (:meth:`grid_slots`). The heads
    then project each slot's token to ``grid_channels`` numbers (one trained Dense shared by
    the slots and by both heads) and read the flattened map, so they know *where* each wall
    is — a mean over the tokens keeps ~0.6 of the wall distances' variance where the placed
    tokens keep ~0.9 (README, "The policy over frozen random encoders").
    """

    FEATURES_FROM = "mae"

    def __init__(
        self,
        mae,
        modalities: tuple[str, ...],
        action_dim: int = 2,
        hidden: Sequence[int] = (256,),
        init_log_std: float = -0.5,
        proprio_dim: int = 0,
        feature_norm: bool = False,
        pooling: str = "mean",
        grid_channels: int = 4,
        *,
        rngs: nnx.Rngs,
    ):
        if pooling not in ("mean", "grid"):
            raise ValueError(f"pooling: {pooling!r} is not 'mean' or 'grid'")
        self.mae = mae
        self.modalities = tuple(modalities)
        self.proprio_dim = int(proprio_dim)
        self.pooling = pooling
        e = mae.cfg.embed_dim
        self.embed_dim = e
        z_dim = e
        if pooling == "grid":
            self.slots = sum(mae.layout[m].n_patches for m in mae.token_layout(self.modalities))
            self.token_proj = nnx.Linear(e, int(grid_channels), rngs=rngs)
            z_dim = self.slots * e
        self.feature_norm = bool(feature_norm)
        if self.feature_norm:
            self.feature_mean = FeatureStats(jnp.zeros((z_dim,), jnp.float32))
            self.feature_std = FeatureStats(jnp.ones((z_dim,), jnp.float32))
        d = (e if pooling == "mean" else self.slots * int(grid_channels)) + self.proprio_dim
        self.policy = PolicyHead(d, action_dim, hidden=tuple(hidden), rngs=rngs)
        self.value = ValueHead(d, hidden=tuple(hidden), rngs=rngs)
        self.log_std = nnx.Param(jnp.full((action_dim,), init_log_std, jnp.float32))

    def features(self, batch: dict) -> jax.Array:
        return self.features_from_pooled(self.pooled(batch), batch)

    def features_from_pooled(self, z: jax.Array, batch: dict) -> jax.Array:
        """:meth:`features` given :meth:`pooled`'s output ``z`` for ``batch``."""
        if self.feature_norm:
            z = (z - self.feature_mean[...]) / self.feature_std[...]
        if not self.proprio_dim:
            return z
        return jnp.concatenate([z, jnp.asarray(batch["proprio"], jnp.float32)], axis=-1)

    def pooled(self, batch: dict) -> jax.Array:
        """The encoders' fused tokens, pooled (``pooling``): (B, embed_dim) or
        (B, slots · embed_dim) float32, before ``feature_norm`` and without the
        proprioception."""
        ids = batch.get("lidar_ids")
        if ids is None:
            fused, valid = self.mae.encode(batch, self.modalities)
        else:
            # the adapter's sparse lidar (ObservationAdapter.jax_patches): only its kept
            # patches enter the lidar encoder, as the visible patches do in pretraining (MAE)
            tokens = {m: self.mae.encoders[m](batch[m]) for m in self.modalities
                      if m != "lidar"}
            tokens["lidar"] = vit_patch_tokens(self.mae.encoders["lidar"],
                                               batch["lidar_patches"], ids)
            fused, valid = self.mae.fusion(tokens, jnp.asarray(batch["present"]))
        fused = fused.astype(jnp.float32)
        if self.pooling == "mean":
            return masked_mean(fused, valid)
        return self.grid_slots(fused, valid, ids)

    def grid_slots(self, fused: jax.Array, valid: jax.Array, lidar_ids=None) -> jax.Array:
        """``pooling = "grid"``: the fused tokens (B, T, D) in fixed places, flattened to
        (B, slots · D); invalid tokens are zeros. With ``lidar_ids`` (B, k) the lidar's k
        tokens go to their patches' slots and the patches left out stay zero."""
        fused = fused * valid[..., None].astype(fused.dtype)
        b, _, e = fused.shape
        parts, start = [], 0
        for m in self.mae.token_layout(self.modalities):
            n = self.mae.layout[m].n_patches
            if m == "lidar" and lidar_ids is not None:
                k = lidar_ids.shape[1]
                grid = jnp.zeros((b, n, e), fused.dtype)
                parts.append(jax.vmap(lambda g, i, t: g.at[i].set(t))(
                    grid, lidar_ids, fused[:, start:start + k]))
                start += k
            else:
                parts.append(fused[:, start:start + n])
                start += n
        if start != fused.shape[1]:
            raise ValueError(f"grid_slots: {fused.shape[1]} tokens, the layout has {start}")
        return jnp.concatenate(parts, axis=1).reshape(b, -1)

    def heads(self, z: jax.Array):
        if self.pooling == "grid":
            n = self.slots * self.embed_dim
            grid = z[..., :n].reshape(*z.shape[:-1], self.slots, self.embed_dim)
            proj = self.token_proj(grid).reshape(*z.shape[:-1], -1)
            z = jnp.concatenate([proj, z[..., n:]], axis=-1)
        mean = self.policy(z)
        log_std = jnp.broadcast_to(self.log_std[...], mean.shape)
        return mean, log_std, self.value(z)

    def __call__(self, batch: dict):
        return self.heads(self.features(batch))


def vit_patch_tokens(vit, patches: jax.Array, ids: jax.Array) -> jax.Array:
    """A :class:`train.encoders.ModalityViT`'s tokens of the patches ``ids`` (B, K) given as
    already-flattened ``patches`` (B, K, p·p·C) — what ``vit(image, ids_keep=ids)`` returns,
    without the image (tests/test_mm_policy.py checks the two agree)."""
    pos = jnp.take(vit.positions(), ids, axis=0)
    z = vit.patch_embed(patches.astype(vit.dtype)) + pos.astype(vit.dtype)
    for block in vit.blocks:
        z = block(z)
    return vit.norm(z)
