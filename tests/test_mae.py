"""The masked multimodal autoencoder: masking, loss, absence, gradients, overfitting, bf16, FLOPs.

Tiny configs (width 32, one block everywhere, 16×16 BEV grids, 32×32 rgb, 16×16 ir, 8-pixel
patches); every jitted function is compiled once per module.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from etl.config import BEVGrid, ImageConfig, PreprocessConfig, RadarConfig
from etl.schema import MODALITIES, empty_sample
from train.config import ModelConfig
from train.mae import (
    MultimodalMAE,
    masked_mse,
    model_flops_per_sample,
    num_visible,
    patch_mask,
    patchify,
    random_masking,
    unpatchify,
)

GRID = BEVGrid(x_min=-8.0, x_max=8.0, y_min=-8.0, y_max=8.0, resolution=1.0)  # 16 × 16
PRE = PreprocessConfig(lidar=GRID, radar=RadarConfig(grid=GRID),
                       image=ImageConfig(rgb_size=(32, 32), ir_size=(16, 16)), max_boxes=2)
# Compiles dominate the run time, so the compiled tests use two modalities (an image and a
# vector: the two encoder kinds); the six-modality model is checked by abstract evaluation.
CFG = ModelConfig(embed_dim=32, depth=1, num_heads=2, patch_size=8, fusion_depth=1,
                  decoder_dim=32, decoder_depth=1, decoder_heads=2,
                  modalities=("rgb", "imu"))
ALL6 = dataclasses.replace(CFG, modalities=MODALITIES)
RATIO = 0.5
# every modality absent in one sample and present in another
PRESENT = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0]], np.uint8)


KEY = jax.random.key(42)
# Test speed only: the RBG key makes eager parameter init ~2× faster to compile than threefry,
# and XLA's backend optimization level 0 cuts compile time; the numbers are the same model's.
FAST = {"xla_backend_optimization_level": 0}


def rngs(seed: int = 0) -> nnx.Rngs:
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def make_batch(seed: int = 0, present=PRESENT) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b = len(present)
    batch = {k: np.stack([v] * b) for k, v in empty_sample(PRE).items()}
    for m in MODALITIES:
        batch[m] = rng.normal(size=batch[m].shape).astype(np.float32)
    batch["gps"] *= 300.0  # metres
    batch["present"] = np.array(present, np.uint8)
    return {k: v for k, v in batch.items() if k in MODALITIES or k == "present"}


class Compiled:
    """A model plus its loss/grad as jitted pure functions of (params, batch, key).
    Tests use ``grad`` (one compile per config) wherever they can."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        self.model = MultimodalMAE(cfg, PRE, rngs=rngs(seed))
        self.graphdef, self.params = nnx.split(self.model, nnx.Param)

        def loss_fn(params, batch, key):
            return nnx.merge(self.graphdef, params)(batch, key, RATIO)

        self.loss_fn = loss_fn
        self.loss = jax.jit(loss_fn, compiler_options=FAST)
        self.grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST)
        self.encode = jax.jit(lambda params, batch: nnx.merge(self.graphdef, params).encode(
            batch, ("imu",)), compiler_options=FAST)


@functools.cache
def compiled(**changes) -> Compiled:
    return Compiled(dataclasses.replace(CFG, **changes))




# ---------------------------------------------------------------------------------- masking


