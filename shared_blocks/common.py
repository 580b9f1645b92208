# Helpers every script shares (with the script's os, time, np, torch): one-line errors, seeding, the device, atomic
# saves, and the run's life. One shape in every train(): stop_on_signals(); find_checkpoint(); build the networks;
# restore_checkpoint(); start_run() (the first write); Progress(); the loop, save_checkpoint() when checkpoint_due();
# finish_run(). Ctrl-C / SIGTERM set RUN["stop"]: the loop checkpoints and exits, nothing is interrupted mid-write.
import atexit
import fcntl
import glob
import hashlib
import json
import random
import re
import signal
import sys

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib import DummyTqdmFile

RUN = dict(stop=None, checkpoint=None, writer=None, dir=None, lock=None, args=None, progress=None)
# flags that may differ when a run resumes, and those --resume-allow-changes lets differ (step counts only grow)
RESUME_FREE = {"resume", "resume_allow_changes", "checkpoint_every", "keep_checkpoints", "checkpoint_buffer", "cuda"}
RESUME_FREE |= {"compile", "track", "wandb_project_name", "wandb_entity", "capture_video", "save_model", "verbose"}
RESUME_ALLOWED = {"total_timesteps", "online_steps", "eval_every", "eval_episodes", "metrics_every", "log_every"}
RESUME_ALLOWED |= {"num_iterations"}  # PPO's rollouts, computed from --total-timesteps


class UserError(Exception):
    """Bad input (a flag, a file, an env id): printed as one line `error: ...`, never a traceback."""


def _print_user_errors(exc_type, exc, tb, default=sys.excepthook):
    close_progress()  # the message goes below the progress bar, not into it
    if issubclass(exc_type, UserError):
        print(f"error: {exc}", file=sys.stderr)
    elif issubclass(exc_type, KeyboardInterrupt):  # before train() took over Ctrl-C: nothing was written yet
        print("interrupted before the run started: nothing was written", file=sys.stderr)
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


def check_finite(value: torch.Tensor, name: str, step: int = None) -> None:
    """Stop with one line when a loss or a policy's logits turn NaN or inf (what was logged reaches the disk)."""
    if not bool(torch.isfinite(value).all()):
        if RUN["writer"] is not None:
            RUN["writer"].flush()
        at = ("" if step is None else f" at global step {step}") + last_good()
        mean = float(value.detach().float().mean())
        raise UserError(
            f"{name} became non-finite ({mean}){at}; try a lower --learning-rate, gradient clipping, or another --seed"
        )


def last_good() -> str:
    return f"; the last good checkpoint is {RUN['checkpoint']}" if RUN["checkpoint"] else ""


