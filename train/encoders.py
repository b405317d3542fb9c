"""Per-modality encoders: a small ViT for every image-like modality, an MLP for GPS and IMU.

Every encoder turns one modality into tokens of width ``cfg.embed_dim``. Image-like modalities
(lidar BEV, radar BEV, rgb, ir) are cut into ``patch_size``² patches; GPS and IMU are cut into a
few channel groups ("vector patches"), so that one masking routine serves both (see mae.py).

MAE-style: an encoder is handed ``ids_keep``, the indices of the *visible* patches, and runs its
transformer on those alone, so compute falls with the mask ratio. Patches are gathered before the
(linear) patch embedding, which gives the same tokens as embedding everything and gathering after,
for less work.

Parameters are float32; ``cfg.dtype == "bfloat16"`` runs every matmul and the residual stream in
bfloat16 (flax's ``dtype``/``param_dtype``). LayerNorm statistics are computed in float32 by flax.

Levers of speed that leave the parameters (and so checkpoints) as they are — issue 15; each is a
ModelConfig key, equivalence-tested in tests/test_levers.py:

- ``attention_impl``: "xla" (the default: jax's reference attention, float32 T×T scores in
  memory), "cudnn" (flash attention: the scores never leave the chip; bfloat16 only) or "auto"
  (cuDNN on an NVIDIA GPU when the compute dtype and head width allow it, XLA otherwise — so
  on a CPU nothing changes). See :func:`attention_backend`.
- ``score_dtype = "compute"``: the XLA path keeps its T×T scores and probabilities in the
  compute dtype (bfloat16) instead of float32; the softmax's max, exponentials and sum stay in
  float32 inside the fused kernel (:func:`softmax_lowp`). A no-op under ``dtype = "float32"``.
- ``stack_encoders``: image encoders of the same token count (lidar + radar BEV; rgb + ir) run
  their transformer blocks as one batched call, ``jax.vmap`` over their parameters stacked on
  the fly (:func:`encode_stacked`). The parameters stay one tree per modality.
- ``remat``: every transformer block is rematerialised in the backward pass
  (``jax.checkpoint``): less activation memory for a larger batch, ~1/3 more FLOPs.

All are off by default (the plain path) until a GPU run measures them (benchmarks/gpu.sh).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.config import ModelConfig

KERNEL_INIT = nnx.initializers.xavier_uniform()
TOKEN_INIT = nnx.initializers.normal(stddev=0.02)


def compute_dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def dense(d_in: int, d_out: int, cfg: ModelConfig, rngs: nnx.Rngs, **kw) -> nnx.Linear:
    """A Linear with float32 parameters computing in the config's dtype."""
    kw.setdefault("kernel_init", KERNEL_INIT)
    return nnx.Linear(d_in, d_out, dtype=compute_dtype(cfg), param_dtype=jnp.float32,
                      rngs=rngs, **kw)


def layer_norm(dim: int, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=1e-6, dtype=compute_dtype(cfg), param_dtype=jnp.float32,
                         rngs=rngs)


# ----------------------------------------------------------------------------------------------
# Patches and positions
# ----------------------------------------------------------------------------------------------


def patchify(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) → (B, (H/p)·(W/p), p·p·C), patches in row-major order, pixels (row, col, ch)."""
    b, h, w, c = x.shape
    gh, gw = h // p, w // p
    x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(patches: jax.Array, p: int, hw: tuple[int, int], channels: int) -> jax.Array:
    """Inverse of :func:`patchify`: (B, N, p·p·C) → (B, H, W, C)."""
    b = patches.shape[0]
    gh, gw = hw[0] // p, hw[1] // p
    x = patches.reshape(b, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * p, gw * p, channels)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    angle = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)


@functools.lru_cache(maxsize=64)
def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> np.ndarray:
    """Fixed 2-D sin-cos positions (gh·gw, dim): half the channels encode the row, half the col."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    emb = np.concatenate([_sincos_1d(dim // 2, rows), _sincos_1d(dim // 2, cols)], axis=1)
    return emb.astype(np.float32)


def gather_tokens(x: jax.Array, ids: jax.Array) -> jax.Array:
    """x (B, N, ...) , ids (B, K) int → (B, K, ...): per-sample gather along the token axis."""
    ids = ids.reshape(ids.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, ids, axis=1)


# ----------------------------------------------------------------------------------------------
# Transformer block
# ----------------------------------------------------------------------------------------------


