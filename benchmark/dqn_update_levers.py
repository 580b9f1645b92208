#!/usr/bin/env python
"""Time one Double DQN update of dqn_atari_injection.py's Atari network (batch 32) as the script does it, and with
each speed lever of issue "throughput" that changes how it is computed; print ms per update and how far the
parameters drift from the script's after --steps updates (0 = the same numbers bit for bit).

    OMP_NUM_THREADS=1 python benchmark/dqn_update_levers.py --steps 30 --repeats 3
"""

import argparse
import copy
import importlib.util
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


def load_dqn():
    spec = importlib.util.spec_from_file_location("dqn_atari_injection", ROOT / "dqn_atari_injection.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def update(q, target, opt, batch, batched=False, channels_last=False):
    """One Huber TD step with Double DQN targets; `batched`: Q(s) and Q(s') of the online net in one forward pass."""
    obs, actions, rewards, terminated, next_obs = batch
    if channels_last:
        obs, next_obs = (x.contiguous(memory_format=torch.channels_last) for x in (obs, next_obs))
    if batched:
        both = q(torch.cat([obs, next_obs]))
        q_obs, q_next = both[: len(obs)], both[len(obs) :].detach()
    else:
        q_obs = None
        with torch.no_grad():
            q_next = q(next_obs)
    with torch.no_grad():
        next_value = target(next_obs).gather(1, q_next.argmax(1, keepdim=True)).squeeze(1)
        td_target = rewards + 0.99 * next_value * (1.0 - terminated)
    q_obs = q(obs) if q_obs is None else q_obs
    loss = F.smooth_l1_loss(q_obs.gather(1, actions[:, None]).squeeze(1), td_target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="updates per timing")
    ap.add_argument("--repeats", type=int, default=3, help="timings per lever (median and min-max reported)")
    args = ap.parse_args(argv)
    D = load_dqn()
    torch.manual_seed(0)
    base = D.QNetwork((4, 84, 84), 4, atari=True)
    g = torch.Generator().manual_seed(1)
    batch = (
        torch.randint(0, 256, (32, 4, 84, 84), dtype=torch.uint8, generator=g),
        torch.randint(0, 4, (32,), generator=g),
        torch.rand(32, generator=g),
        (torch.rand(32, generator=g) < 0.1).float(),
        torch.randint(0, 256, (32, 4, 84, 84), dtype=torch.uint8, generator=g),
    )
    levers = {  # name: (Adam options, update options)
        "as the script (foreach Adam)": (dict(foreach=True), {}),
        "one batched forward for Q(s), Q(s')": (dict(foreach=True), dict(batched=True)),
        "channels-last convolutions": (dict(foreach=True), dict(channels_last=True)),
        "fused Adam": (dict(fused=True), {}),
        "torch.compile (--compile)": (dict(foreach=True), dict(compiled=True)),
    }
    reference = None
    print("| lever | ms per update (median) | min–max | max abs parameter difference after the updates |")
    print("|---|---|---|---|")
    for name, (adam, lever) in levers.items():
        times = []
        for _ in range(args.repeats):
            q, options = copy.deepcopy(base), dict(lever)
            if options.get("channels_last"):
                q = q.to(memory_format=torch.channels_last)
            target = copy.deepcopy(q)
            if options.pop("compiled", False):  # as the scripts' --compile: in place, both networks
                q.compile()
                target.compile()
            opt = torch.optim.Adam(q.parameters(), lr=1e-4, **adam)
            update(q, target, opt, batch, **options)  # warm-up (allocations, kernel choice)
            start = time.perf_counter()
            for _ in range(args.steps - 1):
                update(q, target, opt, batch, **options)
            times.append((time.perf_counter() - start) / (args.steps - 1) * 1000)
        params = torch.cat([p.detach().flatten() for p in q.parameters()])
        reference = params if reference is None else reference
        diff = float((params - reference).abs().max())
        lo, hi, med = min(times), max(times), statistics.median(times)
        print(f"| {name} | {med:.1f} | {lo:.1f}–{hi:.1f} | {diff:.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