def seed_everything(seed: int, torch_deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def pick_device(cuda: bool) -> torch.device:
    """`--cuda` uses the accelerator (CUDA, else Apple MPS) when there is one; otherwise the CPU (Progress says so)."""
    if cuda and torch.cuda.is_available():
        return torch.device("cuda")
    if cuda and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_compile(args) -> None:
    """--compile: one tiny compiled call on the run's device, so that a machine where torch.compile cannot work (no
    C++ compiler, an unsupported accelerator) stops with one line before anything is written."""
    try:
        if args.compile:
            torch.compile(lambda x: x * 2 + 1)(torch.ones(2, device=pick_device(args.cuda)))
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--compile: torch.compile does not work here ({why}); run without --compile") from None


def log_event(writer, events: list, step: int, what: str, log: dict, **extra) -> None:
    """An injection or an intervention: its values go to TensorBoard, stdout and the run's list of events."""
    events.append({"global_step": step, **extra, **log})
    for k, v in log.items():
        writer.add_scalar(k, v, step)
    print(f"global_step={step}, {what}: " + ", ".join(f"{k}={v:g}" for k, v in log.items()))


def atomic_save(obj, path: str) -> None:
    """torch.save (bytes: as they are) to `.tmp-<pid>-<name>` beside `path`, then rename: never a half-written file.
    A failure (disk full, unwritable folder) is a one-line error naming the file and the last checkpoint."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(obj) if isinstance(obj, bytes) else torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        last = f"; the last checkpoint {RUN['checkpoint']} is intact" if RUN["checkpoint"] else ""
        raise UserError(f"cannot write {path} ({type(e).__name__}: {e}){last}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_orphans(folder: str, all_of_them: bool = False) -> None:
    """Delete the `.tmp-<pid>-*` files that writers killed mid-write left under `folder`: all of them in a run
    folder this process has locked, else those whose process is gone."""
    for tmp in glob.glob(os.path.join(glob.escape(folder), "**", ".tmp-*"), recursive=True):
        pid = re.match(r"\.tmp-(\d+)-", os.path.basename(tmp))
        if all_of_them or not pid or not os.path.exists(f"/proc/{pid.group(1)}"):
            os.remove(tmp)


def _request_stop(signum, frame):
    if RUN["stop"] is not None:  # asked twice: leave at once, without a checkpoint
        os._exit(128 + signum)
    RUN["stop"] = signum
    name = signal.Signals(signum).name
    print(f"\n{name}: stopping at the end of this step with a checkpoint (again: quit at once)", file=sys.stderr)


def stop_on_signals() -> None:
    """train()'s first line: Ctrl-C and SIGTERM (sent by schedulers before preemption) stop the run cleanly from here
    on. Forgets an earlier train() call of this process."""
    close_progress()
    if RUN["lock"] is not None:
        os.close(RUN["lock"])
    RUN.update(stop=None, checkpoint=None, writer=None, dir=None, lock=None, progress=None)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _request_stop)


def exit_stopped(step: int, path) -> None:
    """After a stop request: say where the checkpoint is and how to continue, exit 128 + the signal's number."""
    again = re.sub(r"\s--resume(=|\s+)\S+", "", " ".join(sys.argv)) + " --resume auto"
    where = f"checkpoint {path}; continue with: python {again}" if path else "nothing to resume"
    close_progress()
    print(f"stopped by {signal.Signals(RUN['stop']).name} at global step {step}, {where}", file=sys.stderr)
    sys.exit(128 + RUN["stop"])


def lock_run(folder: str) -> None:
    """Hold the run folder for this process (the OS releases it when the process dies): one process per run."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{folder} is in use by another process (a run or resume of it); wait for it to end") from None
    RUN.update(dir=folder, lock=fd)


def checkpoint_paths(folder: str) -> list:
    """The checkpoints step_<N>.pt in `folder`, oldest first."""
    files = os.listdir(folder) if os.path.isdir(folder) else []
    return [os.path.join(folder, f) for f in sorted(f for f in files if re.fullmatch(r"step_\d+\.pt", f))]


def find_checkpoint(args, script: str):
    """The checkpoint --resume names, loaded and checked against the flags (None: a new run). `auto`: the newest run
    folder of this env, exp-name and seed (none: a new run; no checkpoint yet: started again in it); a run folder or
    its checkpoints/; or a checkpoint file. A finished run exits 0. Locks the run's folder; writes nothing."""
    RUN["args"], resume = dict(vars(args), script=script), args.resume
    if "/" in args.exp_name:  # the run folder is runs/{env_id}__{exp_name}__{seed}__{time}: it stays inside runs/
        raise UserError(f"--exp-name {args.exp_name!r} contains '/': it names a folder inside runs/, not a path")
    if os.path.isabs(args.env_id) or ".." in args.env_id.split("/"):
        raise UserError(f"--env-id {args.env_id!r} would put the run folder outside runs/")
    if resume is None:
        return None
    if resume == "auto":
        prefix = os.path.join("runs", f"{args.env_id}__{args.exp_name}__{args.seed}__")
        runs = [d for d in glob.glob(glob.escape(prefix) + "*") if re.fullmatch(r"[0-9]+", d[len(prefix) :])]
        if not runs:
            print(f"--resume auto: no run {prefix}*, starting a new run")
            return None
        folder = max(runs, key=lambda d: int(d[len(prefix) :]))
    elif os.path.isdir(resume):  # a run folder or its checkpoints/
        folder = os.path.normpath(resume)
        folder = os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder
    elif os.path.isfile(resume) and os.path.basename(os.path.dirname(resume)) == "checkpoints":
        folder = os.path.dirname(os.path.dirname(resume))
    else:
        raise UserError(f"--resume {resume}: no such run folder or checkpoints/step_<N>.pt file (or: auto)")
    folder = os.path.normpath(folder)
    if os.path.isfile(os.path.join(folder, "finished.json")):
        with open(os.path.join(folder, "finished.json")) as f:
            done = json.load(f)
        print(f"{folder} finished at global step {done['global_step']}; its results: {done['results']}; nothing to do")
        sys.exit(0)
    found = checkpoint_paths(os.path.join(folder, "checkpoints"))
    if os.path.isfile(resume):
        found = [p for p in found if os.path.basename(p) < os.path.basename(resume)] + [resume]
    if not found and resume != "auto":
        raise UserError(f"--resume {resume}: no checkpoint (checkpoints/step_<N>.pt) in {folder}")
    lock_run(folder)
    if not found:
        print(f"--resume auto: {folder} has no checkpoint yet, starting it again from step 0")
        return None
    path = RUN["checkpoint"] = found[-1]
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        older = f"; the previous checkpoint is intact: --resume {found[-2]}" if len(found) > 1 else ""
        raise UserError(f"--resume: {path} is truncated or corrupt ({type(e).__name__}){older}") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != script:
        raise UserError(f"--resume: {path} is not a checkpoint of {script}")
    if "log_step" not in ckpt:
        raise UserError(f"--resume: {path} was written by an older version of {script}; start a new run")
    saved = ckpt["args"]  # only RESUME_FREE flags may differ, RESUME_ALLOWED ones with --resume-allow-changes
    changed = [k for k, v in saved.items() if k not in RESUME_FREE and getattr(args, k, v) != v]
    fixed = [k for k in changed if k not in RESUME_ALLOWED or k.endswith("steps") and getattr(args, k) < saved[k]]
    if fixed or (changed and not args.resume_allow_changes):
        diff = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} (now {getattr(args, k)!r})" for k in fixed or changed)
        how = (
            "these cannot change on resume (step counts only grow)"
            if fixed
            else "give the same flags, or --resume-allow-changes"
        )
        raise UserError(f"--resume: {path} was made with {diff}; {how}")
    print(f"resuming {folder} (its own folder) from {path} (global step {ckpt['global_step']})")
    return ckpt