def attention_backend(impl: str, dtype, head_dim: int, device=None) -> str:
    """The attention kernel ``model.attention_impl`` resolves to: "xla" or "cudnn".

    "auto" picks cuDNN flash attention on an NVIDIA GPU when it can run it (a 16-bit compute
    dtype, a head width that is a multiple of 8 and at most 128) and XLA everywhere else (CPUs,
    float32 models). "xla" and "cudnn" are taken as they are ("cudnn" fails on a CPU).
    """
    if impl != "auto":
        return impl
    device = device or jax.devices()[0]
    nvidia = device.platform == "gpu" and "nvidia" in device.device_kind.lower()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if nvidia and half and head_dim % 8 == 0 and head_dim <= 128 else "xla"


_MASKED = -0.7 * float(np.finfo(np.float32).max)  # jax XLA attention's masked logit


def _softmax_fwd_f32(logits, mask, scale):
    x = logits.astype(jnp.float32) * scale
    if mask is not None:
        x = jnp.where(mask, x, _MASKED)
    x = x - jax.lax.stop_gradient(x.max(axis=-1, keepdims=True))
    e = jnp.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def softmax_lowp(logits: jax.Array, mask: jax.Array | None, scale: float) -> jax.Array:
    """softmax(scale·logits) over the last axis, masked (``mask`` False → probability 0), with
    its max, exponentials and sum in float32 and the result in ``logits.dtype``.

    The backward pass keeps only that result (no float32 copy of the T×T probabilities) and
    computes ``p·(dp − Σ p·dp)·scale`` in float32, returned in ``logits.dtype``.
    """
    return _softmax_fwd_f32(logits, mask, scale).astype(logits.dtype)


def _softmax_lowp_fwd(logits, mask, scale):
    p = softmax_lowp(logits, mask, scale)
    return p, (p, mask)


def _softmax_lowp_bwd(scale, res, dp):
    p, mask = res
    p32, dp32 = p.astype(jnp.float32), dp.astype(jnp.float32)
    dx = p32 * (dp32 - (p32 * dp32).sum(axis=-1, keepdims=True)) * scale
    return dx.astype(p.dtype), None


softmax_lowp.defvjp(_softmax_lowp_fwd, _softmax_lowp_bwd)


def attention_lowp(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None
                   ) -> jax.Array:
    """Multi-head attention with the T×T scores and probabilities in the inputs' dtype.

    q, k, v (B, T, N, H); ``mask`` (B or 1, 1, T, S) bool, True = may attend. The same function
    as ``jax.nn.dot_product_attention`` (XLA), whose scores are float32 in memory; here only the
    softmax statistics are (inside the kernel, see :func:`softmax_lowp`).
    """
    logits = jnp.einsum("btnh,bsnh->bnts", q, k)
    p = softmax_lowp(logits, mask, 1.0 / math.sqrt(q.shape[-1]))
    return jnp.einsum("bnts,bsnh->btnh", p, v)


