"""The whole pipeline on the embedded default, end to end, in a few minutes on a laptop CPU.

    pip install uv && uv run python demo.py

1. writes two synthetic CMHT drives (scene folder + ROS 2 bag) to ``cmht_raw/``;
2. builds the ArrayRecord cache ``data_cache/`` from them (sync, BEV, resize, normalize);
3. pretrains the tiny masked multimodal autoencoder on it (``runs/demo_pretrain/``) and draws
   its reconstructions;
4. trains a lidar PPO policy on a procedural track in the JAX simulator and a multimodal one
   from the pretrained encoders (``runs/demo_ppo*/``), then evaluates them.

Each step is an ordinary command, printed before it runs; the demo stops at the first failure
with that command's exit code.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time

PY = sys.executable
STEPS: list[tuple[str, list[str]]] = [
    ("synthetic raw drives", [PY, "-m", "etl.synth", "--out", "cmht_raw", "--drives", "2",
                              "--frames", "60", "--format", "both"]),
    ("ETL → ArrayRecord shards", [PY, "-m", "etl.build", "--src", "cmht_raw",
                                  "--out", "data_cache", "--workers", "2",
                                  "--set", "output.split=drive"]),
    ("masked multimodal pretraining (tiny)", [PY, "-m", "train.pretrain", "--config",
                                              "configs/pretrain_tiny.toml",
                                              "--set", "run_name=demo_pretrain",
                                              "--set", "data.path=data_cache"]),
    ("reconstructions", [PY, "-m", "train.visualize", "--ckpt", "runs/demo_pretrain",
                         "--out", "runs/demo_pretrain/vis"]),
    ("linear probe vs random init", [PY, "-m", "train.probe", "--ckpt", "runs/demo_pretrain"]),
    ("PPO, lidar policy, JAX simulator", [PY, "-m", "rl.ppo", "--config", "configs/rl_tiny.toml",
                                          "--set", "run_name=demo_ppo"]),
    ("PPO, multimodal policy from the pretrained encoders",
     [PY, "-m", "rl.ppo", "--config", "configs/rl_tiny.toml", "--set", "run_name=demo_ppo_mm",
      "--set", "model.policy=multimodal", "--set", "finetune.init=pretrained",
      "--set", "finetune.pretrained_ckpt=runs/demo_pretrain/ckpt"]),
    ("evaluation (racecar_gym protocol)", [PY, "-m", "rl.evaluate", "--ckpt",
                                           "runs/demo_ppo/ckpt", "--tracks", "procedural:0",
                                           "--episodes", "2"]),
]  # fmt: skip


def main() -> int:
    t0 = time.time()
    for i, (what, cmd) in enumerate(STEPS, 1):
        print(f"\n== [{i}/{len(STEPS)}] {what}\n$ {shlex.join(cmd[1:] and ['python', *cmd[1:]])}",
              flush=True)  # fmt: skip
        t = time.time()
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"demo: step {i} ({what}) failed with exit code {rc}", file=sys.stderr)
            return rc
        print(f"-- done in {time.time() - t:.0f} s", flush=True)
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
