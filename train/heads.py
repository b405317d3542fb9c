"""Heads on top of the fused tokens: the MAE decoder (pretraining), and the policy and value
heads the RL stage puts on the pooled tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from etl.schema import MODALITY_INDEX
from train.config import ModelConfig
from train.encoders import (
    TOKEN_INIT,
    Block,
    apply_blocks,
    compute_dtype,
    dense,
    gather_tokens,
    layer_norm,
    sincos_pos_embed_2d,
)
from train.fusion import attention_mask, pad_tokens


class PretrainHead(nnx.Module):
    """The MAE decoder: reconstructs every patch of every modality from the fused visible tokens.

    ``specs``: per modality, in fusion order, ``(name, n_patches, patch_dim, grid)`` with ``grid``
    the (rows, cols) patch grid of an image modality (fixed 2-D sin-cos decoder positions) or None
    for a vector modality (learned decoder positions).

    ``__call__(fused, ids, present)``:
      1. project the fused visible tokens (B, sum n_vis, D) to ``decoder_dim``;
      2. per modality, append ``n_patches - n_vis`` copies of the shared mask token and unshuffle
         with ``ids_restore`` so every patch is back at its place; add decoder positions and a
         decoder modality embedding — positions on every token (``decoder_pos = "all"``, the
         MAE's) or on the mask tokens only (``"masked"``: a visible token is placed by what the
         encoder put in it, so the encoder must keep each token's position — otherwise it can
         drop it, since the decoder adds it back, and a probe or a policy that reads the tokens
         without their index no longer knows where a patch is);
      3. ``decoder_depth`` blocks of joint attention over all modalities' patches (absent
         modalities dropped as keys when ``absent = "drop"``; the sequence is padded to a
         multiple of 8 with isolated tokens, see ``train.fusion.pad_tokens``);
      4. per modality, LayerNorm → Linear to the patch's pixels (p·p·C) or channel group.
    Returns predictions (B, n_patches, patch_dim) float32 per modality.
    """

    def __init__(self, cfg: ModelConfig, specs, *, rngs: nnx.Rngs):
        dd = cfg.decoder_dim
        self.specs = tuple((m, int(n), int(pd), None if g is None else tuple(g))
                           for m, n, pd, g in specs)
        self.drop_absent = cfg.absent == "drop"
        self.pos_on_masked_only = cfg.decoder_pos == "masked"
        self.dtype = compute_dtype(cfg)
        self.decoder_dim = dd
        self.embed = dense(cfg.embed_dim, dd, cfg, rngs)
        self.mask_token = nnx.Param(TOKEN_INIT(rngs.params(), (dd,)))
        self.modality_embed = nnx.Param(TOKEN_INIT(rngs.params(), (len(self.specs), dd)))
        self.vector_pos = nnx.Dict({m: nnx.Param(TOKEN_INIT(rngs.params(), (n, dd)))
                                    for m, n, _, g in self.specs if g is None})
        self.blocks = nnx.List([Block(dd, cfg.decoder_heads, cfg, rngs=rngs)
                                for _ in range(cfg.decoder_depth)])
        self.norm = layer_norm(dd, cfg, rngs)
        self.remat = cfg.remat
        self.pred = nnx.Dict({m: dense(dd, pd, cfg, rngs) for m, _, pd, _ in self.specs})

    def positions(self, m: str, n: int, grid) -> jax.Array:
        if grid is None:
            return self.vector_pos[m][...]
        return jnp.asarray(sincos_pos_embed_2d(self.decoder_dim, grid))

    def __call__(self, fused: jax.Array, ids: dict[str, tuple[jax.Array, jax.Array]],
                 present: jax.Array) -> dict[str, jax.Array]:
        """``ids``: modality → (ids_keep (B, n_vis), ids_restore (B, n_patches))."""
        x = self.embed(fused)
        b = x.shape[0]
        mask_token = self.mask_token[...].astype(self.dtype)
        seqs, valid, groups, start = [], [], [], 0
        for i, (m, n, _, grid) in enumerate(self.specs):
            ids_keep, ids_restore = ids[m]
            n_vis = ids_keep.shape[1]
            vis = x[:, start:start + n_vis]
            start += n_vis
            full = jnp.concatenate([vis, jnp.broadcast_to(mask_token, (b, n - n_vis, x.shape[2]))],
                                   axis=1)
            full = gather_tokens(full, ids_restore)  # unshuffle: patch j back at position j
            pos = self.positions(m, n, grid).astype(self.dtype)
            if self.pos_on_masked_only:  # (B, n, 1): 1 where patch j was masked
                pos = pos * (ids_restore >= n_vis)[..., None].astype(self.dtype)
            full = full + pos + self.modality_embed[i].astype(self.dtype)
            seqs.append(full)
            here = present[:, MODALITY_INDEX[m]] > 0
            valid.append(jnp.broadcast_to(here[:, None], (b, n)))
            groups.append(np.full(n, i))
        if start != x.shape[1]:
            raise ValueError(f"decoder got {x.shape[1]} fused tokens, the ids account for {start}")
        x = jnp.concatenate(seqs, axis=1)
        t = x.shape[1]
        x = pad_tokens(x)  # to a multiple of 8; the padding is isolated and sliced off
        mask = attention_mask(jnp.concatenate(valid, axis=1) if self.drop_absent else None,
                              np.concatenate(groups), length=x.shape[1])
        x = apply_blocks(self.blocks, x, mask, remat=self.remat)
        x = self.norm(x[:, :t])
        out, start = {}, 0
        for m, n, _, _ in self.specs:
            out[m] = self.pred[m](x[:, start:start + n]).astype(jnp.float32)
            start += n
        return out


def masked_mean(tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean over the valid tokens: (B, T, D), (B, T) bool → (B, D). Zero if none is valid."""
    w = valid.astype(tokens.dtype)[..., None]
    return (tokens * w).sum(1) / jnp.maximum(w.sum(1), 1)


