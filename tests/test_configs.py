"""Every shipped config file loads into its dataclass (a typo in one fails here, not on a
cluster node), and the seed keys keep their documented values."""

from __future__ import annotations

from pathlib import Path

import pytest

from etl.config import load_config as load_etl
from rl.config import load_config as load_rl
from train.config import load_pretrain_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LOADERS = {"etl": load_etl, "pretrain": load_pretrain_config, "rl": load_rl}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_config_file_loads(path):
    kind = path.stem.split("_")[0]
    assert kind in LOADERS, f"{path.name}: no loader for prefix {kind!r}"
    cfg = LOADERS[kind](path)
    assert cfg is not None
    assert path.read_text().lstrip().startswith("#"), f"{path.name} must open with how to run it"


def test_seed_values():
    p = load_pretrain_config(CONFIGS / "pretrain_cmht.toml")
    assert (p.model.embed_dim, p.model.depth, p.model.num_heads) == (256, 6, 8)
    assert (p.model.patch_size, p.model.fusion_depth) == (16, 6)
    assert (p.training.batch_size, p.training.learning_rate, p.training.steps) == (64, 3e-4, 100000)
    assert p.training.mask_ratio == 0.5
    r = load_rl(CONFIGS / "rl_racecar.toml")
    assert (r.ppo.learning_rate, r.ppo.clip_eps, r.ppo.gae_lambda, r.ppo.gamma) == (
        3e-4,
        0.2,
        0.95,
        0.99,
    )
    assert r.ppo.update_epochs == 4
