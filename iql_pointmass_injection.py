"""Discrete-action IQL with plasticity injection (Nikishin et al., NeurIPS 2023) on CS285 hw5's Pointmass mazes: offline
on the (cached) data of an RND-driven explorer, then online fine-tuning, one env step and one update per step.
`python iql_pointmass_injection.py --inject-at 20000` injects when fine-tuning starts; flags, logs: README.md."""

import hashlib
import io
import json
import os
import pickle
import time
from collections import OrderedDict, deque

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

# ==== BEGIN SHARED BLOCK: flags (shared_blocks/flags.py; sync: tools/sync_blocks.py) ====
# Flags every script shares: RunArgs (seed, device, tracking, checkpoints) and PlasticityArgs (injection, metrics,
# interventions), extended by each script's `Args`. A flag declares its valid range once, `bounded(default, min=,
# max=, above=, below=)`; check_ranges(args) checks them all, check_intervention_args (interventions) the rest.
import math
import operator
import os
from dataclasses import dataclass, field, fields
from typing import List, Literal, Optional


def bounded(default, *, min=None, max=None, above=None, below=None):
    """A flag whose value must be finite, >= min, <= max, > above and < below (each bound optional)."""
    bounds = [(op, b) for op, b in ((">=", min), ("<=", max), (">", above), ("<", below)) if b is not None]
    return field(default=default, metadata={"bounds": bounds})


COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def check_ranges(args) -> None:
    """One-line error naming the first flag whose value lies outside the range its `bounded` field declares."""
    for f in fields(args):
        value, bounds = getattr(args, f.name), f.metadata.get("bounds")
        if bounds is None or value is None:
            continue
        if not math.isfinite(value) or not all(COMPARE[op](value, b) for op, b in bounds):
            rule = " and ".join(f"{op} {b}" for op, b in bounds)
            raise UserError(f"--{f.name.replace('_', '-')} {value} is invalid: it must be a finite number {rule}")


@dataclass
class PlasticityArgs:
    inject_at: List[int] = field(default_factory=list)
    """global step(s) at which to inject plasticity: one step = single injection, more = multiple injections"""
    inject_keep_trainable: bool = False
    """ablation: keep every term trainable (old head, θ'1 and θ'2): the head's trainable parameters triple"""
    inject_no_third_term: bool = False
    """ablation: drop the frozen −h_θ'2 term, so the output jumps at injection"""
    inject_reset_optimizer: bool = False
    """clear the Adam state (moments, step counts) at injection; default keeps the encoder's moments"""
    metrics_every: int = bounded(10000, min=0)
    """measure plasticity (`plasticity/...`) on a fixed probe batch every this many env steps; 0 = never"""
    metrics_batch_size: int = bounded(256, min=2)
    """size of the fixed probe batch for the plasticity metrics (drawn once, seeded)"""
    dormant_tau: float = bounded(0.025, min=0, max=1)
    """ReDo threshold: a unit is dormant when its normalised mean activation is <= tau"""
    reset_at: List[int] = field(default_factory=list)
    """global step(s) at which to re-initialise --reset-target (targets mirrored, its Adam state cleared)"""
    shrink_perturb_at: List[int] = field(default_factory=list)
    """global step(s) at which to shrink-and-perturb --shrink-perturb-target: θ <- S·θ + P·ε"""
    sp_shrink: float = bounded(1.0, min=0, max=1)
    """shrink factor S of shrink-and-perturb (1 = no shrink)"""
    sp_perturb: float = bounded(0.01, min=0)
    """perturbation factor P of shrink-and-perturb (ε: a fresh initialisation)"""
    redo_every: int = bounded(0, min=0)
    """ReDo (Sokar et al. 2023): recycle the units dormant on a seeded probe batch every this many steps; 0 = never"""
    redo_tau: float = bounded(0.025, min=0, max=1)
    """ReDo's dormancy threshold (0.1 stopped a CartPole MLP learning: benchmark/README.md)"""
    l2_schedule: Literal["none", "constant", "incremental", "periodic"] = "none"
    """L2 penalty on the critic loss: constant --l2-coef, incremental --l2-start -> --l2-end, or periodic"""
    l2_coef: float = bounded(1e-5, min=0)
    """L2 coefficient (constant schedule, and periodic while on)"""
    l2_start: float = bounded(0.0, min=0)
    """incremental L2: coefficient at step 0"""
    l2_end: float = bounded(1e-4, min=0)
    """incremental L2: coefficient at the last step"""
    l2_period_on: int = bounded(500000, min=1)
    """periodic L2: steps with the penalty on"""
    l2_period_off: int = bounded(100000, min=1)
    """periodic L2: steps with the penalty off"""
    layer_norm: bool = False
    """LayerNorm after every hidden linear layer, GroupNorm(1, C) (LayerNorm over C, H, W) after every conv"""
    activation: Literal["relu", "leaky_relu", "tanh"] = "relu"
    """hidden activation of the networks (leaky_relu: slope 0.01)"""
    adaptive_inject_metric: Optional[str] = None
    """inject when this plasticity key (e.g. plasticity/erank_features_mean) crosses --adaptive-inject-threshold"""
    adaptive_inject_threshold: Optional[float] = bounded(None, min=-math.inf)
    """threshold of the adaptive injection trigger (setting it turns the trigger on; needs --metrics-every)"""
    adaptive_inject_direction: Literal["below", "above"] = "below"
    """fire when the metric is below / above the threshold"""
    adaptive_inject_min_gap: int = bounded(0, min=0)
    """at least this many env steps between two adaptive injections"""
    adaptive_inject_max_count: int = bounded(1, min=1)
    """at most this many adaptive injections"""


@dataclass
class RunArgs:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = bounded(1, min=0, below=2**32)
    """seed of the experiment (networks, sampling, environments); NumPy takes seeds in [0, 2**32)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, use the accelerator (CUDA, else Apple MPS) when there is one; otherwise the CPU"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "plasticity-injection"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    compile: bool = False
    """compile the networks with torch.compile (warm-up up to a minute, again after each injection; numbers equal
    within float tolerance; speed-ups: benchmark/README.md)"""
    save_model: bool = False
    """save the trained networks (atomically) to `runs/{run_name}/{exp_name}.cleanrl_model` at the end"""
    checkpoint_every: int = bounded(0, min=0)
    """checkpoint (runs/{run_name}/checkpoints) every this many global steps; 0 = only when Ctrl-C/SIGTERM stops it"""
    keep_checkpoints: int = bounded(2, min=1)
    """keep the newest this many checkpoints"""
    checkpoint_buffer: bool = True
    """store the replay buffer in checkpoints (`--no-checkpoint-buffer`: smaller files; a resumed run refills it)"""
    resume: Optional[str] = None
    """continue a run: a checkpoint file, a run folder, or `auto` (the newest run of this env, exp-name and seed)"""
    resume_allow_changes: bool = False
    """resume even when flags that change the run differ from the checkpoint's"""
    verbose: bool = False
    """print a line per training episode besides the progress display (TensorBoard has every episode either way)"""


# ==== END SHARED BLOCK: flags ====


@dataclass
class Args(PlasticityArgs, RunArgs):
    # Environment and data
    env_id: str = "PointmassHard-v0"
    """the id of the environment: PointmassEasy-v0, PointmassMedium-v0 or PointmassHard-v0"""
    dataset: Optional[str] = None
    """your own offline data (.npz: observations, actions, rewards, next_observations, terminals [, truncations])"""
    dataset_kind: Literal["rnd", "random"] = "rnd"
    """how the offline data is generated: `rnd` (DQN on an RND bonus alone, eps-greedy) or `random`"""
    dataset_dir: str = "datasets"
    """folder of the generated-dataset cache (file name holds a hash of the generation settings)"""
    dataset_steps: int = bounded(10000, min=1)
    """environment steps of data generation"""
    dataset_seed: Optional[int] = bounded(None, min=0, below=2**32)
    """seed of the data generation (default: --seed)"""
    rnd_epsilon: float = bounded(0.3, min=0, max=1)
    """epsilon of the eps-greedy RND exploration DQN"""
    # Algorithm
    offline_steps: int = bounded(20000, min=0)
    """gradient steps on the offline data (global steps 0..N-1)"""
    online_steps: int = bounded(40000, min=0)
    """online fine-tuning steps, one env step + one gradient step each (global steps N..N+M-1)"""
    batch_size: int = bounded(256, min=1)
    """the batch size of every update"""
    learning_rate: float = bounded(1e-3, above=0)
    """learning rate of the critics, the value network and the actor (Adam)"""
    gamma: float = bounded(0.99, min=0, max=1)
    """the discount factor gamma"""
    tau: float = bounded(0.005, above=0, max=1)
    """soft target-critic update rate"""
    expectile: float = bounded(0.9, above=0, below=1)
    """expectile of the V regression, in (0, 1): 0.5 = mean, higher = closer to max_a Q"""
    beta: float = bounded(10.0, min=0)
    """inverse temperature of advantage-weighted regression: weight = exp(beta * A)"""
    max_weight: float = bounded(100.0, above=0)
    """AWR weights are clipped at this value"""
    hidden_sizes: List[int] = field(default_factory=lambda: [64, 64])
    """hidden layer sizes of every network (critics, value, actor)"""
    critic_encoder_layers: int = bounded(1, min=0)
    """hidden layers of each critic's (and V's) encoder, which injection keeps; the rest is the head (0: no encoder)"""
    online_exploration: Literal["policy", "eps-greedy"] = "eps-greedy"
    """online action choice: sample the softmax policy, or eps-greedy on the actor's argmax"""
    online_epsilon: float = bounded(0.1, min=0, max=1)
    """epsilon of `--online-exploration eps-greedy`"""
    # Evaluation and logging
    eval_every: int = bounded(5000, min=1)
    """evaluate the greedy policy every this many global steps (and at the end)"""
    eval_episodes: int = bounded(20, min=1)
    """episodes per evaluation"""
    log_every: int = bounded(1000, min=1)
    """write losses and SPS every this many global steps"""
    # Plasticity injection and the interventions (the shared flags are PlasticityArgs'); steps are global steps.
    inject_target: Literal["q", "qv"] = "q"
    """inject into the twin Q heads (and their targets); `qv` also into the value network's head"""
    reset_target: Literal["q-head", "q", "qv-head", "qv", "actor", "all"] = "q-head"
    """what --reset-at re-initialises: both Q heads or Q nets, the same and V's head or all of V, the actor, or all"""
    shrink_perturb_target: Literal["q-head", "q", "qv-head", "qv", "actor", "all"] = "q"
    """what --shrink-perturb-at changes (same choices; Adam state is kept)"""