def restore_checkpoint(ckpt: dict, networks: dict, optimizers: dict, generators: dict) -> None:
    """Load the networks (with their injection state), the optimizers (`{name: (optimizer, its model)}`, pointed at
    the same parameters by name) and every random state; a checkpoint that does not fit is one line."""
    try:
        for name, net in networks.items():
            load_injected_state_dict(net, ckpt["networks"][name])
        for name, (opt, model) in optimizers.items():
            params = dict(model.named_parameters())
            for group, names in zip(opt.param_groups, ckpt["optimizers"][name]["params"]):
                group["params"] = [params[n] for n in names]
            opt.load_state_dict(ckpt["optimizers"][name]["state_dict"])
        rng = ckpt["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        for k, g in generators.items():
            g.bit_generator.state = rng["generators"][k]
    except (KeyError, RuntimeError, ValueError, IndexError, TypeError) as e:
        why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        raise UserError(f"--resume: {RUN['checkpoint']} does not fit what these flags build ({why})") from None


def start_run(args, ckpt):
    """The run's folder (new: runs/{env_id}__{exp_name}__{seed}__{time}; resumed: its own, orphans removed), locked,
    and its logs: TensorBoard (on resume readers hide what the stopped run logged from the checkpoint's step on) and,
    with --track, wandb (the same run id on resume). The first write of a run. Returns (folder, writer)."""
    if RUN["stop"] is not None:
        name = signal.Signals(RUN["stop"]).name
        print(f"stopped by {name} before the run started: nothing was written", file=sys.stderr)
        sys.exit(128 + RUN["stop"])
    purge = None if RUN["dir"] is None else ckpt["log_step"] if ckpt else 0
    stamp = int(time.time())  # a run that starts in the same second as another takes the next free second
    while RUN["dir"] is None:
        folder = os.path.join("runs", f"{args.env_id}__{args.exp_name}__{args.seed}__{stamp}")
        try:
            os.makedirs(folder)
            lock_run(folder)
        except FileExistsError:
            stamp += 1
        except OSError as e:  # read-only, full, or `runs` is not a folder
            raise UserError(f"cannot create the run folder {folder} ({type(e).__name__}: {e})") from None
    remove_orphans(RUN["dir"], all_of_them=True)
    if args.track:
        import wandb

        name = os.path.basename(RUN["dir"])
        run_id = hashlib.sha1(name.encode()).hexdigest()[:16]  # the same on resume
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=name, id=run_id, resume="allow", save_code=True)  # fmt: skip
    writer = RUN["writer"] = SummaryWriter(RUN["dir"], purge_step=purge)
    atexit.register(writer.close)  # flush the logs even when the run stops early (e.g. a non-finite loss)
    if ckpt is None:
        table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return RUN["dir"], writer


