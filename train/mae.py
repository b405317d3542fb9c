"""The masked multimodal autoencoder (MAE over LiDAR/radar BEV, RGB, IR, GPS and IMU).

    per modality m:  patches_m ──random_masking──▶ visible ──encoder_m──▶ Z_m
    fusion:          concat(Z_m + modality embedding) ──fusion blocks──▶ fused visible tokens
    decoder:         + mask tokens at the masked positions ──decoder blocks──▶ every patch
    loss:            MSE(pred, target) on the *masked* patches, per modality, over present samples

Masking. Every modality is masked at the same ``mask_ratio`` with its own random permutation per
sample: n_vis = round(n_patches·(1 − mask_ratio)), at least 1 (so a 2-token IMU is never fully
hidden). The ratio being equal across modalities keeps every shape static (no padding, no Python
branching on data); the exact count per modality is :func:`num_visible`. GPS and IMU are cut
into channel groups ("vector patches": gps east | north | up, imu gyro | accel) and masked the
same way. A modality with no masked patch at a ratio (e.g. imu at 0.25) has no loss term.

Loss. For modality m with prediction P, target X (pixels of a patch, or a normalized channel
group), mask M (B, N) = 1 on masked patches and presence p (B,) ∈ {0, 1}:

    per_patch[b, j] = mean_c (P − X)²                    (fp32)
    per_sample[b]   = Σ_j M·per_patch / Σ_j M            (masked patches only)
    loss_m          = Σ_b p·per_sample / max(Σ_b p, 1)   (present samples only)
    loss            = mean of loss_m over the modalities with Σ_b p > 0

With ``visible_weight`` w > 0 (``training.visible_loss_weight``) each modality's loss also
counts its *visible* patches: loss_m + w · (the same average over the visible patches, M → 1 − M).
The plain MAE loss never asks a token to keep what is in its own patch, only what helps to
inpaint the others; in a sparse LiDAR BEV a vehicle says little about the neighbouring patches,
so the encoder drops it (a linear map recovers less of a patch from its pretrained token than from
a random-init one: R² 0.54 vs 0.70 — README, "Pretraining that learns").

``norm_pix_loss`` normalizes each image target patch by its own mean and variance. An absent
modality contributes neither loss nor gradient: it is excluded as an attention key
(``absent = "drop"``) or replaced by a learned token (``absent = "token"``) — see fusion.py.

Jit. ``__call__`` is pure in (params, batch, key) with ``mask_ratio`` static, so
``graphdef, params = nnx.split(model, nnx.Param)`` and a ``jax.jit`` of
``lambda params, batch, key: nnx.merge(graphdef, params)(batch, key, ratio)`` is the hot path.
Every module attribute is hashable, so the graphdef can be a static argument.

Sharding. Parameters carry no sharding metadata. For FSDP, shard each parameter of ≥ 2
dimensions along its largest axis divisible by the 'data' mesh size (kernels (in, out):
usually the wider one; VectorEmbed's (n_tokens, in, out): the last) and replicate the rest (biases,
LayerNorm, modality/mask tokens — all ≤ max(embed_dim, 3·embed_dim) numbers). Activations are
batch-sharded over 'data'; nothing in the model needs a cross-sample collective.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from etl.config import PreprocessConfig
from etl.schema import IMAGE_MODALITIES, MODALITIES, sample_spec
from train.config import ModelConfig
from train.encoders import ModalityViT, VectorEmbed, encode_stacked, patchify, unpatchify
from train.fusion import MultimodalFusion
from train.heads import PretrainHead

__all__ = [
    "ModalityLayout",
    "MultimodalMAE",
    "masked_mse",
    "model_flops_per_sample",
    "modality_layout",
    "num_visible",
    "patchify",
    "random_masking",
    "unpatchify",
]


def num_visible(n_patches: int, mask_ratio: float) -> int:
    """Visible patches of a modality with ``n_patches`` at ``mask_ratio`` (static)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return min(n_patches, max(1, round(n_patches * (1.0 - mask_ratio))))