# ---- Environment: the Pointmass mazes of CS285 homework 5 --------------------------------------------------------
FOUR_ROOMS = ["00000100000", "00000100000", "00000000000", "00000100000", "00000100000", "10111100000"]
FOUR_ROOMS += ["00000111011", "00000100000", "00000100000", "00000000000", "00000100000"]  # 11 x 11, 1 = wall
MAZE_5X5 = ["00000", "11110", "11110", "11110", "11110"]
MAZE_6X6 = ["001000", "101010", "001011", "011001", "001101", "100001"]
LEVELS = {  # level -> (base map, scale, start, goal, success radius, time limit); start/goal in scaled cells
    "PointmassEasy-v0": (MAZE_5X5, 2, (1.0, 1.0), (9.0, 9.0), 2.0, 50),
    "PointmassMedium-v0": (MAZE_6X6, 1, (0.5, 0.5), (1.5, 5.5), 1.0, 150),
    "PointmassHard-v0": (FOUR_ROOMS, 2, (2.0, 2.0), (20.0, 20.0), 2.0, 100),
}
ACTIONS = np.array([[0.0, 0.0], [0.0, -1.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])


class PointmassEnv(gym.Env):
    """A point at (row, col) in a 2-D maze, seen as position / map size. A move (ACTIONS) plus N(0, 0.5) noise goes in
    10 sub-steps, each axis on its own, none into a wall or off the map. Reward -1 a step; the goal (0) terminates."""

    def __init__(self, env_id: str = "PointmassHard-v0", action_noise: float = 0.5):
        rows, scale, start, goal, self.success_radius, self.max_episode_steps = LEVELS[env_id]
        self.walls = np.array([[c == "1" for c in r] for r in rows]).repeat(scale, axis=0).repeat(scale, axis=1)
        self.action_noise = action_noise
        self.height, self.width = self.walls.shape
        self.start, self.goal = np.array(start, dtype=np.float64), np.array(goal, dtype=np.float64)
        self.action_space = gym.spaces.Discrete(5)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(2,), dtype=np.float32)
        self._scale = np.array([self.height, self.width], dtype=np.float64)

    def cell(self, pos) -> tuple:
        return min(int(pos[0]), self.height - 1), min(int(pos[1]), self.width - 1)

    def move(self, pos: np.ndarray, a: np.ndarray) -> np.ndarray:  # noise-free
        pos = pos.copy()
        for _ in range(10):
            for axis in (0, 1):
                new = pos.copy()
                new[axis] += 0.1 * a[axis]
                if min(new) >= 0 and new[0] <= self.height and new[1] <= self.width and not self.walls[self.cell(new)]:
                    pos = new  # not into a wall, nor off the map
        return pos

    def obs(self) -> np.ndarray:
        return (self.state / self._scale).astype(np.float32)

    def reset(self, *, seed: Optional[int] = None, options=None):
        super().reset(seed=seed)
        self.state, self.t = self.start.copy(), 0
        return self.obs(), {}

    def step(self, action):
        a = ACTIONS[int(action)] + self.np_random.normal(0.0, self.action_noise, size=2)
        self.state = self.move(self.state, a)
        self.t += 1
        success = bool(np.linalg.norm(self.state - self.goal) < self.success_radius)
        truncated = (not success) and self.t >= self.max_episode_steps
        return self.obs(), 0.0 if success else -1.0, success, truncated, {"success": success}


for _id in LEVELS.keys() - gym.registry.keys():  # the levels, for gym.make
    gym.register(id=_id, entry_point=PointmassEnv, kwargs={"env_id": _id})


# ---- Offline data: generated once and cached by a hash of its settings, or the user's own .npz --------------------
DATASET_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals")
DATASET_VERSION = 1  # bump when the generator changes: old cache files are no longer matched


def dataset_seed(args: Args) -> int:
    return args.seed if args.dataset_seed is None else args.dataset_seed


def dataset_path(args: Args) -> str:
    """The cache file of these generation settings (a hash of them in its name)."""
    settings = dict(version=DATASET_VERSION, env_id=args.env_id, kind=args.dataset_kind, steps=args.dataset_steps)
    settings["seed"] = dataset_seed(args)
    if args.dataset_kind == "rnd":
        settings["rnd_epsilon"] = args.rnd_epsilon
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(args.dataset_dir, f"{args.env_id}__{args.dataset_kind}__{args.dataset_steps}__{digest}.npz")


