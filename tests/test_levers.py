"""The speed levers of issue 15 compute the same model: outputs and gradients against the plain
path, within stated tolerances; the parameters (and so checkpoints) are the same either way.

Tolerances. float32 levers that only regroup the same arithmetic (stacked encoders, remat,
the low-precision softmax at float32): loss and every gradient leaf within rtol 1e-5 / atol 1e-6.
bfloat16 scores: their error against the float32 model is at most twice that of the plain
bfloat16 model plus 1e-3 relative (they round the T×T scores to bf16 where XLA's attention
keeps float32). cuDNN flash attention (GPU only): loss within 1e-2 relative, gradients within 5e-2
relative norm of XLA attention, both bf16.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_mae import FAST, KEY, PRE, RATIO, make_batch, rngs

from etl.schema import MODALITIES
from train.checkpoint import COMPUTE_ONLY_KEYS, Checkpointer, config_record, model_config_diff
from train.config import ModelConfig, PretrainConfig, TrainingConfig
from train.encoders import attention_backend, attention_lowp
from train.mae import MultimodalMAE
from train.pretrain import init_state, make_optimizer

# Six modalities; at PRE's sizes lidar, radar and ir are all 16×16 (4 patches of 8 pixels), so
# stacking runs the three of them as one call (ir with 1 channel, the BEV grids with 2) and rgb
# (32×32: 16 patches) alone.
CFG = ModelConfig(embed_dim=32, depth=1, num_heads=2, patch_size=8, fusion_depth=1,
                  decoder_dim=32, decoder_depth=1, decoder_heads=2, modalities=MODALITIES)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@functools.cache
def grad_of(**changes):
    """(loss, grads) of the MAE with CFG + changes, at the parameters of CFG (seed 0)."""
    cfg = dataclasses.replace(CFG, **changes)
    params = nnx.state(MultimodalMAE(CFG, PRE, rngs=rngs(0)), nnx.Param)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MultimodalMAE(cfg, PRE, rngs=rngs(0))))

    def loss_fn(p, batch):
        return nnx.merge(graphdef, p)(batch, KEY, RATIO)[0]

    f = jax.jit(jax.value_and_grad(loss_fn), compiler_options=FAST)
    loss, grads = f(params, make_batch())
    return float(loss), grads


def assert_same_gradients(a, b, rtol=1e-5, atol=1e-6):
    (la, ga), (lb, gb) = a, b
    assert la == pytest.approx(lb, rel=rtol, abs=atol)
    assert jax.tree.structure(ga) == jax.tree.structure(gb)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gb),
                            strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def grad_error(a, b) -> float:
    """Relative norm error of all gradients of ``a`` against ``b``."""
    ga, gb = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g[1])]) for g in (a, b))
    return rel(ga, gb)


# ------------------------------------------------------------------ the lever keys themselves
def test_levers_change_no_parameter_and_no_checkpoint_key():
    shapes = {}
    for changes in ({}, {"stack_encoders": True}, {"remat": True}, {"score_dtype": "compute"},
                    {"attention_impl": "xla"}):
        model = nnx.eval_shape(lambda c=changes: MultimodalMAE(
            dataclasses.replace(CFG, **c), PRE, rngs=rngs(0)))
        state = nnx.state(model, nnx.Param)
        shapes[tuple(changes)] = jax.tree.map(lambda x: (x.shape, x.dtype), state)
        diff = model_config_diff(configlib_dict(CFG), dataclasses.replace(CFG, **changes))
        assert diff == []  # a checkpoint of the plain model restores under every lever
    first = next(iter(shapes.values()))
    assert all(s == first for s in shapes.values())
    assert {"attention_impl", "score_dtype", "stack_encoders", "remat"} <= COMPUTE_ONLY_KEYS


def configlib_dict(cfg):
    from etl import configlib

    return configlib.to_dict(cfg)


def test_plain_checkpoint_restores_into_stacked_model(tmp_path):
    """Orbax round trip: saved by the plain model, restored by a stacked + remat one."""
    plain = PretrainConfig(model=dataclasses.replace(CFG, modalities=("lidar", "radar", "imu")),
                           training=TrainingConfig(steps=10, warmup_steps=1))
    lever = dataclasses.replace(plain, model=dataclasses.replace(
        plain.model, stack_encoders=True, remat=True, score_dtype="compute"))
    tx = make_optimizer(plain.training)
    _, state, _ = init_state(plain, PRE, MultimodalMAE, tx)
    ck = Checkpointer(tmp_path / "ckpt", async_save=False)
    ck.save(3, state, {"next_index": 3}, config_record(plain, PRE))
    ck.close()
    other = dataclasses.replace(lever, training=dataclasses.replace(lever.training, seed=1))
    _, target, _ = init_state(other, PRE, MultimodalMAE, tx)
    ck = Checkpointer(tmp_path / "ckpt", async_save=False)
    restored, data, _ = ck.restore(target, model_cfg=lever.model)
    ck.close()
    assert data == {"next_index": 3}
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------ attention backend choice
def _dev(platform, kind):
    return types.SimpleNamespace(platform=platform, device_kind=kind)


@pytest.mark.parametrize("impl,dtype,head,device,want", [
    ("auto", jnp.bfloat16, 32, _dev("cpu", "cpu"), "xla"),  # CPUs: nothing changes
    ("auto", jnp.bfloat16, 32, _dev("gpu", "NVIDIA H100 80GB HBM3"), "cudnn"),
    ("auto", jnp.bfloat16, 64, _dev("gpu", "NVIDIA A100-SXM4-80GB"), "cudnn"),
    ("auto", jnp.float32, 32, _dev("gpu", "NVIDIA H100 80GB HBM3"), "xla"),  # cuDNN: 16-bit only
    ("auto", jnp.bfloat16, 12, _dev("gpu", "NVIDIA H100 80GB HBM3"), "xla"),  # head width % 8
    ("auto", jnp.bfloat16, 256, _dev("gpu", "NVIDIA H100 80GB HBM3"), "xla"),
    ("auto", jnp.bfloat16, 32, _dev("gpu", "AMD Instinct MI300X"), "xla"),
    ("xla", jnp.bfloat16, 32, _dev("gpu", "NVIDIA H100 80GB HBM3"), "xla"),
    ("cudnn", jnp.float32, 32, _dev("cpu", "cpu"), "cudnn"),  # explicit: taken as it is
])
def test_attention_backend(impl, dtype, head, device, want):
    assert attention_backend(impl, dtype, head, device=device) == want


def test_xla_is_the_default_and_auto_is_xla_on_this_cpu():
    assert ModelConfig().attention_impl == "xla"  # cuDNN is opt-in until measured on a GPU
    if jax.devices()[0].platform == "cpu":
        assert attention_backend("auto", jnp.bfloat16, 32) == "xla"


# ------------------------------------------------------------------ bf16 scores: the kernel
def _qkv(dtype, b=2, t=24, n=2, h=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q, k, v = (jax.random.normal(kk, (b, t, n, h)).astype(dtype) for kk in ks[:3])
    mask = jax.random.bernoulli(ks[3], 0.6, (b, 1, t, t)) | jnp.eye(t, dtype=bool)
    cot = jax.random.normal(ks[4], (b, t, n, h))
    return q, k, v, mask, cot


def _attn_vjp(fn, q, k, v, cot):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cot.astype(out.dtype))


@pytest.mark.parametrize("masked", [True, False])
def test_attention_lowp_equals_xla_attention_in_float32(masked):
    q, k, v, mask, cot = _qkv(jnp.float32)
    mask = mask if masked else None
    ref = _attn_vjp(lambda *a: jax.nn.dot_product_attention(*a, mask=mask), q, k, v, cot)
    low = _attn_vjp(lambda *a: attention_lowp(*a, mask), q, k, v, cot)
    for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_attention_lowp_in_bfloat16_is_as_close_as_xla_bfloat16():
    q, k, v, mask, cot = _qkv(jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = _attn_vjp(lambda *a: jax.nn.dot_product_attention(*a, mask=mask), *f32, cot)
    xla = _attn_vjp(lambda *a: jax.nn.dot_product_attention(*a, mask=mask), q, k, v, cot)
    low = _attn_vjp(lambda *a: attention_lowp(*a, mask), q, k, v, cot)
    assert jax.tree.leaves(low)[0].dtype == jnp.bfloat16
    for lo, xl, rf in zip(jax.tree.leaves(low), jax.tree.leaves(xla), jax.tree.leaves(ref),
                          strict=True):
        e_low, e_xla = rel(lo, rf), rel(xl, rf)
        assert e_low <= 2 * e_xla + 1e-2, (e_low, e_xla)


# ------------------------------------------------------------------ the whole model
def test_stacked_encoders_same_loss_and_gradients():
    assert_same_gradients(grad_of(stack_encoders=True), grad_of())


def test_remat_same_loss_and_gradients():
    assert_same_gradients(grad_of(remat=True, stack_encoders=True), grad_of())


def test_low_precision_softmax_in_float32_is_the_plain_model():
    assert_same_gradients(grad_of(attention_impl="xla", score_dtype="compute"), grad_of())


def test_bf16_scores_are_as_close_to_float32_as_plain_bf16():
    ref = grad_of()
    plain = grad_of(dtype="bfloat16")
    lowp = grad_of(dtype="bfloat16", score_dtype="compute")
    both = grad_of(dtype="bfloat16", score_dtype="compute", stack_encoders=True)
    e_plain = abs(plain[0] - ref[0]) / ref[0]
    for cand in (lowp, both):
        assert abs(cand[0] - ref[0]) / ref[0] <= 2 * e_plain + 1e-3
        assert grad_error(cand, ref) <= 2 * grad_error(plain, ref) + 1e-3
    assert grad_error(plain, ref) < 0.05  # and bf16 itself is close


def test_stacked_encode_subsets_match():
    """encode() with a subset of a stacked group (RL feeds lidar without radar) and with all."""
    model = MultimodalMAE(CFG, PRE, rngs=rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    stacked = nnx.graphdef(nnx.eval_shape(
        lambda: MultimodalMAE(dataclasses.replace(CFG, stack_encoders=True), PRE, rngs=rngs(0))))
    batch = make_batch()
    assert nnx.merge(stacked, params).encoder_groups(MODALITIES) == [
        ("lidar", "radar", "ir"), ("rgb",), ("gps",), ("imu",)]
    for mods in (("lidar",), ("lidar", "radar", "rgb")):  # all six: the gradient tests
        enc = jax.jit(lambda p, b, g, m=mods: nnx.merge(g, p).encode(b, m)[0],
                      static_argnums=2, compiler_options=FAST)
        np.testing.assert_allclose(enc(params, batch, stacked), enc(params, batch, graphdef),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()),
                    reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_same_loss_and_gradients_as_xla_on_gpu():
    xla = grad_of(dtype="bfloat16", attention_impl="xla")
    cudnn = grad_of(dtype="bfloat16", attention_impl="cudnn")
    assert cudnn[0] == pytest.approx(xla[0], rel=1e-2)
    assert grad_error(cudnn, xla) < 5e-2
