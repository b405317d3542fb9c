"""Pretraining configuration: TOML → typed, frozen dataclasses (see etl.configlib)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from etl import configlib
from etl.config import PreprocessConfig
from etl.schema import IMAGE_MODALITIES, MODALITIES, sample_spec


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
    # "self": joint self-attention; "cross": per-modality cross-attention
    fusion: Literal["self", "cross"] = "self"
    # absent modalities: "drop" from attention, or a learned "token"
    absent: Literal["drop", "token"] = "drop"
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = False  # per-patch normalized reconstruction targets
    # compute dtype (parameters stay float32)
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Modalities the model is built for, in etl.schema.MODALITIES order (a subset is allowed).
    modalities: tuple[str, ...] = ("lidar", "radar", "rgb", "ir", "gps", "imu")
    pos_embed: Literal["sincos", "learned"] = "sincos"  # image patches: fixed 2-D or learned
    # decoder positions on every token ("all", the MAE's) or on the mask tokens only
    # ("masked": the encoder's tokens must then carry their own position, as a policy that
    # pools them needs; see heads.PretrainHead)
    decoder_pos: Literal["all", "masked"] = "all"
    gps_tokens: int = 3  # gps (east, north, up) → 3 tokens of 1 channel each (masked like patches)
    imu_tokens: int = 2  # imu → 2 tokens: gyro xyz, accel xyz
    gps_scale: float = 100.0  # metres: gps input is symlog(x / gps_scale) (see encoders.py)
    gyro_scale: float = 1.0  # rad/s
    accel_scale: float = 9.81  # m/s² (1 g)
    # Speed levers (issue 15; train/encoders.py's doc): none changes the parameters, so a
    # checkpoint restores under any setting of them.
    # attention kernel: "xla"; "cudnn" (flash, GPU only); "auto" = cuDNN on an NVIDIA GPU in
    # bf16, XLA otherwise (off by default until a GPU run shows the same losses, issue 15)
    attention_impl: Literal["auto", "xla", "cudnn"] = "xla"
    # XLA attention's T×T scores/probabilities in memory: "float32", or the "compute" dtype
    # (softmax max/sum still float32)
    score_dtype: Literal["float32", "compute"] = "float32"
    stack_encoders: bool = False  # lidar+radar, rgb+ir blocks as one batched (vmapped) call
    remat: bool = False  # recompute each transformer block in the backward pass

    def __post_init__(self):  # also when built in code (tests, benchmarks), not loaded
        configlib.check_literals(self, "model")
        configlib.check_ranges(self, "model", {
            "embed_dim": (1, None), "depth": (0, None), "num_heads": (1, None),
            "patch_size": (1, None), "fusion_depth": (0, None), "mlp_ratio": (0, None, True),
            "decoder_dim": (1, None), "decoder_depth": (1, None), "decoder_heads": (1, None),
            "gps_tokens": (1, None), "imu_tokens": (1, None), "gps_scale": (0, None, True),
            "gyro_scale": (0, None, True), "accel_scale": (0, None, True),
        })  # fmt: skip
        for dim, heads in (("embed_dim", "num_heads"), ("decoder_dim", "decoder_heads")):
            if getattr(self, dim) % getattr(self, heads):
                raise configlib.ConfigError(
                    f"model.{heads}: must divide {dim} ({getattr(self, dim)}), "
                    f"got {getattr(self, heads)}")


# ---------------------------------------------------------------------------------------------
# Training-side configuration (input pipeline, optimisation, devices, the run itself).


@dataclass(frozen=True)
class DataConfig:
    """Where the ETL's shards are and how the Grain reader walks them."""

    path: str = "data_cache"  # an `etl.build --out` directory (manifest.json + shards)
    split: str = "train"
    shuffle_seed: int = 0
    worker_count: int = 0  # Grain worker processes (mp_prefetch); 0 = read in this process
    worker_buffer_size: int = 2  # batches buffered per worker
    read_threads: int = 4  # threads per process reading and decoding records
    prefetch: int = 64  # records buffered per process
    device_prefetch: int = 2  # batches put on the devices ahead of the step

    def __post_init__(self):
        configlib.check_ranges(self, "data", {
            "worker_count": (0, None), "worker_buffer_size": (1, None), "read_threads": (1, None),
            "prefetch": (1, None), "device_prefetch": (0, None),
        })  # fmt: skip


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int = 64  # global: summed over every device and process
    learning_rate: float = 3e-4  # peak, after warmup
    steps: int = 100000
    mask_ratio: float = 0.5
    # weight of the visible patches' reconstruction error next to the masked ones' (0 = MAE)
    visible_loss_weight: float = 0.0
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.0  # cosine ends at learning_rate × this
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0  # clip_by_global_norm; 0 = off
    seed: int = 0  # parameter init; the step-t masking key is fold_in(PRNGKey(seed), t)
    log_every: int = 50
    image_metrics_every: int = 500  # PSNR/SSIM of rgb/ir reconstructions; 0 = never
    ckpt_every: int = 1000
    keep: int = 3  # checkpoints kept
    async_checkpoint: bool = True
    progress: bool = True  # a tqdm bar on a terminal (log lines otherwise)

    def __post_init__(self):
        configlib.check_ranges(self, "training", {
            "batch_size": (1, None), "learning_rate": (0, None, True), "steps": (1, None),
            "mask_ratio": (0, 1, True, True), "warmup_steps": (0, None),
            "visible_loss_weight": (0, None),
            "min_lr_ratio": (0, 1), "weight_decay": (0, None), "b1": (0, 1, False, True),
            "b2": (0, 1, False, True), "grad_clip": (0, None), "log_every": (1, None),
            "image_metrics_every": (0, None), "ckpt_every": (1, None), "keep": (1, None),
        })  # fmt: skip


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh ("data", "fsdp"). The batch is split over both axes; parameters and
    optimizer state are sharded over "fsdp" (each array on its largest divisible axis).
    -1 on `data` = every device not used by `fsdp`."""

    data: int = -1
    fsdp: int = 1
    # jax.distributed.initialize(): "auto" (when SLURM_NTASKS > 1), "on", "off"
    distributed: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self):
        if self.data != -1:
            configlib.check_range("mesh.data", self.data, 1)  # -1: every device left
        configlib.check_range("mesh.fsdp", self.fsdp, 1)


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    run_name: str = "pretrain"
    runs_dir: str = "runs"


def check_against_data(model: ModelConfig, pre: PreprocessConfig, source: str) -> None:
    """The model config against the data's sample sizes (known once the manifest of
    ``source`` is read, before anything is built): :class:`etl.configlib.ConfigError` naming
    the key, e.g. a ``model.patch_size`` that does not divide an image or BEV grid."""
    spec = sample_spec(pre)
    p = model.patch_size
    for m in model.modalities:
        if m not in MODALITIES:
            raise configlib.ConfigError(f"model.modalities: unknown modality {m!r} "
                                        f"(known: {list(MODALITIES)})")  # fmt: skip
        if m in IMAGE_MODALITIES:
            h, w = spec[m].shape[:2]
            if h % p or w % p:
                raise configlib.ConfigError(
                    f"model.patch_size: must divide the {m} size {h}×{w} of the data in "
                    f"{source}, got {p}")
        else:
            key = f"{m}_tokens"
            n = getattr(model, key)
            if spec[m].shape[0] % n:
                raise configlib.ConfigError(
                    f"model.{key}: must divide the {spec[m].shape[0]} {m} channels, got {n}")


def load_pretrain_config(path=None, overrides=()) -> PretrainConfig:
    """TOML (+ `--set key=value` overrides) → PretrainConfig; errors name the key."""
    return configlib.load(PretrainConfig, path, overrides)
