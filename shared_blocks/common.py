# Helpers every script shares: clean errors for bad input, seeding, atomic file writes.
import os as _os
import random as _random
import sys as _sys
import tempfile as _tempfile

import numpy as _np
import torch


class UserError(Exception):
    """Bad input (a flag, a file, an env id). Printed as one clear line, never a traceback."""


def _user_error_hook(exc_type, exc, tb, _default=_sys.excepthook):
    if issubclass(exc_type, UserError):
        print(f"error: {exc}", file=_sys.stderr)
        return
    _default(exc_type, exc, tb)


_sys.excepthook = _user_error_hook


def exit_on_user_error(fn, *args, **kwargs):
    """Run fn; turn a UserError into `error: ...` on stderr and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=_sys.stderr)
        raise SystemExit(2)


def check_steps(flag: str, steps, total: int, lo: int = 0) -> list:
    """Every step of a `--flag STEP [STEP ...]` list must lie in [lo, total) and be unique."""
    steps = sorted(int(s) for s in (steps or []))
    bad = [s for s in steps if s < lo or s >= total]
    if bad:
        raise UserError(f"{flag} {bad} is outside the run: steps must lie in [{lo}, {total})")
    if len(set(steps)) != len(steps):
        raise UserError(f"{flag} {steps} repeats a step")
    return steps


def check_finite(value: torch.Tensor, name: str, step: int) -> None:
    """Stop with a clear message when a loss turns NaN or inf (checkpoints stay as they were)."""
    if not bool(torch.isfinite(value).all()):
        raise UserError(
            f"{name} became non-finite ({float(value.detach().float().mean())}) at global step {step}; "
            "try a lower --learning-rate, gradient clipping, or another --seed"
        )


def seed_everything(seed: int, torch_deterministic: bool = True) -> None:
    _random.seed(seed)
    _np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def pick_device(cuda: bool) -> torch.device:
    """`--cuda` uses the accelerator when there is one; otherwise the CPU."""
    if cuda and torch.cuda.is_available():
        return torch.device("cuda")
    if cuda and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    folder = _os.path.dirname(_os.path.abspath(path))
    _os.makedirs(folder, exist_ok=True)
    fd, tmp = _tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with _os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        _os.replace(tmp, path)
    except BaseException:
        if _os.path.exists(tmp):
            _os.remove(tmp)
        raise
