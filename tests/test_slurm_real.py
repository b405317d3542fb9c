"""The job scripts under a real Slurm: a single-node cluster on localhost, started here.

Debian's ``munged``, ``slurmctld`` and ``slurmd -N localhost`` run as root without systemd,
from a generated slurm.conf (this machine's CPUs and memory, one partition, no accounting,
proctrack/linuxproc and task/none so that no cgroups are needed), every file of theirs in a
temporary folder. Then, as a user would, with only the resources overridden on the sbatch
command line (``--partition``, ``--gres=none``, ``--ntasks-per-node``, ``--cpus-per-task``,
``--mem``) and the CPU jaxlib picked by ``RACEFORMER_EXTRA=cpu``:

- ``slurm/etl.sh`` as a 2-task array and its ``--merge`` job on synthetic drives;
- ``slurm/pretrain.sh`` on one task, then on two tasks — two JAX processes on the CPU joined by
  ``jax.distributed``, each reading its own half of every global batch — preempted with
  ``scancel --signal=USR1 --batch`` while it runs: both processes save one checkpoint, the job
  requeues itself and resumes from that step under the same run name, and its losses are those
  of the one-process run;
- ``slurm/ppo.sh`` on the tiny PPO config, and its refusal of two tasks.

Every daemon is stopped by its PID when the module ends, pass or fail, with any process the
cluster started. Needs root and the packages ``slurmctld slurmd slurm-client munge``
(``.ci/run`` installs them); otherwise the module is skipped, saying which. Select it with
``-m slurm``, leave it out with ``-m "not slurm"``. A few minutes on 2 cores, most of it JAX
compiling in the jobs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from etl.dataset import list_shards

ROOT = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")
PARTITION = "rftest"
MARKER = "RACEFORMER_SLURM_TEST"  # in the environment of everything the cluster starts

# How long one job may take: generous, for a busy machine (they take 10-90 s on an idle one).
JOB_TIMEOUT = 900

# Two processes summing a batch on two devices add in another order than one process on one:
# the losses agree to float32 round-off (measured: ≤ 2e-7 relative over 12 steps).
LOSS_RTOL = 1e-5


SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])


def _tool(name: str) -> str | None:
    """The program's path (daemons live in sbin, which a CI PATH may lack)."""
    return shutil.which(name, path=SEARCH)


def _why_not() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root: it starts munged, slurmctld and slurmd on this machine"
    missing = [p for p in (*DAEMONS, *CLIENTS) if _tool(p) is None]
    if missing:
        return (f"Slurm/MUNGE not installed ({', '.join(missing)} missing): apt-get install "
                "slurmctld slurmd slurm-client munge (.ci/run does it as root)")
    if shutil.which("uv") is None:
        return "uv is not on PATH (the job scripts run `uv run`)"
    return None


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.xdist_group("slurm"),  # one cluster, on one worker (--dist loadgroup)
    pytest.mark.skipif(_why_not() is not None, reason=str(_why_not())),
]


# --------------------------------------------------------------------------- the cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machine() -> tuple[int, int]:
    """(CPUs, RealMemory MB) as slurmd sees this machine."""
    out = subprocess.run([_tool("slurmd"), "-C"], capture_output=True, text=True,
                         check=True).stdout
    cpus = int(re.search(r"\bCPUs=(\d+)", out).group(1))
    mem = int(re.search(r"\bRealMemory=(\d+)", out).group(1))
    return cpus, mem


