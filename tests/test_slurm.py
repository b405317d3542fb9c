"""The Slurm job scripts (slurm/*.sh), run with bash and no Slurm: a fake ``uv``, ``srun``,
``scontrol`` on PATH record what would run, so these tests are fast and need no cluster."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOBS = ["etl.sh", "pretrain.sh", "ppo.sh", "study.sh"]

FAKE_UV = """#!/bin/bash
echo "uv $* | JAX_PLATFORMS=${JAX_PLATFORMS:-} SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-}" \\
  >> "$FAKE_LOG"
[[ "$1" == run ]] || exit 0
if [[ -n "${FAKE_WAIT:-}" ]]; then
  # FAKE_DIE: no handler yet (or killed by srun): USR1 ends the child (exit 128 + 10)
  [[ -n "${FAKE_DIE:-}" ]] || trap 'echo "child got USR1" >> "$FAKE_LOG"; exit 3' USR1
  trap 'echo "child got TERM" >> "$FAKE_LOG"; exit 143' TERM
  touch "$FAKE_WAIT"
  while true; do sleep 0.05; done
fi
exit "${FAKE_EXIT:-0}"
"""
FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$FAKE_LOG"
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
"""


SLURM_TOOLS = {"sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo", "salloc", "sacct"}


@pytest.fixture(scope="module")
def sys_bin(tmp_path_factory):
    """/usr/bin and /bin as links, without any real Slurm command (this machine may have them)."""
    out = tmp_path_factory.mktemp("sysbin")
    for d in (Path("/usr/bin"), Path("/bin")):
        for tool in d.iterdir():
            if tool.name not in SLURM_TOOLS and not (out / tool.name).exists():
                (out / tool.name).symlink_to(tool)
    return out


