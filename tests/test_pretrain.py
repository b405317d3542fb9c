"""The pretraining loop: config errors, exact resume after kill -9, preemption, NaN guard,
architecture mismatch, sharded = unsharded. Runs a tiny stand-in model (tests/_train_fixtures)
so that every compile takes seconds; the real MultimodalMAE has its own tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _train_fixtures import (
    CORRUPTIONS,
    corrupt_step,
    make_standin,
    read_losses,
    run_pretrain,
    standin_flops,
    tiny_config,
    write_shards,
)

from etl.configlib import ConfigError
from train.config import load_pretrain_config

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, wait: bool = True, **env):
    """``python -c code`` with tests/ importable: its CompletedProcess, or the Popen."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), e.get("PYTHONPATH", "")])
    e["JAX_PLATFORMS"] = "cpu"
    e.update(env)
    args = [sys.executable, "-c", textwrap.dedent(code)]
    if wait:
        return subprocess.run(args, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(args, cwd=ROOT, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, shards):
    """An uninterrupted 8-step run: (tmp dir, step → loss)."""
    tmp = tmp_path_factory.mktemp("baseline")
    cfg = tiny_config(tmp, shards, "base")
    # image metrics on: a forward pass that must not change the losses
    assert run_pretrain(["--config", str(cfg), "--set", "training.image_metrics_every=4"]) == 0
    return tmp, read_losses(tmp / "runs" / "base")


# --------------------------------------------------------------------------- config
def test_config_unknown_key_and_wrong_type_name_the_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[training]\nlerning_rate = 1e-3\n")
    with pytest.raises(ConfigError, match=r"training\.lerning_rate"):
        load_pretrain_config(p)
    p.write_text('[training]\nsteps = "ten"\n')
    with pytest.raises(ConfigError, match=r"training\.steps.*int"):
        load_pretrain_config(p)
    with pytest.raises(ConfigError, match=r"model\.embed_dim"):
        load_pretrain_config(None, ["model.embed_dim=1.5"])


def test_config_set_overrides_and_shipped_configs():
    cfg = load_pretrain_config(ROOT / "configs/pretrain_cmht.toml")
    m, t = cfg.model, cfg.training
    assert (m.embed_dim, m.depth, m.num_heads, m.patch_size, m.fusion_depth) == (256, 6, 8, 16, 6)
    assert (t.batch_size, t.learning_rate, t.steps, t.mask_ratio) == (64, 3e-4, 100000, 0.5)
    cfg = load_pretrain_config(ROOT / "configs/pretrain_cmht.toml",
                               ["training.steps=10", "data.path=/scratch/cache", "mesh.fsdp=2"])
    assert cfg.training.steps == 10 and cfg.data.path == "/scratch/cache" and cfg.mesh.fsdp == 2
    load_pretrain_config(ROOT / "configs/pretrain_tiny.toml")


def test_cli_reports_config_error(tmp_path, capsys):
    from train import pretrain

    p = tmp_path / "c.toml"
    p.write_text("[mesh]\nfsdb = 2\n")
    assert pretrain.main(["--config", str(p)]) == 2  # configlib.EXIT_CONFIG, as every entry point
    assert "mesh.fsdb: unknown key" in capsys.readouterr().err


def test_fsdp_rule():
    from jax.sharding import PartitionSpec as P

    from train.sharding import param_spec

    assert param_spec((16, 48), 2) == P(None, "fsdp")
    assert param_spec((48, 16), 4) == P("fsdp", None)
    assert param_spec((3, 5), 2) == P()
    assert param_spec((), 4) == P()
    assert param_spec((16, 48), 1) == P()


# --------------------------------------------------------------------------- the loop
def test_uninterrupted_run_logs_and_checkpoints(baseline):
    tmp, losses = baseline
    run = tmp / "runs" / "base"
    assert sorted(losses) == list(range(1, 9))
    assert all(np.isfinite(list(losses.values())))
    assert sorted(int(p.name) for p in (run / "ckpt").iterdir() if p.name.isdigit())[-1] == 8
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for k in ("loss/lidar", "loss/rgb", "samples_per_s_per_device", "mfu", "lr", "grad_norm"):
        assert k in rec
    images = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    images = [r for r in images if "psnr/rgb" in r]
    assert [r["step"] for r in images] == [4, 8]
    assert all(np.isfinite(r["psnr/rgb"]) and np.isfinite(r["ssim/ir"]) for r in images)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert json.loads((run / "config.json").read_text())["model"]["embed_dim"] == 16


@pytest.fixture(scope="module", autouse=True)
def four_devices_process(tmp_path_factory, shards):
    """Started first, runs alongside the in-process tests (spawning JAX is the slow part):
    one subprocess with 4 fake CPU devices — 8 steps on a 2 (data) × 2 (fsdp) mesh, then a
    1-device run killed with SIGKILL at step 6 once its step-4 checkpoint is on disk."""
    tmp = tmp_path_factory.mktemp("four")
    cfg = tiny_config(tmp, shards, "mesh")
    code = f"""
        import os, signal, sys, time
        import jax
        from _train_fixtures import run_pretrain
        assert jax.device_count() == 4, jax.devices()
        assert run_pretrain(["--config", {str(cfg)!r}, "--set", "run_name=fsdp",
                             "--set", "mesh.data=2", "--set", "mesh.fsdp=2"]) == 0
        def die(step, metrics):  # once the step-4 checkpoint is on disk, at step 6
            if step == 6:
                for _ in range(600):
                    if os.path.isdir({str(tmp / "runs" / "killed" / "ckpt" / "4")!r}):
                        break
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)
        run_pretrain(["--config", {str(cfg)!r}, "--set", "run_name=killed",
                      "--set", "mesh.data=1"], hooks=[die])
    """
    proc = _python(code, wait=False, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    yield tmp, cfg, proc
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def four_devices(four_devices_process):
    tmp, cfg, proc = four_devices_process
    out, err = proc.communicate(timeout=300)
    return tmp, cfg, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_sharded_equals_unsharded(four_devices, baseline):
    """4 fake CPU devices, batch over all 4 and parameters sharded over 2 (FSDP): the 1-device
    losses, step by step."""
    tmp, _, out = four_devices
    want = baseline[1]
    for name in ("fsdp",):
        assert (tmp / "runs" / name / "ckpt" / "8").is_dir(), out.stderr[-3000:]
        got = read_losses(tmp / "runs" / name)
        assert sorted(got) == sorted(want), name
        np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)],
                                   rtol=1e-4, err_msg=name)
    assert "mesh {'data': 2, 'fsdp': 2}" in out.stderr