def random_masking(key: jax.Array, batch_size: int, n_patches: int, mask_ratio: float
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A uniformly random split of each sample's patches into visible and masked.

    Returns ``ids_keep`` (B, n_vis), ``ids_masked`` (B, n_patches − n_vis) and ``ids_restore``
    (B, n_patches): ``concat([ids_keep, ids_masked])[b, ids_restore[b]] == arange(n_patches)``,
    i.e. ``ids_restore`` puts a [visible…, masked…] sequence back in patch order.
    """
    n_vis = num_visible(n_patches, mask_ratio)
    noise = jax.random.uniform(key, (batch_size, n_patches))
    ids_shuffle = jnp.argsort(noise, axis=1)  # ascending: the first n_vis are kept
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    return ids_shuffle[:, :n_vis], ids_shuffle[:, n_vis:], ids_restore


def patch_mask(ids_restore: jax.Array, n_vis: int) -> jax.Array:
    """(B, N) float32, 1 on masked patches, 0 on visible ones, in patch order."""
    b, n = ids_restore.shape
    shuffled = jnp.concatenate([jnp.zeros((b, n_vis)), jnp.ones((b, n - n_vis))], axis=1)
    return jnp.take_along_axis(shuffled, ids_restore, axis=1)


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array, present: jax.Array
               ) -> jax.Array:
    """MSE over masked patches, averaged over present samples (the formula in the docstring).

    pred, target (B, N, P); mask (B, N) 1 = masked; present (B,) 1 = modality present.
    """
    per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)  # (B, N)
    per_sample = (per_patch * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
    # where(), not a product: an absent sample's placeholder never reaches the loss value
    per_sample = jnp.where(present > 0, per_sample, 0.0)
    return per_sample.sum() / jnp.maximum(present.sum(), 1.0)


@dataclasses.dataclass(frozen=True)
class ModalityLayout:
    """How a modality is cut into patches (frozen, so the module's graphdef stays hashable)."""

    n_patches: int
    patch_dim: int  # p·p·C for an image, channels per group for a vector
    grid: tuple[int, int] | None  # patch grid (rows, cols); None for a vector modality
    hw: tuple[int, int] | None = None  # image size
    channels: int | None = None


def modality_layout(cfg: ModelConfig, pre: PreprocessConfig) -> dict[str, ModalityLayout]:
    """Per modality of ``cfg.modalities``: its :class:`ModalityLayout`."""
    spec = sample_spec(pre)
    p = cfg.patch_size
    out = {}
    for m in cfg.modalities:
        if m not in MODALITIES:
            raise ValueError(f"model.modalities: unknown modality {m!r} (known: {MODALITIES})")
        shape = spec[m].shape
        if m in IMAGE_MODALITIES:
            h, w, c = shape
            if h % p or w % p:
                raise ValueError(f"{m}: size {(h, w)} is not divisible by patch_size {p}")
            out[m] = ModalityLayout(n_patches=(h // p) * (w // p), patch_dim=p * p * c,
                                    grid=(h // p, w // p), hw=(h, w), channels=c)
        else:
            n_tok = {"gps": cfg.gps_tokens, "imu": cfg.imu_tokens}[m]
            if shape[0] % n_tok:
                raise ValueError(f"{m}: {shape[0]} channels do not split into {n_tok} tokens")
            out[m] = ModalityLayout(n_patches=n_tok, patch_dim=shape[0] // n_tok, grid=None)
    return out


def _ordered(modalities) -> tuple[str, ...]:
    return tuple(m for m in MODALITIES if m in modalities)


class MultimodalMAE(nnx.Module):
    """Encoders (one per modality) + :class:`MultimodalFusion` + :class:`PretrainHead`.

    ``__call__(batch, key, mask_ratio, visible_weight=0.0) -> (loss, aux)`` is the pretraining
    objective; it is a pure function of (parameters, batch, key) and ``mask_ratio`` and
    ``visible_weight`` must be Python floats (static). ``aux``: ``loss/<m>`` per modality (0
    where no sample is present), ``present/<m>`` (count of present samples), ``mask/<m>`` (B, N)
    1 = masked, ``pred/<m>`` (B, N, patch_dim) and ``target/<m>`` (the reconstruction target;
    patch space: use :func:`unpatchify`).
    ``encode(batch, modalities)`` → (fused tokens (B, T, D), token_valid (B, T)), no masking.
    """

    def __init__(self, cfg: ModelConfig, pre: PreprocessConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.pre = pre
        self.modalities = _ordered(cfg.modalities)
        if len(self.modalities) != len(cfg.modalities):
            raise ValueError(f"model.modalities has repeats or unknowns: {cfg.modalities}")
        layout = modality_layout(cfg, pre)
        self.layouts = tuple(layout[m] for m in self.modalities)  # a tuple: hashable graphdef
        encoders = {}
        for m, lay in layout.items():
            if lay.grid is not None:
                encoders[m] = ModalityViT(lay.channels, lay.hw, cfg, rngs=rngs)
            else:
                encoders[m] = VectorEmbed(m, lay.n_patches * lay.patch_dim, lay.n_patches, cfg,
                                          rngs=rngs)
        self.encoders = nnx.Dict(encoders)
        self.fusion = MultimodalFusion(cfg, self.modalities, rngs=rngs)
        self.decoder = PretrainHead(
            cfg, [(m, lay.n_patches, lay.patch_dim, lay.grid) for m, lay in layout.items()],
            rngs=rngs)

    @property
    def layout(self) -> dict[str, ModalityLayout]:
        return dict(zip(self.modalities, self.layouts, strict=True))

    def targets(self, batch: dict, m: str) -> jax.Array:
        """Reconstruction target of modality m in patch space (B, N, patch_dim), float32."""
        x = jnp.asarray(batch[m], jnp.float32)
        if self.layout[m].grid is None:
            return self.encoders[m].patches(x)
        t = patchify(x, self.cfg.patch_size)
        if self.cfg.norm_pix_loss:
            mean = t.mean(axis=-1, keepdims=True)
            var = t.var(axis=-1, keepdims=True)
            t = (t - mean) / jnp.sqrt(var + 1e-6)
        return t

    def __call__(self, batch: dict, key: jax.Array, mask_ratio: float,
                 visible_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
        present = jnp.asarray(batch["present"])
        b = present.shape[0]
        # 1. mask and encode the visible patches of every modality
        ids = {}
        for m in self.modalities:
            k = jax.random.fold_in(key, MODALITIES.index(m))
            ids_keep, _, ids_restore = random_masking(k, b, self.layout[m].n_patches,
                                                      mask_ratio)
            ids[m] = (ids_keep, ids_restore)
        tokens = self._encode(batch, self.modalities, {m: ids[m][0] for m in ids})
        # 2. fuse, 3. decode every patch
        fused, _ = self.fusion(tokens, present)
        preds = self.decoder(fused, ids, present)
        # 4. MSE on masked patches of present samples
        aux, losses, has = {}, [], []
        for m in self.modalities:
            n_vis = ids[m][0].shape[1]
            mask = patch_mask(ids[m][1], n_vis)  # (B, N) 1 = masked
            target = self.targets(batch, m)
            here = (present[:, MODALITIES.index(m)] > 0).astype(jnp.float32)  # (B,)
            terms = []
            if mask.shape[1] > n_vis:  # some patch is masked at this ratio
                terms.append(masked_mse(preds[m], target, mask, here))
            if visible_weight > 0:  # the visible patches too (static: no trace without it)
                terms.append(visible_weight * masked_mse(preds[m], target, 1.0 - mask, here))
            if terms:
                loss_m = sum(terms[1:], terms[0])
                losses.append(loss_m)
                has.append((here.sum() > 0).astype(jnp.float32))
            else:
                loss_m = jnp.zeros((), jnp.float32)
            aux[f"loss/{m}"] = loss_m
            aux[f"present/{m}"] = here.sum()
            aux[f"mask/{m}"] = mask
            aux[f"pred/{m}"] = preds[m]
            aux[f"target/{m}"] = target
        if losses:
            losses, has = jnp.stack(losses), jnp.stack(has)
            loss = (losses * has).sum() / jnp.maximum(has.sum(), 1.0)
        else:
            loss = jnp.zeros((), jnp.float32)
        aux["loss"] = loss
        return loss, aux

    def encode(self, batch: dict, modalities: tuple[str, ...] | None = None
               ) -> tuple[jax.Array, jax.Array]:
        """All patches of the chosen modalities, unmasked, through encoders and fusion.

        Returns ``tokens`` (B, T, embed_dim) in the compute dtype and ``token_valid`` (B, T) bool
        (False on tokens of modalities absent for that sample). T = Σ n_patches over the chosen
        modalities, in MODALITIES order; :meth:`token_layout` gives each one's slice.
        Modalities left out are simply not there (the model was pretrained to cope with absence).
        """
        modalities = self._select(modalities)
        tokens = self._encode(batch, modalities, dict.fromkeys(modalities))
        return self.fusion(tokens, jnp.asarray(batch["present"]))

    def encoder_groups(self, modalities: tuple[str, ...]) -> list[tuple[str, ...]]:
        """How :meth:`_encode` runs the encoders of ``modalities``: one group per call. With
        ``cfg.stack_encoders`` the image modalities of one patch count share a group (lidar +
        radar BEV, rgb + ir at the same image size); otherwise every modality is its own."""
        groups: dict[object, list[str]] = {}
        for m in modalities:
            lay = self.layout[m]
            same = ("image", lay.n_patches) if self.cfg.stack_encoders and lay.grid else m
            groups.setdefault(same, []).append(m)
        return [tuple(g) for g in groups.values()]

    def _encode(self, batch: dict, modalities: tuple[str, ...],
                ids_keep: dict[str, jax.Array | None]) -> dict[str, jax.Array]:
        """Tokens of each modality from its encoder (visible patches only where ids_keep)."""
        tokens = {}
        for group in self.encoder_groups(modalities):
            if len(group) == 1:
                m = group[0]
                tokens[m] = self.encoders[m](batch[m], ids_keep[m])
            else:
                out = encode_stacked([self.encoders[m] for m in group],
                                     [batch[m] for m in group], [ids_keep[m] for m in group])
                tokens.update(zip(group, out, strict=True))
        return tokens

    def token_layout(self, modalities: tuple[str, ...] | None = None) -> dict[str, slice]:
        """The slice of :meth:`encode`'s token axis that holds each modality."""
        out, start = {}, 0
        for m in self._select(modalities):
            n = self.layout[m].n_patches
            out[m] = slice(start, start + n)
            start += n
        return out

    def _select(self, modalities) -> tuple[str, ...]:
        if modalities is None:
            return self.modalities
        unknown = set(modalities) - set(self.modalities)
        if unknown:
            raise ValueError(f"encode: model has no encoder for {sorted(unknown)}")
        return _ordered(modalities)


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------


def block_flops(t: int, d: int, hidden: int) -> int:
    """Forward FLOPs (2 per multiply-add) of one pre-LN block on t tokens of width d:
    qkv 6·t·d², scores q·kᵀ 2·t²·d, attention·v 2·t²·d, out-proj 2·t·d², MLP 4·t·d·hidden."""
    return 8 * t * d * d + 4 * t * t * d + 4 * t * d * hidden


def model_flops_per_sample(cfg: ModelConfig, pre: PreprocessConfig, mask_ratio: float,
                           training: bool = True) -> float:
    """Analytic matmul FLOPs for one sample through encoders + fusion + decoder.

    Counted: every Linear/einsum (2·in·out per token) and both attention matmuls; not counted:
    LayerNorm, softmax, GELU, adds, gathers (all O(t·d)). With n_m = patches of modality m,
    v_m = :func:`num_visible`, P_m = patch_dim, D = embed_dim, d = decoder_dim, h = mlp_ratio·width:

        image encoder  2·v_m·P_m·D + depth·block(v_m, D)
        vector encoder 2·n_m·(P_m·D + D·D)                   (all groups embedded, then gathered)
        fusion         fusion_depth·block(V, D),  V = Σ v_m
        decoder        2·V·D·d + decoder_depth·block(N, d) + Σ 2·n_m·d·P_m,  N = Σ n_m
        block(t, w)    8·t·w² + 4·t²·w + 4·t·w·h

    ``training=True`` returns 3× forward (backward ≈ 2× forward).
    """
    lay = modality_layout(cfg, pre)
    d_e, d_d = cfg.embed_dim, cfg.decoder_dim
    h_e, h_d = int(d_e * cfg.mlp_ratio), int(d_d * cfg.mlp_ratio)
    total, vis_total, all_total = 0, 0, 0
    for m in _ordered(cfg.modalities):
        n, pd = lay[m].n_patches, lay[m].patch_dim
        v = num_visible(n, mask_ratio)
        if lay[m].grid is not None:
            total += 2 * v * pd * d_e + cfg.depth * block_flops(v, d_e, h_e)
        else:
            total += 2 * n * (pd * d_e + d_e * d_e)
        total += 2 * n * d_d * pd  # decoder prediction layer
        vis_total += v
        all_total += n
    total += cfg.fusion_depth * block_flops(vis_total, d_e, h_e)
    total += 2 * vis_total * d_e * d_d + cfg.decoder_depth * block_flops(all_total, d_d, h_d)
    return float(3 * total if training else total)