def load_dataset_file(path: str, what: str = "--dataset", n_actions: int = 5, batch_size: int = 1) -> dict:
    """A dataset file's arrays, float32 (actions int64), or a one-line UserError naming the file and what is wrong."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:  # not a zip, corrupt, or pickled objects
        raise UserError(f"{what} {path}: cannot be read as an .npz file ({type(e).__name__}: {e})") from None
    if missing := [k for k in DATASET_KEYS if k not in data]:
        raise UserError(f"dataset {path}: missing key(s) {missing}; needs {', '.join(DATASET_KEYS)} [, truncations]")
    if data["actions"].ndim == 0:  # a 0-d array has no len(): one line, as for the other shapes below
        raise UserError(f"dataset {path}: actions has shape (), expected (n,): one action per transition")
    n = len(data["actions"])
    out = {k: data.get(k, np.zeros(n)) for k in (*DATASET_KEYS, "truncations")}  # no truncations: none
    for k, v in out.items():
        shape = (n, 2) if k.endswith("observations") else (n,)
        if v.shape != shape:
            raise UserError(f"dataset {path}: {k} has shape {v.shape}, expected {shape}")
    if n < batch_size:
        raise UserError(f"dataset {path}: actions holds {n} transitions, fewer than one --batch-size ({batch_size})")
    for k in ("observations", "next_observations", "rewards"):
        v = out[k]
        if not np.issubdtype(v.dtype, np.number) or np.issubdtype(v.dtype, np.complexfloating):
            raise UserError(f"dataset {path}: {k} has dtype {v.dtype}, expected a real number type")
        if not np.isfinite(v.astype(np.float64)).all():
            raise UserError(f"dataset {path}: {k} holds NaN or inf values")
        low, high = (0, 1) if k != "rewards" else (-np.finfo(np.float32).max, np.finfo(np.float32).max)
        if v.min() < low or v.max() > high:
            space = "the env's observation space [0, 1]^2" if k != "rewards" else "float32, the dtype training uses"
            raise UserError(f"dataset {path}: {k} range over [{v.min():g}, {v.max():g}], outside {space}")
    a = out["actions"]
    if not np.issubdtype(a.dtype, np.integer):
        raise UserError(f"dataset {path}: actions have dtype {a.dtype}, expected integers in [0, {n_actions})")
    if a.min() < 0 or a.max() >= n_actions:
        raise UserError(f"dataset {path}: actions range over [{a.min()}, {a.max()}], expected [0, {n_actions})")
    for k in ("terminals", "truncations"):
        if not (out[k].dtype == bool or np.issubdtype(out[k].dtype, np.number)) or not np.isin(out[k], (0, 1)).all():
            raise UserError(f"dataset {path}: {k} must be booleans (or 0/1)")
    return {k: v.astype(np.int64 if k == "actions" else np.float32) for k, v in out.items()}


def generate_dataset(args: Args) -> dict:
    """--dataset-steps transitions of a random policy, or of an eps-greedy DQN trained on an RND bonus alone."""
    seed = dataset_seed(args)
    rng = np.random.default_rng(seed)
    env = PointmassEnv(args.env_id)
    obs, _ = env.reset(seed=seed)
    buf, err_sq_mean = {k: [] for k in (*DATASET_KEYS, "truncations")}, 1.0
    if args.dataset_kind == "rnd":
        with torch.random.fork_rng():  # seeded init that leaves the caller's torch RNG untouched
            torch.manual_seed(seed)
            qnet, qtarget, rnd_target, rnd_pred = (mlp(2, [64, 64], k) for k in (5, 5, 16, 16))
        qtarget.load_state_dict(qnet.state_dict())
        opt = torch.optim.Adam([*qnet.parameters(), *rnd_pred.parameters()], lr=1e-3)
    for step in range(args.dataset_steps):
        if RUN["stop"] is not None:  # Ctrl-C or SIGTERM before training: nothing to resume
            exit_stopped(0, None)
        if args.dataset_kind == "random" or rng.random() < args.rnd_epsilon or step < 1000:
            action = int(rng.integers(5))
        else:
            with torch.no_grad():
                action = int(qnet(torch.as_tensor(obs)[None]).argmax())
        next_obs, reward, term, trunc, _ = env.step(action)
        for k, v in zip(buf, (obs, action, reward, next_obs, term, trunc)):
            buf[k].append(v)
        obs = env.reset()[0] if term or trunc else next_obs
        if args.dataset_kind == "rnd" and step >= 500:  # one RND step, one DQN step on the bonus
            idx = rng.integers(0, len(buf["actions"]), size=64)
            o, a, _, o2, d = (torch.as_tensor(np.array([buf[k][i] for i in idx])) for k in DATASET_KEYS)
            err = (rnd_pred(o2) - rnd_target(o2).detach()).pow(2).mean(1)
            err_sq_mean = 0.99 * err_sq_mean + 0.01 * float(err.detach().pow(2).mean())
            bonus = err.detach() / (err_sq_mean**0.5 + 1e-8)
            y = bonus + 0.99 * ~d * qtarget(o2).max(1).values.detach()  # d: terminal (bool)
            loss = F.smooth_l1_loss(qnet(o).gather(1, a[:, None]).squeeze(1), y)
            opt.zero_grad()
            (err.mean() + loss).backward()  # disjoint parameters: each network gets its own gradient
            opt.step()
            if step % 500 == 0:
                qtarget.load_state_dict(qnet.state_dict())
    return {k: np.array(v, np.int64 if k == "actions" else np.float32) for k, v in buf.items()}


def load_or_make_dataset(args: Args) -> tuple:
    """(data, path, generated): --dataset if given, else the cached file for these settings (made once)."""
    if args.dataset is not None:
        return load_dataset_file(args.dataset, batch_size=args.batch_size), args.dataset, False
    path = dataset_path(args)
    remove_orphans(args.dataset_dir)  # what cache writers killed mid-write left
    if os.path.isfile(path):
        try:
            return load_dataset_file(path, "cached dataset", batch_size=args.batch_size), path, False
        except UserError as e:
            raise UserError(f"{e}; delete it to regenerate") from None
    start, data = time.time(), generate_dataset(args)
    buffer = io.BytesIO()
    np.savez(buffer, **data)
    atomic_save(buffer.getvalue(), path)  # an interrupted run never leaves a half-written cache file
    print(f"generated {len(data['actions'])} transitions in {time.time() - start:.1f}s: {path}")
    return data, path, True


# ---- Networks: MLPs; each critic is encoder + head, the head is what injection replaces ---------------------------
def mlp(in_dim: int, hidden, out_dim, layer_norm: bool = False, activation: str = "relu") -> nn.Sequential:
    """Linear [-> LayerNorm] -> activation per hidden size, then a Linear to out_dim (None: none); default init."""
    layers = []
    for h in hidden:
        layers += hidden_layer(nn.Linear(in_dim, h), layer_norm, activation)
        in_dim = h
    return nn.Sequential(*layers, *([nn.Linear(in_dim, out_dim)] if out_dim is not None else []))


def split_mlp(in_dim: int, out_dim: int, args: Args) -> nn.Sequential:
    """`encoder` (the first --critic-encoder-layers hidden layers; Identity when 0), then `head` (the rest)."""
    k = args.critic_encoder_layers
    kw = dict(layer_norm=args.layer_norm, activation=args.activation)
    encoder = mlp(in_dim, args.hidden_sizes[:k], None, **kw) if k else nn.Identity()
    head = mlp(args.hidden_sizes[k - 1] if k else in_dim, args.hidden_sizes[k:], out_dim, **kw)
    return nn.Sequential(OrderedDict(encoder=encoder, head=head))


class TwinQ(nn.Module):
    """Two independent Q(s, .) networks over the discrete actions."""

    def __init__(self, obs_dim: int, n_actions: int, args: Args):
        super().__init__()
        self.q1, self.q2 = split_mlp(obs_dim, n_actions, args), split_mlp(obs_dim, n_actions, args)

    def forward(self, x: torch.Tensor):
        return self.q1(x), self.q2(x)


# ---- Replay buffer: the offline data first, then the agent's own experience ---------------------------------------
class ReplayBuffer:
    def __init__(self, data: dict, extra: int, device: torch.device):  # data: in training's dtypes (load_dataset_file)
        self.size = self.offline_size = n = len(data["actions"])
        self.device, self.arrays = device, {}
        for name, key in zip(("obs", "actions", "rewards", "next_obs", "terminals"), DATASET_KEYS):  # sample()'s order
            self.arrays[name] = np.zeros((n + extra, *data[key].shape[1:]), data[key].dtype)
            self.arrays[name][:n] = data[key]

    def state_dict(self) -> dict:
        """The online part (the offline data comes from the dataset file); `size` counts both."""
        return dict({k: v[self.offline_size : self.size].copy() for k, v in self.arrays.items()}, size=self.size)

    def load_state_dict(self, state: dict) -> None:
        for k, v in self.arrays.items():
            v[self.offline_size : state["size"]] = state[k]
        self.size = state["size"]

    def add(self, obs, action, reward, next_obs, terminal) -> None:
        for v, x in zip(self.arrays.values(), (obs, action, reward, next_obs, terminal)):
            v[self.size] = x
        self.size += 1

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple:
        """(obs, actions, rewards, next_obs, terminals) tensors of uniformly drawn transitions."""
        idx = rng.integers(0, self.size, size=batch_size)
        return tuple(torch.as_tensor(v[idx], device=self.device) for v in self.arrays.values())


# ==== BEGIN SHARED BLOCK: injection (shared_blocks/injection.py; sync: tools/sync_blocks.py) ====
# Plasticity injection (Nikishin et al., NeurIPS 2023). SELF-CONTAINED: copy this block into your script (torch only).
import copy

import torch
from torch import nn


class InjectedModule(nn.Module):
    """h_θ(x) + h_θ'1(x) − h_θ'2(x) + ...: θ the original head, θ'1 = θ'2 one fresh draw per injection, only θ'1
    trainable. Signs and trainable flags are buffers: a state_dict describes the injected module completely."""

    def __init__(self, original: nn.Module):
        super().__init__()
        device = next(original.parameters()).device
        self.terms = nn.ModuleList([original])
        self.register_buffer("signs", torch.ones(1, device=device))
        self.register_buffer("term_trainable", torch.ones(1, dtype=torch.bool, device=device))
        self.register_buffer("injection_count", torch.zeros((), dtype=torch.long, device=device))
        self.register_load_state_dict_post_hook(InjectedModule._read_flags)
        self._read_flags()

    def _read_flags(self, *_):  # also run after each load; forward() reads these Python copies, never the GPU
        self._signs, self._trainable = self.signs.tolist(), self.term_trainable.tolist()
        for term in (t for t, trainable in zip(self.terms, self._trainable) if not trainable):
            term.requires_grad_(False)  # a frozen term stays frozen, in a reloaded model too

    def inject(self, fresh, keep_trainable=False, third_term=True) -> list:  # freeze, add ±fresh; [(new, old param)]
        old = [p for p in self.parameters() if p.requires_grad]  # a head that trains nothing (a target) stays so
        self.zero_grad()  # stale .grad dropped: clip_grad_norm_ over all parameters sees only live gradients
        for m in (m for m in self.modules() if isinstance(m, InjectedModule) and not keep_trainable):
            m.term_trainable.fill_(False)  # nested injections' terms too
            m._read_flags()
        signs, trainable = [1.0, -1.0][: 1 + third_term], [True, keep_trainable][: 1 + third_term]
        self.terms.extend(copy.deepcopy(fresh).to(self.signs.device).requires_grad_(t and bool(old)) for t in trainable)
        self.signs = torch.cat([self.signs, self.signs.new_tensor(signs)])
        self.term_trainable = torch.cat([self.term_trainable, self.term_trainable.new_tensor(trainable)])
        self.injection_count += 1
        self._read_flags()
        return list(zip([p for t in self.terms[-len(signs) :] for p in t.parameters() if p.requires_grad], old * 2))

    def frozen_outputs(self, x: torch.Tensor) -> list:  # for forward(x, frozen_out) while x repeats
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
            return [None if trainable else t(x) for t, trainable in zip(self.terms, self._trainable)]

    def forward(self, x: torch.Tensor, frozen_out: list = None) -> torch.Tensor:
        ys = [t(x) if y is None else y for t, y in zip(self.terms, frozen_out or self.frozen_outputs(x))]
        out, i = ys[0], 1
        while i < len(ys):  # h + (h'1 − h'2) + ...: each pair is exactly 0 when injected
            pair = self._signs[i : i + 2] == [1.0, -1.0]
            out = out + (ys[i] - ys[i + 1]) if pair else out.add(ys[i], alpha=self._signs[i])
            i += 1 + pair
        return out


def _as_injected(model: nn.Module, path: str) -> InjectedModule:  # wrap `model.<path>` once
    if not path:
        raise ValueError("cannot inject into the root module: give the path of a sub-module")
    parent, _, name = path.rpartition(".")
    if not isinstance(model.get_submodule(path), InjectedModule):
        setattr(model.get_submodule(parent), name, InjectedModule(model.get_submodule(path)))
    return model.get_submodule(path)


def fresh_copy(module: nn.Module) -> nn.Module:
    """A fresh draw (each layer's `reset_parameters`) of `module` as it was before any injection."""
    fresh = copy.deepcopy(module.terms[0] if isinstance(module, InjectedModule) else module)
    for parent in list(fresh.modules()):  # an injected module inside: its original term
        for name, child in [(n, c) for n, c in parent.named_children() if isinstance(c, InjectedModule)]:
            setattr(parent, name, child.terms[0])
    for m in (m for m in fresh.modules() if hasattr(m, "reset_parameters")):
        m.reset_parameters()
    return fresh


@torch.no_grad()
def inject_plasticity(
    model,
    paths,
    probe,
    *,
    targets=(),
    sync_targets=False,
    optimizers=(),
    reset_optimizer=False,
    keep_trainable=False,
    third_term=True,
    make_fresh=None,
) -> dict:
    """Inject into each sub-module `model.<path>` in place; returns the values to log. probe: real inputs to check the
    output on. targets get the SAME fresh values (sync_targets: copied from `model` first). optimizers: new parameters
    join the group of those they replace, frozen ones leave with their state, groups follow model.parameters() order.
    make_fresh: {path: () -> module}, another init. Ablations: keep_trainable, third_term=False (the output jumps)."""
    flat = lambda out: torch.cat([o.flatten() for o in out]) if isinstance(out, (tuple, list)) else out.flatten()
    count = lambda trainable_only: sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
    for target in targets if sync_targets else ():
        target.load_state_dict(model.state_dict())
    before, trainable_before = [flat(net(probe)) for net in (model, *targets)], count(True)
    replaced = []  # (new parameter, the parameter at its place in the head before)
    for path in paths:
        fresh = (make_fresh or {}).get(path, lambda: fresh_copy(model.get_submodule(path)))()
        replaced += _as_injected(model, path).inject(fresh, keep_trainable, third_term)
        for target in targets:  # the same θ' values
            _as_injected(target, path).inject(fresh, keep_trainable, third_term)
    ours = {id(p): p for p in model.parameters() if p.requires_grad}  # in model order
    for opt in optimizers:
        for group in opt.param_groups:  # new parameters after those they replace; `model`'s slots in model order
            params = [n for p in group["params"] for n in [p, *(n for n, q in replaced if q is p)] if n.requires_grad]
            in_order = iter([p for p in ours.values() if any(p is q for q in params)])
            group["params"] = [next(in_order) if id(p) in ours else p for p in params]
        for p in [p for p in opt.state if reset_optimizer or not p.requires_grad]:  # frozen ones leave with their state
            opt.state.pop(p)
    changes = [float((flat(net(probe)) - out).abs().max()) for net, out in zip((model, *targets), before)]
    return {
        "injection/count": float(max(int(m.injection_count) for m in model.modules() if isinstance(m, InjectedModule))),
        "injection/output_change": changes[0],
        "injection/trainable_params": float(count(True)),
        "injection/trainable_params_before": float(trainable_before),
        "injection/total_params": float(count(False)),
        **({"injection/target_output_change": max(changes[1:])} if targets else {}),
    }


def load_injected_state_dict(model: nn.Module, state_dict: dict, strict: bool = True):
    """Load an injected model's state_dict into a freshly built model, its injected structure rebuilt first."""
    for key, signs in state_dict.items():
        if key.endswith(".signs") and key[: -len("signs")] + "injection_count" in state_dict:
            head = _as_injected(model, key[: -len(".signs")])
            while len(head.terms) < len(signs):  # placeholders, overwritten by the load
                head.inject(head.terms[0], keep_trainable=True, third_term=False)
    return model.load_state_dict(state_dict, strict=strict)


# ==== END SHARED BLOCK: injection ====


# ---- Plasticity injection into the critics, and the interventions to compare it against ----------------------------
def intervention_parts(agent, target: str) -> list:
    """(network, sub-module paths, optimizer, target networks) of each network that a --*-target value names."""
    heads = target.endswith("-head")
    q = (agent.qf, ["q1.head", "q2.head"] if heads else ["q1", "q2"], agent.q_opt, [agent.qf_target])
    v = (agent.vf, ["head"] if heads else [""], agent.v_opt, [])
    actor = (agent.actor, [""], agent.a_opt, [])
    return {"q-head": [q], "q": [q], "qv-head": [q, v], "qv": [q, v], "actor": [actor], "all": [q, v, actor]}[target]


def inject_critics(agent, probe: torch.Tensor, args: Args) -> dict:
    """Injection into both Q heads, the target critics the same fresh values; qv: V's head too (logs injection/v_)."""
    kw = dict(keep_trainable=args.inject_keep_trainable, third_term=not args.inject_no_third_term)
    kw.update(reset_optimizer=args.inject_reset_optimizer)
    log = {}
    for net, paths, opt, targets in intervention_parts(agent, f"{args.inject_target}-head"):
        net_log = inject_plasticity(net, paths, probe, targets=targets, optimizers=[opt], **kw)
        prefix = "injection/v_" if net is agent.vf else "injection/"
        log.update({k.replace("injection/", prefix): v for k, v in net_log.items()})
    return log


def reset_networks(agent, target: str) -> dict:
    """--reset-at: default init for `target` (injected heads: the trainable terms), Adam state cleared, targets too."""
    count = 0.0
    for net, paths, opt, targets in intervention_parts(agent, target):
        count += reset_modules(net, paths, optimizers=[opt], targets=targets)["interventions/reset_params"]
    return {"interventions/reset_params": count}


def shrink_perturb_networks(agent, target: str, args: Args) -> dict:
    """--shrink-perturb-at on `target`, the target critics with the same eps; the relative change over all of it."""
    parts = intervention_parts(agent, target)
    touched = [p for net, paths, _, _ in parts for path in paths for _, p in trainable_under(net, path)]
    before = [p.detach().clone() for p in touched]
    count = 0.0
    for net, paths, _, targets in parts:
        log = shrink_perturb(net, paths, args.sp_shrink, args.sp_perturb, targets=targets)
        count += log["interventions/shrink_perturb_params"]
    sq_change = sum(float((p.detach() - old).double().pow(2).sum()) for p, old in zip(touched, before))
    sq_norm = sum(float(old.double().pow(2).sum()) for old in before)
    rel_change = (sq_change / sq_norm) ** 0.5 if sq_norm > 0 else 0.0
    return {"interventions/shrink_perturb_params": count, "interventions/shrink_perturb_rel_change": rel_change}


# ---- IQL ----------------------------------------------------------------------------------------------------------
class IQLAgent:
    """Twin Q (+ soft targets), V and a softmax actor, their optimizers and the IQL update."""

    def __init__(self, args: Args, device: torch.device, obs_dim: int = 2, n_actions: int = 5):
        self.args, self.device, self.n_actions = args, device, n_actions
        self.qf = TwinQ(obs_dim, n_actions, args).to(device)
        self.qf_target = TwinQ(obs_dim, n_actions, args).to(device)
        self.qf_target.load_state_dict(self.qf.state_dict())
        self.qf_target.requires_grad_(False)
        self.vf = split_mlp(obs_dim, 1, args).to(device)
        self.actor = mlp(obs_dim, args.hidden_sizes, n_actions, args.layer_norm, args.activation).to(device)
        self.networks = dict(qf=self.qf, qf_target=self.qf_target, vf=self.vf, actor=self.actor)
        for net in self.networks.values() if args.compile else ():  # in place: state_dict keys, injection, hooks
            net.compile()
        fused = device.type in ("cpu", "cuda")  # one kernel per parameter: much less overhead for small nets
        adam = lambda net: torch.optim.Adam(net.parameters(), lr=args.learning_rate, fused=fused)
        self.q_opt, self.v_opt, self.a_opt = adam(self.qf), adam(self.vf), adam(self.actor)
        # {name: (optimizer, the network it trains)}: what an update steps and a checkpoint saves and restores
        self.trained = dict(q=(self.q_opt, self.qf), v=(self.v_opt, self.vf), actor=(self.a_opt, self.actor))
        # the first update with a non-finite loss (step -1: none yet) and its losses, noted on the device: no host sync
        self.bad_step, self.bad_losses = torch.tensor(-1, device=device), torch.zeros(3, device=device)

    def update(self, batch, l2: float = 0.0, step: int = 0) -> dict:
        """IQL gradient step `step` on a batch, l2 * l2_penalty(twin Q) added to the Q loss; returns detached stats."""
        args = self.args
        o, a, r, o2, d = batch
        with torch.no_grad():
            q_t = torch.min(*self.qf_target(o)).gather(1, a[:, None]).squeeze(1)
        v_both = self.vf(torch.cat([o, o2])).squeeze(1)  # V(s) and V(s') in one pass; V(s') only as a target
        v, next_v = v_both[: o.shape[0]], v_both[o.shape[0] :].detach()
        # V: expectile regression towards min(Q_target)(s, a); Q: regression towards r + gamma (1 - terminal) V(s')
        diff = q_t - v
        v_loss = (torch.where(diff > 0, args.expectile, 1 - args.expectile) * diff.pow(2)).mean()
        q1a, q2a = (q.gather(1, a[:, None]).squeeze(1) for q in self.qf(o))
        q_target = r + args.gamma * (1.0 - d) * next_v
        q_loss = F.mse_loss(q1a, q_target) + F.mse_loss(q2a, q_target)
        if l2 > 0:
            q_loss = q_loss + l2 * l2_penalty(self.qf)
        # actor: advantage-weighted regression, weights exp(beta A) clipped
        adv = q_t - v.detach()
        weights = torch.exp(args.beta * adv).clamp(max=args.max_weight)
        logp = torch.log_softmax(self.actor(o), dim=1).gather(1, a[:, None]).squeeze(1)
        actor_loss = -(weights * logp).mean()
        losses = torch.stack([q_loss, v_loss, actor_loss]).detach()
        first = (self.bad_step < 0) & ~torch.isfinite(losses).all()
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_losses = torch.where(first, losses, self.bad_losses)
        for opt, _ in self.trained.values():
            opt.zero_grad(set_to_none=True)
        (v_loss + q_loss + actor_loss).backward()  # disjoint parameters: each network gets exactly its own gradient
        for opt, _ in self.trained.values():
            opt.step()
        with torch.no_grad():  # soft target update
            torch._foreach_lerp_(list(self.qf_target.parameters()), list(self.qf.parameters()), args.tau)
        stats = dict(q_loss=q_loss, v_loss=v_loss, actor_loss=actor_loss, q_values=q1a.mean(), v_values=v.mean())
        stats.update(advantage=adv.mean(), awr_weight=weights.mean())
        return {f"losses/{k}": value.detach() for k, value in stats.items()}

    def check_losses(self) -> None:
        """check_finite's one-line error for the first update with a non-finite loss, if any (a host sync)."""
        if (step := int(self.bad_step)) >= 0:
            for name, value in zip(("losses/q_loss", "losses/v_loss", "losses/actor_loss"), self.bad_losses):
                check_finite(value, name, step)

    @torch.no_grad()
    def act(self, obs: np.ndarray, rng: np.random.Generator = None, mode: str = "greedy", epsilon: float = 0.0) -> int:
        """`greedy` (argmax of the actor), `eps-greedy` or `policy` (a sample of its softmax)."""
        logits = self.actor(torch.as_tensor(obs, device=self.device)[None])[0]
        if mode == "policy":
            p = torch.softmax(logits.double(), 0).cpu().numpy()
            return int(rng.choice(self.n_actions, p=p / p.sum()))
        if mode == "eps-greedy" and rng.random() < epsilon:
            return int(rng.integers(self.n_actions))
        return int(logits.argmax())


def plasticity_metrics(agent: IQLAgent, batch, tau: float) -> dict:
    """plasticity/... of critic q1 on the probe batch; its TD loss (the target computed now) for the gradient ones."""
    o, a, r, o2, d = batch
    with torch.no_grad():
        y = r + agent.args.gamma * (1.0 - d) * agent.vf(o2).squeeze(1)
    loss_fn = lambda q: F.mse_loss(q(o).gather(1, a[:, None]).squeeze(1), y)
    return measure_plasticity(agent.qf.q1, o, loss_fn=loss_fn, tau=tau)


# ---- Training -----------------------------------------------------------------------------------------------------
def validate_args(args: Args) -> int:
    """Every check beyond the flags' types and declared ranges, before anything is written; the total steps."""
    if args.env_id not in LEVELS:
        raise UserError(f"--env-id {args.env_id!r} is unknown; choose one of {sorted(LEVELS)}")
    check_ranges(args)
    check_compile(args)
    total = args.offline_steps + args.online_steps
    if total <= 0:
        raise UserError("--offline-steps + --online-steps must be > 0")
    if not args.hidden_sizes or min(args.hidden_sizes) <= 0:
        raise UserError(f"--hidden-sizes {args.hidden_sizes} must be one or more positive sizes")
    if (k := args.critic_encoder_layers) > len(args.hidden_sizes):
        raise UserError(f"--critic-encoder-layers {k} must lie in [0, {len(args.hidden_sizes)}]")
    args.inject_at = check_steps("--inject-at", args.inject_at, total)
    if args.dataset is None and args.dataset_steps < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} exceeds the data: --dataset-steps {args.dataset_steps}")
    if args.dataset is None and not os.path.isfile(folder := dataset_path(args)):  # the dataset will be generated
        while not os.path.exists(folder := os.path.dirname(folder) or "."):  # its cache goes in the nearest folder
            pass
        if not (os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)):
            why = "not writable" if os.path.isdir(folder) else "a file, not a folder"
            raise UserError(f"--dataset-dir {args.dataset_dir}: {folder} is {why} (the generated dataset's cache)")
    with torch.device("meta"):  # critic q1's structure, without weights or random draws
        q1 = split_mlp(2, 5, args)
    check_intervention_args(args, total, plasticity_keys(q1))  # --adaptive-inject-metric: a key of q1's metrics
    return total