def test_resume_after_kill_9_is_exact(four_devices, baseline, capsys):
    """kill -9 mid-run (subprocess), rerun: every step's loss equals the uninterrupted run's."""
    tmp, cfg, out = four_devices
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    run = tmp / "runs" / "killed"
    assert max(read_losses(run)) == 5  # died before logging step 6
    rc = run_pretrain(["--config", str(cfg), "--set", "run_name=killed"])
    assert rc == 0
    assert "resumed from step 4" in capsys.readouterr().err
    got, want = read_losses(run), baseline[1]
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                               rtol=1e-6)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) == list(range(1, 9))  # step 5, logged before the kill, once


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, shards):
    """A run that got SIGTERM at step 3: (config, run dir)."""
    tmp = tmp_path_factory.mktemp("preempted")
    cfg = tiny_config(tmp, shards, "pre")

    def sigterm(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    from train.pretrain import EXIT_PREEMPTED

    assert run_pretrain(["--config", str(cfg)], hooks=[sigterm]) == EXIT_PREEMPTED
    return cfg, tmp / "runs" / "pre"


def _ckpt_steps(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "ckpt").iterdir() if p.name.isdigit())


def test_sigterm_saves_and_exits_for_requeue(preempted, baseline):
    _, run = preempted
    logged = max(read_losses(run))
    assert logged < 8
    assert _ckpt_steps(run)[-1] == logged  # saved right where it stopped
    losses = read_losses(run)
    np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                               [baseline[1][s] for s in sorted(losses)], rtol=1e-6)


