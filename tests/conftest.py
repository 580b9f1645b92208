"""Test helpers: import the single-file scripts as modules, run them as subprocesses."""

import atexit
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("MPLBACKEND", "Agg")
# SB3's default logger writes a /tmp folder per learn(), torch.compile its kernels to /tmp/torchinductor_<user>: one
# temporary folder each per test process, removed at exit
for variable in ("SB3_LOGDIR", "TORCHINDUCTOR_CACHE_DIR"):
    if variable not in os.environ:
        os.environ[variable] = tempfile.mkdtemp(prefix=f"{variable.lower()}-")
        atexit.register(shutil.rmtree, os.environ[variable], ignore_errors=True)


def load_script(name: str, folder: str = ""):
    """Import e.g. 'dqn_atari_injection' from the repository root (or `folder` in it) as a module (cached)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_blocks(*names):
    """flags + common + injection + the given shared blocks executed into one namespace, as in a script (after the
    imports every script has: os, time, numpy as np, torch, torch.nn as nn)."""
    mod = types.ModuleType("blocks_" + "_".join(names))
    exec("import os, time\nimport numpy as np\nimport torch\nimport torch.nn as nn", mod.__dict__)
    for name in ("flags", "common", "injection", *names):
        path = ROOT / "shared_blocks" / f"{name}.py"
        mod.__file__ = str(path)
        exec(compile(path.read_text(), str(path), "exec"), mod.__dict__)
    return mod


def run_script(name: str, *args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Run a script with the given flags (and extra environment variables); returns the completed process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline", **(env or {}))
    return subprocess.run(
        [sys.executable, str(ROOT / f"{name}.py"), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    """Run inside a temporary folder so runs/, models/ and datasets/ never touch the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def read_scalars(run_dir) -> dict:
    """The TensorBoard scalars of a run folder: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def count_params(model, trainable_only: bool = False) -> int:
    """Parameters of `model` (only those that train, with trainable_only)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def injection_counts(model) -> dict:
    """{path: injection_count} of every injected module of `model`."""
    return {n: int(m.injection_count) for n, m in model.named_modules() if hasattr(m, "injection_count")}