@pytest.mark.parametrize("n,ratio", [(16, 0.5), (196, 0.75), (3, 0.5), (2, 0.75), (5, 0.0)])
def test_random_masking_invariants(n, ratio):
    b = 4
    keep, masked, restore = random_masking(jax.random.key(n), b, n, ratio)
    n_vis = num_visible(n, ratio)
    assert n_vis == min(n, max(1, round(n * (1 - ratio))))
    assert keep.shape == (b, n_vis) and masked.shape == (b, n - n_vis) and restore.shape == (b, n)
    for i in range(b):  # disjoint and covering
        assert sorted(np.concatenate([keep[i], masked[i]]).tolist()) == list(range(n))
    shuffled = jnp.concatenate([keep, masked], axis=1)
    np.testing.assert_array_equal(jnp.take_along_axis(shuffled, restore, 1),
                                  np.broadcast_to(np.arange(n), (b, n)))
    mask = patch_mask(restore, n_vis)
    np.testing.assert_array_equal(mask.sum(1), n - n_vis)  # exact ratio, every sample
    for i in range(b):
        np.testing.assert_array_equal(np.asarray(mask[i])[np.asarray(keep[i])], 0)
        np.testing.assert_array_equal(np.asarray(mask[i])[np.asarray(masked[i])], 1)


def test_masking_differs_between_samples():
    keep, _, _ = random_masking(jax.random.key(0), 8, 64, 0.75)
    assert len({tuple(sorted(k.tolist())) for k in np.asarray(keep)}) == 8


def test_patchify_roundtrip():
    x = jax.random.normal(jax.random.key(0), (2, 32, 16, 3))
    p = patchify(x, 8)
    assert p.shape == (2, 8, 192)
    np.testing.assert_array_equal(p[0, 1], x[0, :8, 8:16].reshape(-1))  # row-major patches
    np.testing.assert_array_equal(unpatchify(p, 8, (32, 16), 3), x)


# ---------------------------------------------------------------------------------- forward


def test_forward_shapes_all_six_modalities():
    """Abstract evaluation of the full model (no parameters allocated, nothing compiled)."""
    model = nnx.eval_shape(lambda: MultimodalMAE(ALL6, PRE, rngs=rngs(0)))
    graphdef, state = nnx.split(model)
    hash(graphdef)  # static for jax.jit / nnx.jit: every module attribute must be hashable
    loss, aux = jax.eval_shape(lambda s, b, k: nnx.merge(graphdef, s)(b, k, RATIO),
                               state, make_batch(), KEY)
    assert loss.shape == () and loss.dtype == jnp.float32
    n = {"lidar": 4, "radar": 4, "rgb": 16, "ir": 4, "gps": 3, "imu": 2}
    pd = {"lidar": 128, "radar": 128, "rgb": 192, "ir": 64, "gps": 1, "imu": 3}
    for m in MODALITIES:
        assert aux[f"pred/{m}"].shape == (3, n[m], pd[m]) and aux[f"pred/{m}"].dtype == jnp.float32
        assert aux[f"target/{m}"].shape == (3, n[m], pd[m])
        assert aux[f"mask/{m}"].shape == (3, n[m]) and aux[f"loss/{m}"].shape == ()
    tokens, valid = jax.eval_shape(lambda s, b: nnx.merge(graphdef, s).encode(b), state,
                                   make_batch())
    assert tokens.shape == (3, sum(n.values()), 32) and valid.shape == (3, sum(n.values()))
    for changes in ({"fusion": "cross"}, {"absent": "token"}, {"pos_embed": "learned"}):
        cfg = dataclasses.replace(ALL6, **changes)
        model = nnx.eval_shape(lambda cfg=cfg: MultimodalMAE(cfg, PRE, rngs=rngs(0)))
        graphdef, state = nnx.split(model)
        loss = jax.eval_shape(lambda s, b, k, g=graphdef: nnx.merge(g, s)(b, k, RATIO)[0],
                              state, make_batch(), KEY)
        assert loss.shape == ()


def test_forward_values_and_aux():
    c = compiled()
    (loss, aux), _ = c.grad(c.params, make_batch(), KEY)
    assert np.isfinite(float(loss))
    n = {"rgb": 16, "imu": 2}
    for m in CFG.modalities:
        np.testing.assert_array_equal(aux[f"mask/{m}"].sum(1), n[m] - num_visible(n[m], RATIO))
        assert float(aux[f"present/{m}"]) == 2
        assert float(aux[f"loss/{m}"]) > 0
    # targets: image patches as they are; imu normalized (accel in g)
    np.testing.assert_allclose(aux["target/rgb"], patchify(make_batch()["rgb"], 8), atol=1e-6)
    imu = make_batch()["imu"]
    np.testing.assert_allclose(aux["target/imu"][:, 1], imu[:, 3:] / 9.81, rtol=1e-5)
    losses = [float(aux[f"loss/{m}"]) for m in CFG.modalities]
    assert float(loss) == pytest.approx(np.mean(losses), rel=1e-5)