class Attention(nnx.Module):
    """Multi-head attention. ``kv=None`` is self-attention; ``mask`` (B, 1, Tq, Tk) bool, True =
    may attend. The kernel follows ``cfg.attention_impl`` and ``cfg.score_dtype`` (module doc)."""

    def __init__(self, dim: int, num_heads: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.impl = cfg.attention_impl
        self.lowp_scores = cfg.score_dtype == "compute" and cfg.dtype != "float32"
        self.dtype = compute_dtype(cfg)
        self.qkv = dense(dim, 3 * dim, cfg, rngs)
        self.proj = dense(dim, dim, cfg, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads),
                            3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        impl = attention_backend(self.impl, self.dtype, d // self.num_heads)
        if impl == "xla" and self.lowp_scores:
            out = attention_lowp(q, k, v, mask)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                               implementation=None if impl == "xla" else impl)
        return self.proj(out.reshape(b, t, d))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.fc1 = dense(dim, hidden, cfg, rngs)
        self.fc2 = dense(hidden, dim, cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class Block(nnx.Module):
    """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.norm1 = layer_norm(dim, cfg, rngs)
        self.attn = Attention(dim, num_heads, cfg, rngs=rngs)
        self.norm2 = layer_norm(dim, cfg, rngs)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


def apply_blocks(blocks: Sequence[Block], x: jax.Array, mask: jax.Array | None = None, *,
                 remat: bool = False) -> jax.Array:
    """x through ``blocks`` in order (a Python loop: every layer is unrolled in the program).

    ``remat``: each block is a ``jax.checkpoint`` — only its input is kept for the backward
    pass, its inside is computed again there.
    """
    for block in blocks:
        if remat:
            graphdef, state = nnx.split(block)
            x = jax.checkpoint(lambda s, h, m, g=graphdef: nnx.merge(g, s)(h, m))(state, x, mask)
        else:
            x = block(x, mask)
    return x


# ----------------------------------------------------------------------------------------------
# Image-like modalities
# ----------------------------------------------------------------------------------------------


class PatchEmbed(nnx.Module):
    """Flattened patches (B, N, p·p·C) → tokens (B, N, D): one Linear (= a stride-p conv)."""

    def __init__(self, in_ch: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.patch_size = cfg.patch_size
        self.proj = dense(cfg.patch_size**2 * in_ch, cfg.embed_dim, cfg, rngs)

    def __call__(self, patches: jax.Array) -> jax.Array:
        return self.proj(patches)


class ModalityViT(nnx.Module):
    """PatchEmbed → positional embedding → ``cfg.depth`` × Block → LayerNorm.

    ``__call__(x, ids_keep)``: ``x`` (B, H, W, C) channels last; ``ids_keep`` (B, n_vis) int —
    only those patches become tokens (None: all of them). Returns tokens (B, n_vis, D).
    """

    def __init__(self, in_ch: int, image_hw: tuple[int, int], cfg: ModelConfig, *,
                 rngs: nnx.Rngs):
        p = cfg.patch_size
        if image_hw[0] % p or image_hw[1] % p:
            raise ValueError(f"image size {tuple(image_hw)} is not divisible by patch_size {p}")
        self.in_ch = in_ch
        self.image_hw = tuple(image_hw)
        self.grid = (image_hw[0] // p, image_hw[1] // p)
        self.n_patches = self.grid[0] * self.grid[1]
        self.patch_size = p
        self.dtype = compute_dtype(cfg)
        self.patch_embed = PatchEmbed(in_ch, cfg, rngs=rngs)
        self.learned_pos = cfg.pos_embed == "learned"
        if self.learned_pos:
            self.pos_embed = nnx.Param(TOKEN_INIT(rngs.params(), (self.n_patches, cfg.embed_dim)))
        self.embed_dim = cfg.embed_dim
        self.blocks = nnx.List([Block(cfg.embed_dim, cfg.num_heads, cfg, rngs=rngs)
                                for _ in range(cfg.depth)])
        self.norm = layer_norm(cfg.embed_dim, cfg, rngs)
        self.remat = cfg.remat

    def positions(self) -> jax.Array:
        if self.learned_pos:
            return self.pos_embed[...]
        return jnp.asarray(sincos_pos_embed_2d(self.embed_dim, self.grid))

    def embed(self, x: jax.Array, ids_keep: jax.Array | None = None) -> jax.Array:
        """Patches (the visible ones) → tokens with positions (B, n_vis, D), before the blocks."""
        patches = patchify(x, self.patch_size)  # (B, N, p·p·C)
        pos = jnp.broadcast_to(self.positions(), (x.shape[0], self.n_patches, self.embed_dim))
        if ids_keep is not None:  # MAE: the masked patches never enter the encoder
            patches, pos = gather_tokens(patches, ids_keep), gather_tokens(pos, ids_keep)
        return self.patch_embed(patches.astype(self.dtype)) + pos.astype(self.dtype)

    def trunk(self, z: jax.Array) -> jax.Array:
        """Tokens through the blocks and the final LayerNorm."""
        return self.norm(apply_blocks(self.blocks, z, remat=self.remat))

    def __call__(self, x: jax.Array, ids_keep: jax.Array | None = None) -> jax.Array:
        return self.trunk(self.embed(x, ids_keep))


def encode_stacked(encoders: Sequence[ModalityViT], xs: Sequence[jax.Array],
                   ids_keep: Sequence[jax.Array | None]) -> list[jax.Array]:
    """Several image encoders of one shape as one batched program: each embeds its own patches
    (the patch sizes may differ: rgb 3 channels, ir 1), then the token sets (all of one shape)
    go through the blocks together, ``jax.vmap`` over the encoders' parameters stacked on the
    fly. The same tokens as ``[e(x, i) for e, x, i in zip(encoders, xs, ids_keep)]`` up to
    float rounding; the parameters stay per encoder (a checkpoint is the same either way).
    """
    z = [e.embed(x, i) for e, x, i in zip(encoders, xs, ids_keep, strict=True)]
    if len({t.shape for t in z}) != 1:
        raise ValueError(f"encode_stacked: token shapes differ {[t.shape for t in z]}")
    graphdef, first = nnx.split((encoders[0].blocks, encoders[0].norm))
    states = [first]
    for e in encoders[1:]:
        g, s = nnx.split((e.blocks, e.norm))
        if g != graphdef:
            raise ValueError("encode_stacked: the encoders' blocks differ in structure")
        states.append(s)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
    remat = encoders[0].remat

    def trunk(state, tokens):
        blocks, norm = nnx.merge(graphdef, state)
        return norm(apply_blocks(blocks, tokens, remat=remat))

    out = jax.vmap(trunk)(stacked, jnp.stack(z))
    return list(out)


# ----------------------------------------------------------------------------------------------
# Vector modalities (GPS, IMU)
# ----------------------------------------------------------------------------------------------


def _symlog(x: jax.Array) -> jax.Array:
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def normalize_vector(modality: str, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Physical units → O(1) numbers; the encoder's input and the reconstruction target.

    gps (east, north, up metres from the drive's first fix — up to kilometres):
        symlog(x / gps_scale) = sign(x)·log(1 + |x|/gps_scale); with gps_scale = 100 m, 10 m → 0.1,
        100 m → 0.69, 5 km → 3.9. Per-sample and batch-independent, so the simulator's pose (x, y
        from its own start) maps the same way.
    imu (gyro rad/s, accel m/s²): gyro / gyro_scale, accel / accel_scale (default 1 rad/s, 1 g).
    """
    x = x.astype(jnp.float32)
    if modality == "gps":
        return _symlog(x / cfg.gps_scale)
    if modality == "imu":
        scale = jnp.array([cfg.gyro_scale] * 3 + [cfg.accel_scale] * 3, jnp.float32)
        return x / scale
    raise ValueError(f"no vector normalization for modality {modality!r}")


class VectorEmbed(nnx.Module):
    """A vector (B, in_dim) → ``n_tokens`` tokens (B, n_tokens, D).

    The vector is split into ``n_tokens`` equal channel groups (gps: east | north | up;
    imu: gyro | accel), and each group has its own 2-layer MLP (group → D → D), so a token's
    identity lives in its weights (no positional embedding needed). The input is normalized
    with :func:`normalize_vector`. ``ids_keep`` (B, n_vis) picks the visible groups; all groups
    are embedded first (a handful of tiny matmuls) and the visible ones gathered.
    """

    def __init__(self, modality: str, in_dim: int, n_tokens: int, cfg: ModelConfig, *,
                 rngs: nnx.Rngs):
        if in_dim % n_tokens:
            raise ValueError(f"{modality}: {in_dim} channels do not split into {n_tokens} tokens")
        d = cfg.embed_dim
        self.modality = modality
        self.cfg = cfg
        self.n_tokens = n_tokens
        self.n_patches = n_tokens
        self.group = in_dim // n_tokens
        self.dtype = compute_dtype(cfg)
        init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=-2,
                                                 out_axis=-1, batch_axis=(0,))
        self.w1 = nnx.Param(init(rngs.params(), (n_tokens, self.group, d)))
        self.b1 = nnx.Param(jnp.zeros((n_tokens, d)))
        self.w2 = nnx.Param(init(rngs.params(), (n_tokens, d, d)))
        self.b2 = nnx.Param(jnp.zeros((n_tokens, d)))
        self.norm = layer_norm(d, cfg, rngs)

    def patches(self, v: jax.Array) -> jax.Array:
        """Normalized vector as "patches" (B, n_tokens, group): also the reconstruction target."""
        v = normalize_vector(self.modality, v, self.cfg)
        return v.reshape(v.shape[0], self.n_tokens, self.group)

    def __call__(self, v: jax.Array, ids_keep: jax.Array | None = None) -> jax.Array:
        g = self.patches(v).astype(self.dtype)
        dt = self.dtype
        h = jnp.einsum("bng,ngd->bnd", g, self.w1[...].astype(dt)) + self.b1[...].astype(dt)
        h = jnp.einsum("bnd,nde->bne", jax.nn.gelu(h), self.w2[...].astype(dt))
        z = self.norm(h + self.b2[...].astype(dt))
        return z if ids_keep is None else gather_tokens(z, ids_keep)
