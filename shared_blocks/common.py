# Helpers every script shares: one-line errors for bad input, seeding, the device, event logs, atomic saves,
# checkpoints with exact resume, and clean stops on Ctrl-C / SIGTERM.
import atexit
import glob
import hashlib
import os
import random
import re
import signal
import sys
import time

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter


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
        if RUN["writer"] is not None:  # what was logged up to here reaches the disk
            RUN["writer"].flush()
        last = f"; the last good checkpoint is {RUN['checkpoint']}" if RUN["checkpoint"] else ""
        raise UserError(
            f"{name} became non-finite ({float(value.detach().float().mean())}) at global step {step}{last}; "
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


def check_compile(args) -> None:
    """--compile: one tiny compiled call on the run's device now, so that a machine where torch.compile cannot work
    (no C++ compiler, an unsupported accelerator) stops with one line before anything is written."""
    if args.compile:
        try:
            torch.compile(lambda x: x * 2 + 1)(torch.ones(2, device=pick_device(args.cuda)))
        except Exception as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--compile: torch.compile does not work here ({why}); run without --compile") from None


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
    """torch.save to a temporary file beside `path`, then rename: never a half-written file. A failure (disk full,
    unwritable folder) is a one-line error naming the file and the last checkpoint, which stays intact."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        last = f"; the last checkpoint {RUN['checkpoint']} is intact" if RUN["checkpoint"] else ""
        raise UserError(f"cannot write {path} ({type(e).__name__}: {e}){last}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---- Checkpoints: `--checkpoint-every`, `--resume`, and a checkpoint when Ctrl-C or SIGTERM stops the run ----------
RUN = {"stop": None, "checkpoint": None, "writer": None}  # the signal that asked the run to stop; the newest good
# checkpoint; the run's TensorBoard writer (flushed before each checkpoint)
# flags that may change when a run resumes; any other change is refused unless --resume-allow-changes
RESUME_FREE = {"resume", "resume_allow_changes", "checkpoint_every", "keep_checkpoints", "checkpoint_buffer", "cuda"}
RESUME_FREE |= {"compile", "track", "wandb_project_name", "wandb_entity", "capture_video", "save_model"}


def _request_stop(signum, frame):
    if RUN["stop"] is not None:  # asked twice: leave at once, without a checkpoint
        os._exit(128 + signum)
    RUN["stop"] = signum
    name = signal.Signals(signum).name
    print(f"\n{name}: stopping at the end of this step with a checkpoint (again: quit at once)", file=sys.stderr)


def stop_on_signals() -> None:
    """Ctrl-C (SIGINT) and SIGTERM (what schedulers send before preemption) set RUN["stop"]; the training loop
    then writes a checkpoint and calls exit_stopped. Nothing is interrupted mid-write, so nothing can hang."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _request_stop)


def exit_stopped(step: int, path: str) -> None:
    """After a stop request: say where the checkpoint is and how to continue, exit 128 + the signal's number."""
    again = re.sub(r"\s--resume(=|\s+)\S+", "", " ".join(sys.argv)) + " --resume auto"
    name = signal.Signals(RUN["stop"]).name
    where = f"checkpoint {path}; continue with: python {again}" if path else "nothing to resume"
    print(f"stopped by {name} at global step {step}, {where}", file=sys.stderr)
    sys.exit(128 + RUN["stop"])


def checkpoint_due(args, step: int, previous_step: int) -> bool:
    """A stop was asked for, or a multiple of --checkpoint-every lies in (previous_step, step]."""
    every = args.checkpoint_every
    return RUN["stop"] is not None or (every > 0 and step // every > previous_step // every)


def checkpoint_paths(folder: str) -> list:
    """The checkpoints step_<N>.pt in `folder`, oldest first."""
    files = os.listdir(folder) if os.path.isdir(folder) else []
    found = [(int(m.group(1)), f) for f in files if (m := re.fullmatch(r"step_(\d+)\.pt", f))]
    return [os.path.join(folder, f) for _, f in sorted(found)] if found else []


def save_checkpoint(state: dict, run_name: str, step: int, keep: int, networks: dict) -> str:
    """Write runs/<run>/checkpoints/step_<step>.pt atomically, then delete all but the newest `keep`: the previous
    checkpoint survives until the new one is complete. Non-finite weights stop the run instead of being saved."""
    for name, net in networks.items():
        bad = [k for k, v in net.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            last = f"; the last good checkpoint is {RUN['checkpoint']}" if RUN["checkpoint"] else ""
            raise UserError(f"{name} has non-finite weights ({bad[0]}) at global step {step}{last}")
    folder = os.path.join("runs", run_name, "checkpoints")
    path = os.path.join(folder, f"step_{step:012d}.pt")
    if RUN["writer"] is not None:  # the events logged so far reach the disk before the checkpoint does
        RUN["writer"].flush()
    state = dict(state, run_name=run_name, global_step=step, log_time=time.time())
    atomic_save(dict(state, networks={k: v.state_dict() for k, v in networks.items()}), path)
    for old in checkpoint_paths(folder)[:-keep]:
        os.remove(old)
    RUN["checkpoint"] = path
    return path


def find_checkpoint(args, script: str):
    """The checkpoint `--resume` names, loaded and checked (None: a new run). `auto`: the newest checkpoint of the
    newest run folder of this env, exp-name and seed that has one (a new run when there is none); a run folder:
    its newest checkpoint; or a checkpoint file. Stray temporary files of killed saves in that run are removed."""
    RUN.update(stop=None, checkpoint=None, writer=None)  # a new train() call: nothing of an earlier one
    if args.resume is None:
        return None
    if args.resume == "auto":
        prefix = os.path.join("runs", glob.escape(f"{args.env_id}__{args.exp_name}__{args.seed}__"))
        runs = sorted(glob.glob(prefix + "[0-9]*"), key=lambda d: int(d.rpartition("__")[2]))
        found = [ckpts for d in runs if (ckpts := checkpoint_paths(os.path.join(d, "checkpoints")))]
        if not found:
            print(f"--resume auto: no checkpoint under {prefix}*, starting a new run")
            return None
        found = found[-1]
    elif os.path.isdir(args.resume):  # a run folder or its checkpoints folder
        found = checkpoint_paths(os.path.join(args.resume, "checkpoints")) or checkpoint_paths(args.resume)
        if not found:
            raise UserError(f"--resume {args.resume}: no checkpoint (checkpoints/step_<N>.pt) in this folder")
    elif os.path.isfile(args.resume):
        found = [p for p in checkpoint_paths(os.path.dirname(args.resume) or ".") if p < args.resume]
        found.append(args.resume)
    else:
        raise UserError(f"--resume {args.resume}: no such file or folder (give a checkpoint, a run folder, or auto)")
    path = found[-1]
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        older = f"; the previous checkpoint is intact: --resume {found[-2]}" if len(found) > 1 else ""
        raise UserError(f"--resume: {path} is truncated or corrupt ({type(e).__name__}){older}") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != script:
        raise UserError(f"--resume: {path} is not a checkpoint of {script}")
    if "log_time" not in ckpt:
        raise UserError(f"--resume: {path} was written by an older version of {script}; start a new run")
    changed = [k for k, v in ckpt["args"].items() if k not in RESUME_FREE and getattr(args, k, v) != v]
    if changed and not args.resume_allow_changes:
        diff = ", ".join(f"--{k.replace('_', '-')} {ckpt['args'][k]!r} (now {getattr(args, k)!r})" for k in changed)
        raise UserError(f"--resume: {path} was made with {diff}; give the same flags, or --resume-allow-changes")
    run_dir = os.path.join("runs", ckpt["run_name"])
    for tmp in glob.glob(os.path.join(glob.escape(run_dir), "**", ".tmp-*"), recursive=True):
        os.remove(tmp)
    RUN["checkpoint"] = path
    print(f"resuming {run_dir} from {path} (global step {ckpt['global_step']})")
    return ckpt


def rng_state(generators: dict) -> dict:
    """Every random state a run draws from: python, numpy, torch (and CUDA), and the run's numpy Generators."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    state["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return dict(state, generators={k: g.bit_generator.state for k, g in generators.items()})


def set_rng_state(state: dict, generators: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in generators.items():
        g.bit_generator.state = state["generators"][k]


def optimizer_state(optimizer, model) -> dict:
    """The optimizer's state_dict and the names of its parameters in `model` (injection re-points optimizers)."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    return {"state_dict": optimizer.state_dict(), "params": groups}


def restore_optimizer(optimizer, model, saved: dict) -> None:
    """Point `optimizer` at the same parameters of the rebuilt (injected) `model`, then load its state."""
    params = dict(model.named_parameters())
    for group, names in zip(optimizer.param_groups, saved["params"]):
        group["params"] = [params[n] for n in names]
    optimizer.load_state_dict(saved["state_dict"])


def drop_events_after(folder: str, log_time: float) -> None:
    """Rewrite the TensorBoard event files in `folder` without the events logged after `log_time` (by wall clock:
    a step's events can come on both sides of its checkpoint). Each file is replaced atomically."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "events.out.tfevents.*"))):
        events = list(RawEventFileLoader(path).Load())  # the records as written
        kept = [e for e in events if Event.FromString(e).wall_time < log_time]
        if not kept:
            os.remove(path)
        elif len(kept) < len(events):
            tmp = os.path.join(folder, ".tmp-events")
            with open(tmp, "wb") as f:
                records = RecordWriter(f)
                for e in kept:
                    records.write(e)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)


def open_logs(args, run_name: str, ckpt=None):
    """TensorBoard writer for runs/<run_name> (and wandb with --track, same run id on resume). On resume the events
    logged after the checkpoint (by the run that was stopped) are dropped, so the curves continue seamlessly."""
    if ckpt is not None:
        drop_events_after(os.path.join("runs", run_name), ckpt["log_time"])
    if args.track:
        import wandb

        run_id = hashlib.sha1(run_name.encode()).hexdigest()[:16]
        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            id=run_id,
            resume="allow",
            save_code=True,
        )
    writer = RUN["writer"] = SummaryWriter(f"runs/{run_name}")
    atexit.register(writer.close)  # flush the logs even when the run stops early (e.g. a non-finite loss)
    if ckpt is None:
        table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return writer