@pytest.fixture
def fake(tmp_path, sys_bin):
    """(env, log path): PATH with the fakes first, then the system's programs without Slurm's,
    no Slurm variables, no RACEFORMER_EXTRA."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in (("uv", FAKE_UV), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    log = tmp_path / "log"
    log.touch()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RACEFORMER_", "JAX_PLATFORMS"))}
    env.update(PATH=f"{bin_}:{sys_bin}", FAKE_LOG=str(log))
    return env, log


def _run(script, args, env, **kw):
    return subprocess.run(["bash", f"slurm/{script}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, **kw)


def _slurm(env, **extra):
    return {**env, "SLURM_JOB_ID": "123", "SLURM_NTASKS": "1", "SLURM_NNODES": "1",
            "SLURM_CPUS_PER_TASK": "8", "SLURM_SUBMIT_DIR": str(ROOT), **extra}


def _usr1_once_started(args, env, started):
    """Start ``bash ARGS…``, send the batch shell SIGUSR1 once the fake program has written
    ``started`` (it is running), and return (returncode, stdout, stderr)."""
    p = subprocess.Popen(["bash", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=30)
    return p.returncode, out, err


@pytest.mark.parametrize("script", [*JOBS, "lib.sh"])
def test_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(ROOT / "slurm" / script)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", JOBS)
def test_sbatch_lines_requeue_on_the_early_signal(script):
    """Every job asks for SIGUSR1 before its end (to the batch shell), may be requeued, and
    appends to its log across restarts."""
    lines = [ln for ln in (ROOT / "slurm" / script).read_text().splitlines()
             if ln.startswith("#SBATCH")]
    assert any(re.fullmatch(r"#SBATCH --signal=B:USR1@\d+", ln) for ln in lines), lines
    assert "#SBATCH --requeue" in lines
    assert "#SBATCH --open-mode=append" in lines


def test_pretrain_without_slurm_runs_here_on_the_cpu_env(fake):
    env, log = fake
    r = _run("pretrain.sh", ["configs/pretrain_tiny.toml", "--set", "training.steps=2"], env)
    assert r.returncode == 0, r.stderr
    (line,) = log.read_text().splitlines()
    assert line.startswith("uv run --frozen python -m train.pretrain --config "
                           "configs/pretrain_tiny.toml --set training.steps=2 |"), line
    assert "--extra" not in line and "JAX_PLATFORMS= " in line


@pytest.mark.parametrize(("extra", "sync", "platforms"), [
    (None, "uv sync --frozen --inexact --extra cuda13 ", "cuda"),
    ("cpu", "uv sync --frozen --inexact |", "cpu"),
])
def test_pretrain_under_slurm_one_process_per_task_and_requeue_on_usr1(
        fake, tmp_path, extra, sync, platforms):
    """Under Slurm: one sync, then srun (one process per task); USR1 to the batch shell reaches
    the program, which exits 3 (checkpoint saved), and the job requeues itself."""
    env, log = fake
    env = _slurm(env, SLURM_NTASKS="8", SLURM_NNODES="2", FAKE_WAIT=str(tmp_path / "started"))
    if extra:
        env["RACEFORMER_EXTRA"] = extra
    code, out, err = _usr1_once_started(["slurm/pretrain.sh", "configs/pretrain_tiny.toml"],
                                        env, tmp_path / "started")
    assert code == 3, err
    lines = log.read_text().splitlines()
    assert lines[0].startswith(sync), lines
    assert lines[1].startswith("srun --kill-on-bad-exit=1 uv run --frozen --no-sync python -m "
                               "train.pretrain"), lines
    assert f"JAX_PLATFORMS={platforms} SRUN_CPUS_PER_TASK=8" in lines[2], lines
    assert lines[3:] == ["child got USR1", "scontrol requeue 123"], lines
    assert "2 node(s), 8 task(s)" in out


def test_unknown_extra_is_one_line(fake):
    env, log = fake
    r = _run("pretrain.sh", [], {**env, "RACEFORMER_EXTRA": "cuda99"})
    assert r.returncode == 2
    assert r.stderr.strip() == "slurm/lib.sh: RACEFORMER_EXTRA=cuda99: expected cuda13 or cpu"
    assert log.read_text() == ""


def test_ppo_refuses_several_tasks(fake):
    """rl.ppo is one process: several nodes or tasks fail with one line, before any work."""
    env, log = fake
    r = _run("ppo.sh", [], _slurm(env, SLURM_NTASKS="8", SLURM_NNODES="2"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "--nodes=1" in r.stderr
    assert log.read_text() == ""


def test_etl_without_slurm_builds_everything_here(fake):
    env, log = fake
    r = _run("etl.sh", [], {**env, "SRC": "raw", "OUT": "cache", "WORKERS": "2"})
    assert r.returncode == 0, r.stderr
    assert "no Slurm here" in r.stdout
    (line,) = log.read_text().splitlines()
    assert line.startswith("uv run --frozen python -m etl.build --src raw --out cache "
                           "--workers 2 |"), line


def test_etl_array_task_stops_and_requeues_on_usr1(fake, tmp_path):
    """An array task has no checkpoint to save: USR1 stops the build (finished drives keep
    their markers) and requeues the task; it builds its own group of drives."""
    env, log = fake
    env = _slurm(env, SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_TASK_COUNT="4", SRC="raw",
                 OUT="cache", FAKE_WAIT=str(tmp_path / "started"))
    code, _, err = _usr1_once_started(["slurm/etl.sh"], env, tmp_path / "started")
    assert code == 3, err
    lines = log.read_text().splitlines()
    assert lines[0].startswith("uv sync --frozen --inexact |"), lines  # no CUDA for the ETL
    assert "--shard-index 2 --num-shards 4 --no-progress" in lines[1], lines
    assert lines[3:] == ["child got TERM", "scontrol requeue 123"], lines


def test_pretrain_killed_by_a_signal_after_the_stop_still_requeues(fake, tmp_path):
    """A program that dies of a signal once the stop was passed on (no handler installed yet,
    or a task srun ended when another exited 3 first) is requeued like one that exited 3: the
    rerun resumes from the newest intact checkpoint. Without the stop, a death is a failure."""
    env, log = fake
    env = _slurm(env, RACEFORMER_EXTRA="cpu", FAKE_WAIT=str(tmp_path / "started"), FAKE_DIE="1")
    code, out, err = _usr1_once_started(["slurm/pretrain.sh", "configs/pretrain_tiny.toml"],
                                        env, tmp_path / "started")
    assert code == 3, err
    assert "python died of signal 10 after the stop: requeueing" in out
    assert log.read_text().splitlines()[-1] == "scontrol requeue 123"

    log.write_text("")
    r = _run("pretrain.sh", ["configs/pretrain_tiny.toml"], {**env, "FAKE_WAIT": "",
                                                              "FAKE_EXIT": "137"})
    assert r.returncode == 137 and "scontrol" not in log.read_text()


def test_etl_on_a_login_node_submits_the_array_and_its_merge_with_the_options_given(fake):
    """`bash slurm/etl.sh [sbatch options]` where sbatch exists: the array (ETL_GROUPS tasks)
    and the merge after it, the options going to both (after the merge's own defaults, so
    they win: a cluster whose nodes are smaller needs no edit)."""
    env, log = fake
    bin_ = Path(env["PATH"].split(":")[0])
    (bin_ / "sbatch").write_text('#!/bin/bash\necho "sbatch $* | SRC=$SRC OUT=$OUT '
                                 'ETL_GROUPS=$ETL_GROUPS EXTRA=$EXTRA" >> "$FAKE_LOG"\necho 77\n')
    (bin_ / "sbatch").chmod(0o755)
    extra = "--set preprocess.image.rgb_size=[32,32] --strict"  # a comma: no --export list
    r = _run("etl.sh", ["--partition=cpu", "--mem=4G"], {**env, "OUT": "cache", "SRC": "raw",
                                                         "ETL_GROUPS": "3", "EXTRA": extra})
    assert r.returncode == 0, r.stderr
    array, merge = log.read_text().splitlines()
    job_env = f" | SRC=raw OUT=cache ETL_GROUPS=3 EXTRA={extra}"
    assert array == ("sbatch --parsable --partition=cpu --mem=4G --array=0-2 --export=ALL "
                     "slurm/etl.sh" + job_env), array
    assert merge == ("sbatch --cpus-per-task=2 --mem=8G --time=00:30:00 "
                     "--output=slurm/logs/etl-merge-%j.out --partition=cpu --mem=4G "
                     "--dependency=afterany:77 --job-name=raceformer-etl-merge --array=0-0 "
                     "--export=ALL slurm/etl.sh --merge" + job_env), merge
    assert "submitted ETL array 77 (3 tasks)" in r.stdout


# --------------------------------------------------------------------------- the study
FAKE_SBATCH = """#!/bin/bash
echo "sbatch $*" >> "$FAKE_LOG"
n=$(grep -c '^sbatch' "$FAKE_LOG")
echo "90$n"
"""


def test_study_submits_pretrain_then_the_array_then_the_report(fake):
    """On a login node: the pretraining job, the arm × seed array after it succeeded
    (afterok), the report after the whole array (afterany: failed tasks reported missing)."""
    env, log = fake
    sbatch = Path(env["PATH"].split(":")[0]) / "sbatch"
    sbatch.write_text(FAKE_SBATCH)
    sbatch.chmod(0o755)
    r = _run("study.sh", ["configs/study_cluster.toml", "--set", "seeds=[0,1]"],
             {**env, "TASKS": "10"})
    assert r.returncode == 0, r.stderr
    subs = [ln for ln in log.read_text().splitlines() if ln.startswith("sbatch")]
    assert len(subs) == 3, subs
    assert "--gres=gpu:a100:4" in subs[0]
    assert subs[0].endswith("slurm/study.sh --job pretrain configs/study_cluster.toml --set "
                            "seeds=[0,1]")
    assert "--dependency=afterok:901 --array=0-9" in subs[1] and "--job task" in subs[1]
    assert "--dependency=afterany:902" in subs[2] and "--job report" in subs[2]
    assert "901" in r.stdout and "10 arm × seed tasks 902" in r.stdout


@pytest.mark.parametrize(("job", "args"), [
    ("pretrain", ["--stage", "data,tracks,pretrain,probe,gap"]),
    ("task", ["--task", "7"]),
    ("report", ["--stage", "report"]),
])
def test_study_jobs_run_their_units(fake, job, args):
    env, log = fake
    r = _run("study.sh", ["--job", job, "configs/study_cluster.toml"],
             _slurm(env, SLURM_ARRAY_TASK_ID="7"))
    assert r.returncode == 0, r.stderr
    run = [ln for ln in log.read_text().splitlines() if ln.startswith("srun")]
    assert run == ["srun --kill-on-bad-exit=1 uv run --frozen --no-sync python -m rl.study "
                   "--config configs/study_cluster.toml " + " ".join(args)], run


def test_study_without_slurm_runs_everything_here(fake):
    env, log = fake
    env = {**env, "STUDY_LOCAL": "1"}  # as if no sbatch were on PATH
    r = _run("study.sh", ["configs/study_cpu.toml"], env)
    assert r.returncode == 0, r.stderr
    assert "no Slurm here" in r.stdout
    (line,) = log.read_text().splitlines()
    assert line.startswith("uv run --frozen python -m rl.study --config configs/study_cpu.toml |")
    bad = _run("study.sh", ["--job", "bogus", "configs/study_cpu.toml"], env)
    assert bad.returncode == 2 and "expected pretrain, task or report" in bad.stderr
