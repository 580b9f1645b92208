#!/usr/bin/env python
"""Throughput cost of plasticity injection in ppo_atari_injection.py (CPU, tiny settings).

First times the script's `ppo_update` alone on a fixed batch (best of several repeats, so a busy
machine disturbs it little), with the frozen outputs precomputed as the rollout would store them.
Then runs the script's own `train()` for a few iterations per configuration, injecting at step 0 (the
first rollout boundary), and reports steps per second of the rollout phase, of the update phase
(samples x epochs / update time) and of whole iterations, for: no injection, encoder injection with
and without the frozen-output cache, head injection, and whole-network injection with the cache.
Configurations are interleaved over rounds and the median per configuration is reported, because
the machine may be shared; the order is shuffled per round, since position alone biases a timing.
Results go to benchmark/results/ppo_injection_overhead.json.

    OMP_NUM_THREADS=1 python benchmark/ppo_injection_overhead.py [--rounds 3] [--iterations 5]
"""

import argparse
import json
import os
import platform
import random
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
    args = P.Args(
        num_envs=args_ns.num_envs,
        num_steps=args_ns.num_steps,
        num_minibatches=4,
        update_epochs=4,
        total_timesteps=args_ns.num_envs * args_ns.num_steps * (args_ns.iterations + 1),
        cuda=args_ns.cuda,
        env_threads=1,
        seed=1,
        **config,
    )
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
    return {
        "rollout_sps": steps * len(timing) / rollout,
        "update_sps": samples / update,
        "iteration_sps": steps * len(timing) / iteration,
    }


def update_setup(config: dict, n: int, seed: int = 0):
    """Agent, optimizer, args and a batch for one configuration; the batch carries the frozen terms' outputs
    ("frozen/..." entries) as the rollout stores them."""
    args = P.Args(num_minibatches=4, update_epochs=4, **{k: v for k, v in config.items() if k != "inject_at"})
    torch.manual_seed(seed)
    agent = P.Agent(4)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-5, eps=1e-5)
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8, generator=g)
    if config.get("inject_at"):  # the injection as train() calls it
        P.intervene("inject", agent, optimizer, args, obs[:4])
    with torch.no_grad():
        actions, logprobs, _, values = agent.get_action_and_value(obs)
    batch = dict(
        obs=obs,
        actions=actions,
        logprobs=logprobs,
        advantages=torch.randn(n, generator=g),
        returns=values,
        values=values,
    )
    batch.update(agent.frozen_outputs(obs, P.cached_paths(agent, args)))
    return agent, optimizer, batch, args


def update_only(configs: dict, n: int, repeats: int) -> dict:
    """Samples x epochs per second of `ppo_update` alone on a fixed batch of n samples: configurations
    interleaved, best of `repeats` per configuration."""
    import numpy as np

    setups = {name: update_setup(cfg, n) for name, cfg in configs.items()}
    best = {name: float("inf") for name in configs}
    for agent, optimizer, batch, args in setups.values():  # warm-up (allocations, Adam state)
        P.ppo_update(agent, optimizer, batch, args)
    for r in range(repeats):
        order = list(setups)
        random.Random(r).shuffle(order)  # a configuration's position in the sequence biases it (~10%)
        for name in order:
            agent, optimizer, batch, args = setups[name]
            np.random.seed(0)
            t = time.perf_counter()
            P.ppo_update(agent, optimizer, batch, args)
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: n * 4 / t for name, t in best.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=4, help="timed iterations per run (after one warm-up)")
    ap.add_argument("--num-envs", type=int, default=8)
    ap.add_argument("--num-steps", type=int, default=32)
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--update-repeats", type=int, default=12, help="repeats of the update-only measurement")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    # 1) the update phase alone, in-process on a fixed batch: best of several repeats (robust to a busy machine)
    upd = update_only({name: CONFIGS[name] for name in a.configs}, a.num_envs * a.num_steps, a.update_repeats)
    for name, sps in upd.items():
        print(f"update only, {name}: {sps:.0f} samples/s")
    # 2) whole training iterations through train()
    results = {name: [] for name in a.configs}
    for r in range(a.rounds):
        order = list(a.configs)
        random.Random(100 + r).shuffle(order)
        for name in order:
            results[name].append(run(CONFIGS[name], a))
            print(
                f"round {r + 1}/{a.rounds} {name}: " + ", ".join(f"{k}={v:.0f}" for k, v in results[name][-1].items()),
                flush=True,
            )
    med = {name: {k: statistics.median(x[k] for x in runs) for k in runs[0]} for name, runs in results.items()}
    base = med.get("no injection")
    ubase = upd.get("no injection")
    lines = [
        "| configuration | update-only SPS (best) | extra update time | rollout SPS | update SPS | iteration SPS "
        "| extra iteration time |",
        "|-|-|-|-|-|-|-|",
    ]
    for name, m in med.items():
        extra = f"{(base['iteration_sps'] / m['iteration_sps'] - 1) * 100:+.1f}%" if base else "n/a"
        uextra = f"{(ubase / upd[name] - 1) * 100:+.1f}%" if ubase else "n/a"
        lines.append(
            f"| {name} | {upd[name]:.0f} | {uextra} | {m['rollout_sps']:.0f} | {m['update_sps']:.0f} "
            f"| {m['iteration_sps']:.0f} | {extra} |"
        )
    table = "\n".join(lines)
    print(table)
    out_dir = ROOT / "benchmark" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": a.cuda and torch.cuda.is_available(),
        "num_envs": a.num_envs,
        "num_steps": a.num_steps,
        "update_epochs": 4,
        "num_minibatches": 4,
        "rounds": a.rounds,
        "iterations": a.iterations,
    }
    (out_dir / "ppo_injection_overhead.json").write_text(
        json.dumps({"meta": meta, "update_only": upd, "median": med, "runs": results}, indent=1)
    )
    (out_dir / "ppo_injection_overhead.md").write_text(table + "\n")
    print(f"wrote {out_dir / 'ppo_injection_overhead.json'}")


if __name__ == "__main__":
    main()