SLURM_CONF = """\
ClusterName=raceformer-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
MinJobAge=600
NodeName=localhost CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName={partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """munged, slurmctld, slurmd in the foreground (their PIDs known), files under ``dir``."""

    def __init__(self, dir_: Path):
        self.dir = dir_
        self.conf = dir_ / "slurm.conf"
        self.procs: list[tuple[str, subprocess.Popen]] = []
        # the environment of the daemons and of every job submitted (sbatch --export=ALL)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "RACEFORMER_"))}
        env.pop("XLA_FLAGS", None)  # one CPU device per JAX process
        tools = {str(Path(_tool(t)).parent) for t in (*DAEMONS, *CLIENTS)}
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *sorted(tools)])
        env.update(SLURM_CONF=str(self.conf), RACEFORMER_EXTRA="cpu", PYTHONUNBUFFERED="1",
                   RACEFORMER_CACHE=str(dir_ / "rfcache"), **{MARKER: str(dir_)})
        self.env = env

    # ------------------------------------------------------------------ up and down
    def start(self) -> None:
        d = self.dir
        for sub in ("munge", "state", "spool"):
            (d / sub).mkdir(mode=0o755)
        cpus, mem = _machine()
        self.conf.write_text(SLURM_CONF.format(
            d=d, ctld_port=_free_port(), slurmd_port=_free_port(), cpus=max(cpus, 2), mem=mem,
            partition=PARTITION))
        key = d / "munge" / "munge.key"
        subprocess.run([_tool("mungekey"), "--create", f"--keyfile={key}"], check=True,
                       capture_output=True)
        sock = d / "munge" / "munge.socket"
        self._spawn("munged", [_tool("munged"), "--foreground", "--force", f"--socket={sock}",
                               f"--key-file={key}", f"--pid-file={d}/munge/munged.pid",
                               f"--log-file={d}/munge/munged.log",
                               f"--seed-file={d}/munge/munged.seed"])
        self._until(sock.exists, 10, "munged made no socket", d / "munge" / "munged.log")
        self._spawn("slurmctld", [_tool("slurmctld"), "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [_tool("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
        self.until_idle(30)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / f"{name}.out", "w")  # noqa: SIM115 (kept open by the child)
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                             start_new_session=True)
        log.close()
        self.procs.append((name, p))

    def _until(self, ok, timeout: float, what: str, log: Path) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            dead = [f"{n} exited with {p.returncode}" for n, p in self.procs
                    if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                pytest.fail(f"Slurm: {what} ({'; '.join(dead) or 'timeout'}); "
                            f"{log}:\n{_tail(log)}")
            time.sleep(0.2)

    def stop(self) -> list[str]:
        """Cancel every job, stop the daemons (newest first) and whatever the cluster started,
        each by PID. Returns what had to be killed with SIGKILL or would not die."""
        trouble = []
        if any(n == "slurmctld" and p.poll() is None for n, p in self.procs):
            jobs = self.sh("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if jobs:
                self.sh("scancel", *jobs, check=False)
                deadline = time.monotonic() + 30
                while (self.sh("squeue", "-h", "-o", "%A", check=False).stdout.strip()
                       and time.monotonic() < deadline):
                    time.sleep(0.5)
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
                    trouble.append(f"{name} (pid {p.pid}) needed SIGKILL")
        for pid in self.stragglers():  # job steps, slurmstepd, slurmscriptd
            try:
                os.kill(pid, signal.SIGKILL)
                trouble.append(f"pid {pid} left running: killed")
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        trouble += [f"pid {pid} would not die" for pid in self.stragglers()]
        return trouble

    def stragglers(self) -> list[int]:
        """Live processes carrying this cluster's marker in their environment."""
        tag = f"{MARKER}={self.dir}".encode()
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if tag in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                pass
        return found

    # ------------------------------------------------------------------ jobs
    def sh(self, *cmd: str, check: bool = True, env: dict | None = None):
        r = subprocess.run(cmd, cwd=ROOT, env={**self.env, **(env or {})},
                           capture_output=True, text=True, timeout=60)
        if check and r.returncode:
            pytest.fail(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        """Submit from the repository (SLURM_SUBMIT_DIR) to our partition; the job id."""
        r = self.sh("sbatch", "--parsable", f"--partition={PARTITION}", *args, env=env)
        return r.stdout.strip().split(";")[0]

    def until_idle(self, timeout: float) -> None:
        self._until(lambda: self.sh("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
                    == "idle", timeout, "the node did not become idle", self.dir / "slurmd.log")

    def job(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` of a job (each task of an array), as key → value."""
        out = self.sh("scontrol", "-o", "show", "job", job_id).stdout
        return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
                for line in out.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float, log: Path | None = None) -> list[dict]:
        """Poll squeue until the job (every array task) has left the queue; its records."""
        deadline = time.monotonic() + timeout
        while self.sh("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip():
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} still queued after {timeout:.0f} s: "
                            f"{self.job(job_id)}\n{_tail(log) if log else ''}")
            time.sleep(1)
        return self.job(job_id)


def _tail(path: Path | None, n: int = 40) -> str:
    if path is None or not path.exists():
        return f"({path}: no such file)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _ok(cluster: Cluster, records: list[dict], log: Path) -> None:
    for r in records:
        assert (r["JobState"], r["ExitCode"]) == ("COMPLETED", "0:0"), \
            f"job {r['JobId']}: {r['JobState']} exit {r['ExitCode']} ({r['Reason']})\n" \
            f"{log}:\n{_tail(log)}\nslurmctld.log:\n{_tail(cluster.dir / 'slurmctld.log', 15)}" \
            f"\nslurmd.log:\n{_tail(cluster.dir / 'slurmd.log', 15)}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    dir_ = Path(tempfile.mkdtemp(prefix="rf-slurm-"))  # short: a socket path ≤ 107 bytes
    c = Cluster(dir_)
    try:
        c.start()
        yield c
    finally:
        trouble = c.stop()
        ctld_log = _tail(dir_ / "slurmctld.log")
        kept = tmp_path_factory.mktemp("slurm-logs")  # the daemons' logs, for a post-mortem
        for log in [*dir_.glob("*.log"), *dir_.glob("*.out"), *dir_.glob("munge/*.log")]:
            shutil.copy(log, kept / log.name)
        shutil.rmtree(dir_, ignore_errors=True)
        assert not dir_.exists()
        assert not trouble, f"stopping the test cluster: {trouble}\nslurmctld.log:\n{ctld_log}"


# --------------------------------------------------------------------------- the jobs
def _common(ntasks: int = 1) -> list[str]:
    """The resources a 2-CPU machine can give, over the scripts' 4×A100 node."""
    return ["--nodes=1", f"--ntasks-per-node={ntasks}", "--cpus-per-task=1", "--mem=1G",
            "--gres=none"]


@pytest.fixture(scope="module")
def dataset(cluster, tmp_path_factory):
    """`sbatch slurm/etl.sh` as a 2-task array over 2 synthetic drives, then its merge:
    (dataset folder, array log folder)."""
    tmp = tmp_path_factory.mktemp("etl")
    raw, out, logs = tmp / "raw", tmp / "cache", tmp / "logs"
    logs.mkdir()
    r = subprocess.run([sys.executable, "-m", "etl.synth", "--out", str(raw), "--drives", "2",
                        "--frames", "24", "--format", "scene"], cwd=ROOT, env=cluster.env,
                       capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert r.returncode == 0, r.stderr
    env = {"SRC": str(raw), "OUT": str(out),
           "EXTRA": "--set preprocess.image.rgb_size=[32,32] "
                    "--set preprocess.image.ir_size=[32,32] --set preprocess.lidar.resolution=2.0"}
    array = cluster.sbatch("--array=0-1", "--cpus-per-task=1", "--mem=1G",
                           f"--output={logs}/etl-%A_%a.out", "slurm/etl.sh", env=env)
    merge = cluster.sbatch(f"--dependency=afterok:{array}", "--array=0-0", "--cpus-per-task=1",
                           "--mem=1G", f"--output={logs}/merge-%j.out", "slurm/etl.sh",
                           "--merge", env=env)
    tasks = cluster.wait(array, JOB_TIMEOUT, logs / f"etl-{array}_0.out")
    _ok(cluster, tasks, logs / f"etl-{array}_0.out")
    _ok(cluster, cluster.wait(merge, JOB_TIMEOUT), logs / f"merge-{merge}.out")
    return out, logs, array, merge


def test_etl_array_and_merge(cluster, dataset):
    out, logs, array, merge = dataset
    task_logs = sorted(logs.glob(f"etl-{array}_*.out"))
    assert len(task_logs) == 2
    for i, log in enumerate(task_logs):
        text = log.read_text()
        assert f"--shard-index {i} --num-shards 2" in text, text
        assert "built 1, reused 0, failed 0 drive(s)" in text, text
    merged = (logs / f"merge-{merge}.out").read_text()
    assert "total: 48 samples" in merged and "drives ok 2, skipped 0, failed 0" in merged, merged
    assert (out / "index.parquet").is_file()
    shards = list_shards(out, "train")  # from manifest.json
    assert len(shards) == 2 and sum(n for _, n in shards) == 48
    assert all(p.is_file() and p.parent.parent == out / "drives" for p, _ in shards), shards


PRETRAIN = [
    "--set", "training.steps=12", "--set", "training.log_every=1",
    "--set", "training.ckpt_every=100", "--set", "training.image_metrics_every=0",
    "--set", "training.progress=false", "--set", 'model.modalities=["lidar","imu"]',
    "--set", "model.fusion_depth=0", "--set", "data.read_threads=1", "--set", "data.prefetch=8",
]  # fmt: skip


def _pretrain_args(dataset, runs: Path, name: str) -> list[str]:
    return ["configs/pretrain_tiny.toml", "--set", f"data.path={dataset[0]}",
            "--set", f"runs_dir={runs}", "--set", f"run_name={name}", *PRETRAIN]


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == sorted(set(steps)), f"{run}: steps logged twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.fixture(scope="module")
def one_process(cluster, dataset, tmp_path_factory):
    """`sbatch slurm/pretrain.sh` on one task: (run dir, log)."""
    tmp = tmp_path_factory.mktemp("pretrain1")
    log = tmp / "job.out"
    job = cluster.sbatch(*_common(1), f"--output={log}", "slurm/pretrain.sh",
                         *_pretrain_args(dataset, tmp / "runs", "one"))
    _ok(cluster, cluster.wait(job, JOB_TIMEOUT, log), log)
    return tmp / "runs" / "one", log


def test_pretrain_one_task(one_process):
    run, log = one_process
    text = log.read_text()
    assert "1 node(s), 1 task(s), cpu: python -m train.pretrain" in text, text
    assert "1 process(es)" in text and "done: step 12" in text, text
    assert sorted(int(p.name) for p in (run / "ckpt").iterdir() if p.name.isdigit()) == [12]
    assert sorted(_losses(run)) == list(range(1, 13))


def test_pretrain_two_processes_preempted_requeued_match_one(cluster, dataset, one_process,
                                                            tmp_path):
    """Two tasks = two JAX processes (jax.distributed over Slurm's environment), each reading
    its half of every global batch; preempted once (USR1 to the batch shell, as Slurm's
    --signal=B:USR1@300 sends it), they save the same step, the job requeues itself and the
    restart resumes there. Its losses are the one-process run's, step for step."""
    log = tmp_path / "job.out"
    job = cluster.sbatch(*_common(2), f"--output={log}", "slurm/pretrain.sh",
                         *_pretrain_args(dataset, tmp_path / "runs", "two"))
    # both processes have their signal handlers once jax.distributed has joined them (the
    # first log line); the signal then lands while they compile
    deadline = time.monotonic() + JOB_TIMEOUT
    while "2 process(es)" not in (log.read_text() if log.exists() else ""):
        state = cluster.job(job)[0]["JobState"]
        assert state in ("PENDING", "RUNNING") and time.monotonic() < deadline, \
            f"job {job} {state} before it started training:\n{_tail(log)}"
        time.sleep(0.5)
    cluster.sh("scancel", "--signal=USR1", "--batch", job)
    # the job requeues itself; Slurm holds a requeued job ~2 min (BeginTime): release it now
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        rec = cluster.job(job)[0]
        if rec["Restarts"] == "1" and rec["JobState"] == "PENDING":
            break
        assert rec["JobState"] in ("RUNNING", "COMPLETING", "REQUEUED", "PENDING") \
            and time.monotonic() < deadline, f"job {job} did not requeue: {rec}\n{_tail(log)}"
        time.sleep(0.5)
    # ... once the node has cleaned up after the first run (its epilog done: "idle"); released
    # any earlier, the same job id can reach slurmd while the old one is still torn down
    cluster.until_idle(300)
    # ... and once the wall clock has passed the second in which slurmd revoked the first
    # run's credential: slurmd refuses a credential created in or before that second ("Job
    # credential revoked", the job FAILED) — the race Slurm's own ~2 min hold exists to avoid
    time.sleep(2.5)
    cluster.sh("scontrol", "update", f"JobId={job}", "StartTime=now")
    _ok(cluster, cluster.wait(job, JOB_TIMEOUT, log), log)

    text = log.read_text()
    run = tmp_path / "runs" / "two"
    assert f"job {job} (restart 0)" in text and f"job {job} (restart 1)" in text, text
    assert "2 task(s), cpu: python -m train.pretrain" in text
    saved = re.findall(r"signal \d+: saved step (\d+), exiting for requeue", text)
    assert len(saved) == 1, text  # process 0 logs; both saved it (one checkpoint)
    assert f"stopped early (exit 3); requeueing job {job}" in text
    assert f"resumed from step {saved[0]} ({run / 'ckpt'})" in text, text
    assert 0 < int(saved[0]) < 12 and "done: step 12" in text, text
    assert sorted(int(p.name) for p in (run / "ckpt").iterdir() if p.name.isdigit()) \
        == [int(saved[0]), 12]

    one, two = _losses(one_process[0]), _losses(run)
    assert sorted(two) == sorted(one) == list(range(1, 13))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                               rtol=LOSS_RTOL)


def test_ppo_one_task_and_refuses_two(cluster, tmp_path):
    log = tmp_path / "job.out"
    sets = ["ppo.num_envs=8", "ppo.num_steps=16", "ppo.num_minibatches=2",
            "ppo.update_epochs=2", "ppo.total_timesteps=512", "model.hidden=[32]",
            "env.time_limit=5.0", "updates_per_log=1", "ckpt_every=2",
            f"runs_dir='{tmp_path / 'runs'}'", "run_name='ppo'"]
    args = [x for s in sets for x in ("--set", s)]
    job = cluster.sbatch(*_common(1), f"--output={log}", "slurm/ppo.sh",
                         "configs/rl_tiny.toml", *args)
    _ok(cluster, cluster.wait(job, JOB_TIMEOUT, log), log)
    run = tmp_path / "runs" / "ppo"
    assert sorted(int(p.name) for p in (run / "ckpt").iterdir() if p.name.isdigit()) == [2, 4]
    steps = [json.loads(x)["env_steps"]
             for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [128, 256, 384, 512], steps

    log2 = tmp_path / "two.out"
    job2 = cluster.sbatch(*_common(2), f"--output={log2}", "slurm/ppo.sh",
                          "configs/rl_tiny.toml", *args)
    (rec,) = cluster.wait(job2, 300, log2)
    assert (rec["JobState"], rec["ExitCode"]) == ("FAILED", "2:0"), rec
    assert "rl.ppo is one process; got 2 tasks" in log2.read_text()
