#!/usr/bin/env python
"""Steps per second of the experiment scripts, per configuration, side by side in one run.

Each configuration is a real run of a script as a subprocess (in a temporary folder, one torch thread unless
--threads), repeated --repeats times in interleaved, shuffled order (a shared machine drifts). Its throughput is
read from the TensorBoard events it writes: (last step − first step) / (wall time between them) over the events of
`charts/SPS` logged after --warmup of the run, so start-up, the first compilations and the steps before learning
starts are excluded. The table gives the median and the spread (min–max) per configuration, and each
configuration's ratio to its script's first configuration (e.g. "no injection").

It also measures this machine's floor (--floor): the same networks' forward + backward passes alone, and the env
steps alone, so the table shows how close a script is to what the hardware allows; and the replay memory per
transition of the DQN buffer. `--external NAME="COMMAND"` runs another implementation (e.g. cleanRL's
dqn_atari.py on the same settings) the same way: the command must write TensorBoard events with `charts/SPS`
under runs/ of its working directory, as cleanRL scripts do.

    OMP_NUM_THREADS=1 python benchmark/throughput.py --scripts dqn ppo --repeats 3 --floor
    python benchmark/throughput.py --scripts dqn --external cleanrl="python /path/dqn_atari.py --env-id \
        BreakoutNoFrameskip-v4 --total-timesteps 12000 --learning-starts 2000 --buffer-size 12000"
"""

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# script -> (file, flags common to every configuration, {configuration: extra flags}); the first is the baseline.
SCRIPTS = {
    "dqn": (
        "dqn_atari_injection.py",
        "--env-id BreakoutNoFrameskip-v4 --total-timesteps 12000 --learning-starts 2000 --buffer-size 12000 "
        "--train-frequency 4 --batch-size 32 --eval-episodes 0 --metrics-every 0 --no-cuda",
        {
            "no injection": "",
            "inject head": "--inject-at 2000",
            "inject all": "--inject-at 2000 --inject-target all",
            "no injection, vanilla DQN": "--no-double-dqn",
            "no injection, --compile": "--compile",
            "inject head, --compile": "--inject-at 2000 --compile",
            "no injection, vanilla DQN, --compile": "--no-double-dqn --compile",
        },
    ),
    "ppo": (
        "ppo_atari_injection.py",
        "--env-id BreakoutNoFrameskip-v4 --total-timesteps 8192 --num-envs 8 --num-steps 128 --eval-every 0 "
        "--metrics-every 0 --no-cuda",
        {
            "no injection": "",
            "inject encoder": "--inject-at 0 --inject-target encoder",
            "inject heads": "--inject-at 0 --inject-target heads",
            "inject all": "--inject-at 0 --inject-target all",
            "inject encoder, no cache": "--inject-at 0 --inject-target encoder --no-inject-cache-frozen",
            "no injection, --compile": "--compile",
            "inject encoder, --compile": "--inject-at 0 --inject-target encoder --compile",
            "inject heads, --compile": "--inject-at 0 --inject-target heads --compile",
        },
    ),
    "iql": (
        "iql_pointmass_injection.py",
        "--offline-steps 3000 --online-steps 3000 --log-every 250 --eval-every 100000 --eval-episodes 1 "
        "--metrics-every 0 --dataset-kind random --dataset-steps 2000 --no-cuda",
        {
            "no injection": "",
            "inject q": "--inject-at 0",
            "inject qv": "--inject-at 0 --inject-target qv",
            "no injection, --compile": "--compile",
            "inject q, --compile": "--inject-at 0 --compile",
        },
    ),
}


def steps_per_second(run_dir: str, warmup: float) -> float:
    """Throughput between the first `charts/SPS` event after `warmup` (a fraction of the run's steps) and the last."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    if "charts/SPS" not in acc.Tags()["scalars"]:
        raise RuntimeError(f"{run_dir}: no charts/SPS events")
    events = acc.Scalars("charts/SPS")
    last = events[-1]
    later = [e for e in events if e.step >= warmup * last.step and e.step < last.step]
    if not later or last.wall_time <= later[0].wall_time:
        raise RuntimeError(f"{run_dir}: too few charts/SPS events after the warm-up to time (raise the budget)")
    return (last.step - later[0].step) / (last.wall_time - later[0].wall_time)


def run_once(command: list, threads: int, warmup: float) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), WANDB_MODE="disabled")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} failed:\n{proc.stderr[-2000:]}")
        events = sorted(Path(tmp, "runs").rglob("events.out.tfevents.*"))
        if not events:
            raise RuntimeError(f"{shlex.join(command)} wrote no TensorBoard events under runs/")
        return steps_per_second(str(events[-1].parent), warmup)


def floor(script: str) -> dict:
    """Steps/s of the env alone (random actions) and updates/s of the network alone, for this machine."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    out = {}
    if script in ("dqn", "ppo"):
        from ale_py.vector_env import AtariVectorEnv

        n_envs = 1 if script == "dqn" else 8
        envs = AtariVectorEnv("breakout", n_envs)
        envs.reset(seed=0)
        start, n = time.perf_counter(), 2000 // n_envs
        for _ in range(n):
            envs.step(np.random.randint(0, 4, n_envs))
        out["env steps/s"] = n * n_envs / (time.perf_counter() - start)
        envs.close()
        net = torch.nn.Sequential(
            torch.nn.Conv2d(4, 32, 8, 4),
            torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 4, 2),
            torch.nn.ReLU(),
            torch.nn.Conv2d(64, 64, 3, 1),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(3136, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 4),
        )
        batch = 32 if script == "dqn" else 256
    else:
        net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU())
        net.append(torch.nn.Linear(64, 5))
        batch = 256
    opt = torch.optim.Adam(net.parameters())
    x = torch.rand(batch, *((4, 84, 84) if script != "iql" else (2,)))
    for k in range(12):
        if k == 2:
            start = time.perf_counter()
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    out[f"forward+backward+Adam of batch {batch} /s"] = 10 / (time.perf_counter() - start)
    return out