def test_masked_patches_never_reach_the_encoder_but_count_in_the_loss():
    c = compiled()
    batch = make_batch()
    (_, aux), _ = c.grad(c.params, batch, KEY)
    mask = np.asarray(aux["mask/rgb"][0])
    j = int(np.flatnonzero(mask)[0])  # a masked rgb patch of sample 0 (present)
    r, col = divmod(j, 32 // 8)
    perturbed = dict(batch, rgb=batch["rgb"].copy())
    perturbed["rgb"][0, r * 8:(r + 1) * 8, col * 8:(col + 1) * 8] += 3.0
    (_, aux2), _ = c.grad(c.params, perturbed, KEY)
    for m in CFG.modalities:  # the predictions do not depend on the masked pixels...
        np.testing.assert_allclose(aux2[f"pred/{m}"], aux[f"pred/{m}"], atol=1e-6)
    assert abs(float(aux2["loss/rgb"]) - float(aux["loss/rgb"])) > 1e-3  # ...the loss does


def test_loss_only_on_masked_patches():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 2, 6, 5)).astype(np.float32)
    mask = np.array([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 0]], np.float32)
    present = np.array([1.0, 1.0], np.float32)
    base = masked_mse(pred, target, mask, present)
    expected = np.mean([((pred[i] - target[i]) ** 2).mean(-1)[mask[i] > 0].mean() for i in (0, 1)])
    assert float(base) == pytest.approx(expected, rel=1e-5)
    visible = target.copy()
    visible[0, 1] += 10.0  # a visible patch's target
    assert float(masked_mse(pred, visible, mask, present)) == pytest.approx(float(base), rel=1e-6)
    hidden = target.copy()
    hidden[0, 0] += 10.0  # a masked one
    assert float(masked_mse(pred, hidden, mask, present)) > float(base) + 1.0
    # an absent sample contributes nothing, whatever its numbers
    gone = target.copy()
    gone[1] = 1e6
    only0 = masked_mse(pred, gone, mask, np.array([1.0, 0.0], np.float32))
    assert float(only0) == pytest.approx(float(masked_mse(pred[:1], target[:1], mask[:1],
                                                          present[:1])), rel=1e-6)


@pytest.mark.parametrize("decoder_pos", ["all", "masked"])
def test_decoder_positions_on_mask_tokens_only(decoder_pos):
    """decoder_pos = "masked": the decoder adds positions to the mask tokens only, so it places a
    visible token by its content alone. Swapping where two visible tokens go then only swaps
    their own outputs; the masked patches' predictions stay — under "all" they change (the
    decoder, not the encoder, carries the visible tokens' positions)."""
    from train.heads import PretrainHead

    cfg = dataclasses.replace(CFG, decoder_pos=decoder_pos)
    head = PretrainHead(cfg, [("lidar", 16, 8, (4, 4))], rngs=rngs(0))
    ids_keep, _, ids_restore = random_masking(jax.random.key(1), 1, 16, 0.5)
    fused = jax.random.normal(jax.random.key(2), (1, 8, cfg.embed_dim))
    present = jnp.ones((1, len(MODALITIES)))
    out = np.asarray(head(fused, {"lidar": (ids_keep, ids_restore)}, present)["lidar"][0])
    vis = np.flatnonzero(np.asarray(ids_restore[0]) < 8)
    j1, j2 = vis[0], vis[1]
    swapped = np.asarray(ids_restore).copy()
    swapped[0, [j1, j2]] = swapped[0, [j2, j1]]
    out2 = np.asarray(head(fused, {"lidar": (ids_keep, jnp.asarray(swapped))}, present)["lidar"][0])
    masked = np.flatnonzero(np.asarray(ids_restore[0]) >= 8)
    if decoder_pos == "masked":
        np.testing.assert_allclose(out2[masked], out[masked], atol=1e-5)
        np.testing.assert_allclose(out2[[j1, j2]], out[[j2, j1]], atol=1e-5)
    else:
        assert np.abs(out2[masked] - out[masked]).max() > 1e-4