class MLP(nnx.Module):
    """The project's one tanh MLP (policy and value heads here, the lidar actor-critic in
    rl/agent.py): hidden Dense → tanh layers (orthogonal init, gain √2, zero bias), then a
    linear output layer (orthogonal, gain ``out_scale``: 0.01 for a policy mean, 1 for a
    value)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int, out_scale: float,
                 *, rngs: nnx.Rngs):
        dims = (in_dim, *hidden)
        ortho = nnx.initializers.orthogonal
        self.layers = nnx.List([nnx.Linear(a, b, kernel_init=ortho(np.sqrt(2)), rngs=rngs)
                                for a, b in zip(dims[:-1], dims[1:], strict=True)])
        self.out = nnx.Linear(dims[-1], out_dim, kernel_init=ortho(out_scale), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.out(x)


class PolicyHead(nnx.Module):
    """Features (…, in_dim) → actions in [-1, 1] (…, action_dim): [hidden tanh layers] Dense → tanh.

    The last layer is orthogonal with gain 0.01 (PPO practice: a near-zero initial mean action).
    """

    def __init__(self, in_dim: int, action_dim: int, *, hidden: tuple[int, ...] = (),
                 rngs: nnx.Rngs):
        self.mlp = MLP(in_dim, tuple(hidden), action_dim, 0.01, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(self.mlp(x.astype(jnp.float32)))


class ValueHead(nnx.Module):
    """Features (…, in_dim) → a scalar value (…,): [hidden tanh layers] Dense → 1."""

    def __init__(self, in_dim: int, *, hidden: tuple[int, ...] = (), rngs: nnx.Rngs):
        self.mlp = MLP(in_dim, tuple(hidden), 1, 1.0, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.mlp(x.astype(jnp.float32))[..., 0]