def evaluate(agent: IQLAgent, args: Args, writer, run_dir: str, step: int) -> dict:
    """--eval-episodes greedy episodes: logs and returns eval/..., draws the first one to eval_{step}.png in run_dir."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    env, rets, succ, trajs = PointmassEnv(args.env_id), [], [], []
    for ep in range(args.eval_episodes):
        obs, _ = env.reset(seed=args.seed + 10_000 + ep)
        traj, ret, done = [env.state.copy()], 0.0, False
        while not done:
            obs, r, term, trunc, info = env.step(agent.act(obs))
            ret += r
            traj.append(env.state.copy())
            done = term or trunc
        trajs.append(np.array(traj))
        rets.append(ret)
        succ.append(float(info["success"]))
    results = {"eval/episodic_return": np.mean(rets), "eval/episodic_length": np.mean([len(t) - 1 for t in trajs])}
    results["eval/success_rate"] = np.mean(succ)
    for k, v in results.items():
        writer.add_scalar(k, v, step)
    ax = Figure(figsize=(4, 4), dpi=80).subplots()
    ax.imshow(env.walls, cmap="Greys", vmin=0, vmax=2, origin="upper", extent=(0, env.width, env.height, 0))
    ax.add_patch(Circle((env.goal[1], env.goal[0]), env.success_radius, color="green", alpha=0.3))
    ax.plot(trajs[0][:, 1], trajs[0][:, 0], "b.-", alpha=0.7, markersize=3)
    ax.plot(env.start[1], env.start[0], "r+", markersize=12, label="start")
    ax.plot(env.goal[1], env.goal[0], "g*", markersize=12, label="goal")
    ax.set(xlim=(0, env.width), ylim=(env.height, 0))
    ax.set_title(f"{args.env_id} step {step}: return {np.mean(rets):.1f}, success {np.mean(succ):.2f}", fontsize=9)
    ax.legend(loc="lower left", fontsize=7)
    png = io.BytesIO()
    ax.figure.savefig(png, format="png")
    atomic_save(png.getvalue(), os.path.join(run_dir, f"eval_{step:07d}.png"))
    print(f"global_step={step}, eval/episodic_return={np.mean(rets):.1f}, eval/success_rate={np.mean(succ):.2f}")
    return {k: float(v) for k, v in results.items()}


def train(args: Args) -> dict:
    """Run offline IQL, then online fine-tuning; returns the final metrics and the run's events."""
    stop_on_signals()  # Ctrl-C / SIGTERM from here on: a checkpoint at the end of the current step, never a traceback
    total = validate_args(args)
    ckpt = find_checkpoint(args, "iql_pointmass_injection.py")  # --resume: loaded and checked; None for a new run
    data, data_path, _ = load_or_make_dataset(args)  # validates --dataset before runs/ exists
    with open(data_path, "rb") as f:  # checkpoints keep the data's hash: a resume on a changed file is refused
        data_sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    if ckpt is not None and ckpt["dataset_sha256"] != data_sha256:
        raise UserError(f"--resume: the dataset {data_path} changed since {RUN['checkpoint']} was written (sha256)")
    seed_everything(args.seed, args.torch_deterministic)
    device = pick_device(args.cuda)
    rng = np.random.default_rng(args.seed)
    agent = IQLAgent(args, device)
    rb = ReplayBuffer(data, args.online_steps, device)
    # fixed batches from their own RNGs (training draws the same without them): injection's check, the metrics
    probe = rb.sample(min(256, rb.size), np.random.default_rng(args.seed + 12345))[0]
    metrics_probe = rb.sample(args.metrics_batch_size, np.random.default_rng(args.seed + 54321))
    history = dict(injections=[], interventions=[], fired=[], recent=deque(maxlen=20), final={})  # in checkpoints
    env = PointmassEnv(args.env_id)
    obs, _ = env.reset(seed=args.seed)
    ep_ret, ep_len, start_step = 0.0, 0, 0
    if ckpt is not None:  # resume: every state as it was, the environment included (a misfit stops here)
        restore_checkpoint(ckpt, agent.networks, agent.trained, {"train": rng})
        if ckpt["buffer"] is not None:
            rb.load_state_dict(ckpt["buffer"])
        history, env = ckpt["history"], pickle.loads(ckpt["env"])
        obs, ep_ret, ep_len, start_step = *ckpt["episode"], ckpt["global_step"]
    injections, interventions, fired, recent, final = history.values()
    run_dir, writer = start_run(args, ckpt)  # the run's folder, locked; the first write of the run
    progress = Progress(args, device, start_step, total)  # the start line, then a bar or status lines
    goals = int(data["terminals"].sum())
    if ckpt is None:
        writer.add_text("dataset", f"{data_path}: {len(data['actions'])} transitions, {goals} goal-reaching")

    start_time = time.time()
    for global_step in range(start_step, total):
        redo_now = args.redo_every > 0 and global_step > 0 and global_step % args.redo_every == 0
        intervene = redo_now or any(global_step in s for s in (args.inject_at, args.reset_at, args.shrink_perturb_at))
        measure = args.metrics_every > 0 and global_step % args.metrics_every == 0
        online = global_step >= args.offline_steps
        checkpoint = checkpoint_due(args, global_step, max(global_step - 1, start_step))
        evaluate_now = global_step > 0 and global_step % args.eval_every == 0
        if intervene or measure or online or checkpoint or evaluate_now:  # a non-finite loss stops the run here
            agent.check_losses()

        if checkpoint:  # every --checkpoint-every steps, and when Ctrl-C or SIGTERM asked the run to stop (then exit)
            state = dict(history=history, env=pickle.dumps(env), episode=(obs, ep_ret, ep_len))
            state.update(buffer=rb.state_dict() if args.checkpoint_buffer else None, dataset_sha256=data_sha256)
            save_checkpoint(global_step, global_step, agent.networks, agent.trained, {"train": rng}, **state)
        if evaluate_now:  # the greedy policy after every --eval-every updates
            final.update(evaluate(agent, args, writer, run_dir, global_step), global_step=global_step)

        # plasticity injection, and the interventions to compare it against
        if global_step in args.inject_at:
            log = dict(inject_critics(agent, probe, args), **{"injection/adaptive": 0.0})
            log_event(writer, injections, global_step, f"injected plasticity into {args.inject_target}", log)
        for kind in ("reset", "shrink_perturb"):  # at --reset-at, --shrink-perturb-at
            if global_step in getattr(args, f"{kind}_at"):
                target = getattr(args, f"{kind}_target")
                log = reset_networks(agent, target) if kind == "reset" else shrink_perturb_networks(agent, target, args)
                log_event(writer, interventions, global_step, f"{kind} of {target}", log, kind=kind, target=target)
        if redo_now:  # ReDo in both Q critics (targets mirrored) and in V; the dormant shares are Q's
            log = redo(agent.qf, probe, args.redo_tau, optimizers=[agent.q_opt], targets=[agent.qf_target])
            v_log = redo(agent.vf, probe, args.redo_tau, optimizers=[agent.v_opt])
            log["interventions/redo_units"] += v_log["interventions/redo_units"]
            log_event(writer, interventions, global_step, "redo", log, kind="redo")

        # plasticity metrics of critic q1 on one fixed probe batch; the adaptive trigger reads them
        if measure:
            metrics = plasticity_metrics(agent, metrics_probe, args.dormant_tau)
            for k, v in metrics.items():
                writer.add_scalar(k, v, global_step)
            if reason := adaptive_injection_due(args, global_step, metrics, fired):
                log = dict(inject_critics(agent, probe, args), **{"injection/adaptive": 1.0})
                writer.add_text("injection/adaptive_reason", reason, global_step)
                what = f"injected plasticity into {args.inject_target} (adaptive: {reason})"
                log_event(writer, injections, global_step, what, log)

        if online:  # one environment step with the current policy
            action = agent.act(obs, rng, args.online_exploration, args.online_epsilon)
            next_obs, reward, term, trunc, info = env.step(action)
            rb.add(obs, action, reward, next_obs, term)
            ep_ret, ep_len, obs = ep_ret + reward, ep_len + 1, next_obs
            if term or trunc:
                writer.add_scalar("charts/episodic_return", ep_ret, global_step)
                writer.add_scalar("charts/episodic_length", ep_len, global_step)
                writer.add_scalar("charts/success", float(info["success"]), global_step)
                progress.episode(global_step, ep_ret)
                recent.append(ep_ret)
                (obs, _), ep_ret, ep_len = env.reset(), 0.0, 0

        # one IQL update on a batch of offline data and (online) the agent's own experience
        l2 = l2_coef(args, global_step, total)
        stats = agent.update(rb.sample(args.batch_size, rng), l2=l2, step=global_step)
        if global_step % args.log_every == 0 or global_step == total - 1:
            agent.check_losses()
            scalars = {k: v.item() for k, v in stats.items()}
            scalars.update({"charts/learning_rate": agent.q_opt.param_groups[0]["lr"], "charts/online": float(online)})
            scalars["charts/SPS"] = int((global_step + 1 - start_step) / (time.time() - start_time))
            if args.l2_schedule != "none":
                scalars["losses/l2_coef"] = l2
            for k, v in scalars.items():
                writer.add_scalar(k, v, global_step)
        progress.update(global_step + 1)

    agent.check_losses()
    final.update(evaluate(agent, args, writer, run_dir, total), global_step=total)
    final.update({k: float(v) for k, v in stats.items()}, injections=injections, interventions=interventions)
    elapsed = time.time() - start_time
    final.update({"charts/SPS": (total - start_step) / elapsed, "train_time_s": elapsed, "run_dir": run_dir})
    final.update({"injection/count": float(len(injections)), "injection/adaptive_count": float(len(fired))})
    last20 = float(np.mean(recent)) if recent else float("nan")
    final.update(online_episodic_return_last20=last20, dataset_goal_transitions=float(goals))
    if args.save_model:
        final["model_path"] = os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
        networks = {k: net.state_dict() for k, net in agent.networks.items()}
        model = dict(model=networks, args=vars(args), global_step=total, adaptive_trigger={"fired": fired})
        atomic_save(model, final["model_path"])
        print(f"model saved to {final['model_path']}")
    finish_run(total, final.get("model_path") or run_dir)  # a stop asked during the last step exits here
    return final


