#!/usr/bin/env python
"""Count the arithmetic that injection adds: the floating-point operations of matrix products and convolutions
(torch.utils.flop_counter) that each script's own code runs per unit of training, with and without each injection
target, and their ratio. On a machine bound by arithmetic (a CPU) this ratio is about the best steps/s ratio that
injection can reach; compare it with the measured ratio of `benchmark/throughput.py`.

Units of training, at the scripts' default settings:
- DQN (Atari network, Double DQN): one update of --batch-size 32 and the --train-frequency 4 one-observation action
  forwards between two updates.
- PPO: one iteration of --num-envs 8 x --num-steps 128 (the rollout with its frozen-output cache, the value of the
  next observation, --update-epochs 4 of --num-minibatches 4).
- IQL: one update of --batch-size 256 and one action of the online phase.

    python benchmark/injection_flops.py
"""

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent


def load(script: str):
    spec = importlib.util.spec_from_file_location(script, ROOT / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def dqn_flops(D, label):
    """FLOPs of one Double DQN update (label VANILLA: vanilla DQN, as cleanRL's) plus the action forwards between two
    updates (Atari network)."""
    target = None if label == VANILLA else label
    args = D.Args(env_id="BreakoutNoFrameskip-v4", inject_target=target or "head", double_dqn=label != VANILLA)
    spec = D.EnvSpec(args.env_id, "breakout", (args.frame_stack, 84, 84), 4)
    q, target_net = D.build_network(spec, args), D.build_network(spec, args)
    optimizer = torch.optim.Adam(q.parameters(), lr=args.learning_rate)
    obs = torch.randint(0, 256, (args.batch_size, *spec.obs_shape), dtype=torch.uint8)
    if target:
        D.apply_intervention("injection", q, target_net, optimizer, obs, args)
    zeros = torch.zeros(args.batch_size)
    batch = (obs, zeros.long(), zeros, zeros, obs)

    def work():
        D.td_loss(q, target_net, batch, args)[0].backward()
        for _ in range(args.train_frequency):
            D.select_actions(q, obs[:1].numpy(), 0.0, spec.n_actions, np.random.default_rng(0), "cpu")

    return count(work)


def ppo_flops(P, label):
    """FLOPs of one PPO iteration: rollout (with the frozen-output cache), next value, update epochs."""
    target, no_cache = (label or "encoder").removesuffix(NO_CACHE), (label or "").endswith(NO_CACHE)
    args = P.Args(inject_target=target, inject_cache_frozen=not no_cache)
    agent, optimizer = P.build_agent(args, 4, torch.device("cpu"))
    n = args.num_envs * args.num_steps
    obs = torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8)
    if label:
        P.intervene("inject", agent, optimizer, args, obs[: args.num_envs])
    cached = P.cached_paths(agent, args)
    batch = {}

    def rollout():  # one forward per observation; FLOPs add up over the steps, so one call on all of them
        with torch.no_grad():
            cache = agent.frozen_outputs(obs, cached)
            actions, logprobs, _, values = agent.get_action_and_value(obs, cache=cache)
            agent(obs[: args.num_envs])  # the value of the next observation
        batch.update(cache, obs=obs, actions=actions, logprobs=logprobs, values=values.flatten())
        batch.update(advantages=torch.randn(n), returns=torch.randn(n))

    def update():
        for _ in range(args.update_epochs):
            for mb in np.array_split(np.arange(n), args.num_minibatches):
                index = torch.as_tensor(mb)
                P.ppo_loss(agent, {k: v[index] for k, v in batch.items()}, args)[0].backward()

    return count(rollout) + count(update)


def iql_flops(Q, target):
    """FLOPs of one IQL update and one online action."""
    args = Q.Args(inject_target=target or "q")
    agent = Q.IQLAgent(args, torch.device("cpu"))
    b = args.batch_size
    obs = torch.rand(b, 2)
    if target:
        Q.inject_critics(agent, obs, args)
    batch = (obs, torch.zeros(b, dtype=torch.long), torch.zeros(b), torch.rand(b, 2), torch.zeros(b))
    return count(lambda: (agent.update(batch), agent.act(obs[0].numpy())))


NO_CACHE = ", no frozen-output cache"  # PPO's --no-inject-cache-frozen
VANILLA = "none, vanilla DQN (--no-double-dqn)"  # the arithmetic of cleanRL's dqn_atari.py
SCRIPTS = {  # name: (script, counter, injection targets)
    "dqn": ("dqn_atari_injection", dqn_flops, ["head", "all", VANILLA]),
    "ppo": ("ppo_atari_injection", ppo_flops, ["encoder", "heads", "all", "encoder" + NO_CACHE]),
    "iql": ("iql_pointmass_injection", iql_flops, ["q", "qv"]),
}


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scripts", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS), help="which scripts")
    args = ap.parse_args(argv)
    rows = []
    print("| script | configuration | GFLOPs per unit | none / this (the arithmetic bound on the steps/s ratio) |")
    print("|---|---|---|---|")
    for name in args.scripts:
        script, flops, targets = SCRIPTS[name]
        mod = load(script)
        torch.manual_seed(0)
        base = flops(mod, None)
        for target in [None, *targets]:
            f = base if target is None else flops(mod, target)
            rows.append((name, target or "none", f, base / f))
            print(f"| {name} | {target or 'none'} | {f / 1e9:.4g} | {base / f:.3f} |")
    return rows


if __name__ == "__main__":
    main()