def checkpoint_due(args, step: int, previous_step: int) -> bool:
    """A stop was asked for, or a multiple of --checkpoint-every lies in (previous_step, step]."""
    every = args.checkpoint_every
    return RUN["stop"] is not None or (every > 0 and step // every > previous_step // every)


def save_checkpoint(step: int, log_step: int, networks: dict, optimizers: dict, generators: dict, **state) -> str:
    """Write checkpoints/step_<step>.pt atomically after everything logged before `log_step` (the first step the
    resumed run logs), then keep the newest --keep-checkpoints. Non-finite weights stop the run instead. After a
    stop request, exits saying how to continue."""
    for name, net in networks.items():
        bad = [k for k, v in net.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise UserError(f"{name} has non-finite weights ({bad[0]}) at global step {step}{last_good()}")
    RUN["writer"].flush()  # the events logged so far reach the disk before the checkpoint does
    state.update(script=RUN["args"]["script"], args={k: v for k, v in RUN["args"].items() if k != "script"})
    state.update(global_step=step, log_step=log_step, networks={k: v.state_dict() for k, v in networks.items()})
    state["optimizers"] = {}
    for name, (opt, model) in optimizers.items():
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
        state["optimizers"][name] = {"state_dict": opt.state_dict(), "params": groups}
    state["rng"] = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    state["rng"]["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    state["rng"]["generators"] = {k: g.bit_generator.state for k, g in generators.items()}
    path = os.path.join(RUN["dir"], "checkpoints", f"step_{step:012d}.pt")
    atomic_save(state, path)
    for old in checkpoint_paths(os.path.dirname(path))[: -RUN["args"]["keep_checkpoints"]]:
        os.remove(old)
    RUN["checkpoint"] = path
    if RUN["stop"] is not None:
        exit_stopped(step, path)
    return path


def finish_run(step: int, results: str) -> None:
    """The run is complete: close its logs, mark it finished (`finished.json`: a later --resume says so and trains
    nothing) and release its folder. Exits after a stop request that came during the last step."""
    close_progress()
    RUN["writer"].close()
    if RUN["args"]["track"]:
        import wandb

        wandb.finish()
    done = json.dumps({"global_step": step, "results": results, "time": time.time()})
    atomic_save(done.encode(), os.path.join(RUN["dir"], "finished.json"))
    os.close(RUN["lock"])
    RUN["lock"] = None
    if RUN["stop"] is not None:
        exit_stopped(step, results)


PROGRESS_EVERY = float(os.environ.get("PROGRESS_EVERY", 60))  # seconds between status lines (not a terminal)


class Progress:
    """Made after start_run: the start line (run folder, steps, device), then `update(step)` in the loop: a tqdm bar
    (printed lines go above it) on a terminal, else a status line every PROGRESS_EVERY seconds (a SLURM log).
    `episode()`: a line per training episode, with --verbose only."""

    def __init__(self, args, device: torch.device, start: int, total: int):
        self.verbose, self.start, self.total, self.t0 = args.verbose, start, total, time.time()
        self.last, self.stdout, self.bar, RUN["progress"] = self.t0, sys.stdout, None, self
        cpu = " (--cuda, but there is no CUDA device here)" if args.cuda and device.type == "cpu" else ""
        gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else cpu
        print(f"run {RUN['dir']}: {f'steps {start} to {total}' if start else f'{total} steps'} on {device}{gpu}")
        if sys.stdout.isatty():
            self.bar = tqdm(total=total, initial=start, unit="step", unit_scale=True, file=sys.stdout)
            sys.stdout = DummyTqdmFile(sys.stdout)  # print() clears the bar, writes, redraws it

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
        elif time.time() - self.last >= PROGRESS_EVERY:
            self.last = time.time()
            rate = max(step - self.start, 1) / (self.last - self.t0)
            left = int((self.total - step) / rate)
            done = f"step {step} of {self.total} ({step / self.total:.0%}), {rate:.0f} steps/s"
            print(f"{done}, {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left", flush=True)

    def episode(self, step: int, episodic_return: float) -> None:
        if self.verbose:
            print(f"global_step={step}, episodic_return={episodic_return}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            sys.stdout, self.bar = self.stdout, None


def close_progress() -> None:
    if RUN["progress"] is not None:
        RUN["progress"].close()
