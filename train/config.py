"""Pretraining configuration: TOML → typed, frozen dataclasses (see etl.configlib)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """The masked multimodal autoencoder. Keys of the seed config: embed_dim, depth, num_heads,
    patch_size, fusion_depth."""

    embed_dim: int = 256
    depth: int = 6  # transformer blocks per modality encoder
    num_heads: int = 8
    patch_size: int = 16
    fusion_depth: int = 6
    mlp_ratio: float = 4.0
    fusion: str = "self"  # "self": joint self-attention; "cross": per-modality cross-attention
    absent: str = "drop"  # absent modalities: "drop" from attention, or a learned "token"
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = False  # per-patch normalized reconstruction targets
    dtype: str = "float32"  # compute dtype: "float32" or "bfloat16" (parameters stay float32)
