#!/usr/bin/env python
"""Cost of `measure_plasticity` (shared_blocks/plasticity.py) against a training update, to choose a
default `--metrics-every` per script.

Networks: the Atari NatureCNN (4x84x84 input, 512 features) + a Linear(512, 6) head, as DQN/PPO
use it; and the PointmassHard MLP 2 -> 256 -> 256 -> 5, as IQL's critic. One metrics call = one
no-grad forward over the probe batch + (with --grads) one autograd.grad of an MSE loss on it.
The reference update is a DQN step (batch 32: online + target forward, MSE, Adam) for the CNN and
an MLP step (batch 256, same recipe) for the MLP. Overhead at a frequency F = metrics ms /
(updates per F env steps x update ms); env stepping is ignored, so this is an upper bound.

    OMP_NUM_THREADS=1 python benchmark/metrics_overhead.py            # CPU, 1 thread
    python benchmark/metrics_overhead.py --cuda --threads 0            # accelerator if any
"""

import argparse
import time
import types
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def load_blocks():
    ns = types.ModuleType("blocks")
    for name in ("flags", "common", "injection", "plasticity", "interventions"):
        path = ROOT / "shared_blocks" / f"{name}.py"
        exec(compile(path.read_text(), str(path), "exec"), ns.__dict__)
    return ns


def timed(fn, repeats, device):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats * 1000.0


def train_step(model, target, opt, x, n_out):
    a = torch.randint(n_out, (x.shape[0], 1), device=x.device)
    with torch.no_grad():
        y = target(x).max(1, keepdim=True).values
    loss = (model(x).gather(1, a) - y).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuda", action="store_true", help="use the accelerator when there is one")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = leave torch's default)")
    ap.add_argument("--probe-batch", type=int, default=256, help="probe batch size (--metrics-batch-size)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B = load_blocks()
    device = B.pick_device(args.cuda)
    torch.manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} probe_batch={args.probe_batch} torch={torch.__version__}")

    def cnn():  # the Nature DQN encoder and a linear head
        return nn.Sequential(
            nn.Conv2d(4, 32, 8, 4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, 2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, 1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3136, 512),
            nn.ReLU(),
            nn.Linear(512, 6),
        )

    def mlp():
        return nn.Sequential(nn.Linear(2, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 5))

    # (label, network factory, input shape, outputs, [(schedule, train batch, env steps per update, freqs)])
    cases = [
        (
            "atari NatureCNN+head",
            cnn,
            (4, 84, 84),
            6,
            [
                ("DQN: 1 update of 32 per 4 env steps", 32, 4, [10_000, 50_000, 100_000]),
                (
                    "PPO: 8 envs x 128 steps, 4 epochs x 4 minibatches of 256 = 1 update per 64 env steps",
                    256,
                    64,
                    [10_000, 50_000, 100_000],
                ),
            ],
        ),
        (
            "pointmass MLP 2-256-256-5",
            mlp,
            (2,),
            5,
            [
                ("IQL: 1 update of 256 per env step", 256, 1, [1_000, 5_000, 10_000]),
            ],
        ),
    ]
    for name, factory, shape, n_out, schedules in cases:
        model, target = factory().to(device), factory().to(device)
        target.load_state_dict(model.state_dict())
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        probe = torch.rand(args.probe_batch, *shape, device=device)
        acts = torch.randint(n_out, (args.probe_batch, 1), device=device)

        def loss_fn(m):
            return (m(probe).gather(1, acts) - 1.0).pow(2).mean()

        ms_fwd = timed(lambda: B.measure_plasticity(model, probe), args.repeats, device)
        ms_grad = timed(lambda: B.measure_plasticity(model, probe, loss_fn=loss_fn), args.repeats, device)
        n_keys = len(B.measure_plasticity(model, probe, loss_fn=loss_fn))
        print(f"\n{name}: {n_keys} keys")
        print(f"  measure_plasticity, features only : {ms_fwd:9.1f} ms/call")
        print(f"  measure_plasticity, with loss_fn  : {ms_grad:9.1f} ms/call")
        for label, batch, steps_per_update, freqs in schedules:
            xb = torch.rand(batch, *shape, device=device)
            ms_step = timed(lambda: train_step(model, target, opt, xb, n_out), 2 * args.repeats, device)
            parts = [f"every {f:,d} steps: {100 * ms_grad / (f / steps_per_update * ms_step):.2f}%" for f in freqs]
            print(f"  {label}\n    update {ms_step:.2f} ms; metrics overhead " + "; ".join(parts))


if __name__ == "__main__":
    main()
