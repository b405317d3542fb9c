"""Orbax checkpoints: round trip of model + optimizer + data state + config; architecture check."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from _train_fixtures import TINY_PRE, make_standin

from train.checkpoint import (
    ArchitectureMismatch,
    Checkpointer,
    config_record,
    model_config_diff,
    model_config_from_record,
)
from train.config import ModelConfig, PretrainConfig, TrainingConfig
from train.pretrain import init_state, make_optimizer

CFG = PretrainConfig(model=ModelConfig(embed_dim=16, patch_size=8, modalities=("lidar", "rgb")),
                     training=TrainingConfig(steps=10, warmup_steps=1))


def _state(seed):
    cfg = dataclasses.replace(CFG, training=dataclasses.replace(CFG.training, seed=seed))
    tx = make_optimizer(cfg.training)
    _, state, _ = init_state(cfg, TINY_PRE, make_standin(), tx)

    @jax.jit
    def one_update(state):  # make the optimizer state non-trivial
        grads = jax.tree.map(lambda p: p * 0.1 + 1.0, state["params"])
        return {**state, "opt": tx.update(grads, state["opt"], state["params"])[1]}

    return one_update(state)


def test_round_trip(tmp_path):
    state = _state(0)
    data_state = {"next_index": 17, "nested": {"worker": [1, 2]}}
    rec = config_record(CFG, TINY_PRE)
    ck = Checkpointer(tmp_path / "ckpt", keep=2)
    for step in (1, 2, 3):
        ck.save(step, state, {**data_state, "next_index": step}, rec)
    ck.close()  # waits for the async saves

    ck = Checkpointer(tmp_path / "ckpt", keep=2)
    assert ck.all_steps() == [2, 3]  # keep the last 2
    target = _state(1)  # another init: every value must come from the checkpoint
    restored, got_data, got_rec = ck.restore(target, model_cfg=CFG.model)
    ck.close()
    a, b = jax.tree.leaves(state), jax.tree.leaves(restored)
    assert len(a) == len(b) and jax.tree.structure(state) == jax.tree.structure(restored)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert got_data == {**data_state, "next_index": 3}
    assert got_rec == json.loads(json.dumps(rec))
    assert model_config_from_record(got_rec) == CFG.model
    assert not list((tmp_path / "ckpt").rglob("*.pkl"))


def test_architecture_mismatch_lists_the_differing_keys(tmp_path):
    ck = Checkpointer(tmp_path / "ckpt", async_save=False)
    ck.save(5, _state(0), {}, config_record(CFG, TINY_PRE))
    other = dataclasses.replace(CFG.model, embed_dim=32, depth=2, dtype="bfloat16")
    with pytest.raises(ArchitectureMismatch) as e:
        ck.check_architecture(other)
    msg = str(e.value)
    assert "model.embed_dim: checkpoint 16 ≠ config 32" in msg
    assert "model.depth: checkpoint 6 ≠ config 2" in msg
    assert "dtype" not in msg  # compute dtype is not architecture
    ck.check_architecture(dataclasses.replace(CFG.model, dtype="bfloat16"))  # fine
    ck.close()
    assert model_config_diff({"embed_dim": 16}, CFG.model)  # keys absent in the checkpoint


def test_a_model_key_added_later_reads_as_its_default_in_older_checkpoints():
    """A checkpoint saved before ModelConfig grew a key (decoder_pos) restores under the key's
    default — the old behaviour — and only under it."""
    from etl import configlib

    old = configlib.to_dict(CFG.model)
    del old["decoder_pos"]
    assert model_config_diff(old, CFG.model) == []
    masked = dataclasses.replace(CFG.model, decoder_pos="masked")
    assert model_config_diff(old, masked) == [
        "model.decoder_pos: checkpoint 'all' ≠ config 'masked'"]
