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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from etl.schema import MODALITY_INDEX
from train.config import ModelConfig
from train.encoders import TOKEN_INIT, Block, compute_dtype, layer_norm


def attention_mask(valid: jax.Array | None, groups: np.ndarray, *, cross: bool = False
                   ) -> jax.Array | None:
    """(B, 1, T, T) bool mask, True = query may attend key; None when nothing is masked.

    ``valid`` (B, T) bool marks tokens usable as keys (None: all); ``groups`` (T,) the modality
    of each token (static); ``cross`` forbids keys of the query's own modality. The diagonal is
    always allowed.
    """
    if valid is None and not cross:
        return None
    t = len(groups)
    allowed = np.ones((t, t), bool)
    if cross:
        allowed = groups[:, None] != groups[None, :]
    allowed = jnp.asarray(allowed | np.eye(t, dtype=bool))[None]  # (1, T, T)
    if valid is not None:
        allowed = allowed & (valid[:, None, :] | jnp.eye(t, dtype=bool)[None])
    return allowed[:, None]


class MultimodalFusion(nnx.Module):
    """``__call__(tokens, present) -> (fused (B, T, D), token_valid (B, T) bool)``.

    ``tokens``: dict modality → (B, n_m, D), any subset of ``modalities``; concatenated in
    ``modalities`` order. ``present``: (B, 6) flags in ``etl.schema.MODALITIES`` order.
    ``token_valid`` is True where a token's modality is present for that sample (in both absent
    modes: under "token" the absent positions hold the learned token, not data).
    """

    def __init__(self, cfg: ModelConfig, modalities: tuple[str, ...], *, rngs: nnx.Rngs):
        if cfg.fusion not in ("self", "cross"):
            raise ValueError(f"model.fusion must be 'self' or 'cross', got {cfg.fusion!r}")
        if cfg.absent not in ("drop", "token"):
            raise ValueError(f"model.absent must be 'drop' or 'token', got {cfg.absent!r}")
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
        mask = attention_mask(valid if self.drop_absent else None, np.concatenate(groups),
                              cross=self.cross)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x), valid