# ==== BEGIN SHARED BLOCK: common (shared_blocks/common.py; sync: tools/sync_blocks.py) ====
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


# ==== END SHARED BLOCK: common ====
# ==== BEGIN SHARED BLOCK: plasticity (shared_blocks/plasticity.py; sync: tools/sync_blocks.py) ====
# Plasticity diagnostics of any nn.Module on a FIXED probe batch (drawn once: every point of a curve, same inputs):
#     for k, v in measure_plasticity(q_network, probe_obs, loss_fn=loss_fn, tau=args.dormant_tau).items():
#         writer.add_scalar(k, v, global_step)   # loss_fn(model) -> scalar training loss on the probe (optional)
# One no_grad forward and, with loss_fn, one torch.autograd.grad: .grad, the optimizer, modes and RNG are untouched.
# Every Linear/Conv layer is measured; it is *hidden* when the next module (past norms, Dropout, Identity) is an
# activation module (F.relu is invisible), whose output are its features: a Linear layer's units, a conv's channels.
# Keys: plasticity/<role>/<layer>/<metric>, role `trainable` or `frozen` (after an injection `head.terms.0.*` is the
# frozen original head); metric weight_magnitude, erank_weights, for hidden layers erank_features, dormant_ratio,
# feature_norm, and with loss_fn for trainable layers updated_units_pct, grad_norm. Also plasticity/<metric>_mean
# (trainable layers), plasticity/frozen/<metric>_mean, and with loss_fn plasticity/grad_norm (all trainable params).
from functools import partial

