"""Encoders, fusion and heads as modules: shapes, masks, and the MAE gather equivalence."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from etl.schema import MODALITIES
from train.config import ModelConfig
from train.encoders import (
    Block,
    ModalityViT,
    VectorEmbed,
    gather_tokens,
    normalize_vector,
    sincos_pos_embed_2d,
)
from train.fusion import MultimodalFusion, attention_mask
from train.heads import PolicyHead, PretrainHead, ValueHead, masked_mean

CFG = ModelConfig(embed_dim=32, depth=1, num_heads=2, patch_size=8, fusion_depth=1,
                  decoder_dim=32, decoder_depth=1, decoder_heads=2)


def rngs(seed: int = 0) -> nnx.Rngs:
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))  # cheaper to compile than threefry


def jitted(module, *args):
    """module(*args) compiled as one program (much faster here than op-by-op dispatch)."""
    return jax.jit(lambda *a: module(*a),
                   compiler_options={"xla_backend_optimization_level": 0})(*args)


def test_block_keeps_shape():
    x = jax.random.normal(jax.random.key(0), (2, 5, 32))
    assert jitted(Block(32, 2, CFG, rngs=rngs(0)), x).shape == (2, 5, 32)


def test_sincos_positions():
    pos = sincos_pos_embed_2d(32, (3, 4))
    assert pos.shape == (12, 32) and pos.dtype == np.float32
    assert len({tuple(np.round(r, 5)) for r in pos}) == 12  # every position distinct
    with pytest.raises(ValueError):
        sincos_pos_embed_2d(30, (2, 2))


def test_modality_vit_shapes_and_visible_tokens_only():
    vit = ModalityViT(3, (32, 16), CFG, rngs=rngs(0))
    assert vit.n_patches == 8 and vit.grid == (4, 2)
    x = jax.random.normal(jax.random.key(1), (2, 32, 16, 3))
    assert jitted(vit, x).shape == (2, 8, 32)
    ids = jnp.array([[5, 0, 3], [1, 2, 7]])
    assert jitted(vit, x, ids).shape == (2, 3, 32)
    # with no blocks, gathering patches before the embedding equals gathering tokens after it
    flat = ModalityViT(3, (32, 16), dataclasses.replace(CFG, depth=0), rngs=rngs(0))
    np.testing.assert_allclose(jitted(flat, x, ids), gather_tokens(jitted(flat, x), ids),
                               atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        ModalityViT(3, (30, 16), CFG, rngs=rngs(0))


def test_vector_embed_and_normalization():
    gps = jnp.array([[100.0, -100.0, 0.0], [5000.0, 10.0, -2.0]])
    g = normalize_vector("gps", gps, CFG)
    np.testing.assert_allclose(g[0], [np.log(2), -np.log(2), 0.0], rtol=1e-6)
    assert float(jnp.abs(g).max()) < 4.0  # kilometres stay O(1)
    imu = jnp.array([[1.0, 0.0, 0.0, 0.0, 0.0, 9.81]])
    np.testing.assert_allclose(normalize_vector("imu", imu, CFG), [[1, 0, 0, 0, 0, 1]], rtol=1e-6)
    emb = VectorEmbed("imu", 6, 2, CFG, rngs=rngs(0))
    assert emb.patches(imu).shape == (1, 2, 3)
    assert emb(imu).shape == (1, 2, 32)
    assert emb(imu, jnp.array([[1]])).shape == (1, 1, 32)
    np.testing.assert_allclose(emb(imu, jnp.array([[1]]))[:, 0], emb(imu)[:, 1], atol=1e-6)


def test_attention_mask_drop_and_cross():
    groups = np.array([0, 0, 1, 2])
    valid = jnp.array([[True, True, False, True]])
    assert attention_mask(None, groups) is None
    m = np.asarray(attention_mask(valid, groups))[0, 0]
    assert not m[:, 2][[0, 1, 3]].any() and m[2, 2]  # absent key dropped, its diagonal kept
    assert m[0].tolist() == [True, True, False, True]
    c = np.asarray(attention_mask(None, groups, cross=True))[0, 0]
    assert c[0].tolist() == [True, False, True, True]  # own modality's other tokens excluded
    assert c[2].tolist() == [True, True, True, True]


@pytest.mark.parametrize("fusion,absent", [("self", "drop"), ("cross", "token")])
def test_fusion_shapes_and_absent_independence(fusion, absent):
    cfg = dataclasses.replace(CFG, fusion=fusion, absent=absent)
    fus = MultimodalFusion(cfg, ("lidar", "rgb", "gps"), rngs=rngs(0))
    k = jax.random.split(jax.random.key(0), 4)
    toks = {"lidar": jax.random.normal(k[0], (2, 3, 32)),
            "rgb": jax.random.normal(k[1], (2, 4, 32)),
            "gps": jax.random.normal(k[2], (2, 2, 32))}
    present = np.ones((2, 6), np.uint8)
    present[1, MODALITIES.index("rgb")] = 0
    out, valid = jitted(fus, toks, present)
    assert out.shape == (2, 9, 32) and valid.shape == (2, 9)
    assert valid[1].tolist() == [True] * 3 + [False] * 4 + [True] * 2
    # the absent rgb of sample 1 does not change the present tokens
    changed = dict(toks, rgb=toks["rgb"].at[1].set(jax.random.normal(k[3], (4, 32)) * 10))
    out2, _ = jitted(fus, changed, present)
    np.testing.assert_allclose(out2[:, np.r_[0:3, 7:9]], out[:, np.r_[0:3, 7:9]], atol=1e-5)
    np.testing.assert_allclose(out2[0], out[0], atol=1e-5)
    # a subset of the modalities is fine (encode with fewer sensors)
    sub, sub_valid = fus({"gps": toks["gps"]}, present)
    assert sub.shape == (2, 2, 32) and sub_valid.all()
    with pytest.raises(ValueError):
        fus({"radar": toks["gps"]}, present)


def test_pretrain_head_restores_patch_order():
    specs = [("rgb", 4, 12, (2, 2)), ("imu", 2, 3, None)]
    head = PretrainHead(CFG, specs, rngs=rngs(0))
    fused = jax.random.normal(jax.random.key(0), (2, 2 + 1, 32))
    ids = {"rgb": (jnp.array([[3, 1], [0, 2]]), jnp.array([[2, 1, 3, 0], [0, 2, 1, 3]])),
           "imu": (jnp.array([[1], [0]]), jnp.array([[1, 0], [0, 1]]))}
    out = jitted(head, fused, ids, np.ones((2, 6), np.uint8))
    assert out["rgb"].shape == (2, 4, 12) and out["imu"].shape == (2, 2, 3)
    assert out["rgb"].dtype == jnp.float32


def test_policy_and_value_heads():
    x = jax.random.normal(jax.random.key(0), (5, 32)) * 100
    pi = PolicyHead(32, 2, hidden=(16,), rngs=rngs(0))
    a = pi(x)
    assert a.shape == (5, 2) and float(jnp.abs(a).max()) <= 1.0
    v = ValueHead(32, rngs=rngs(0))
    assert v(x).shape == (5,)
    tokens = jnp.arange(12.0).reshape(1, 3, 4)
    pooled = masked_mean(tokens, jnp.array([[True, False, True]]))
    np.testing.assert_allclose(pooled, [[4.0, 5.0, 6.0, 7.0]])


# ------------------------------------------------------- attention padding (cuDNN needs even T)


@pytest.mark.parametrize("with_valid,cross", [(True, False), (False, True), (True, True),
                                              (False, False)])
def test_attention_mask_padding_is_isolated(with_valid, cross):
    groups = np.array([0, 0, 1, 2, 2])
    valid = jnp.array([[True, True, False, True, True], [True] * 5]) if with_valid else None
    ref = attention_mask(valid, groups, cross=cross)
    m = np.asarray(attention_mask(valid, groups, cross=cross, length=8))
    assert m.shape == ((2 if with_valid else 1), 1, 8, 8)
    ref = np.ones((1, 1, 5, 5), bool) if ref is None else np.asarray(ref)
    np.testing.assert_array_equal(m[:, :, :5, :5], np.broadcast_to(ref, m[:, :, :5, :5].shape))
    eye = np.eye(8, dtype=bool)[5:]
    for row in m[:, 0]:
        np.testing.assert_array_equal(row[5:], eye)  # a padding query sees only itself
        np.testing.assert_array_equal(row[:, 5:], eye.T)  # and no query sees a padding key
        assert row.any(axis=1).all()  # no empty softmax row
    assert attention_mask(None, groups, length=5) is None
    with pytest.raises(ValueError, match="shorter"):
        attention_mask(valid, groups, length=4)


def test_padded_length_and_pad_tokens():
    from train.fusion import pad_tokens, padded_length

    assert [padded_length(t) for t in (1, 8, 9, 263, 525)] == [8, 8, 16, 264, 528]
    x = jnp.ones((2, 9, 4))
    p = pad_tokens(x)
    assert p.shape == (2, 16, 4) and not p[:, 9:].any() and (p[:, :9] == 1).all()
    assert pad_tokens(p) is p


def _fusion_and_decoder(cfg):
    """A fusion (9 tokens: not a multiple of 8) and a decoder (9 patches) with one absent
    modality in sample 1; returns the modules and ``f(fus, head) -> (fused, preds)``."""
    fus = MultimodalFusion(cfg, ("lidar", "rgb", "gps"), rngs=rngs(0))
    specs = [("lidar", 3, 5, None), ("rgb", 4, 12, (2, 2)), ("gps", 2, 1, None)]
    head = PretrainHead(cfg, specs, rngs=rngs(1))
    k = jax.random.split(jax.random.key(0), 3)
    toks = {"lidar": jax.random.normal(k[0], (2, 2, 32)),
            "rgb": jax.random.normal(k[1], (2, 3, 32)),
            "gps": jax.random.normal(k[2], (2, 1, 32))}  # 6 visible tokens
    ids = {"lidar": (jnp.array([[2, 0], [1, 2]]), jnp.array([[1, 2, 0], [2, 0, 1]])),
           "rgb": (jnp.array([[3, 1, 0], [0, 2, 1]]), jnp.array([[2, 1, 3, 0], [0, 2, 1, 3]])),
           "gps": (jnp.array([[1], [0]]), jnp.array([[1, 0], [0, 1]]))}
    present = np.ones((2, 6), np.uint8)
    present[1, MODALITIES.index("rgb")] = 0

    def run(fus, head):
        fused, _ = fus(toks, present)
        return fused, head(fused, ids, present)

    return fus, head, run, toks


@pytest.mark.parametrize("fusion,absent", [("self", "drop"), ("cross", "token"),
                                           ("self", "token")])
def test_padding_leaves_fusion_and_decoder_outputs_unchanged(monkeypatch, fusion, absent):
    import train.fusion as fusion_mod

    cfg = dataclasses.replace(CFG, fusion=fusion, absent=absent)
    fus, head, run, _ = _fusion_and_decoder(cfg)
    assert fusion_mod.PAD_MULTIPLE == 8
    padded = jitted(run, fus, head)  # fusion 6 → 8 tokens, decoder 9 → 16
    monkeypatch.setattr(fusion_mod, "PAD_MULTIPLE", 1)  # the unpadded computation
    plain = jitted(run, fus, head)  # (a fresh trace: jitted wraps run in a new lambda)
    assert padded[0].shape == plain[0].shape == (2, 6, 32)
    for a, b in zip(jax.tree.leaves(padded), jax.tree.leaves(plain), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_padding_gradients_are_finite_and_unchanged(monkeypatch):
    import train.fusion as fusion_mod

    fus, head, run, toks = _fusion_and_decoder(CFG)

    def grads():
        def loss(models, toks):
            fused, preds = run(*models)
            return (fused.astype(jnp.float32) ** 2).mean() + sum(
                (p ** 2).mean() for p in preds.values())
        return jax.jit(nnx.grad(loss, argnums=(0, 1)))((fus, head), toks)

    padded = grads()
    monkeypatch.setattr(fusion_mod, "PAD_MULTIPLE", 1)
    plain = grads()
    leaves_p = jax.tree.leaves(padded)
    leaves_u = jax.tree.leaves(plain)
    assert len(leaves_p) == len(leaves_u) > 10
    for a, b in zip(leaves_p, leaves_u, strict=True):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any(float(jnp.abs(a).max()) > 0 for a in leaves_p)