def dqn_replay_bytes_per_transition() -> float:
    """Bytes per Atari transition of the DQN replay buffer (frames stored once), measured on a small buffer."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    import dqn_atari_injection as D

    rb = D.ReplayBuffer(10_000, 1, (84, 84), np.uint8, 4, stacked=True, seed=0)
    arrays = [v for v in vars(rb).values() if isinstance(v, np.ndarray)]
    return sum(a.nbytes for a in arrays) / 10_000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scripts", nargs="+", choices=sorted(SCRIPTS), default=["dqn", "ppo", "iql"])
    ap.add_argument("--only", nargs="+", default=None, help="run only these configurations (names as in the table)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration (median and min-max reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each run (OMP_NUM_THREADS)")
    ap.add_argument("--warmup", type=float, default=0.3, help="fraction of each run's steps left out as warm-up")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply --total-timesteps/--*-steps budgets by this")
    ap.add_argument("--external", action="append", default=[], metavar='NAME="COMMAND"', help="another program")
    ap.add_argument("--floor", action="store_true", help="also time the networks and the env steps alone")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.repeats < 1 or not 0 <= args.warmup < 1 or args.scale <= 0:
        print("error: --repeats must be >= 1, --warmup in [0, 1), --scale > 0", file=sys.stderr)
        return 2

    jobs = []  # (script, configuration, command)
    for name in args.scripts:
        file, common, configs = SCRIPTS[name]
        for config, extra in configs.items():
            if args.only and config not in args.only:
                continue
            flags = scale_budget(shlex.split(common), args.scale) + shlex.split(extra)
            jobs.append((name, config, [sys.executable, str(ROOT / file), *flags]))
    for spec in args.external:
        label, sep, command = spec.partition("=")
        if not sep or not command.strip():
            print(f'error: --external {spec!r}: expected NAME="COMMAND"', file=sys.stderr)
            return 2
        jobs.append(("external", label, shlex.split(command)))
    results = {(s, c): [] for s, c, _ in jobs}
    order = [job for _ in range(args.repeats) for job in jobs]
    random.Random(0).shuffle(order)
    for k, (script, config, command) in enumerate(order, 1):
        sps = run_once(command, args.threads, args.warmup)
        results[(script, config)].append(sps)
        print(f"[{k}/{len(order)}] {script} / {config}: {sps:.1f} steps/s", file=sys.stderr)

    print(f"| script | configuration | steps/s (median) | min–max | vs {'first row'} |\n|---|---|---|---|---|")
    base = {}
    for (script, config), values in results.items():
        median = statistics.median(values)
        base.setdefault(script, median)
        ratio = median / base[script]
        print(f"| {script} | {config} | {median:.1f} | {min(values):.1f}–{max(values):.1f} | {ratio:.3f} |")
    extras = {}
    if args.floor:
        for script in args.scripts:
            extras[f"floor/{script}"] = floor(script)
            print(f"floor ({script}): " + ", ".join(f"{k} {v:.1f}" for k, v in extras[f"floor/{script}"].items()))
    if "dqn" in args.scripts:
        extras["dqn replay bytes per transition"] = dqn_replay_bytes_per_transition()
        per = extras["dqn replay bytes per transition"]
        print(f"DQN replay memory: {per:.0f} bytes per transition, {per * 1e6 / 1e9:.2f} GB per 1M transitions")
    if args.json:
        rows = [dict(script=s, configuration=c, steps_per_second=v) for (s, c), v in results.items()]
        Path(args.json).write_text(json.dumps({"runs": rows, **extras}, indent=1))
    return 0


def scale_budget(flags: list, scale: float) -> list:
    """Scale the step budgets (and the steps that depend on them) of a flag list by `scale`."""
    budget_flags = {"--total-timesteps", "--learning-starts", "--buffer-size", "--offline-steps", "--online-steps"}
    out = list(flags)
    for i, flag in enumerate(out[:-1]):
        if flag in budget_flags:
            out[i + 1] = str(max(1, int(int(out[i + 1]) * scale)))
    return out


if __name__ == "__main__":
    sys.exit(main())