def test_visible_loss_weight_adds_the_visible_patches_error():
    """training.visible_loss_weight = w: loss_m = masked MSE + w · the same over the visible
    patches (computed here by hand from the predictions); w = 0 is the plain MAE loss."""
    c = compiled()
    batch = make_batch()
    plain, aux = c.loss(c.params, batch, KEY)
    w = 0.7
    weighted = jax.jit(lambda p, b, k: nnx.merge(c.graphdef, p)(b, k, RATIO, visible_weight=w),
                       compiler_options=FAST)
    both, aux_w = weighted(c.params, batch, KEY)
    per_m = []
    for m in CFG.modalities:
        pred, target = np.asarray(aux[f"pred/{m}"]), np.asarray(aux[f"target/{m}"])
        vis = 1.0 - np.asarray(aux[f"mask/{m}"])
        here = np.asarray(batch["present"])[:, MODALITIES.index(m)] > 0
        err = ((pred - target) ** 2).mean(-1)
        v = np.mean([(err[i] * vis[i]).sum() / vis[i].sum() for i in np.flatnonzero(here)])
        assert float(aux_w[f"loss/{m}"]) == pytest.approx(float(aux[f"loss/{m}"]) + w * v,
                                                          rel=1e-5)
        per_m.append(float(aux[f"loss/{m}"]) + w * v)
    assert float(both) == pytest.approx(np.mean(per_m), rel=1e-5)
    assert float(both) > float(plain)


@pytest.mark.parametrize("changes", [{}, {"absent": "token", "fusion": "cross"}],
                         ids=["drop-self", "token-cross"])
def test_absent_modalities_contribute_no_loss_and_no_gradient(changes):
    c = compiled(**changes)
    batch = make_batch()
    (loss, aux), grads = c.grad(c.params, batch, KEY)
    other = make_batch(seed=7)  # different content everywhere...
    for i, flags in enumerate(PRESENT):  # ...but only where the modality is absent
        for j, m in enumerate(MODALITIES):
            if flags[j]:
                other[m][i] = batch[m][i]
    (loss2, aux2), grads2 = c.grad(c.params, other, KEY)
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6, abs=1e-7)
    for m in CFG.modalities:
        assert float(aux2[f"loss/{m}"]) == pytest.approx(float(aux[f"loss/{m}"]), rel=1e-6)
    for g1, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-7)


def test_fully_absent_modality_has_zero_loss_and_is_left_out_of_the_mean():
    c = compiled()
    present = PRESENT.copy()
    present[:, MODALITIES.index("rgb")] = 0
    (loss, aux), _ = c.grad(c.params, make_batch(present=present), KEY)
    assert float(aux["loss/rgb"]) == 0.0
    rest = [float(aux[f"loss/{m}"]) for m in CFG.modalities if m != "rgb"]
    assert float(loss) == pytest.approx(np.mean(rest), rel=1e-5)


@pytest.mark.parametrize("changes", [{}, {"absent": "token", "fusion": "cross"}],
                         ids=["drop-self", "token-cross"])
def test_gradients_reach_every_parameter(changes):
    c = compiled(**changes)
    (_, _), grads = c.grad(c.params, make_batch(), KEY)
    flat = nnx.to_flat_state(grads)
    assert len(flat) > 20
    for path, g in flat:
        assert np.all(np.isfinite(g[...])), path
        assert float(jnp.abs(g[...]).max()) > 0, f"no gradient reaches {path}"
    names = {"/".join(map(str, p)) for p, _ in flat}
    assert any("absent_token" in n for n in names) == (changes.get("absent") == "token")


