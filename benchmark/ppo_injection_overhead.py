#!/usr/bin/env python
"""Throughput cost of plasticity injection in ppo_atari_injection.py (CPU, tiny settings).

Runs the script's own `train()` for a few iterations per configuration, injecting at step 0 (the
first rollout boundary), and reports steps per second of the rollout phase, of the update phase
(samples x epochs / update time) and of whole iterations, for: no injection, encoder injection with
and without the frozen-output cache, head injection, and whole-network injection with the cache.
Configurations are interleaved over rounds and the median per configuration is reported, because
the machine may be shared. Results go to benchmark/results/ppo_injection_overhead.json.

    OMP_NUM_THREADS=1 python benchmark/ppo_injection_overhead.py [--rounds 3] [--iterations 5]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import ppo_atari_injection as P  # noqa: E402

CONFIGS = {
    "no injection": dict(inject_at=[]),
    "encoder, cache": dict(inject_at=[0], inject_target="encoder", inject_cache_frozen=True),
    "encoder, no cache": dict(inject_at=[0], inject_target="encoder", inject_cache_frozen=False),
    "heads": dict(inject_at=[0], inject_target="heads"),
    "all, cache": dict(inject_at=[0], inject_target="all", inject_cache_frozen=True),
    "all, no cache": dict(inject_at=[0], inject_target="all", inject_cache_frozen=False),
}


def run(config: dict, args_ns) -> dict:
    args = P.Args(num_envs=args_ns.num_envs, num_steps=args_ns.num_steps, num_minibatches=4, update_epochs=4,
                  total_timesteps=args_ns.num_envs * args_ns.num_steps * (args_ns.iterations + 1),
                  cuda=args_ns.cuda, env_threads=1, seed=1, **config)
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            out = P.train(args)
        finally:
            os.chdir(cwd)
    timing = out["timing"][1:]  # the first iteration warms up
    steps = args.num_envs * args.num_steps
    rollout = sum(t["rollout"] for t in timing)
    update = sum(t["update"] for t in timing)
    iteration = sum(t["iteration"] for t in timing)
    samples = sum(t["samples"] for t in timing) * args.update_epochs
    return {"rollout_sps": steps * len(timing) / rollout, "update_sps": samples / update,
            "iteration_sps": steps * len(timing) / iteration}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=4, help="timed iterations per run (after one warm-up)")
    ap.add_argument("--num-envs", type=int, default=8)
    ap.add_argument("--num-steps", type=int, default=32)
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = {name: [] for name in a.configs}
    for r in range(a.rounds):
        for name in a.configs:
            results[name].append(run(CONFIGS[name], a))
            print(f"round {r + 1}/{a.rounds} {name}: " + ", ".join(f"{k}={v:.0f}" for k, v in results[name][-1].items()),
                  flush=True)
    med = {name: {k: statistics.median(x[k] for x in runs) for k in runs[0]} for name, runs in results.items()}
    base = med.get("no injection")
    lines = ["| configuration | rollout SPS | update SPS | iteration SPS | extra iteration time |", "|-|-|-|-|-|"]
    for name, m in med.items():
        extra = f"{(base['iteration_sps'] / m['iteration_sps'] - 1) * 100:+.1f}%" if base else "n/a"
        lines.append(f"| {name} | {m['rollout_sps']:.0f} | {m['update_sps']:.0f} | {m['iteration_sps']:.0f} | {extra} |")
    table = "\n".join(lines)
    print(table)
    out_dir = ROOT / "benchmark" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": a.cuda and torch.cuda.is_available(), "num_envs": a.num_envs, "num_steps": a.num_steps,
            "update_epochs": 4, "num_minibatches": 4, "rounds": a.rounds, "iterations": a.iterations}
    (out_dir / "ppo_injection_overhead.json").write_text(json.dumps({"meta": meta, "median": med, "runs": results}, indent=1))
    (out_dir / "ppo_injection_overhead.md").write_text(table + "\n")
    print(f"wrote {out_dir / 'ppo_injection_overhead.json'}")


if __name__ == "__main__":
    main()
