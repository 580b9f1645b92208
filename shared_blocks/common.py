# Helpers every script shares: one-line errors for bad input, seeding, the device, event logs, atomic saves.
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch


class UserError(Exception):
    """Bad input (a flag, a file, an env id): printed as one line `error: ...`, never a traceback."""


def _print_user_errors(exc_type, exc, tb, default=sys.excepthook):
    if issubclass(exc_type, UserError):
        print(f"error: {exc}", file=sys.stderr)
    else:
        default(exc_type, exc, tb)


sys.excepthook = _print_user_errors


def check_steps(flag: str, steps, total: int) -> list:
    """Every step of a `--flag STEP [STEP ...]` list must lie in [0, total) and be unique."""
    steps = sorted(int(s) for s in steps)
    if any(s < 0 or s >= total for s in steps):
        raise UserError(f"{flag} {steps} is outside the run: steps must lie in [0, {total})")
    if len(set(steps)) != len(steps):
        raise UserError(f"{flag} {steps} repeats a step")
    return steps


def check_finite(value: torch.Tensor, name: str, step: int) -> None:
    """Stop with a clear message when a loss turns NaN or inf (files already written stay as they were)."""
    if not bool(torch.isfinite(value).all()):
        raise UserError(
            f"{name} became non-finite ({float(value.detach().float().mean())}) at global step {step}; "
            "try a lower --learning-rate, gradient clipping, or another --seed"
        )


def seed_everything(seed: int, torch_deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def pick_device(cuda: bool) -> torch.device:
    """`--cuda` uses the accelerator (CUDA, else Apple MPS) when there is one; otherwise the CPU."""
    if cuda and torch.cuda.is_available():
        return torch.device("cuda")
    if cuda and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def new_run_name(args) -> str:
    """`{env_id}__{exp_name}__{seed}__{unix time}`, its folder runs/<name> created atomically: a run that starts in
    the same second as another of the same name and seed takes the next free second, never the other's folder."""
    stamp = int(time.time())
    while True:
        name = f"{args.env_id}__{args.exp_name}__{args.seed}__{stamp}"
        try:
            os.makedirs(os.path.join("runs", name))
            return name
        except FileExistsError:
            stamp += 1
        except OSError as e:  # read-only, full, or `runs` is not a folder: say so before any training
            raise UserError(f"cannot create the run folder runs/{name} ({type(e).__name__}: {e})") from None


def log_event(writer, events: list, step: int, what: str, log: dict, **extra) -> None:
    """An injection or an intervention: its values go to TensorBoard, stdout and the run's list of events."""
    events.append({"global_step": step, **extra, **log})
    for k, v in log.items():
        writer.add_scalar(k, v, step)
    print(f"global_step={step}, {what}: " + ", ".join(f"{k}={v:g}" for k, v in log.items()))


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