def test_tiny_batch_overfits():
    c = compiled()
    opt = optax.adamw(3e-3, weight_decay=0.0)
    batch = make_batch()
    # one colour per 8×8 patch: memorizing 3 numbers per masked patch, not 192 of pure noise
    low = np.random.default_rng(1).normal(size=(3, 4, 4, 3)).astype(np.float32)
    batch["rgb"] = np.repeat(np.repeat(low, 8, axis=1), 8, axis=2)
    update = jax.jit(lambda grads, opt_state, params: opt.update(grads, opt_state, params),
                     compiler_options=FAST)
    params, opt_state = c.params, opt.init(c.params)
    losses = []
    for _ in range(100):
        (loss, _), grads = c.grad(params, batch, KEY)  # fixed key: the same mask each step
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])


# ---------------------------------------------------------------------------------- encode


def test_encode_shapes_and_validity():
    c = compiled()
    tokens, valid = c.encode(c.params, make_batch())  # encode(batch, ("imu",))
    assert list(c.model.token_layout(("imu", "rgb"))) == ["rgb", "imu"]  # MODALITIES order
    layout = c.model.token_layout(("imu",))
    assert tokens.shape == (3, 2, 32) and valid.shape == (3, 2)
    assert valid.dtype == jnp.bool_
    for m, sl in layout.items():
        flags = PRESENT[:, MODALITIES.index(m)].astype(bool)
        np.testing.assert_array_equal(valid[:, sl], np.repeat(flags[:, None], sl.stop - sl.start,
                                                              axis=1))
    with pytest.raises(ValueError, match="no encoder"):
        c.model.encode(make_batch(), ("radar",))


# ---------------------------------------------------------------------------------- bf16


def test_bf16_runs_and_is_close_to_fp32():
    c32 = compiled()
    c16 = compiled(dtype="bfloat16")
    for leaf in jax.tree.leaves(c16.params):
        assert leaf.dtype == jnp.float32  # parameters stay fp32
    batch = make_batch()
    (loss32, _), _ = c32.grad(c32.params, batch, KEY)
    loss16, aux16 = c16.loss(c32.params, batch, KEY)  # the same weights, bf16 compute
    assert loss16.dtype == jnp.float32 and aux16["pred/rgb"].dtype == jnp.float32
    assert float(loss16) == pytest.approx(float(loss32), rel=3e-2)


# ---------------------------------------------------------------------------------- FLOPs


def test_flops_match_a_hand_count_for_one_block():
    # rgb only, 32×32×3 with 8-pixel patches: 16 patches of 192 values; D = 32, decoder 16,
    # mlp_ratio 4; mask 0.75 → 4 visible.
    cfg = dataclasses.replace(CFG, modalities=("rgb",), decoder_dim=16)
    D, d, P, n, v = 32, 16, 192, 16, 4
    patch_embed = 2 * v * P * D

    def block(t, w):  # qkv, q·k, a·v, proj, mlp up, mlp down
        return 2 * t * w * 3 * w + 2 * t * t * w + 2 * t * t * w + 2 * t * w * w + 2 * (
            2 * t * w * 4 * w)

    encoder = patch_embed + block(v, D)
    fusion = block(v, D)
    decoder = 2 * v * D * d + block(n, d) + 2 * n * d * P
    forward = encoder + fusion + decoder
    assert model_flops_per_sample(cfg, PRE, 0.75, training=False) == forward
    assert model_flops_per_sample(cfg, PRE, 0.75) == 3 * forward
    # masking removes encoder and fusion work
    assert model_flops_per_sample(cfg, PRE, 0.0) > model_flops_per_sample(cfg, PRE, 0.75)
