"""Measuring a pretraining run: reconstructions as images, PSNR/SSIM (metrax), MFU, and the
log sinks (metrics.jsonl, TensorBoard event files, a progress bar or log lines)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_METRIC_MODALITIES = ("rgb", "ir")


# --------------------------------------------------------------------------- reconstructions
def _find(aux: dict, modality: str, words: Sequence[str]):
    for w in words:
        for k in (f"{w}/{modality}", f"{modality}/{w}", f"{w}_{modality}"):
            if k in aux:
                return aux[k]
        if isinstance(aux.get(w), dict) and modality in aux[w]:
            return aux[w][modality]
    return None


def reconstruction(aux: dict, batch: dict, modality: str, patch: int,
                   norm_pix: bool = False):
    """(prediction image, mask image) of ``modality`` as (B, H, W, C) / (B, H, W, 1) numpy
    arrays from the model's aux (``pred/<m>`` as (B, N, p·p·C) patches, row-major patches,
    pixels (row, col, ch) — train.encoders.patchify's layout); None if it has none.
    ``norm_pix``: predictions are per-patch normalized; the input patch's statistics undo it."""
    target = np.asarray(batch[modality], np.float32)
    pred = _find(aux, modality, ("pred", "prediction", "predictions", "recon"))
    if pred is None:
        return None
    pred = np.asarray(pred, np.float32)
    b, h, w, c = target.shape
    gh, gw = h // patch, w // patch
    if pred.shape != target.shape:
        if norm_pix:
            t = target.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
            t = t.reshape(b, gh * gw, -1)
            pred = pred * np.sqrt(t.var(-1, keepdims=True) + 1e-6) + t.mean(-1, keepdims=True)
        pred = pred.reshape(b, gh, gw, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
        pred = pred.reshape(b, h, w, c)
    mask = _find(aux, modality, ("mask", "masks"))
    if mask is not None:
        mask = np.asarray(mask)
        if mask.ndim == 2:  # (B, N) per patch → per pixel
            mask = mask.reshape(b, gh, gw).repeat(patch, 1).repeat(patch, 2)[..., None]
        mask = np.broadcast_to(mask.astype(bool), target.shape[:3] + (1,))
    return pred, mask


def to_unit_range(modality: str, x: np.ndarray) -> np.ndarray:
    """Undo the contract's normalization for display / PSNR (rgb: ImageNet mean/std)."""
    if modality == "rgb":
        from etl.schema import IMAGENET_MEAN, IMAGENET_STD

        x = x * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(x, 0.0, 1.0)


def image_metrics(aux: dict, batch: dict, patch: int, norm_pix: bool = False
                  ) -> dict[str, float]:
    """metrax PSNR and SSIM of rgb/ir reconstructions over the samples where present."""
    import metrax

    from etl.schema import MODALITY_INDEX

    out = {}
    present = np.asarray(batch["present"])
    for m in IMAGE_METRIC_MODALITIES:
        if m not in batch:
            continue
        rec = reconstruction(aux, batch, m, patch, norm_pix)
        keep = present[:, MODALITY_INDEX[m]] > 0
        if rec is None or not keep.any():
            continue
        pred = jnp.asarray(to_unit_range(m, rec[0][keep]))
        target = jnp.asarray(to_unit_range(m, np.asarray(batch[m])[keep]))
        out[f"psnr/{m}"] = float(metrax.PSNR.from_model_output(pred, target, 1.0).compute())
        if min(pred.shape[1:3]) >= 11:
            out[f"ssim/{m}"] = float(metrax.SSIM.from_model_output(pred, target, 1.0).compute())
    return out


# --------------------------------------------------------------------------- MFU
# Dense peak FLOP/s per device by device kind: (bfloat16, float32 matmuls as JAX runs them).
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "A40": (150e12, 75e12),
    "V100": (125e12, 15.7e12),
    "TPU v6": (918e12, 918e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v5": (197e12, 197e12),
    "TPU v4": (275e12, 275e12),
}
_cpu_peak: float | None = None


def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a jitted float32 n×n matmul on the first device (best of ``repeats``)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops_per_device(device=None, dtype: str = "bfloat16") -> tuple[float, str]:
    """(peak FLOP/s, where it came from). CPUs: the measured matmul throughput, shared by
    the host's CPU devices."""
    global _cpu_peak
    device = device or jax.devices()[0]
    kind = device.device_kind
    for name, (bf16, fp32) in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return (bf16 if dtype == "bfloat16" else fp32), f"{kind} {dtype} table"
    if device.platform == "cpu":
        if _cpu_peak is None:
            _cpu_peak = measure_matmul_flops()
        return _cpu_peak / max(1, jax.local_device_count()), "measured CPU matmul"
    return float("nan"), f"{kind}: unknown peak"


# --------------------------------------------------------------------------- logging
class Logger:
    """metrics.jsonl + TensorBoard events (process 0 only) + log lines or a progress bar."""

    def __init__(self, run_dir: Path, total: int, start: int, progress: bool):
        self.active = jax.process_index() == 0
        self.bar = None
        if not self.active:
            return
        from tensorboardX import SummaryWriter

        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.tb = SummaryWriter(str(run_dir / "tb"))
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict[str, float]):
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()
        line = " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                        if k in ("loss", "lr", "samples_per_s_per_device", "mfu")
                        or k.startswith(("psnr", "ssim")))
        if self.bar is not None:
            self.bar.set_postfix_str(line, refresh=False)
        else:
            print(f"step {step}: {line}", flush=True)

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.active:
            if self.bar is not None:
                self.bar.close()
            self.jsonl.close()
            self.tb.close()


def truncate_jsonl(path: Path, step: int, key: str = "step") -> None:
    """Drop the records whose ``key`` is after ``step`` (logged by a run that then died before
    its next checkpoint): a resumed run logs those steps again, with the same values."""
    if not path.is_file():
        return
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    keep = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # torn by a kill mid-write: dropped, its step is logged again
                break
            raise ValueError(f"{path}:{n}: not a JSON record") from None
        if rec.get(key, 0) <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))
