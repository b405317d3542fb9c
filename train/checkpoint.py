"""Orbax checkpoints at ``runs/{run_name}/ckpt/{step}``: safe to load (no pickle), resumable.

One checkpoint holds three items:

* ``state`` — model parameters, other model variables and the optimizer state (Orbax
  StandardSave: tensorstore arrays, restored straight into their shardings);
* ``data`` — the Grain iterator state after the last batch trained on (JSON);
* ``config`` — the resolved PretrainConfig, the preprocess config of the shards and
  ``config_hash`` of the model config (JSON).

Saves are asynchronous; :meth:`Checkpointer.close` waits for the last one. Restoring first
reads ``config`` and refuses, naming every differing ModelConfig key, when the checkpoint's
architecture is not the configured one.

Resuming (:meth:`Checkpointer.restore` without a step) takes the newest *intact* step: a step
that cannot be read (a truncated chunk or metadata file, a missing manifest) is skipped when
an older step restores, with one :class:`CheckpointWarning` naming the skipped steps and why;
the damaged folders are renamed ``<step>.corrupt`` (kept for a look, no longer a step), so that
the run saves those steps again. Where no step can be read: :class:`CheckpointError`, one line
naming the folder.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from etl import configlib


class ArchitectureMismatch(ValueError):
    """The checkpoint was written for a different ModelConfig."""


class CheckpointError(RuntimeError):
    """No checkpoint step that can be read (one line naming the folder)."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint step was skipped (one line naming it and why)."""


def reason_line(e: BaseException) -> str:
    """The first line of an exception, short (Orbax/TensorStore messages run for pages)."""
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > 160:
        first = first[:157] + "…"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# ModelConfig keys that change how the model computes, not what its parameters are.
COMPUTE_ONLY_KEYS = frozenset({"dtype", "attention_impl", "score_dtype", "stack_encoders",
                               "remat"})


def model_config_diff(saved: dict[str, Any], current: Any) -> list[str]:
    """``key: saved → current`` for every ModelConfig key whose value differs (keys that only
    change the computation, such as ``dtype``, may differ). A key the checkpoint does not record
    (added to ModelConfig after it was saved) counts as its default: a new key's default keeps
    the old behaviour."""
    now = configlib.to_dict(current)
    defaults = configlib.to_dict(type(current)())
    diffs = []
    for k in sorted((set(saved) | set(now)) - COMPUTE_ONLY_KEYS):
        a, b = saved.get(k, defaults.get(k, "<absent>")), now.get(k, "<absent>")
        if a != b:
            diffs.append(f"model.{k}: checkpoint {a!r} ≠ config {b!r}")
    return diffs


def abstract(tree):
    """ShapeDtypeStructs (with shardings) of a live pytree: the restore target."""

    def one(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True,
                 save_every: int = 1):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,  # the training loop decides when to save
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )

    # ------------------------------------------------------------------ queries
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def saved_config(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return out["config"]

    # ------------------------------------------------------------------ save / restore
    def save(self, step: int, state, data_state: dict[str, Any], config: dict[str, Any],
             force: bool = True) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=force,
        )

    def check_architecture(self, model_cfg, step: int | None = None) -> None:
        saved = self.saved_config(step)
        diffs = model_config_diff(saved.get("model", {}), model_cfg)
        if diffs:
            raise ArchitectureMismatch(
                f"checkpoint {self.directory} (step {step or self.latest_step()}) was written "
                "for a different architecture:\n  " + "\n  ".join(diffs)
                + "\nUse the checkpoint's [model] settings, or a new run_name."
            )

    def restore(self, target_state, model_cfg=None, step: int | None = None):
        """(state, data_state, config) of ``step`` (default: the newest intact step, see the
        module doc; :meth:`latest_step` is that step afterwards), into the shardings and
        structure of ``target_state``."""
        if step is not None:
            try:
                return self._restore_step(target_state, model_cfg, step)
            except ArchitectureMismatch:
                raise
            except Exception as e:
                raise CheckpointError(f"{self.directory / str(step)}: cannot restore this "
                                      f"checkpoint ({reason_line(e)})") from None
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        skipped: list[tuple[int, str]] = []
        for s in steps:
            try:
                out = self._restore_step(target_state, model_cfg, s)
            except ArchitectureMismatch:
                raise
            except Exception as e:  # a damaged step: try the one before it
                skipped.append((s, reason_line(e)))
                continue
            if skipped:
                self._set_aside([k for k, _ in skipped])
                what = "; ".join(f"step {k}: {why}" for k, why in skipped)
                warnings.warn(f"{self.directory}: damaged checkpoint skipped ({what}); resuming "
                              f"from step {s}, the damaged folder renamed <step>.corrupt",
                              CheckpointWarning, stacklevel=2)
            return out
        raise CheckpointError(
            f"{self.directory}: no intact checkpoint (steps {', '.join(map(str, steps))} all "
            f"fail; newest, step {steps[0]}: {skipped[0][1]})")

    def _set_aside(self, steps: list[int]) -> None:
        """Rename damaged step folders ``<step>.corrupt`` (``.corrupt1``… if taken): Orbax no
        longer lists them, and the run may save those steps again."""
        if jax.process_index() == 0:
            for k in steps:
                src = self.directory / str(k)
                dst, n = self.directory / f"{k}.corrupt", 0
                while dst.exists():
                    n += 1
                    dst = self.directory / f"{k}.corrupt{n}"
                if src.exists():
                    src.rename(dst)
        self.manager.reload()

    def _restore_step(self, target_state, model_cfg, step: int):
        if model_cfg is not None:
            self.check_architecture(model_cfg, step)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract(target_state)),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], out["data"], out["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def config_record(cfg, pre=None) -> dict[str, Any]:
    """What a checkpoint stores of the configuration (plain JSON)."""
    rec = {**configlib.to_dict(cfg), "model_hash": configlib.config_hash(cfg.model)}
    if pre is not None:
        rec["preprocess"] = configlib.to_dict(pre)
        rec["preprocess_hash"] = configlib.config_hash(pre)
    return rec


def model_config_from_record(record: dict[str, Any]):
    """The ModelConfig a checkpoint was written for."""
    from train.config import ModelConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return configlib.from_dict(
        ModelConfig, {k: v for k, v in record["model"].items() if k in known}, prefix="model"
    )