import torch
from torch import nn

_PL_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish)
_PL_ACTIVATIONS += (nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish)
_PL_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PL_PASS_THROUGH = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Dropout, nn.Identity)


def effective_rank(matrix: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli (2007): exp(entropy of σ_k / Σσ) of matrix.reshape(len, -1) in float64; 0 for a zero matrix."""
    x = matrix.detach().to("cpu" if matrix.device.type == "mps" else matrix.device, torch.float64)  # MPS: no float64
    x = x.reshape(matrix.shape[0], -1)
    gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    sigma = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    total = sigma.sum()
    p = sigma / total.clamp_min(torch.finfo(torch.float64).tiny)
    erank = torch.exp(-torch.special.xlogy(p, p).sum())  # 0 log 0 = 0
    return torch.where(total > 0, erank, torch.zeros_like(erank))


def unit_matrix(features: torch.Tensor) -> torch.Tensor:
    """(B, units) stays; (B, C, *spatial) -> (B*prod(spatial), C): one column per channel."""
    if features.dim() <= 2:
        return features.reshape(features.shape[0], -1)
    return features.movedim(1, -1).reshape(-1, features.shape[1])


def dormant_units(features: torch.Tensor, tau: float = 0.025) -> torch.Tensor:
    """ReDo (Sokar et al. 2023): per unit, mean|h_i| / mean_j mean|h_j| <= tau (bool); all for all-zero features."""
    score = unit_matrix(features).detach().abs().float().mean(0)
    avg = score.mean()
    s = torch.where(avg > 0, score / avg.clamp_min(torch.finfo(score.dtype).tiny), torch.zeros_like(score))
    return s <= tau


def dormant_ratio(features: torch.Tensor, tau: float = 0.025) -> torch.Tensor:
    """Share of dormant units (dormant_units); 1.0 for all-zero features."""
    return dormant_units(features, tau).float().mean()


def updated_units_fraction(grad_weight: torch.Tensor | None, grad_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Share of units (weight rows) whose incoming weights or bias got a non-zero gradient; None counts as zero."""
    if grad_weight is None:
        return torch.zeros(())
    hit = (grad_weight.reshape(grad_weight.shape[0], -1) != 0).any(1)
    hit = hit | (grad_bias != 0) if grad_bias is not None else hit
    return hit.float().mean()


def weight_layers(model: nn.Module) -> dict:
    """module path -> every Linear/Conv layer of the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _PL_WEIGHT_LAYERS)}


def hidden_layers(model: nn.Module) -> dict:
    """module path -> (layer, activation) for every Linear/Conv layer followed by an activation."""
    # All paths, to see a reused activation; an aliased layer (e.g. SB3's) is measured once, under its first name.
    leaves = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if next(m.children(), None) is None]
    layers, out, owner = weight_layers(model), {}, {}
    for i, (name, m) in enumerate(leaves):
        if layers.get(name) is not m:
            continue
        act = next((a for _, a in leaves[i + 1 :] if not isinstance(a, _PL_PASS_THROUGH)), None)
        if isinstance(act, _PL_ACTIVATIONS):
            if owner.setdefault(id(act), name) != name:
                raise ValueError(
                    f"the activation module after '{owner[id(act)]}' is reused after '{name}': "
                    "give each layer its own activation module to measure plasticity"
                )
            out[name] = (m, act)
    return out


def _keep_first(store: dict, name: str, _module, args, out=None) -> None:  # forward hook: output; pre-hook: input
    store.setdefault(name, (args[0] if out is None else out).detach())


def record_forward(model, inputs, outputs_of: dict, inputs_of: dict = None) -> tuple:
    """One no_grad forward of `inputs` (eager: hooks fire in a compiled model too); returns ({name: the first output
    of module outputs_of[name]}, {name: the first input of module inputs_of[name]})."""
    outs, ins = {}, {}
    handles = [m.register_forward_hook(partial(_keep_first, outs, n)) for n, m in outputs_of.items()]
    handles += [m.register_forward_pre_hook(partial(_keep_first, ins, n)) for n, m in (inputs_of or {}).items()]
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    return outs, ins


def measure_plasticity(model, probe_inputs, loss_fn=None, tau=0.025) -> dict:
    """{key: float} as in the header. loss_fn(model) -> scalar: the loss on the probe batch, without .backward()."""
    feats, _ = record_forward(model, probe_inputs, {n: act for n, (_, act) in hidden_layers(model).items()})
    grads, vals = {}, {}
    if loss_fn is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.enable_grad():
            loss = loss_fn(model)
            gs = torch.autograd.grad(loss, params, allow_unused=True) if params else []
        grads = {id(p): g for p, g in zip(params, gs)}
        present = [g.detach().float().pow(2).sum() for g in gs if g is not None]
        vals["plasticity/grad_norm"] = torch.stack(present).sum().sqrt() if present else torch.zeros(())
    per_role = {"trainable": {}, "frozen": {}}
    for name, layer in weight_layers(model).items():
        w = layer.weight.detach()
        role = "trainable" if layer.weight.requires_grad else "frozen"
        m = {"weight_magnitude": w.abs().float().mean(), "erank_weights": effective_rank(w)}
        if (h := feats.get(name)) is not None:
            m["erank_features"] = effective_rank(unit_matrix(h))
            m["dormant_ratio"] = dormant_ratio(h, tau)
            m["feature_norm"] = h.float().reshape(h.shape[0], -1).norm(dim=1).mean()
        if loss_fn is not None and role == "trainable":
            gw, gb = grads.get(id(layer.weight)), grads.get(id(layer.bias))  # None: no gradient
            m["updated_units_pct"] = 100.0 * updated_units_fraction(gw, gb)
            parts = [g.detach().float().pow(2).sum() for g in (gw, gb) if g is not None]
            m["grad_norm"] = torch.stack(parts).sum().sqrt() if parts else torch.zeros(())
        for metric, v in m.items():
            vals[f"plasticity/{role}/{name}/{metric}"] = v
            per_role[role].setdefault(metric, []).append(v)
    dev = next(model.parameters()).device
    for role, head in (("trainable", "plasticity"), ("frozen", "plasticity/frozen")):
        for metric, vs in per_role[role].items():
            vals[f"{head}/{metric}_mean"] = torch.stack([v.to(dev, torch.float64) for v in vs]).mean()
    numbers = torch.stack([v.detach().to(dev, torch.float64) for v in vals.values()]).cpu().tolist()  # one transfer
    return dict(zip(vals, numbers))


def plasticity_keys(model: nn.Module, with_grads: bool = True) -> set:
    """The `_mean` keys (and grad_norm) that measure_plasticity returns for `model` as it is now."""
    features = ["erank_features", "dormant_ratio", "feature_norm"] if hidden_layers(model) else []
    grads = ["updated_units_pct", "grad_norm"] if with_grads else []
    if not any(layer.weight.requires_grad for layer in weight_layers(model).values()):
        return set()
    keys = {f"plasticity/{m}_mean" for m in ["weight_magnitude", "erank_weights", *features, *grads]}
    return keys | ({"plasticity/grad_norm"} if with_grads else set())


# ==== END SHARED BLOCK: plasticity ====
# ==== BEGIN SHARED BLOCK: interventions (shared_blocks/interventions.py; sync: tools/sync_blocks.py) ====
# Interventions to compare plasticity injection against, generic over any nn.Module: resets, shrink-and-perturb,
# ReDo, L2 schedules and an adaptive injection trigger; and the cross-flag checks of the shared flags. Targets
# (DQN/IQL target networks) get the same new values. make_fresh={path: factory} gives a network's own init (e.g.
# orthogonal; `reset_parameters` is PyTorch's default). Uses the injection and plasticity blocks, math (flags block).
import difflib
import re


def _canonical(name: str) -> str:  # a name in the un-injected network: `terms.K.` levels dropped
    return re.sub(r"(^|\.)terms\.\d+\.", r"\1", name)


def trainable_under(model: nn.Module, path: str) -> list:
    """(name, parameter) of every trainable parameter under `model.<path>`, the path read in the un-injected network:
    inside an injected module it names that part of each term (e.g. the head after injecting the whole network)."""
    prefix = f"{path}." if path else ""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and _canonical(n).startswith(prefix)]


def _fresh_part(module: nn.Module, name: str, make_fresh, drawn: dict) -> nn.Module:
    """A fresh draw of `module` at `name`: its part of the longest make_fresh path above it (drawn once), or its own."""
    name = _canonical(name)
    key = max((k for k in make_fresh or {} if k in ("", name) or name.startswith(k + ".")), key=len, default=None)
    if key is not None and key not in drawn:
        drawn[key] = make_fresh[key]()
    return fresh_copy(module) if key is None else drawn[key].get_submodule(name[len(key) :].lstrip("."))


def _trainable_with_fresh(model: nn.Module, path: str, make_fresh) -> list:
    """(name, parameter, its fresh value) for every trainable parameter under `model.<path>`: the same-named
    parameter of one fresh draw of the un-injected module at `path`."""
    sub = model
    for part in filter(None, path.split(".")):
        sub = (sub.terms[0] if isinstance(sub, InjectedModule) else sub).get_submodule(part)
    fresh, out = dict(_fresh_part(sub, path, make_fresh, {}).named_parameters()), []
    for name, p in trainable_under(model, path):
        key = _canonical(name)[len(path) + 1 if path else 0 :]
        if key not in fresh or fresh[key].shape != p.shape:
            raise ValueError(f"make_fresh['{path}'] gives no parameter '{key}' of shape {tuple(p.shape)}")
        out.append((name, p, fresh[key].to(p.device, p.dtype)))
    return out


@torch.no_grad()
def shrink_perturb(model, paths=("",), shrink=1.0, perturb=0.01, make_fresh=None, targets=(), optimizers=()) -> dict:
    """Shrink-and-perturb (Ash & Adams 2020): θ <- S·θ + P·ε, ε a fresh initialisation, for every trainable
    parameter under each path ("" = the whole network); `optimizers` forget these parameters' state (as a reset
    does), the others keep it. S=1, P=0 changes nothing and draws no random numbers. Logs ||Δθ|| / ||θ||."""
    count, sq_change, sq_norm = 0, 0.0, 0.0
    for path in paths:
        if perturb != 0:
            params = _trainable_with_fresh(model, path, make_fresh)
        else:
            params = [(n, p, None) for n, p in trainable_under(model, path)]
        for name, p, fresh in params:
            for q in [p] + [t.get_parameter(name) for t in targets]:
                before = q.detach().clone()
                q.mul_(shrink)
                if perturb != 0:
                    q.add_(fresh, alpha=perturb)
                if q is p:
                    sq_change += float((p - before).double().pow(2).sum())
                    sq_norm += float(before.double().pow(2).sum())
            for opt in optimizers:
                opt.state.pop(p, None)
            count += p.numel()
    rel_change = math.sqrt(sq_change / sq_norm) if sq_norm > 0 else 0.0
    return {"interventions/shrink_perturb_params": float(count), "interventions/shrink_perturb_rel_change": rel_change}


def reset_modules(model, paths, optimizers=(), make_fresh=None, targets=()) -> dict:
    """Re-initialise the trainable parameters under each `model.<path>` in place (on an injected head: the trainable
    terms only), i.e. shrink-and-perturb with S=0, P=1: they lose their optimizer state, the others keep theirs."""
    log = shrink_perturb(model, paths, 0.0, 1.0, make_fresh, targets, optimizers)
    return {"interventions/reset_params": log["interventions/shrink_perturb_params"]}


def _redo_scan(model: nn.Module, probe, tau: float) -> dict:
    """{hidden layer: (dormant units, the Linear/Conv layers whose input is its activation's output or a view of all
    of it (nn.Flatten), whether they all read it as channels or flat features)} from one forward of the probe."""
    layers = weight_layers(model)
    feats, inputs = record_forward(model, probe, {n: a for n, (_, a) in hidden_layers(model).items()}, layers)
    out = {}
    for n, h in feats.items():
        readers = [r for r, x in inputs.items() if x.data_ptr() == h.data_ptr() and x.numel() == h.numel()]
        fits = all(layers[r].weight.shape[1] in (h.shape[1], h[0].numel()) for r in readers)
        out[n] = (dormant_units(h, tau), readers, fits)
    return out


def _dormant_share(scan: dict, layers: dict) -> float:  # dormant units / units, over the trainable hidden layers
    masks = [d for n, (d, _, _) in scan.items() if layers[n].weight.requires_grad]
    return float(torch.cat(masks).float().mean()) if masks else 0.0


@torch.no_grad()
def redo(model, probe, tau=0.025, optimizers=(), targets=(), make_fresh=None) -> dict:
    """ReDo (Sokar et al. 2023): recycle the hidden units (of a hidden_layers layer that Linear/Conv layers read)
    dormant on the probe. Incoming weights (row, bias entry) get a fresh draw of the layer's init (make_fresh as in
    reset_modules, e.g. PPO's orthogonal init), outgoing ones (its columns in every reader, all of a channel's after
    a flatten) 0: the output moves by at most the units' former contribution, not at all for dead units. A norm
    between layer and activation is part of the unit (its affine entries are reset too: a unit killed by its norm's
    bias would stay dead); it mixes the layer's units, so there the others and the output move too. A layer is
    recycled only if it, its norm and all its readers train (after a head injection: in θ'1, not in the frozen terms
    nor the encoder's output they read). The optimizers' per-entry state (Adam's moments) of the recycled entries
    is zeroed, the rest and `step` kept; targets get the same new values."""
    layers, hidden, scan = weight_layers(model), hidden_layers(model), _redo_scan(model, probe, tau)
    leaves = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    pos, drawn, touched, units = {id(m): i for i, (_, m) in enumerate(leaves)}, {}, {}, 0
    for name, (dormant, readers, fits) in scan.items():
        layer, act = hidden[name]
        parts = [(name, layer)] + [(n, m) for n, m in leaves[pos[id(layer)] + 1 : pos[id(act)]] if list(m.parameters())]
        trains = all(p.requires_grad and p.shape[0] == len(dormant) for _, m in parts for p in m.parameters())
        if not (dormant.any() and readers and fits and trains and all(layers[r].weight.requires_grad for r in readers)):
            continue
        for part_name, part in parts:
            fresh = _fresh_part(part, part_name, make_fresh, drawn)
            for key, p in part.named_parameters(recurse=False):
                rows = dormant.view(-1, *[1] * (p.dim() - 1)).expand_as(p)
                p.copy_(torch.where(rows, fresh.get_parameter(key).to(p), p))
                touched.setdefault(f"{part_name}.{key}", [p, torch.zeros_like(rows)])[1] |= rows
        for r in readers:
            w = layers[r].weight
            cols = dormant.view(1, -1, 1).expand(w.shape[0], -1, w[0].numel() // len(dormant)).reshape(w.shape)
            touched.setdefault(f"{r}.weight", [w, torch.zeros_like(cols)])[1] |= cols
            w.masked_fill_(cols, 0.0)
        units += int(dormant.sum())
    for key, (p, mask) in touched.items():
        states = [v for opt in optimizers for v in opt.state.get(p, {}).values() if torch.is_tensor(v)]
        for state in (s for s in states if s.shape == p.shape):  # Adam's exp_avg and exp_avg_sq, not `step`
            state.masked_fill_(mask, 0.0)
        for target in targets:
            target.get_parameter(key).copy_(torch.where(mask, p, target.get_parameter(key)))
    return {
        "interventions/redo_units": float(units),
        "interventions/redo_dormant_before": _dormant_share(scan, layers),
        "interventions/redo_dormant_after": _dormant_share(_redo_scan(model, probe, tau), layers),
    }


def hidden_layer(layer: nn.Module, layer_norm: bool, activation: str) -> list:
    """`layer` [-> LayerNorm, GroupNorm(1, C) after a conv, with --layer-norm] -> its own --activation module (the
    metrics and ReDo hook it): relu, leaky_relu (slope 0.01) or tanh."""
    act = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh}[activation]()
    if not layer_norm:
        return [layer, act]
    norm = nn.GroupNorm(1, layer.out_channels) if isinstance(layer, nn.Conv2d) else nn.LayerNorm(layer.out_features)
    return [layer, norm, act]


def l2_coef(args, step: int, total_steps: int) -> float:
    """λ of `--l2-schedule` at `step`: none 0; constant --l2-coef; incremental linear from --l2-start to --l2-end
    over the run; periodic --l2-coef for --l2-period-on steps, then 0 for --l2-period-off steps, repeating."""
    if args.l2_schedule == "constant":
        return float(args.l2_coef)
    if args.l2_schedule == "incremental":
        return float(args.l2_start + (args.l2_end - args.l2_start) * min(max(step / max(total_steps, 1), 0.0), 1.0))
    if args.l2_schedule == "periodic":
        return float(args.l2_coef) if step % (args.l2_period_on + args.l2_period_off) < args.l2_period_on else 0.0
    return 0.0


def l2_penalty(module: nn.Module) -> torch.Tensor:
    """Σ w² over the trainable weight matrices and kernels (biases, norms and frozen terms excluded): add
    `l2_coef(args, step, total) * l2_penalty(critic)` to the loss when λ > 0 (no 1/2: the gradient is 2λw)."""
    return torch.stack([p.pow(2).sum() for p in module.parameters() if p.requires_grad and p.dim() >= 2]).sum()


def adaptive_injection_due(args, step: int, metrics: dict, fired: list, start_step: int = 0):
    """The adaptive trigger (--adaptive-inject-*, the metric checked by check_intervention_args): when the metric
    crosses the threshold (at most --adaptive-inject-max-count times, --adaptive-inject-min-gap steps apart, from
    start_step on), append `step` to `fired` (keep it in checkpoints) and return the reason to log; else None."""
    metric, threshold = args.adaptive_inject_metric, args.adaptive_inject_threshold
    if threshold is None or step < start_step or len(fired) >= args.adaptive_inject_max_count:
        return None
    below, value = args.adaptive_inject_direction == "below", float(metrics[metric])
    if value >= threshold if below else value <= threshold:
        return None
    if fired and step - fired[-1] < args.adaptive_inject_min_gap:
        return None
    fired.append(int(step))
    return f"{metric}={value:.6g} {'<' if below else '>'} {threshold:.6g} at step {step}"


def check_intervention_args(args, total_steps: int, metric_keys=None) -> None:
    """Checks of the shared flags beyond their types and ranges (check_ranges): steps inside the run, flags that need
    each other; one-line errors naming the flag. Call before anything is written. metric_keys: plasticity_keys(net)."""
    check_steps("--reset-at", args.reset_at, total_steps)
    check_steps("--shrink-perturb-at", args.shrink_perturb_at, total_steps)
    if args.l2_schedule == "incremental" and args.l2_end < args.l2_start:
        raise UserError(f"--l2-end {args.l2_end} is below --l2-start {args.l2_start}: an incremental schedule grows")
    metric, threshold = args.adaptive_inject_metric, args.adaptive_inject_threshold
    if threshold is None:
        if metric is not None:
            raise UserError("--adaptive-inject-metric needs --adaptive-inject-threshold")
        return
    if metric is None:
        raise UserError(
            "--adaptive-inject-threshold needs --adaptive-inject-metric (e.g. plasticity/erank_features_mean)"
        )
    if args.metrics_every <= 0:
        raise UserError("--adaptive-inject-threshold needs --metrics-every > 0 (the trigger reads the metrics)")
    if metric_keys is not None and metric not in set(metric_keys):
        close = difflib.get_close_matches(metric, sorted(metric_keys), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose one of {', '.join(sorted(metric_keys))}"
        raise UserError(f"--adaptive-inject-metric '{metric}' is not a measured metric; {hint}")


# ==== END SHARED BLOCK: interventions ====


if __name__ == "__main__":
    train(tyro.cli(Args))