def test_architecture_mismatch_names_the_keys(preempted, tmp_path, capsys):
    cfg, run = preempted
    before = _ckpt_steps(run)
    rc = run_pretrain(["--config", str(cfg), "--set", "model.embed_dim=32",
                       "--set", "model.patch_size=16"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "model.embed_dim: checkpoint 16 ≠ config 32" in err
    assert "model.patch_size: checkpoint 8 ≠ config 16" in err
    assert "model.num_heads" not in err
    assert _ckpt_steps(run) == before
    assert json.loads((run / "config.json").read_text())["model"]["embed_dim"] == 16


def test_nan_loss_stops_without_checkpoint(preempted, tmp_path, capsys):
    cfg, run = preempted
    runs = tmp_path / "runs"
    shutil.copytree(run, runs / "pre")
    cfg2 = tmp_path / "nan.toml"
    cfg2.write_text(cfg.read_text().replace(str(run.parent), str(runs)))
    before = _ckpt_steps(runs / "pre")

    import jax.numpy as jnp

    from train import pretrain

    base = make_standin()

    class NaNMAE(base):
        def __call__(self, batch, key, mask_ratio):
            loss, aux = super().__call__(batch, key, mask_ratio)
            return loss * jnp.nan, aux

    rc = pretrain.main(["--config", str(cfg2)], model_cls=NaNMAE, flops_fn=lambda *a, **k: 1.0)
    assert rc == pretrain.EXIT_NONFINITE
    first = before[-1] + 1  # the first step after the resume
    assert f"non-finite loss nan (gradient norm nan) at step {first}" in capsys.readouterr().err
    assert _ckpt_steps(runs / "pre") == before


def test_overflowing_update_is_never_saved(shards, tmp_path, capsys):
    """A learning rate that overflows gives inf/NaN parameters after step 1 while its loss
    (computed before the update) is finite: the run stops there, with no checkpoint."""
    cfg = tiny_config(tmp_path, shards, "overflow")
    rc = run_pretrain(["--config", str(cfg), "--set", "training.learning_rate=1e39",
                       "--set", "training.warmup_steps=0", "--set", "training.ckpt_every=1",
                       "--set", "training.grad_clip=0.0"])
    from train.pretrain import EXIT_NONFINITE

    err = capsys.readouterr().err
    assert rc == EXIT_NONFINITE
    assert "non-finite parameters after the update of step 1" in err
    assert "No checkpoint was written." in err and "step None" not in err
    ckpt = tmp_path / "runs" / "overflow" / "ckpt"
    assert not ckpt.exists() or not [p for p in ckpt.iterdir() if p.name.isdigit()]


class DeviceClock:
    """A virtual clock that only the devices' work advances: the timed model below adds
    ``cost`` seconds in a callback that runs when its step runs on the device — not when the
    step is dispatched — so the time the loop reads around a step is that step's only if the
    loop really waited for it."""

    def __init__(self, cost: float = 1.0):
        self.t, self.cost, self.calls = 0.0, cost, 0

    def __call__(self) -> float:
        return self.t

    def work(self) -> None:
        self.t += self.cost
        self.calls += 1


def test_step_time_is_the_device_time_of_the_steps_it_counts(shards, tmp_path):
    """samples/s and MFU come from a window that holds whole steps: it opens with no step in
    flight and closes once its last step has finished; image metrics (a forward pass) are
    taken out of it. Under the device clock each forward pass costs 1 s, so every logged
    step_time_s is exactly 1.0 — less would be a step counted outside its time (the MFU above
    1 of issue 14), more a step timed but not counted. Checkpoint saves and image metrics fall
    inside windows; the run starts at 0 and again at a resume."""
    import jax

    from train import pretrain

    clock = DeviceClock()

    class Timed(make_standin()):
        def __call__(self, batch, key, mask_ratio):
            jax.debug.callback(clock.work)
            return super().__call__(batch, key, mask_ratio)

    cfg = tiny_config(tmp_path, shards, "timed")
    args = ["--config", str(cfg), "--set", "training.log_every=3", "--set",
            "training.ckpt_every=2", "--set", "training.image_metrics_every=4"]
    for steps in (5, 12):  # 5 steps (saved at 2, 4, 5), then resumed at 5 and run to 12
        assert pretrain.main([*args, "--set", f"training.steps={steps}"], model_cls=Timed,
                             flops_fn=standin_flops, clock=clock) == 0
    assert clock.calls == 12 + 3  # one pass per train step, one per image step (4, 8, 12)
    recs = [json.loads(x) for x in
            (tmp_path / "runs" / "timed" / "metrics.jsonl").read_text().splitlines()]
    # logged at 3, 5 (the end), 6, 9, 12; the first step of each start is compile time and
    # not timed, so the window that ends at 6 holds no step and logs no speed
    assert sorted(r["step"] for r in recs if "loss" in r) == [3, 5, 6, 9, 12]
    timed = {r["step"]: r for r in recs if "step_time_s" in r}
    assert sorted(timed) == [3, 5, 9, 12], sorted(timed)
    for step, r in timed.items():
        assert r["step_time_s"] == 1.0, (step, r["step_time_s"])
        assert r["samples_per_s"] == 8.0  # batch 8 per 1 s step
    assert len({r["mfu"] for r in timed.values()}) == 1


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, shards):
    """A finished 4-step run with checkpoints at steps 2 and 4: (tmp dir, config)."""
    tmp = tmp_path_factory.mktemp("two")
    cfg = tiny_config(tmp, shards, "two")
    assert run_pretrain(["--config", str(cfg), "--set", "training.steps=4",
                         "--set", "training.ckpt_every=2"]) == 0
    assert _ckpt_steps(tmp / "runs" / "two") == [2, 4]
    return tmp, cfg


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_damaged_latest_checkpoint_resumes_from_the_one_before(two_checkpoints, tmp_path,
                                                               capsys, how):
    src, cfg = two_checkpoints
    shutil.copytree(src / "runs" / "two", tmp_path / "runs" / "two")
    cfg2 = tmp_path / "two.toml"
    cfg2.write_text(cfg.read_text().replace(str(src / "runs"), str(tmp_path / "runs")))
    run = tmp_path / "runs" / "two"
    corrupt_step(run / "ckpt" / "4", how)
    from train.checkpoint import CheckpointWarning

    with pytest.warns(CheckpointWarning) as w:
        rc = run_pretrain(["--config", str(cfg2), "--set", "training.steps=6",
                           "--set", "training.ckpt_every=2"])
    assert rc == 0
    msgs = [str(x.message) for x in w if issubclass(x.category, CheckpointWarning)]
    assert len(msgs) == 1 and "step 4:" in msgs[0] and "resuming from step 2" in msgs[0]
    assert "resumed from step 2" in capsys.readouterr().err
    assert _ckpt_steps(run) == [2, 4, 6]  # step 4 saved again; the damaged one set aside
    assert (run / "ckpt" / "4.corrupt").is_dir()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_no_intact_checkpoint_is_one_line(two_checkpoints, tmp_path, capsys):
    src, cfg = two_checkpoints
    shutil.copytree(src / "runs" / "two", tmp_path / "runs" / "two")
    cfg2 = tmp_path / "two.toml"
    cfg2.write_text(cfg.read_text().replace(str(src / "runs"), str(tmp_path / "runs")))
    ckpt = tmp_path / "runs" / "two" / "ckpt"
    corrupt_step(ckpt / "4", "chunk")
    corrupt_step(ckpt / "2", "manifest")
    rc = run_pretrain(["--config", str(cfg2), "--set", "training.steps=6"])
    err = capsys.readouterr().err
    assert rc == 1
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    assert f"{ckpt}: no intact checkpoint (steps 4, 2 all fail" in line
    assert "Traceback" not in err
    assert _ckpt_steps(tmp_path / "runs" / "two") == [2, 4]  # nothing renamed or written


def test_torn_last_metrics_line_does_not_block_resume(tmp_path):
    from train.metrics import truncate_jsonl

    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    truncate_jsonl(f, 2)
    assert f.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n'
    f.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON record"):
        truncate_jsonl(f, 2)


# --------------------------------------------------------------------------- helpers
def test_reconstruction_inverts_the_models_patchify():
    import jax.numpy as jnp

    from train.encoders import patchify
    from train.metrics import reconstruction

    x = np.random.default_rng(0).random((2, 16, 24, 3)).astype(np.float32)
    patches = np.asarray(patchify(jnp.asarray(x), 8))  # (2, 6, 192)
    mask = np.zeros((2, 6), bool)
    mask[:, 1] = True
    pred, pix_mask = reconstruction({"pred/rgb": patches, "mask/rgb": mask}, {"rgb": x}, "rgb", 8)
    np.testing.assert_allclose(pred, x, rtol=1e-6)
    assert pix_mask.shape == (2, 16, 24, 1)
    assert pix_mask[:, :8, 8:16].all() and pix_mask.sum() == 2 * 64


