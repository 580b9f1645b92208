"""Short fixed-seed runs of the three scripts, reduced to the numbers they log.

`python tests/fixed_seed_runs.py --write` records the reference of this kind of CPU (float kernels round
differently on Intel and AMD CPUs) in tests/data/: both were recorded from the scripts as they were before the
lean-scripts restructure (commit 9e55942, with this file as of 7e3049a), fixed_seed_reference.json on an Intel Xeon
and fixed_seed_reference_amd.json on an AMD EPYC. tests/test_fixed_seed_numbers.py runs the same commands and
compares. Each run includes an injection and plasticity metrics. Wall-clock keys (charts/SPS, ...) are left out.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import read_scalars

ROOT = Path(__file__).resolve().parent.parent


def cpu_vendor() -> str:
    """GenuineIntel, AuthenticAMD, ... (from /proc/cpuinfo; 'unknown' elsewhere)."""
    try:
        found = re.search(r"vendor_id\s*:\s*(\S+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        found = None
    return found.group(1) if found else "unknown"


REFERENCES = {
    "GenuineIntel": ROOT / "tests" / "data" / "fixed_seed_reference.json",
    "AuthenticAMD": ROOT / "tests" / "data" / "fixed_seed_reference_amd.json",
}
REFERENCE = REFERENCES.get(cpu_vendor())  # None: no reference recorded on this kind of CPU

RUNS = {
    "dqn_cartpole": (
        "dqn_atari_injection",
        "--env-id CartPole-v1 --total-timesteps 1200 --learning-starts 300 --buffer-size 1000 --eval-every 600 "
        "--eval-episodes 2 --metrics-every 300 --target-network-frequency 100 --inject-at 700 --seed 3 --no-cuda",
    ),
    "dqn_atari": (
        "dqn_atari_injection",
        "--env-id BreakoutNoFrameskip-v4 --total-timesteps 320 --learning-starts 100 --buffer-size 500 "
        "--eval-every 0 --eval-episodes 0 --metrics-every 100 --metrics-batch-size 32 --probe-batch-size 32 "
        "--target-network-frequency 50 --inject-at 200 --seed 2 --no-cuda",
    ),
    "ppo_atari": (
        "ppo_atari_injection",
        "--env-id BreakoutNoFrameskip-v4 --total-timesteps 192 --num-envs 2 --num-steps 32 --num-minibatches 2 "
        "--update-epochs 2 --inject-at 64 --inject-target encoder --metrics-every 64 --metrics-batch-size 32 "
        "--eval-every 128 --eval-episodes 1 --no-eval-deterministic --seed 2 --no-cuda",
    ),
    "iql_pointmass": (
        "iql_pointmass_injection",
        "--hidden-sizes 16 16 --batch-size 32 --dataset-kind random --dataset-steps 300 --eval-episodes 2 "
        "--offline-steps 60 --online-steps 150 --eval-every 100 --log-every 30 --metrics-every 50 "
        "--inject-at 50 120 --inject-target qv --seed 4 --no-cuda",
    ),
}
TIME_KEYS = ("SPS", "time")


def scalars(run_dir: str) -> dict:
    """The run's scalars without wall-clock keys: {tag: [[step, value], ...]}."""
    return {
        k: [list(p) for p in pairs]
        for k, pairs in sorted(read_scalars(run_dir).items())
        if not any(t in k for t in TIME_KEYS)
    }


def run(name: str) -> dict:
    script, flags = RUNS[name]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / f"{script}.py"), *flags.split()]
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
        (run_dir,) = [str(p.parent) for p in Path(tmp, "runs").rglob("events.out.tfevents.*")]
        return scalars(run_dir)


if __name__ == "__main__":
    results = {name: run(name) for name in RUNS}
    if "--write" in sys.argv:
        if REFERENCE is None:
            sys.exit(f"no reference file for {cpu_vendor()} CPUs: add one to REFERENCES")
        REFERENCE.write_text(json.dumps(results, indent=0, sort_keys=True) + "\n")
    for name, tags in results.items():
        print(name, len(tags), "keys:", ", ".join(k for k in tags if "/" in k and k.count("/") == 1)[:400])
