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
