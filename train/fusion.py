"""Multimodal fusion: every modality's tokens in one transformer.

Tokens of each modality get that modality's learned embedding added and are concatenated in
``etl.schema.MODALITIES`` order, then run through ``cfg.fusion_depth`` pre-LN blocks:

- ``fusion = "self"``: joint self-attention, every token attends to every (valid) token.
- ``fusion = "cross"``: each modality's tokens attend to the *other* modalities' tokens only
  (the same blocks with a block-diagonal-excluded attention mask; a token also keeps its own
  position as a key, so that a query whose other modalities are all absent is well defined).
  Same parameter count and FLOPs as "self".

Absent modalities (``present == 0`` for a sample, per the ``present`` flags of the batch):

- ``absent = "drop"``: their tokens are removed from attention as *keys* for that sample (every
  query keeps its own position as a key, so no softmax row is empty). Their own outputs are
  junk and are flagged invalid in ``token_valid``; nothing downstream may read them (the MAE loss
  skips them).
- ``absent = "token"``: their tokens are replaced by one learned "absent" token per modality
  (broadcast to all of its positions) and attend normally. Their content never enters.

Either way, the model's outputs for present modalities are independent of an absent modality's
(placeholder) data.

The attention sequence is padded with zero tokens to a multiple of :data:`PAD_MULTIPLE` (8) inside
the module (:func:`pad_tokens`; the decoder does the same): cuDNN flash attention
(``model.attention_impl = "cudnn"``) needs even lengths when a mask is given, and aligned rows
suit the XLA path too. The padding attends only to itself and is never a key, so the real tokens'
outputs are unchanged; it is sliced off before the final LayerNorm. No parameters are involved.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from etl.schema import MODALITY_INDEX
from train.config import ModelConfig
from train.encoders import TOKEN_INIT, Block, apply_blocks, compute_dtype, layer_norm

PAD_MULTIPLE = 8  # attention sequences are padded to a multiple of this (see pad_tokens)


def padded_length(t: int, multiple: int | None = None) -> int:
    """``t`` rounded up to a multiple of ``multiple`` (default :data:`PAD_MULTIPLE`)."""
    multiple = PAD_MULTIPLE if multiple is None else multiple
    return -(-t // multiple) * multiple


def pad_tokens(x: jax.Array, multiple: int | None = None) -> jax.Array:
    """(B, T, D) → (B, T', D): zero tokens appended so that T' = :func:`padded_length` (T).

    cuDNN flash attention with a mask (a bias) needs even sequence lengths when training, and
    rows of a multiple of 8 align the XLA path's tiles. Run the blocks with
    ``attention_mask(..., length=T')`` and keep ``[:, :T]``: the padding is isolated (it attends
    only to itself, nothing attends to it), so the real tokens' outputs are unchanged and every
    softmax row keeps a key (no NaN, in the forward or the backward pass).
    """
    t = x.shape[1]
    tp = padded_length(t, multiple)
    return x if tp == t else jnp.pad(x, ((0, 0), (0, tp - t), (0, 0)))


def attention_mask(valid: jax.Array | None, groups: np.ndarray, *, cross: bool = False,
                   length: int | None = None) -> jax.Array | None:
    """(B, 1, T', T') bool mask, True = query may attend key; None when nothing is masked.

    ``valid`` (B, T) bool marks tokens usable as keys (None: all); ``groups`` (T,) the modality
    of each token (static); ``cross`` forbids keys of the query's own modality. The diagonal is
    always allowed. ``length`` (T' ≥ T, default T) appends T' − T padding tokens (see
    :func:`pad_tokens`): each may attend only to itself and no token may attend to it.
    """
    t = len(groups)
    tp = t if length is None else int(length)
    if tp < t:
        raise ValueError(f"attention_mask: length {tp} is shorter than the {t} tokens")
    if valid is None and not cross and tp == t:
        return None
    allowed = np.ones((t, t), bool)
    if cross:
        allowed = groups[:, None] != groups[None, :]
    full = np.eye(tp, dtype=bool)  # padding: the diagonal only
    full[:t, :t] |= allowed
    mask = jnp.asarray(full)[None]  # (1, T', T')
    if valid is not None:
        keys = jnp.pad(valid.astype(bool), ((0, 0), (0, tp - t)))  # padding is never a key
        mask = mask & (keys[:, None, :] | jnp.eye(tp, dtype=bool)[None])
    return mask[:, None]


class MultimodalFusion(nnx.Module):
    """``__call__(tokens, present) -> (fused (B, T, D), token_valid (B, T) bool)``.

    ``tokens``: dict modality → (B, n_m, D), any subset of ``modalities``; concatenated in
    ``modalities`` order. ``present``: (B, 6) flags in ``etl.schema.MODALITIES`` order.
    ``token_valid`` is True where a token's modality is present for that sample (in both absent
    modes: under "token" the absent positions hold the learned token, not data).
    """

    def __init__(self, cfg: ModelConfig, modalities: tuple[str, ...], *, rngs: nnx.Rngs):
        self.modalities = tuple(modalities)
        self.cross = cfg.fusion == "cross"
        self.drop_absent = cfg.absent == "drop"
        self.dtype = compute_dtype(cfg)
        m, d = len(self.modalities), cfg.embed_dim
        self.modality_embed = nnx.Param(TOKEN_INIT(rngs.params(), (m, d)))
        if not self.drop_absent:  # only exists (and is trained) under absent = "token"
            self.absent_token = nnx.Param(TOKEN_INIT(rngs.params(), (m, d)))
        self.blocks = nnx.List([Block(d, cfg.num_heads, cfg, rngs=rngs)
                                for _ in range(cfg.fusion_depth)])
        self.norm = layer_norm(d, cfg, rngs)
        self.remat = cfg.remat

    def __call__(self, tokens: dict[str, jax.Array], present: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
        unknown = set(tokens) - set(self.modalities)
        if unknown:
            raise ValueError(f"fusion was built for {self.modalities}, got tokens of {unknown}")
        xs, valid, groups = [], [], []
        for i, m in enumerate(self.modalities):
            if m not in tokens:
                continue
            z = tokens[m].astype(self.dtype)
            b, n, _ = z.shape
            here = present[:, MODALITY_INDEX[m]] > 0  # (B,)
            emb = self.modality_embed[i].astype(self.dtype)
            if not self.drop_absent:
                z = jnp.where(here[:, None, None], z, self.absent_token[i].astype(self.dtype))
            xs.append(z + emb)
            valid.append(jnp.broadcast_to(here[:, None], (b, n)))
            groups.append(np.full(n, i))
        x, valid = jnp.concatenate(xs, axis=1), jnp.concatenate(valid, axis=1)
        t = x.shape[1]
        x = pad_tokens(x)
        mask = attention_mask(valid if self.drop_absent else None, np.concatenate(groups),
                              cross=self.cross, length=x.shape[1])
        x = apply_blocks(self.blocks, x, mask, remat=self.remat)
        return self.norm(x[:, :t]), valid
