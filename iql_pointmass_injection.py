"""Discrete-action IQL, offline -> online fine-tuning on Pointmass (CS285 hw5), with plasticity injection.

Single-file, cleanRL-style. The script
  1. builds the Pointmass maze (a gymnasium env defined below; PointmassHard-v0 by default),
  2. generates an offline dataset itself (a DQN driven only by an RND bonus, eps = 0.3, as in the
     homework; or uniformly random actions) and caches it under --dataset-dir keyed by a hash of the
     generation settings; or loads the user's own .npz with --dataset,
  3. trains IQL (twin Q with soft targets, V by expectile regression, softmax actor by AWR) offline for
     --offline-steps, then fine-tunes online for --online-steps, adding its own experience to the
     buffer that holds the offline data,
  4. injects plasticity (Nikishin et al., 2023) into the critics at any global steps (--inject-at;
     two steps = double injection), mirrored into the target critics,
  5. evaluates every --eval-every steps and draws the map with an evaluation trajectory (PNG),
  6. offers the baselines of the shared `interventions` block: resets (--reset-at), shrink-and-perturb
     (--shrink-perturb-at), an L2 penalty on the Q loss (--l2-schedule), --layer-norm / --activation,
     and an adaptive injection trigger on a plasticity metric of critic q1 (--adaptive-inject-metric/-threshold).

Global steps: the offline phase is steps 0..N-1, the online phase N..N+M-1 (one gradient update per
step; one environment step per online step).
"""
import hashlib
import json
import os
import random
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Literal, Optional, Sequence

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (networks, sampling, environment noise)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, use the accelerator when one is available (else the CPU)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "plasticity-injection"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    save_model: bool = False
    """whether to save the final networks to `runs/{run_name}/{exp_name}.cleanrl_model`"""

    # Environment and data
    env_id: str = "PointmassHard-v0"
    """the id of the environment: PointmassEasy-v0, PointmassMedium-v0 or PointmassHard-v0"""
    dataset: Optional[str] = None
    """your own offline dataset (.npz with observations, actions, rewards, next_observations, terminals
    [, truncations]); when given, no dataset is generated"""
    dataset_kind: Literal["rnd", "random"] = "rnd"
    """how the offline data is generated: `rnd` (DQN on an RND bonus alone, eps-greedy) or `random`"""
    dataset_dir: str = "datasets"
    """folder of the generated-dataset cache (file name holds a hash of the generation settings)"""
    dataset_steps: int = 10000
    """environment steps of data generation"""
    dataset_seed: Optional[int] = None
    """seed of the data generation (default: --seed)"""
    rnd_epsilon: float = 0.3
    """epsilon of the eps-greedy RND exploration DQN"""

    # Algorithm
    offline_steps: int = 20000
    """gradient steps on the offline data (global steps 0..N-1)"""
    online_steps: int = 40000
    """online fine-tuning steps, one env step + one gradient step each (global steps N..N+M-1)"""
    batch_size: int = 256
    """the batch size of every update"""
    learning_rate: float = 1e-3
    """learning rate of the critics, the value network and the actor (Adam)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """soft target-critic update rate"""
    expectile: float = 0.9
    """expectile of the V regression (0.5 = mean; higher = closer to max_a Q)"""
    beta: float = 10.0
    """inverse temperature of advantage-weighted regression: weight = exp(beta * A)"""
    max_weight: float = 100.0
    """AWR weights are clipped at this value"""
    hidden_sizes: List[int] = field(default_factory=lambda: [64, 64])
    """hidden layer sizes of every network (critics, value, actor)"""
    critic_encoder_layers: int = 1
    """hidden layers of each critic that form the shared encoder; the rest (and the output layer) is the
    head that gets injected. 0 = inject into the whole network (no encoder sharing)"""
    layer_norm: bool = False
    """LayerNorm after every hidden linear layer"""
    activation: Literal["relu", "leaky_relu", "tanh"] = "relu"
    """activation of every hidden layer"""
    online_exploration: Literal["policy", "eps-greedy"] = "eps-greedy"
    """online action choice: sample the softmax policy, or eps-greedy on the actor's argmax"""
    online_epsilon: float = 0.1
    """epsilon of `--online-exploration eps-greedy`"""

    # Evaluation and logging
    eval_every: int = 5000
    """evaluate the greedy policy every this many global steps (and at the end)"""
    eval_episodes: int = 20
    """episodes per evaluation"""
    log_every: int = 1000
    """write losses and SPS every this many global steps"""
    metrics_every: int = 10000
    """measure plasticity metrics of the critic q1 (plasticity/...) every this many global steps; 0 = never
    (they never change training: fixed probe batch with its own RNG, no .grad or optimizer use)"""
    metrics_batch_size: int = 256
    """size of the fixed probe batch of the plasticity metrics (drawn once from the offline data)"""
    dormant_tau: float = 0.025
    """ReDo dormant threshold of the plasticity metrics"""

    # Plasticity injection
    inject_at: List[int] = field(default_factory=list)
    """global steps at which to inject plasticity (empty = never; two steps = double injection)"""
    inject_target: Literal["q", "qv"] = "q"
    """inject into the twin Q heads (and their targets); `qv` also into the value network's head"""
    inject_keep_trainable: bool = False
    """ablation: the old head and both new copies stay trainable"""
    inject_no_third_term: bool = False
    """ablation: no -h_theta'2 term, so the output jumps at injection"""
    inject_reset_optimizer: bool = False
    """reset the Adam state at injection (default keeps the encoder's moments)"""

    # Other interventions to compare against (shared block `interventions`); steps are global steps.
    # Targets: q-head = both Q heads (the injected part, see --critic-encoder-layers), q = both whole Q
    # networks, qv-head / qv = the same plus V's head / all of V, actor, all = Q, V and actor.
    # Whatever touches the Q networks is mirrored into the target critics (same new values).
    reset_at: List[int] = field(default_factory=list)
    """global step(s) at which to re-initialise --reset-target (the replay buffer is kept)"""
    reset_target: Literal["q-head", "q", "qv-head", "qv", "actor", "all"] = "q-head"
    """what --reset-at re-initialises (PyTorch default init, as at the start); the reset parameters also
    lose their Adam state, every other parameter keeps it"""
    shrink_perturb_at: List[int] = field(default_factory=list)
    """global step(s) at which to shrink-and-perturb --shrink-perturb-target: theta <- S*theta + P*eps"""
    shrink_perturb_target: Literal["q-head", "q", "qv-head", "qv", "actor", "all"] = "q"
    """what --shrink-perturb-at changes (Adam state is kept)"""
    sp_shrink: float = 1.0
    """shrink factor S of shrink-and-perturb"""
    sp_perturb: float = 0.01
    """perturbation factor P of shrink-and-perturb (eps: a fresh default initialisation)"""
    l2_schedule: Literal["none", "constant", "incremental", "periodic"] = "none"
    """L2 penalty lambda * sum(w^2) over the twin Q networks' trainable weight matrices, added to the Q loss
    (`losses/q_loss` includes it): constant --l2-coef, incremental --l2-start -> --l2-end over all
    global steps, or periodic (--l2-coef on for --l2-period-on steps, off for --l2-period-off)"""
    l2_coef: float = 1e-5
    """L2 coefficient (constant schedule, and periodic while on)"""
    l2_start: float = 0.0
    """incremental L2: coefficient at global step 0"""
    l2_end: float = 1e-4
    """incremental L2: coefficient at the last global step"""
    l2_period_on: int = 500000
    """periodic L2: steps with the penalty on (starting at global step 0)"""
    l2_period_off: int = 100000
    """periodic L2: steps with the penalty off"""
    adaptive_inject_metric: Optional[str] = None
    """inject into the critics (as --inject-at does, --inject-target honoured) when this plasticity key of
    critic q1 (e.g. plasticity/erank_features_mean) crosses --adaptive-inject-threshold"""
    adaptive_inject_threshold: Optional[float] = None
    """threshold of the adaptive injection trigger (setting it turns the trigger on; needs --metrics-every)"""
    adaptive_inject_direction: Literal["below", "above"] = "below"
    """fire when the metric is below / above the threshold"""
    adaptive_inject_min_gap: int = 0
    """at least this many global steps between two adaptive injections"""
    adaptive_inject_max_count: int = 1
    """at most this many adaptive injections"""


# ----------------------------------------------------------------------------------------------
# Environment: Pointmass mazes of CS285 homework 5.
# ----------------------------------------------------------------------------------------------
_FOUR_ROOMS = [  # 11 x 11, 1 = wall
    "00000100000",
    "00000100000",
    "00000000000",
    "00000100000",
    "00000100000",
    "10111100000",
    "00000111011",
    "00000100000",
    "00000100000",
    "00000000000",
    "00000100000",
]
_MAZE_5X5 = ["00000", "11110", "11110", "11110", "11110"]
_MAZE_6X6 = ["001000", "101010", "001011", "011001", "001101", "100001"]

# level -> (base map, scale, start, goal, success radius, time limit); start/goal in scaled cells.
LEVELS = {
    "PointmassEasy-v0": (_MAZE_5X5, 2, (1.0, 1.0), (9.0, 9.0), 2.0, 50),
    "PointmassMedium-v0": (_MAZE_6X6, 1, (0.5, 0.5), (1.5, 5.5), 1.0, 150),
    "PointmassHard-v0": (_FOUR_ROOMS, 2, (2.0, 2.0), (20.0, 20.0), 2.0, 100),
}
ACTIONS = np.array([[0.0, 0.0], [0.0, -1.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])


def level_walls(env_id: str) -> np.ndarray:
    rows, scale = LEVELS[env_id][0], LEVELS[env_id][1]
    walls = np.array([[c == "1" for c in r] for r in rows], dtype=bool)
    return walls.repeat(scale, axis=0).repeat(scale, axis=1)


class PointmassEnv(gym.Env):
    """A point in a 2-D maze. Position (row, col) in map cells; observation = position / map size.

    Actions: 0 stay, 1 (0,-1), 2 (0,+1), 3 (-1,0), 4 (+1,0). The move is perturbed with Gaussian noise
    (sigma 0.5) and applied as 10 sub-steps of 0.1 * move; in each sub-step each axis moves on its own
    and a move into a wall or off the map is skipped. Reward -1 per step, 0 when the goal is reached
    (`terminated`); the time limit gives `truncated`.
    """

    metadata = {"render_modes": []}

    def __init__(self, env_id: str = "PointmassHard-v0", action_noise: float = 0.5):
        if env_id not in LEVELS:
            raise UserError(f"--env-id {env_id!r} is unknown; choose one of {sorted(LEVELS)}")
        self.env_id = env_id
        _, _, start, goal, radius, limit = LEVELS[env_id]
        self.walls = level_walls(env_id)
        self.height, self.width = self.walls.shape
        self.start = np.array(start, dtype=np.float64)
        self.goal = np.array(goal, dtype=np.float64)
        self.success_radius = radius
        self.max_episode_steps = limit
        self.action_noise = action_noise
        self.action_space = gym.spaces.Discrete(5)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(2,), dtype=np.float32)
        self._scale = np.array([self.height, self.width], dtype=np.float64)
        self.state = self.start.copy()
        self.t = 0

    def blocked(self, pos) -> bool:
        r, c = pos
        if r < 0 or c < 0 or r > self.height or c > self.width:
            return True
        i, j = min(int(r), self.height - 1), min(int(c), self.width - 1)
        return bool(self.walls[i, j])

    def move(self, pos: np.ndarray, a: np.ndarray) -> np.ndarray:
        """Noise-free dynamics: 10 sub-steps of 0.1 * a, each axis separately, walls skip a sub-move."""
        pos = pos.copy()
        for _ in range(10):
            for axis in (0, 1):
                new = pos.copy()
                new[axis] += 0.1 * a[axis]
                if not self.blocked(new):
                    pos = new
        return pos

    def obs(self) -> np.ndarray:
        return (self.state / self._scale).astype(np.float32)

    def reset(self, *, seed: Optional[int] = None, options=None):
        super().reset(seed=seed)
        self.state = self.start.copy()
        self.t = 0
        return self.obs(), {}

    def step(self, action):
        a = ACTIONS[int(action)] + self.np_random.normal(0.0, self.action_noise, size=2)
        self.state = self.move(self.state, a)
        self.t += 1
        success = bool(np.linalg.norm(self.state - self.goal) < self.success_radius)
        reward = 0.0 if success else -1.0
        truncated = (not success) and self.t >= self.max_episode_steps
        return self.obs(), reward, success, truncated, {"success": success}


for _id in LEVELS:
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=PointmassEnv, kwargs={"env_id": _id})


class ShortestPathController:
    """Reference policy: BFS distances over free cells to the goal cell, then the action whose
    noise-free move lands in the cell closest to the goal (ties: Euclidean distance)."""

    def __init__(self, env: PointmassEnv):
        self.env = env
        h, w = env.height, env.width
        dist = np.full((h, w), np.inf)
        goal = (int(env.goal[0]), int(env.goal[1]))
        dist[goal] = 0
        queue = deque([goal])
        while queue:
            i, j = queue.popleft()
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                a, b = i + di, j + dj
                if 0 <= a < h and 0 <= b < w and not env.walls[a, b] and dist[a, b] == np.inf:
                    dist[a, b] = dist[i, j] + 1
                    queue.append((a, b))
        self.dist = dist

    def __call__(self, obs: np.ndarray) -> int:
        env = self.env
        pos = np.asarray(obs, dtype=np.float64) * env._scale
        best, best_key = 0, None
        for k, a in enumerate(ACTIONS):
            p = env.move(pos, a)
            i, j = min(int(p[0]), env.height - 1), min(int(p[1]), env.width - 1)
            key = (self.dist[i, j], float(np.linalg.norm(p - env.goal)))
            if best_key is None or key < best_key:
                best, best_key = k, key
        return best


def draw_trajectory(env: PointmassEnv, traj: np.ndarray, path: str, title: str = "") -> None:
    """Save a PNG of the map (walls grey), start, goal region and a trajectory of positions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
    ax.imshow(env.walls, cmap="Greys", vmin=0, vmax=2, origin="upper",
              extent=(0, env.width, env.height, 0))
    ax.add_patch(plt.Circle((env.goal[1], env.goal[0]), env.success_radius, color="green", alpha=0.3))
    ax.plot(traj[:, 1], traj[:, 0], "b.-", alpha=0.7, markersize=3)
    ax.plot(env.start[1], env.start[0], "r+", markersize=12, label="start")
    ax.plot(env.goal[1], env.goal[0], "g*", markersize=12, label="goal")
    ax.set_xlim(0, env.width)
    ax.set_ylim(env.height, 0)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower left", fontsize=7)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    os.close(fd)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
def mlp(in_dim: int, hidden: Sequence[int], out_dim: Optional[int], layer_norm: bool = False,
        activation: str = "relu") -> nn.Sequential:
    """Linear (+ LayerNorm) + activation per hidden size, then a Linear to out_dim (None: no output layer).
    Built by the interventions block's `build_mlp` (default PyTorch init; `--layer-norm`: nn.LayerNorm;
    `--activation leaky_relu`: nn.LeakyReLU(0.01))."""
    return build_mlp(in_dim, hidden, out_dim, layer_norm=layer_norm, activation=activation)


class SplitNet(nn.Module):
    """encoder (first `encoder_layers` hidden layers; Identity when 0) followed by head (the rest).
    The head is what plasticity injection replaces."""

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int], encoder_layers: int,
                 layer_norm: bool = False, activation: str = "relu"):
        super().__init__()
        hidden = list(hidden)
        self.encoder = mlp(in_dim, hidden[:encoder_layers], None, layer_norm, activation) if encoder_layers else nn.Identity()
        enc_dim = hidden[encoder_layers - 1] if encoder_layers else in_dim
        self.head = mlp(enc_dim, hidden[encoder_layers:], out_dim, layer_norm, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class TwinQ(nn.Module):
    """Two independent Q(s, .) networks over the discrete actions."""

    def __init__(self, obs_dim: int, n_actions: int, args: Args):
        super().__init__()
        kw = dict(layer_norm=args.layer_norm, activation=args.activation)
        self.q1 = SplitNet(obs_dim, n_actions, args.hidden_sizes, args.critic_encoder_layers, **kw)
        self.q2 = SplitNet(obs_dim, n_actions, args.hidden_sizes, args.critic_encoder_layers, **kw)

    def forward(self, x: torch.Tensor):
        return self.q1(x), self.q2(x)


# ----------------------------------------------------------------------------------------------
# Replay buffer (offline data first, then the agent's own experience)
# ----------------------------------------------------------------------------------------------
class ReplayBuffer:
    def __init__(self, data: Dict[str, np.ndarray], extra: int, device: torch.device):
        n = len(data["actions"])
        cap = n + extra
        self.obs = np.zeros((cap, 2), np.float32)
        self.next_obs = np.zeros((cap, 2), np.float32)
        self.actions = np.zeros(cap, np.int64)
        self.rewards = np.zeros(cap, np.float32)
        self.terminals = np.zeros(cap, np.float32)
        self.obs[:n] = data["observations"]
        self.next_obs[:n] = data["next_observations"]
        self.actions[:n] = data["actions"]
        self.rewards[:n] = data["rewards"]
        self.terminals[:n] = data["terminals"]
        self.size, self.device = n, device

    def add(self, obs, action, reward, next_obs, terminal) -> None:
        i = self.size
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_obs[i], self.terminals[i] = next_obs, float(terminal)
        self.size += 1

    def sample(self, batch_size: int, rng: np.random.Generator):
        idx = rng.integers(0, self.size, size=batch_size)
        d = self.device
        return (torch.as_tensor(self.obs[idx], device=d), torch.as_tensor(self.actions[idx], device=d),
                torch.as_tensor(self.rewards[idx], device=d), torch.as_tensor(self.next_obs[idx], device=d),
                torch.as_tensor(self.terminals[idx], device=d))


# ==== BEGIN SHARED BLOCK: common (canonical: shared_blocks/common.py; sync: python tools/sync_blocks.py) ====
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
# ==== END SHARED BLOCK: common ====
# ==== BEGIN SHARED BLOCK: injection (canonical: shared_blocks/injection.py; sync: python tools/sync_blocks.py) ====
# Plasticity injection (Nikishin et al., NeurIPS 2023), generic over any nn.Module head.
#
#   f(x) = h_θ(x) + h_θ'1(x) − h_θ'2(x)
#
# h_θ is the head as trained so far (frozen); θ'1 and θ'2 are two copies of ONE fresh
# initialisation, θ'1 trainable and θ'2 frozen. At the injection step the output is unchanged
# (θ'1 = θ'2) and the number of trainable parameters is unchanged. Injecting again freezes
# everything trainable in the head and adds a new pair (double / multiple injection).
# The whole injection state (terms, signs, which terms are frozen) lives in buffers, so a
# state_dict describes the injected network completely; `load_injected_state_dict` rebuilds it.
import copy as _copy
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn


class InjectedModule(nn.Module):
    """y(x) = term_0(x) + Σ_k (term_2k+1(x) − term_2k+2(x)): the head, then one pair per injection.

    When the input carries no gradient (e.g. raw observations, or an encoder that is itself
    frozen), the frozen terms run under `torch.no_grad()`; their outputs can also be computed once
    with `frozen_outputs` and passed back as `forward(x, frozen_out=...)` to avoid recomputation.
    When the input does carry a gradient (a shared trainable encoder), all terms are part of the
    graph, so gradients from every term still reach the encoder, but frozen parameters get none.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.terms = nn.ModuleList([original])
        self.register_buffer("signs", torch.ones(1))
        self.register_buffer("term_trainable", torch.ones(1, dtype=torch.bool))
        self.register_buffer("injection_count", torch.zeros((), dtype=torch.long))
        self._sync_python_flags()

    def _sync_python_flags(self) -> None:
        # Python mirrors of the buffers, so forward() never syncs with an accelerator.
        self._signs = [float(s) for s in self.signs]
        self._trainable = [bool(t) for t in self.term_trainable]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_python_flags()

    # -- structure -----------------------------------------------------------------------
    def add_term(self, module: nn.Module, sign: float, trainable: bool) -> None:
        for p in module.parameters():
            p.requires_grad_(trainable)
        self.terms.append(module)
        dev = self.signs.device
        self.signs = torch.cat([self.signs, torch.tensor([float(sign)], device=dev)])
        self.term_trainable = torch.cat([self.term_trainable, torch.tensor([trainable], device=dev)])
        self._sync_python_flags()

    def set_term_trainable(self, i: int, trainable: bool) -> None:
        for p in self.terms[i].parameters():
            p.requires_grad_(trainable)
        self.term_trainable[i] = trainable
        self._sync_python_flags()

    def apply_trainable_mask(self) -> None:
        """Set requires_grad of every term from the saved `term_trainable` buffer."""
        self._sync_python_flags()
        for term, trainable in zip(self.terms, self._trainable):
            for p in term.parameters():
                p.requires_grad_(trainable)

    def frozen_terms(self) -> List[nn.Module]:
        return [t for t, tr in zip(self.terms, self._trainable) if not tr]

    def trainable_terms(self) -> List[nn.Module]:
        return [t for t, tr in zip(self.terms, self._trainable) if tr]

    # -- forward ---------------------------------------------------------------------------
    def frozen_outputs(self, x: torch.Tensor) -> List[Optional[torch.Tensor]]:
        """Output of every frozen term (None for trainable ones); reusable via forward(frozen_out=)."""
        need_graph = torch.is_grad_enabled() and x.requires_grad
        with torch.set_grad_enabled(need_graph):
            return [None if tr else term(x) for term, tr in zip(self.terms, self._trainable)]

    def forward(self, x: torch.Tensor, frozen_out: Optional[List[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        outs = self.frozen_outputs(x) if frozen_out is None else frozen_out
        ys = [y if y is not None else term(x) for y, term in zip(outs, self.terms)]
        # Evaluate as h + (h'1 − h'2) + (h''1 − h''2) + ...: each pair is exactly 0 when injected,
        # so the output is bit-for-bit unchanged at the injection step.
        out, i, n = ys[0], 1, len(ys)
        while i < n:
            if i + 1 < n and self._signs[i] == 1.0 and self._signs[i + 1] == -1.0:
                out = out + (ys[i] - ys[i + 1])
                i += 2
            else:
                out = out.add(ys[i], alpha=self._signs[i])
                i += 1
        return out


def fresh_like(module: nn.Module) -> nn.Module:
    """A fresh copy of `module` drawn with its own init scheme (`reset_parameters` of every layer)."""
    if isinstance(module, InjectedModule):
        module = module.terms[0]
    fresh = _copy.deepcopy(module)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    for p in fresh.parameters():
        p.requires_grad_(True)
    return fresh


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    if not path:
        raise ValueError("cannot inject into the root module itself: wrap it and give a sub-module path")
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def inject(
    model: nn.Module,
    path: str,
    *,
    fresh: Optional[nn.Module] = None,
    make_fresh: Optional[Callable[[], nn.Module]] = None,
    keep_trainable: bool = False,
    third_term: bool = True,
) -> nn.Module:
    """Inject plasticity into the sub-module `model.<path>` in place; return the fresh module used.

    fresh:          use these exact values for the new pair (to mirror a target network).
    make_fresh:     factory for the fresh head (default: deepcopy + reset_parameters).
    keep_trainable: ablation, every term stays trainable (old head, θ'1 and θ'2).
    third_term:     False is the ablation without −h_θ'2: the output jumps at injection.
    """
    head = model.get_submodule(path)
    device = next(head.parameters()).device
    if not isinstance(head, InjectedModule):
        head = InjectedModule(head).to(device)
        _set_submodule(model, path, head)
    if not keep_trainable:
        for i in range(len(head.terms)):
            head.set_term_trainable(i, False)
    if fresh is None:
        fresh = make_fresh() if make_fresh is not None else fresh_like(head)
    fresh = fresh.to(device)
    head.add_term(_copy.deepcopy(fresh), +1.0, trainable=True)
    if third_term:
        head.add_term(_copy.deepcopy(fresh), -1.0, trainable=keep_trainable)
    head.injection_count += 1
    return fresh


def injection_counts(model: nn.Module) -> Dict[str, int]:
    return {n: int(m.injection_count) for n, m in model.named_modules() if isinstance(m, InjectedModule)}


def load_injected_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True):
    """Load a state_dict saved from an injected model into a freshly built (un-injected) model.

    The injected structure (number of terms, signs, frozen flags) is read from the state_dict's
    buffers, rebuilt with placeholder terms, then every value is loaded, so the reloaded model
    computes the same function and trains the same parameters.
    """
    for key, signs in state_dict.items():
        if not key.endswith(".signs") or key[: -len("signs")] + "injection_count" not in state_dict:
            continue
        path = key[: -len(".signs")]
        head = model.get_submodule(path)
        if not isinstance(head, InjectedModule):
            head = InjectedModule(head).to(signs.device)
            _set_submodule(model, path, head)
        while len(head.terms) < len(signs):
            head.add_term(_copy.deepcopy(head.terms[0]), 1.0, trainable=True)
    result = model.load_state_dict(state_dict, strict=strict)
    for m in model.modules():
        if isinstance(m, InjectedModule):
            m.apply_trainable_mask()
    return result


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def refresh_optimizer(
    optimizer: torch.optim.Optimizer,
    replaced: List[tuple] = (),
    reset_state: bool = False,
) -> None:
    """Re-point `optimizer` after an injection.

    replaced: (ids of the head's trainable parameters before injection, new trainable parameters)
    pairs: the new parameters join the param group that held the old ones, with fresh state.
    Parameters that are now frozen leave the optimizer with their state. Surviving parameters
    (e.g. the shared encoder) keep their Adam moments unless `reset_state`, which clears the state
    of every parameter (moments and step counts back to zero).
    """
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        for old_ids, new_params in replaced:
            if ids & set(old_ids):
                group["params"].extend(p for p in new_params if id(p) not in ids)
        for p in group["params"]:
            if not p.requires_grad:
                optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if p.requires_grad]
    if reset_state:
        optimizer.state.clear()


def _flat_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().flatten()
    return torch.cat([_flat_output(o) for o in out])


@torch.no_grad()
def _probe_output(model: nn.Module, probe, forward: Optional[Callable]) -> torch.Tensor:
    return _flat_output(forward(model, probe) if forward is not None else model(probe))


def apply_injection(
    model: nn.Module,
    paths: Iterable[str],
    probe,
    *,
    targets: Iterable[nn.Module] = (),
    optimizers: Iterable[torch.optim.Optimizer] = (),
    reset_optimizer: bool = False,
    make_fresh: Optional[Dict[str, Callable[[], nn.Module]]] = None,
    keep_trainable: bool = False,
    third_term: bool = True,
    forward: Optional[Callable] = None,
) -> Dict[str, float]:
    """Inject into each `paths` entry of `model`, mirror the SAME fresh values into every target
    network (same paths), re-point the optimizers, and return the values to log.

    injection/output_change is max |f_after(probe) − f_before(probe)|: 0 with the third term.
    """
    paths = list(paths)
    targets = list(targets)
    trainable_before = count_params(model, trainable_only=True)
    before = _probe_output(model, probe, forward)
    targets_before = [_probe_output(t, probe, forward) for t in targets]
    replaced = []
    for path in paths:
        old_ids = {id(p) for p in model.get_submodule(path).parameters() if p.requires_grad}
        factory = (make_fresh or {}).get(path)
        fresh = inject(model, path, make_fresh=factory, keep_trainable=keep_trainable, third_term=third_term)
        new = [p for p in model.get_submodule(path).parameters() if p.requires_grad and id(p) not in old_ids]
        replaced.append((old_ids, new))
        for t in targets:
            inject(t, path, fresh=fresh, keep_trainable=keep_trainable, third_term=third_term)
    for opt in optimizers:
        refresh_optimizer(opt, replaced, reset_state=reset_optimizer)
    after = _probe_output(model, probe, forward)
    log = {
        "injection/count": float(max(injection_counts(model).values())),
        "injection/output_change": float((after - before).abs().max()),
        "injection/trainable_params": float(count_params(model, trainable_only=True)),
        "injection/trainable_params_before": float(trainable_before),
        "injection/total_params": float(count_params(model)),
    }
    for k, (t, tb) in enumerate(zip(targets, targets_before)):
        log["injection/target_output_change" + (f"_{k}" if k else "")] = float(
            (_probe_output(t, probe, forward) - tb).abs().max()
        )
    return log
# ==== END SHARED BLOCK: injection ====
# ==== BEGIN SHARED BLOCK: plasticity (canonical: shared_blocks/plasticity.py; sync: python tools/sync_blocks.py) ====
# Plasticity diagnostics, generic over any nn.Module, logged under `plasticity/...`.
#
#   metrics = measure_plasticity(model, probe_inputs, loss_fn=None, tau=args.dormant_tau,
#                                forward=None, prefix="plasticity")
#   for k, v in metrics.items(): writer.add_scalar(k, v, global_step)
#
# Call it every `--metrics-every` steps on a FIXED probe batch of `--metrics-batch-size` (256)
# samples drawn once (e.g. from the replay buffer when metrics start, with its own
# np.random.default_rng(seed) so the training RNG stream is not consumed), so every point of a
# curve measures the same inputs. It runs one forward under no_grad (feature metrics) and, when
# loss_fn is given, one torch.autograd.grad on the trainable parameters (gradient metrics). It never
# touches `.grad`, the optimizer, the train/eval mode or the RNG (unless your forward/loss_fn draw
# random numbers), so training with and without metrics gives the same numbers. DQN example:
#   obs, act, target_q = probe            # fixed tensors; target_q computed once or per call
#   loss_fn = lambda m: F.smooth_l1_loss(m(obs).gather(1, act).squeeze(1), target_q)
#   metrics = measure_plasticity(q_network, obs, loss_fn=loss_fn, tau=args.dormant_tau)
# Cost (benchmark/metrics_overhead.py): NatureCNN + head, probe 256, 1 CPU thread ~0.5 s a call
# with loss_fn; MLP 2-256-256-5 ~20 ms.
#
# Layers. Every Linear/Conv layer is measured (weights). A layer is *hidden* when, in module
# registration order, it is followed by an activation module (optionally after a LayerNorm /
# GroupNorm / BatchNorm / Dropout / Identity); its features are that activation's output. The
# final output layer is followed by no activation, so it has weight metrics only. Each hidden
# layer needs its own activation module instance (a reused one raises ValueError); activations
# called functionally (F.relu) are invisible: use modules.
#
# Units. A Linear layer's units are its outputs; a conv layer's units are its channels. The conv
# feature matrix for the effective rank has one row per (sample, position) and one column per
# channel, i.e. (B*H*W) x C, so erank ranges over [1, C] like a Linear layer's [1, units];
# dormant scores average over batch and positions; the feature norm is the L2 norm of the whole
# flattened (C*H*W) feature map per sample.
#
# Keys, with <layer> the module path of the Linear/Conv layer, <role> `trainable` or `frozen`
# (from the layer's weight.requires_grad; after an injection `head.terms.0.*` is the frozen
# original head, `head.terms.<2k+1>.*` the trainable copy added by injection k+1 and
# `head.terms.<2k+2>.*` its frozen twin, see the injection block):
#   <prefix>/<role>/<layer>/weight_magnitude    mean |w| over the weight tensor (bias excluded)
#   <prefix>/<role>/<layer>/erank_weights       effective rank of w reshaped to out x (in*k*k)
#   <prefix>/<role>/<layer>/erank_features      hidden layers: effective rank of the feature matrix
#   <prefix>/<role>/<layer>/dormant_ratio       hidden layers: share of units with s_i <= tau (ReDo)
#   <prefix>/<role>/<layer>/feature_norm        hidden layers: mean over samples of ||h(x)||_2
#   <prefix>/trainable/<layer>/updated_units_pct  with loss_fn: % of units whose incoming weights
#                                               or bias got a non-zero gradient on the batch
#   <prefix>/trainable/<layer>/grad_norm        with loss_fn: L2 norm of the layer's gradient
#   <prefix>/<metric>_mean                      average over TRAINABLE layers of each metric above
#   <prefix>/frozen/<metric>_mean               average over frozen layers (only once some exist)
#   <prefix>/grad_norm                          with loss_fn: global L2 norm over all trainable params
# Frozen layers get no gradient metrics. Feature metrics of a frozen head still move when the
# encoder feeding it keeps training (shared encoder); its weight metrics are constant.
# A non-injected network is all `trainable`, so its curves continue under the same keys.
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

_PL_ACTIVATIONS = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish,
)
_PL_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PL_PASS_THROUGH = (
    nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Dropout, nn.Identity,
)


def _pl_f64(x: torch.Tensor) -> torch.Tensor:
    # float64 for exact ranks; MPS has no float64, so go through the CPU there.
    return x.detach().to("cpu" if x.device.type == "mps" else x.device, torch.float64)


def effective_rank(matrix: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli (2007): exp(entropy of p_k = σ_k / Σσ). A zero matrix gives 0.

    Any 2-D shape; singular values come from the smaller Gram matrix in float64.
    """
    x = _pl_f64(matrix).reshape(matrix.shape[0], -1)
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=x.device)
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


def dormant_ratio(features: torch.Tensor, tau: float = 0.025) -> torch.Tensor:
    """ReDo (Sokar et al. 2023): s_i = mean|h_i| / mean_j mean|h_j|; share of units with s_i <= tau.

    features: (B, units) or (B, C, *spatial) (units = channels, mean over batch and positions).
    All-zero features count as fully dormant (1.0).
    """
    score = unit_matrix(features).detach().abs().float().mean(0)
    avg = score.mean()
    s = torch.where(avg > 0, score / avg.clamp_min(torch.finfo(score.dtype).tiny), torch.zeros_like(score))
    return (s <= tau).float().mean()


def updated_units_fraction(grad_weight: Optional[torch.Tensor], grad_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Share of units (rows of the weight = output units / channels) whose incoming weights or
    bias got a non-zero gradient. A missing gradient (None) counts as zero."""
    if grad_weight is None:
        return torch.zeros(())
    hit = (grad_weight.reshape(grad_weight.shape[0], -1) != 0).any(1)
    if grad_bias is not None:
        hit = hit | (grad_bias != 0)
    return hit.float().mean()


def weight_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """module path -> every Linear/Conv layer of the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _PL_WEIGHT_LAYERS)}


def hidden_layers(model: nn.Module) -> Dict[str, Tuple[nn.Module, nn.Module]]:
    """module path -> (layer, activation) for every Linear/Conv layer followed by an activation."""
    # remove_duplicate=False to see a reused activation; a layer registered under two names
    # (e.g. SB3's pi_/vf_features_extractor aliases) is measured once, under its first name.
    leaves = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if next(m.children(), None) is None]
    out, owner, seen = {}, {}, set()
    for i, (name, m) in enumerate(leaves):
        if not isinstance(m, _PL_WEIGHT_LAYERS) or id(m) in seen:
            continue
        seen.add(id(m))
        for _, nxt in leaves[i + 1:]:
            if isinstance(nxt, _PL_ACTIVATIONS):
                if owner.setdefault(id(nxt), name) != name:
                    raise ValueError(
                        f"the activation module after '{owner[id(nxt)]}' is reused after '{name}': "
                        "give each layer its own activation module to measure plasticity"
                    )
                out[name] = (m, nxt)
                break
            if not isinstance(nxt, _PL_PASS_THROUGH):
                break
    return out


@torch.no_grad()
def _pl_capture_features(model: nn.Module, probe_inputs, forward: Optional[Callable]) -> Dict[str, torch.Tensor]:
    feats: Dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(_module, _inputs, output):
            feats.setdefault(name, output.detach())  # first call wins if a forward reuses a layer
        return hook

    handles = [act.register_forward_hook(hook_for(n)) for n, (_, act) in hidden_layers(model).items()]
    try:
        forward(model, probe_inputs) if forward is not None else model(probe_inputs)
    finally:
        for h in handles:
            h.remove()
    return feats


def measure_plasticity(
    model: nn.Module,
    probe_inputs: Any,
    loss_fn: Optional[Callable[[nn.Module], torch.Tensor]] = None,
    tau: float = 0.025,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    prefix: str = "plasticity",
) -> Dict[str, float]:
    """Plasticity diagnostics of `model` on a fixed probe batch; flat {key: float} (keys above).

    probe_inputs: what `forward(model, probe_inputs)` (default `model(probe_inputs)`) takes, e.g.
                  the scaled observations of the probe batch. Run under torch.no_grad.
    loss_fn:      optional `loss_fn(model) -> scalar`, the training loss on the probe batch (close
                  over actions/targets); enables updated_units_pct and grad_norm. It must not call
                  .backward(): gradients come from torch.autograd.grad and never reach `.grad`.
    tau:          dormant threshold (`--dormant-tau`).
    prefix:       key prefix, e.g. "plasticity/critic" when measuring several networks.
    """
    feats = _pl_capture_features(model, probe_inputs, forward)
    grads: Dict[int, Optional[torch.Tensor]] = {}
    vals: Dict[str, torch.Tensor] = {}
    if loss_fn is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.enable_grad():
            loss = loss_fn(model)
            gs = torch.autograd.grad(loss, params, allow_unused=True) if params else []
        grads = {id(p): g for p, g in zip(params, gs)}
        present = [g.detach().float().pow(2).sum() for g in gs if g is not None]
        vals[f"{prefix}/grad_norm"] = torch.stack(present).sum().sqrt() if present else torch.zeros(())
    per_role: Dict[str, Dict[str, list]] = {"trainable": {}, "frozen": {}}
    for name, layer in weight_layers(model).items():
        w = layer.weight.detach()
        role = "trainable" if layer.weight.requires_grad else "frozen"
        m = {
            "weight_magnitude": w.abs().float().mean(),
            "erank_weights": effective_rank(w.reshape(w.shape[0], -1)),
        }
        if name in feats:
            h = feats[name]
            m["erank_features"] = effective_rank(unit_matrix(h))
            m["dormant_ratio"] = dormant_ratio(h, tau)
            m["feature_norm"] = h.float().reshape(h.shape[0], -1).norm(dim=1).mean()
        if loss_fn is not None and role == "trainable":
            gw = grads.get(id(layer.weight))
            gb = grads.get(id(layer.bias)) if layer.bias is not None else None
            m["updated_units_pct"] = 100.0 * updated_units_fraction(gw, gb)
            parts = [g.detach().float().pow(2).sum() for g in (gw, gb) if g is not None]
            m["grad_norm"] = torch.stack(parts).sum().sqrt() if parts else torch.zeros(())
        for metric, v in m.items():
            vals[f"{prefix}/{role}/{name}/{metric}"] = v
            per_role[role].setdefault(metric, []).append(v)
    dev = next(model.parameters()).device
    for role, metrics in per_role.items():
        head = prefix if role == "trainable" else f"{prefix}/frozen"
        for metric, vs in metrics.items():
            vals[f"{head}/{metric}_mean"] = torch.stack([v.to(dev, torch.float64) for v in vs]).mean()
    keys = list(vals)  # one device->host transfer for all numbers
    numbers = torch.stack([vals[k].detach().to(dev, torch.float64) for k in keys]).cpu().tolist()
    return dict(zip(keys, numbers))


def plasticity_keys(model: nn.Module, with_grads: bool = True, prefix: str = "plasticity") -> set:
    """The `_mean` keys measure_plasticity returns for `model` as it is now (before any injection),
    e.g. to validate `--adaptive-inject-metric` before a run starts. Per-layer keys are not listed."""
    metrics = ["weight_magnitude", "erank_weights"]
    if hidden_layers(model):
        metrics += ["erank_features", "dormant_ratio", "feature_norm"]
    keys = set()
    if any(l.weight.requires_grad for l in weight_layers(model).values()):
        keys |= {f"{prefix}/{m}_mean" for m in metrics}
        if with_grads:
            keys |= {f"{prefix}/updated_units_pct_mean", f"{prefix}/grad_norm_mean", f"{prefix}/grad_norm"}
    return keys
# ==== END SHARED BLOCK: plasticity ====
# ==== BEGIN SHARED BLOCK: interventions (canonical: shared_blocks/interventions.py; sync: python tools/sync_blocks.py) ====
# Interventions to compare plasticity injection against, generic over any nn.Module: resets,
# shrink-and-perturb, L2 schedules, LayerNorm / LeakyReLU network builders, an adaptive trigger,
# and the validation of their flags. Uses UserError / check_steps (common block) and
# InjectedModule (injection block).
#
# Flags every script defines (same names; python attribute = snake_case; [default]):
#   --metrics-every N            measure plasticity every N env steps, 0 = never [script-specific]
#   --metrics-batch-size B       size of the fixed probe batch [256]
#   --dormant-tau T              ReDo dormant threshold, 0 <= T <= 1 [0.025]
#   --reset-at STEP [STEP ...]   re-initialise --reset-target at these steps [empty]
#   --reset-target NAME          what to reset [script-specific choices, e.g. head]
#   --shrink-perturb-at STEP [STEP ...]  shrink-and-perturb --shrink-perturb-target at these steps [empty]
#   --shrink-perturb-target NAME what to shrink-and-perturb [script-specific choices, e.g. all]
#   --sp-shrink S                θ <- S·θ + P·ε [1.0]
#   --sp-perturb P               [0.01]
#   --l2-schedule {none,constant,incremental,periodic}  L2 on the critic loss [none]
#   --l2-coef λ                  constant λ, and periodic λ while on [1e-5]
#   --l2-start / --l2-end        incremental: λ linear from start to end over the run [0.0, 1e-4]
#   --l2-period-on / --l2-period-off  periodic: λ on for N steps, off for M, repeating [500000, 100000]
#   --layer-norm                 LayerNorm after every hidden conv/linear layer [False]
#   --activation {relu,leaky_relu}  hidden activation; tanh is also accepted [relu]
#   --adaptive-inject-metric KEY inject when this measure_plasticity key crosses the threshold [None]
#   --adaptive-inject-threshold X   setting it turns the adaptive trigger on [None]
#   --adaptive-inject-direction {below,above}  fire when the metric is below / above X [below]
#   --adaptive-inject-min-gap N  at least N env steps between two adaptive injections [0]
#   --adaptive-inject-max-count K   at most K adaptive injections [1]
#
# How a script uses it (steps are env steps; with vector envs act at the first step >= STEP):
#   check_intervention_args(args, args.total_timesteps, plasticity_keys(net))  # before runs/ exists
#   net = ... build_mlp / NatureCNNEncoder(layer_norm=args.layer_norm, activation=args.activation)
#   trigger = AdaptiveTrigger.from_args(args)            # None unless --adaptive-inject-threshold
#   if step in reset steps:  log = reset_modules(net, [path], optimizers=[opt], targets=[target_net])
#   if step in S&P steps:    log = shrink_perturb(net, [path], args.sp_shrink, args.sp_perturb, targets=[target_net])
#   lam = l2_coef_from_args(args, step, args.total_timesteps)
#   if lam > 0: loss = loss + lam * l2_penalty(critic);  writer.add_scalar("losses/l2_coef", lam, step)
#   after measure_plasticity: if trigger and (why := trigger.check(step, metrics)): apply_injection(...)
#   checkpoints: {"adaptive_trigger": trigger.state_dict()} -> trigger.load_state_dict(...)
# Pass make_fresh={path: factory} to resets / shrink-and-perturb when the network uses a custom
# init (e.g. orthogonal), since reset_parameters gives PyTorch's default init.
import copy as _copy
import difflib as _difflib
import math as _math
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

L2_SCHEDULE_CHOICES = ("none", "constant", "incremental", "periodic")
ACTIVATION_CHOICES = ("relu", "leaky_relu", "tanh")


# -- resets and shrink-and-perturb -------------------------------------------------------------
def _iv_canonical_params(module: nn.Module, prefix: str = ""):
    """(name without InjectedModule `terms.K.` levels, parameter) for every parameter: the name
    it has in the un-injected network, so a fresh un-injected copy supplies its new value."""
    if isinstance(module, InjectedModule):
        for term in module.terms:
            yield from _iv_canonical_params(term, prefix)
        return
    for n, p in module.named_parameters(recurse=False):
        yield prefix + n, p
    for n, child in module.named_children():
        yield from _iv_canonical_params(child, prefix + n + ".")


def fresh_uninjected(module: nn.Module) -> nn.Module:
    """A fresh copy of `module` from its layers' own init (`reset_parameters`), every
    InjectedModule inside replaced by its original head (terms[0])."""
    fresh = _copy.deepcopy(module.terms[0] if isinstance(module, InjectedModule) else module)

    def strip(m: nn.Module) -> None:
        for n, child in list(m.named_children()):
            if isinstance(child, InjectedModule):
                child = child.terms[0]
                setattr(m, n, child)
            strip(child)

    strip(fresh)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return fresh


def _iv_fresh_values(model: nn.Module, path: str, make_fresh) -> Dict[str, torch.Tensor]:
    factory = (make_fresh or {}).get(path)
    fresh = factory() if factory is not None else fresh_uninjected(model.get_submodule(path))
    return dict(fresh.named_parameters())


def _iv_trainable_under(model: nn.Module, path: str):
    """(name relative to path, canonical name, param) for every trainable parameter under path."""
    sub = model.get_submodule(path)
    names = {id(p): n for n, p in sub.named_parameters()}
    return [(names[id(p)], c, p) for c, p in _iv_canonical_params(sub) if p.requires_grad]


def _iv_mirror(targets: Sequence[nn.Module], path: str, updates: Callable[[str, torch.Tensor], None]) -> None:
    for t in targets:
        tparams = dict(t.get_submodule(path).named_parameters())
        for name, fn in updates:
            if name not in tparams:
                raise ValueError(f"target network has no parameter '{path}.{name}': mirror its structure first")
            fn(tparams[name])


@torch.no_grad()
def reset_modules(
    model: nn.Module,
    paths: Iterable[str],
    optimizers: Iterable[torch.optim.Optimizer] = (),
    make_fresh: Optional[Dict[str, Callable[[], nn.Module]]] = None,
    targets: Iterable[nn.Module] = (),
) -> Dict[str, float]:
    """Re-initialise the sub-modules `model.<path>` in place (the parameter objects stay, so
    optimizers still hold them); return values to log.

    New values: `make_fresh[path]()` if given (a module shaped like the un-injected sub-module,
    e.g. with the script's orthogonal init), else each layer's own `reset_parameters`.
    optimizers: the reset parameters lose their optimizer state (Adam moments and step count
                start from zero); every other parameter keeps its state untouched.
    targets:    networks mirroring `model` (DQN/IQL target nets) get the SAME new values.
    Only trainable parameters are reset: on an injected path (InjectedModule) that means the
    trainable term(s); the frozen original head and frozen twins keep their values.
    `path=""` resets the whole network.
    """
    targets, optimizers = list(targets), list(optimizers)
    count = 0
    for path in paths:
        fresh = _iv_fresh_values(model, path, make_fresh)
        params = _iv_trainable_under(model, path)
        for _, canon, p in params:
            if canon not in fresh or fresh[canon].shape != p.shape:
                raise ValueError(f"make_fresh['{path}'] does not provide parameter '{canon}' of shape {tuple(p.shape)}")
            p.copy_(fresh[canon])
            for opt in optimizers:
                opt.state.pop(p, None)
            count += p.numel()
        _iv_mirror(targets, path, [(n, (lambda q, p=p: q.copy_(p))) for n, _, p in params])
    return {"interventions/reset_params": float(count)}


@torch.no_grad()
def shrink_perturb(
    model: nn.Module,
    paths: Iterable[str] = ("",),
    shrink: float = 1.0,
    perturb: float = 0.01,
    make_fresh: Optional[Dict[str, Callable[[], nn.Module]]] = None,
    targets: Iterable[nn.Module] = (),
) -> Dict[str, float]:
    """Shrink-and-perturb (Ash & Adams 2020): θ <- S·θ + P·ε, ε a fresh initialisation of the same
    layer (`make_fresh[path]()` or `reset_parameters`), for every trainable parameter under each
    path (weights, biases and norm gains alike; a norm gain initialised to 1 thus gains +P).
    `paths=("",)` is the whole network. Frozen (injected) terms are untouched; optimizer state is
    kept. Targets get the same operation with the same ε. S=1, P=0 changes nothing and draws no
    random numbers. Returns values to log, including the relative change ||Δθ|| / ||θ||.
    """
    targets = list(targets)
    count, sq_change, sq_norm = 0, 0.0, 0.0
    for path in paths:
        params = _iv_trainable_under(model, path)
        fresh = _iv_fresh_values(model, path, make_fresh) if perturb != 0 else {}

        def update(q: torch.Tensor, canon: str) -> None:
            q.mul_(shrink)
            if perturb != 0:
                q.add_(fresh[canon].to(q.device, q.dtype), alpha=perturb)

        for _, canon, p in params:
            if perturb != 0 and (canon not in fresh or fresh[canon].shape != p.shape):
                raise ValueError(f"make_fresh['{path}'] does not provide parameter '{canon}' of shape {tuple(p.shape)}")
            before = p.detach().clone()
            update(p, canon)
            sq_change += float((p - before).double().pow(2).sum())
            sq_norm += float(before.double().pow(2).sum())
            count += p.numel()
        _iv_mirror(targets, path, [(n, (lambda q, c=c: update(q, c))) for n, c, _ in params])
    return {
        "interventions/shrink_perturb_params": float(count),
        "interventions/shrink_perturb_rel_change": _math.sqrt(sq_change / sq_norm) if sq_norm > 0 else 0.0,
    }


# -- L2 regularisation ----------------------------------------------------------------------------
def l2_coef(
    schedule: str,
    step: int,
    total_steps: int,
    coef: float = 0.0,
    start: float = 0.0,
    end: float = 0.0,
    period_on: int = 500_000,
    period_off: int = 100_000,
) -> float:
    """λ at `step`: none -> 0; constant -> coef; incremental -> start + (end − start)·step/total_steps
    (clipped to [start, end] at the ends); periodic -> coef for period_on steps, 0 for period_off
    steps, repeating from step 0 (on first)."""
    if schedule == "none":
        return 0.0
    if schedule == "constant":
        return float(coef)
    if schedule == "incremental":
        frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return float(start + (end - start) * frac)
    if schedule == "periodic":
        return float(coef) if step % (period_on + period_off) < period_on else 0.0
    raise UserError(f"--l2-schedule '{schedule}' is unknown: choose one of {', '.join(L2_SCHEDULE_CHOICES)}")


def l2_coef_from_args(args, step: int, total_steps: int) -> float:
    """l2_coef with the --l2-* flags."""
    return l2_coef(args.l2_schedule, step, total_steps, args.l2_coef, args.l2_start, args.l2_end,
                   args.l2_period_on, args.l2_period_off)


def l2_penalty(module: nn.Module) -> torch.Tensor:
    """Σ w² over the TRAINABLE weight matrices / conv kernels (parameters with ≥ 2 dims) of `module`.
    Biases and norm gains/shifts are excluded; frozen (injected) terms are excluded.
    Use as `loss = loss + l2_coef(...) * l2_penalty(critic)` (no 1/2 factor: gradient 2λw),
    and skip the call when the coefficient is 0."""
    ws = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    if not ws:
        return torch.zeros((), device=next(module.parameters()).device)
    return torch.stack([w.pow(2).sum() for w in ws]).sum()


# -- network builders: LayerNorm, LeakyReLU, init ---------------------------------------------------
def build_activation(name: str) -> nn.Module:
    """`--activation`: relu -> nn.ReLU(); leaky_relu -> nn.LeakyReLU(0.01); tanh -> nn.Tanh().
    A new module per call (plasticity metrics need one activation module per layer)."""
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01)
    if name == "tanh":
        return nn.Tanh()
    raise UserError(f"--activation '{name}' is unknown: choose one of {', '.join(ACTIVATION_CHOICES)}")


def build_norm(layer: nn.Module) -> nn.Module:
    """The LayerNorm that follows `layer` under `--layer-norm`: nn.LayerNorm(out_features) after a
    Linear; nn.GroupNorm(1, out_channels) after a conv, which normalises each sample over all of
    (C, H, W) like LayerNorm, with a per-channel gain and shift, whatever the spatial size."""
    if isinstance(layer, nn.Linear):
        return nn.LayerNorm(layer.out_features)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return nn.GroupNorm(1, layer.out_channels)
    raise TypeError(f"no LayerNorm for {type(layer).__name__}")


def init_orthogonal(layer: nn.Module, std: float = _math.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    """cleanRL/SB3 orthogonal init: weight orthogonal with gain `std`, bias constant."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


def _iv_block(layer: nn.Module, layer_norm: bool, activation: str, orthogonal: bool, gain: float) -> List[nn.Module]:
    if orthogonal:
        init_orthogonal(layer, gain)
    return [layer] + ([build_norm(layer)] if layer_norm else []) + [build_activation(activation)]


def build_mlp(
    in_dim: int,
    hidden: Sequence[int],
    out_dim: Optional[int] = None,
    *,
    layer_norm: bool = False,
    activation: str = "relu",
    orthogonal: bool = False,
    gain: float = _math.sqrt(2),
    out_gain: float = 1.0,
) -> nn.Sequential:
    """Linear [-> LayerNorm] -> activation for each hidden size, then a plain Linear(out_dim)
    (no norm, no activation) unless out_dim is None. Default PyTorch init unless `orthogonal`
    (hidden gain `gain`, output gain `out_gain`, biases 0)."""
    layers: List[nn.Module] = []
    for h in hidden:
        layers += _iv_block(nn.Linear(in_dim, h), layer_norm, activation, orthogonal, gain)
        in_dim = h
    if out_dim is not None:
        out = nn.Linear(in_dim, out_dim)
        layers.append(init_orthogonal(out, out_gain) if orthogonal else out)
    return nn.Sequential(*layers)


class NatureCNNEncoder(nn.Module):
    """Mnih et al. (2015) encoder with Stable-Baselines3's layout: `cnn` = Conv(32,8,4), Conv(64,4,2),
    Conv(64,3,1) each followed by [GroupNorm(1,C) if layer_norm] and the activation, then Flatten;
    `linear` = Linear(n_flatten, features_dim) [LayerNorm] activation. Without layer_norm the keys
    are SB3's (`cnn.0/2/4`, `linear.0`), so SB3 `features_extractor.*` weights load directly.
    Input: float images already scaled to [0, 1], shape (B, in_channels, *input_hw).
    orthogonal: SB3/cleanRL PPO init (gain sqrt(2), biases 0); default PyTorch init otherwise.
    For resets/injection of an orthogonally initialised net pass a `make_fresh` factory that
    builds it again, since `reset_parameters` gives PyTorch's default init."""

    def __init__(self, in_channels: int = 4, features_dim: int = 512, *, layer_norm: bool = False,
                 activation: str = "relu", orthogonal: bool = False, input_hw=(84, 84)):
        super().__init__()
        convs = [nn.Conv2d(in_channels, 32, 8, 4), nn.Conv2d(32, 64, 4, 2), nn.Conv2d(64, 64, 3, 1)]
        layers: List[nn.Module] = []
        for conv in convs:
            layers += _iv_block(conv, layer_norm, activation, orthogonal, _math.sqrt(2))
        self.cnn = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            n_flatten = self.cnn(torch.zeros(1, in_channels, *input_hw)).shape[1]
        self.linear = nn.Sequential(*_iv_block(nn.Linear(n_flatten, features_dim), layer_norm, activation,
                                            orthogonal, _math.sqrt(2)))
        self.features_dim = features_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.cnn(x))


# -- adaptive trigger --------------------------------------------------------------------------------
class AdaptiveTrigger:
    """Fire (e.g. inject) when a measured metric crosses a threshold.

    check(step, metrics) returns a reason string such as
    "plasticity/erank_features_mean=12.3 < 15.0 at step 50000" when metrics[metric] is below
    (direction="below") or above ("above") threshold, step >= start_step, fewer than max_count
    fires happened, and at least min_gap steps passed since the last fire; else None. Fire steps
    are kept in `.fired`; save `state_dict()` in checkpoints so a resumed run keeps its history.
    """

    def __init__(self, metric: str, threshold: float, direction: str = "below", min_gap: int = 0,
                 max_count: int = 1, start_step: int = 0):
        if direction not in ("below", "above"):
            raise UserError(f"--adaptive-inject-direction '{direction}' is unknown: choose below or above")
        self.metric, self.threshold, self.direction = metric, float(threshold), direction
        self.min_gap, self.max_count, self.start_step = int(min_gap), int(max_count), int(start_step)
        self.fired: List[int] = []

    @classmethod
    def from_args(cls, args, start_step: int = 0) -> Optional["AdaptiveTrigger"]:
        """The trigger of the --adaptive-inject-* flags, or None when no threshold is set."""
        if getattr(args, "adaptive_inject_threshold", None) is None:
            return None
        return cls(args.adaptive_inject_metric, args.adaptive_inject_threshold, args.adaptive_inject_direction,
                   args.adaptive_inject_min_gap, args.adaptive_inject_max_count, start_step)

    def check(self, step: int, metrics: Dict[str, float]) -> Optional[str]:
        if self.metric not in metrics:
            close = _difflib.get_close_matches(self.metric, list(metrics), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"--adaptive-inject-metric '{self.metric}' is not a measured metric{hint}")
        if step < self.start_step or len(self.fired) >= self.max_count:
            return None
        if self.fired and step - self.fired[-1] < self.min_gap:
            return None
        value = float(metrics[self.metric])
        crossed = value < self.threshold if self.direction == "below" else value > self.threshold
        if not crossed:
            return None
        self.fired.append(int(step))
        op = "<" if self.direction == "below" else ">"
        return f"{self.metric}={value:.6g} {op} {self.threshold:.6g} at step {step}"

    def state_dict(self) -> dict:
        return {"metric": self.metric, "threshold": self.threshold, "direction": self.direction,
                "fired": list(self.fired)}

    def load_state_dict(self, state: dict) -> None:
        self.fired = [int(s) for s in state["fired"]]


# -- flag validation ---------------------------------------------------------------------------------
def _iv_finite(flag: str, value, lo: Optional[float] = None, hi: Optional[float] = None) -> None:
    v = float(value)
    if not _math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise UserError(f"{flag} {value} is invalid: it must be a finite number {rng}")


def check_intervention_args(args, total_steps: int, metric_keys: Optional[Iterable[str]] = None) -> None:
    """Raise UserError naming the flag for any impossible intervention/metrics setting. Call before
    creating run folders. metric_keys (e.g. plasticity_keys(model)) also validates
    --adaptive-inject-metric against what measure_plasticity will report."""
    a = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    if int(a("metrics_every", 0)) < 0:
        raise UserError(f"--metrics-every {a('metrics_every')} must be >= 0 (0 turns the metrics off)")
    if int(a("metrics_batch_size", 256)) < 2:
        raise UserError(f"--metrics-batch-size {a('metrics_batch_size')} must be >= 2")
    _iv_finite("--dormant-tau", a("dormant_tau", 0.025), 0.0, 1.0)
    check_steps("--reset-at", a("reset_at", []), total_steps)
    check_steps("--shrink-perturb-at", a("shrink_perturb_at", []), total_steps)
    _iv_finite("--sp-shrink", a("sp_shrink", 1.0), 0.0)
    _iv_finite("--sp-perturb", a("sp_perturb", 0.01), 0.0)
    if a("l2_schedule", "none") not in L2_SCHEDULE_CHOICES:
        raise UserError(f"--l2-schedule '{a('l2_schedule')}' is unknown: choose one of {', '.join(L2_SCHEDULE_CHOICES)}")
    for flag in ("l2_coef", "l2_start", "l2_end"):
        _iv_finite("--" + flag.replace("_", "-"), a(flag, 0.0), 0.0)
    for flag in ("l2_period_on", "l2_period_off"):
        if int(a(flag, 1)) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} {a(flag)} must be > 0 steps")
    if a("activation", "relu") not in ACTIVATION_CHOICES:
        raise UserError(f"--activation '{a('activation')}' is unknown: choose one of {', '.join(ACTIVATION_CHOICES)}")
    metric, threshold = a("adaptive_inject_metric"), a("adaptive_inject_threshold")
    if threshold is None:
        if metric:
            raise UserError("--adaptive-inject-metric needs --adaptive-inject-threshold")
        return
    if not metric:
        raise UserError("--adaptive-inject-threshold needs --adaptive-inject-metric (e.g. plasticity/erank_features_mean)")
    _iv_finite("--adaptive-inject-threshold", threshold)
    if a("adaptive_inject_direction", "below") not in ("below", "above"):
        raise UserError(f"--adaptive-inject-direction '{a('adaptive_inject_direction')}' is unknown: choose below or above")
    if int(a("adaptive_inject_min_gap", 0)) < 0:
        raise UserError(f"--adaptive-inject-min-gap {a('adaptive_inject_min_gap')} must be >= 0")
    if int(a("adaptive_inject_max_count", 1)) < 1:
        raise UserError(f"--adaptive-inject-max-count {a('adaptive_inject_max_count')} must be >= 1")
    if int(a("metrics_every", 0)) <= 0:
        raise UserError("--adaptive-inject-threshold needs --metrics-every > 0 (the trigger reads the metrics)")
    if metric_keys is not None and metric not in set(metric_keys):
        close = _difflib.get_close_matches(metric, sorted(metric_keys), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; choose one of {', '.join(sorted(metric_keys))}"
        raise UserError(f"--adaptive-inject-metric '{metric}' is not a measured metric{hint}")
# ==== END SHARED BLOCK: interventions ====


# ----------------------------------------------------------------------------------------------
# Offline data: generation (cached by a hash of the settings), loading and validation
# ----------------------------------------------------------------------------------------------
DATASET_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals")
DATASET_VERSION = 1  # bump when the generator changes: old cache files are no longer matched


def dataset_settings(args: Args) -> dict:
    seed = args.seed if args.dataset_seed is None else args.dataset_seed
    s = {"version": DATASET_VERSION, "env_id": args.env_id, "kind": args.dataset_kind,
         "steps": args.dataset_steps, "seed": seed}
    if args.dataset_kind == "rnd":
        s["rnd_epsilon"] = args.rnd_epsilon
    return s


def dataset_path(args: Args) -> str:
    s = dataset_settings(args)
    digest = hashlib.sha1(json.dumps(s, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(args.dataset_dir, f"{args.env_id}__{args.dataset_kind}__{args.dataset_steps}__{digest}.npz")


def validate_dataset(data, path: str, n_actions: int = 5) -> Dict[str, np.ndarray]:
    """Check keys, shapes, dtypes, action range and finiteness; return clean arrays."""
    missing = [k for k in DATASET_KEYS if k not in data]
    if missing:
        raise UserError(f"dataset {path}: missing key(s) {missing}; needs {list(DATASET_KEYS)} (+ optional truncations)")
    out = {k: np.asarray(data[k]) for k in DATASET_KEYS}
    if "truncations" in data:
        out["truncations"] = np.asarray(data["truncations"])
    n = len(out["actions"])
    if n == 0:
        raise UserError(f"dataset {path}: it holds no transitions")
    for k in ("observations", "next_observations"):
        if out[k].shape != (n, 2):
            raise UserError(f"dataset {path}: {k} has shape {out[k].shape}, expected ({n}, 2)")
    for k in ("actions", "rewards", "terminals", "truncations"):
        if k in out and out[k].shape != (n,):
            raise UserError(f"dataset {path}: {k} has shape {out[k].shape}, expected ({n},)")
    for k in ("observations", "next_observations", "rewards"):
        if not np.issubdtype(out[k].dtype, np.number) or np.issubdtype(out[k].dtype, np.complexfloating):
            raise UserError(f"dataset {path}: {k} has dtype {out[k].dtype}, expected a real number type")
        if not np.isfinite(out[k].astype(np.float64)).all():
            raise UserError(f"dataset {path}: {k} holds NaN or inf values")
    if not np.issubdtype(out["actions"].dtype, np.integer):
        raise UserError(f"dataset {path}: actions have dtype {out['actions'].dtype}, expected integers in [0, {n_actions})")
    if out["actions"].min() < 0 or out["actions"].max() >= n_actions:
        raise UserError(f"dataset {path}: actions range over [{out['actions'].min()}, {out['actions'].max()}], "
                        f"expected [0, {n_actions})")
    for k in ("terminals", "truncations"):
        if k in out:
            v = out[k]
            if not (v.dtype == bool or np.issubdtype(v.dtype, np.number)) or not np.isin(v, (0, 1)).all():
                raise UserError(f"dataset {path}: {k} must be booleans (or 0/1)")
    return {
        "observations": out["observations"].astype(np.float32),
        "next_observations": out["next_observations"].astype(np.float32),
        "actions": out["actions"].astype(np.int64),
        "rewards": out["rewards"].astype(np.float32),
        "terminals": out["terminals"].astype(np.float32),
        "truncations": out.get("truncations", np.zeros(n)).astype(np.float32),
    }


def load_dataset_file(path: str) -> Dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise UserError(f"--dataset {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            raw = {k: f[k] for k in f.files}
    except Exception as e:  # not a zip / corrupt / pickled objects
        raise UserError(f"--dataset {path}: cannot be read as an .npz file ({type(e).__name__}: {e})")
    return validate_dataset(raw, path)


def _save_npz_atomic(path: str, arrays: Dict[str, np.ndarray]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def generate_dataset(args: Args) -> Dict[str, np.ndarray]:
    """Collect --dataset-steps transitions with a random policy or a DQN trained on an RND bonus alone."""
    s = dataset_settings(args)
    rng = np.random.default_rng(s["seed"])
    env = PointmassEnv(args.env_id)
    obs, _ = env.reset(seed=s["seed"])
    keys = DATASET_KEYS + ("truncations",)
    buf = {k: [] for k in keys}
    if args.dataset_kind == "rnd":
        # Exploration DQN: reward = normalised RND prediction error of the next state; no env reward.
        with torch.random.fork_rng():  # seeded init that leaves the caller's torch RNG untouched
            torch.manual_seed(s["seed"])
            qnet, qtarget, rnd_target, rnd_pred = (mlp(2, [64, 64], k) for k in (5, 5, 16, 16))
        qtarget.load_state_dict(qnet.state_dict())
        q_opt = torch.optim.Adam(qnet.parameters(), lr=1e-3)
        r_opt = torch.optim.Adam(rnd_pred.parameters(), lr=1e-3)
        err_sq_mean = 1.0
    for step in range(args.dataset_steps):
        if args.dataset_kind == "random" or rng.random() < args.rnd_epsilon or step < 1000:
            action = int(rng.integers(5))
        else:
            with torch.no_grad():
                action = int(qnet(torch.as_tensor(obs)[None]).argmax())
        next_obs, reward, term, trunc, _ = env.step(action)
        for k, v in zip(keys, (obs, action, reward, next_obs, term, trunc)):
            buf[k].append(v)
        obs = next_obs
        if term or trunc:
            obs, _ = env.reset()
        if args.dataset_kind == "rnd" and step >= 500:
            n = len(buf["actions"])
            idx = rng.integers(0, n, size=64)
            o = torch.as_tensor(np.array([buf["observations"][i] for i in idx]))
            a = torch.as_tensor(np.array([buf["actions"][i] for i in idx]))
            o2 = torch.as_tensor(np.array([buf["next_observations"][i] for i in idx]))
            d = torch.as_tensor(np.array([buf["terminals"][i] for i in idx], dtype=np.float32))
            err = (rnd_pred(o2) - rnd_target(o2).detach()).pow(2).mean(1)
            r_opt.zero_grad()
            err.mean().backward()
            r_opt.step()
            err_sq_mean = 0.99 * err_sq_mean + 0.01 * float(err.detach().pow(2).mean())
            bonus = err.detach() / (err_sq_mean ** 0.5 + 1e-8)
            with torch.no_grad():
                y = bonus + 0.99 * (1 - d) * qtarget(o2).max(1).values
            q = qnet(o).gather(1, a[:, None]).squeeze(1)
            loss = F.smooth_l1_loss(q, y)
            q_opt.zero_grad()
            loss.backward()
            q_opt.step()
            if step % 500 == 0:
                qtarget.load_state_dict(qnet.state_dict())
    data = {k: np.array(v) for k, v in buf.items()}
    return validate_dataset(data, "(generated)")


def load_or_make_dataset(args: Args, verbose: bool = True) -> tuple:
    """(data, path, generated): --dataset if given, else the cached file for these settings (made once)."""
    if args.dataset is not None:
        return load_dataset_file(args.dataset), args.dataset, False
    path = dataset_path(args)
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                return validate_dataset({k: f[k] for k in f.files}, path), path, False
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cached dataset {path} is unreadable ({e}); delete it to regenerate")
    t0 = time.time()
    data = generate_dataset(args)
    _save_npz_atomic(path, data)
    if verbose:
        print(f"generated {len(data['actions'])} transitions ({args.dataset_kind}) in {time.time() - t0:.1f}s -> {path}")
    return data, path, True


# ----------------------------------------------------------------------------------------------
# IQL
# ----------------------------------------------------------------------------------------------
def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    weight = torch.where(diff > 0, expectile, 1 - expectile)
    return (weight * diff.pow(2)).mean()


# --reset-target / --shrink-perturb-target -> (network attribute, sub-module paths) of IQLAgent
INTERVENTION_PATHS = {
    "q-head": (("qf", ("q1.head", "q2.head")),),
    "q": (("qf", ("q1", "q2")),),
    "qv-head": (("qf", ("q1.head", "q2.head")), ("vf", ("head",))),
    "qv": (("qf", ("q1", "q2")), ("vf", ("",))),
    "actor": (("actor", ("",)),),
    "all": (("qf", ("q1", "q2")), ("vf", ("",)), ("actor", ("",))),
}


class IQLAgent:
    """Twin Q (+ soft targets), V and a softmax actor, their optimizers, the IQL update, injection,
    resets and shrink-and-perturb."""

    def __init__(self, args: Args, device: torch.device, obs_dim: int = 2, n_actions: int = 5):
        self.args, self.device, self.n_actions = args, device, n_actions
        self.qf = TwinQ(obs_dim, n_actions, args).to(device)
        self.qf_target = TwinQ(obs_dim, n_actions, args).to(device)
        self.qf_target.load_state_dict(self.qf.state_dict())
        for p in self.qf_target.parameters():
            p.requires_grad_(False)
        self.vf = SplitNet(obs_dim, 1, args.hidden_sizes, args.critic_encoder_layers, args.layer_norm,
                           args.activation).to(device)
        self.actor = mlp(obs_dim, args.hidden_sizes, n_actions, args.layer_norm, args.activation).to(device)
        fused = device.type in ("cpu", "cuda")  # one kernel per parameter: much less overhead for small nets
        self.q_opt = torch.optim.Adam(self.qf.parameters(), lr=args.learning_rate, fused=fused)
        self.v_opt = torch.optim.Adam(self.vf.parameters(), lr=args.learning_rate, fused=fused)
        self.a_opt = torch.optim.Adam(self.actor.parameters(), lr=args.learning_rate, fused=fused)
        self.optimizers = [self.q_opt, self.v_opt, self.a_opt]

    def update(self, batch, l2: float = 0.0) -> Dict[str, torch.Tensor]:
        """One IQL gradient step on (obs, actions, rewards, next_obs, terminals); returns detached stats.
        l2 > 0 adds l2 * l2_penalty(twin Q) (`--l2-schedule`) to the Q loss (and to `losses/q_loss`).

        The three losses touch disjoint parameters (targets are computed without gradient), so one
        backward pass on their sum gives each network exactly its own gradient; each keeps its optimizer.
        """
        args = self.args
        o, a, r, o2, d = batch
        n = o.shape[0]
        with torch.no_grad():
            tq1, tq2 = self.qf_target(o)
            q_t = torch.min(tq1, tq2).gather(1, a[:, None]).squeeze(1)
        # V(s) and V(s') in one pass; V(s') only as a (detached) regression target for Q
        v_both = self.vf(torch.cat([o, o2])).squeeze(1)
        v, next_v = v_both[:n], v_both[n:].detach()
        q_target = r + args.gamma * (1.0 - d) * next_v
        # V: expectile regression towards min(Q_target)(s, a)
        v_loss = expectile_loss(q_t - v, args.expectile)
        # Q: regression towards r + gamma (1 - terminal) V(s')
        q1, q2 = self.qf(o)
        q1a, q2a = q1.gather(1, a[:, None]).squeeze(1), q2.gather(1, a[:, None]).squeeze(1)
        q_loss = F.mse_loss(q1a, q_target) + F.mse_loss(q2a, q_target)
        if l2 > 0:
            q_loss = q_loss + l2 * l2_penalty(self.qf)
        # actor: advantage-weighted regression, weights exp(beta A) clipped
        adv = q_t - v.detach()
        weights = torch.exp(args.beta * adv).clamp(max=args.max_weight)
        logp = torch.log_softmax(self.actor(o), dim=1).gather(1, a[:, None]).squeeze(1)
        actor_loss = -(weights * logp).mean()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        (v_loss + q_loss + actor_loss).backward()
        for opt in self.optimizers:
            opt.step()
        with torch.no_grad():  # soft target update
            torch._foreach_lerp_(list(self.qf_target.parameters()), list(self.qf.parameters()), args.tau)
        return {"losses/q_loss": q_loss.detach(), "losses/v_loss": v_loss.detach(),
                "losses/actor_loss": actor_loss.detach(), "losses/q_values": q1a.detach().mean(),
                "losses/v_values": v.detach().mean(), "losses/advantage": adv.mean(),
                "losses/awr_weight": weights.mean()}

    def inject(self, probe: torch.Tensor) -> Dict[str, float]:
        """Plasticity injection into both Q heads (mirrored into the target critics); with
        --inject-target qv also into V's head. Returns the values to log."""
        args = self.args
        kw = dict(reset_optimizer=args.inject_reset_optimizer, keep_trainable=args.inject_keep_trainable,
                  third_term=not args.inject_no_third_term)
        log = apply_injection(self.qf, ["q1.head", "q2.head"], probe, targets=[self.qf_target],
                              optimizers=[self.q_opt], **kw)
        for p in self.qf_target.parameters():  # the mirrored terms arrive trainable; targets only follow
            p.requires_grad_(False)
        if args.inject_target == "qv":
            vlog = apply_injection(self.vf, ["head"], probe, optimizers=[self.v_opt], **kw)
            log.update({k.replace("injection/", "injection/v_"): v for k, v in vlog.items()})
        return log

    def _intervention_parts(self, target: str):
        """(network, paths, optimizer, target networks) for each network that `target` names."""
        parts = []
        for attr, paths in INTERVENTION_PATHS[target]:
            opt = {"qf": self.q_opt, "vf": self.v_opt, "actor": self.a_opt}[attr]
            parts.append((getattr(self, attr), list(paths), opt, [self.qf_target] if attr == "qf" else []))
        return parts

    def reset(self, target: str) -> Dict[str, float]:
        """Re-initialise `target` (a --reset-target choice) with PyTorch's default init; the target
        critics get the same values; the reset parameters lose their Adam state. On injected heads only
        the trainable terms are reset. Returns the values to log."""
        count = 0.0
        for net, paths, opt, targets in self._intervention_parts(target):
            count += reset_modules(net, paths, optimizers=[opt], targets=targets)["interventions/reset_params"]
        return {"interventions/reset_params": count}

    def shrink_perturb(self, target: str, shrink: float, perturb: float) -> Dict[str, float]:
        """theta <- shrink * theta + perturb * eps on `target` (a --shrink-perturb-target choice), the target
        critics with the same eps; Adam state is kept. Returns the values to log (relative change over
        all touched parameters)."""
        count, sq_change, sq_norm = 0.0, 0.0, 0.0
        for net, paths, _, targets in self._intervention_parts(target):
            touched = {id(p): p for path in paths for p in net.get_submodule(path).parameters() if p.requires_grad}
            before = {k: p.detach().clone() for k, p in touched.items()}
            log = shrink_perturb(net, paths, shrink, perturb, targets=targets)
            count += log["interventions/shrink_perturb_params"]
            for k, p in touched.items():
                sq_change += float((p.detach() - before[k]).double().pow(2).sum())
                sq_norm += float(before[k].double().pow(2).sum())
        return {"interventions/shrink_perturb_params": count,
                "interventions/shrink_perturb_rel_change": (sq_change / sq_norm) ** 0.5 if sq_norm > 0 else 0.0}

    @torch.no_grad()
    def act(self, obs: np.ndarray, rng: np.random.Generator, mode: str = "greedy", epsilon: float = 0.0) -> int:
        logits = self.actor(torch.as_tensor(obs, device=self.device)[None])[0]
        if mode == "policy":
            p = torch.softmax(logits.double(), 0).cpu().numpy()
            return int(rng.choice(self.n_actions, p=p / p.sum()))
        if mode == "eps-greedy" and rng.random() < epsilon:
            return int(rng.integers(self.n_actions))
        return int(logits.argmax())

    def plasticity_metrics(self, batch, tau: float) -> Dict[str, float]:
        """measure_plasticity of critic q1 on a fixed probe batch, with its TD loss for the gradient
        metrics (target r + gamma (1 - terminal) V(s') computed now, without gradient)."""
        o, a, r, o2, d = batch
        with torch.no_grad():
            y = r + self.args.gamma * (1.0 - d) * self.vf(o2).squeeze(1)
        loss_fn = lambda q: F.mse_loss(q(o).gather(1, a[:, None]).squeeze(1), y)  # noqa: E731
        return measure_plasticity(self.qf.q1, o, loss_fn=loss_fn, tau=tau, prefix="plasticity")

    def state_dict(self) -> dict:
        return {"qf": self.qf.state_dict(), "qf_target": self.qf_target.state_dict(),
                "vf": self.vf.state_dict(), "actor": self.actor.state_dict()}


def validate_args(args: Args) -> int:
    """Every check that can fail on bad input; runs before anything is written. Returns total steps."""
    if args.env_id not in LEVELS:
        raise UserError(f"--env-id {args.env_id!r} is unknown; choose one of {sorted(LEVELS)}")
    for flag, v in (("--offline-steps", args.offline_steps), ("--online-steps", args.online_steps)):
        if v < 0:
            raise UserError(f"{flag} {v} must be >= 0")
    total = args.offline_steps + args.online_steps
    if total <= 0:
        raise UserError("--offline-steps + --online-steps must be > 0")
    for flag, v in (("--batch-size", args.batch_size), ("--eval-every", args.eval_every),
                    ("--eval-episodes", args.eval_episodes), ("--log-every", args.log_every),
                    ("--dataset-steps", args.dataset_steps)):
        if v <= 0:
            raise UserError(f"{flag} {v} must be > 0")
    if not args.hidden_sizes or min(args.hidden_sizes) <= 0:
        raise UserError(f"--hidden-sizes {args.hidden_sizes} must be one or more positive sizes")
    if not 0 <= args.critic_encoder_layers < len(args.hidden_sizes) + 1:
        raise UserError(f"--critic-encoder-layers {args.critic_encoder_layers} must lie in [0, {len(args.hidden_sizes)}]")
    for flag, v, lo, hi in (("--gamma", args.gamma, 0.0, 1.0), ("--expectile", args.expectile, 0.0, 1.0),
                            ("--tau", args.tau, 0.0, 1.0), ("--rnd-epsilon", args.rnd_epsilon, 0.0, 1.0),
                            ("--online-epsilon", args.online_epsilon, 0.0, 1.0)):
        if not (lo <= v <= hi) or not np.isfinite(v):
            raise UserError(f"{flag} {v} must lie in [{lo}, {hi}]")
    if not 0 < args.expectile < 1:
        raise UserError(f"--expectile {args.expectile} must lie strictly between 0 and 1")
    if not args.learning_rate > 0 or not np.isfinite(args.learning_rate):
        raise UserError(f"--learning-rate {args.learning_rate} must be > 0")
    if not args.beta >= 0 or not args.max_weight > 0:
        raise UserError(f"--beta {args.beta} must be >= 0 and --max-weight {args.max_weight} > 0")
    args.inject_at = check_steps("--inject-at", args.inject_at, total)
    keys = None
    if args.adaptive_inject_threshold is not None:  # the keys measure_plasticity gives for critic q1
        with torch.random.fork_rng():
            keys = plasticity_keys(SplitNet(2, 5, args.hidden_sizes, args.critic_encoder_layers, args.layer_norm,
                                            args.activation))
    check_intervention_args(args, total, keys)
    return total


@torch.no_grad()
def evaluate(actor: nn.Module, env_id: str, episodes: int, seed: int, device: torch.device):
    """Greedy (argmax) episodes; returns (returns, lengths, successes, first trajectory)."""
    env = PointmassEnv(env_id)
    rets, lens, succ, first = [], [], [], None
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        traj, ret, done = [env.state.copy()], 0.0, False
        while not done:
            action = int(actor(torch.as_tensor(obs, device=device)[None]).argmax())
            obs, r, term, trunc, info = env.step(action)
            ret += r
            traj.append(env.state.copy())
            done = term or trunc
        rets.append(ret)
        lens.append(len(traj) - 1)
        succ.append(float(info["success"]))
        if first is None:
            first = np.array(traj)
    return np.array(rets), np.array(lens), np.array(succ), first


def train(args: Args) -> Dict[str, float]:
    total = validate_args(args)
    data, data_path, generated = load_or_make_dataset(args)  # validates --dataset before runs/ exists

    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    run_dir = os.path.join("runs", run_name)
    writer = SummaryWriter(run_dir)
    try:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        writer.add_text("dataset", f"{data_path}: {len(data['actions'])} transitions, "
                                   f"{int(data['terminals'].sum())} goal-reaching")

        seed_everything(args.seed, args.torch_deterministic)
        device = pick_device(args.cuda)
        rng = np.random.default_rng(args.seed)

        agent = IQLAgent(args, device)

        rb = ReplayBuffer(data, args.online_steps, device)
        probe = rb.sample(min(256, rb.size), np.random.default_rng(args.seed + 12345))[0]  # fixed probe batch
        inject_steps = set(args.inject_at)
        reset_steps, sp_steps = set(args.reset_at), set(args.shrink_perturb_at)
        trigger = AdaptiveTrigger.from_args(args)  # None unless --adaptive-inject-threshold
        injections: List[dict] = []
        interventions: List[dict] = []
        metrics_probe = None
        if args.metrics_every > 0:  # own RNG: the training streams are the same with or without metrics
            metrics_probe = rb.sample(args.metrics_batch_size, np.random.default_rng(args.seed + 54321))
        env = PointmassEnv(args.env_id)
        obs, _ = env.reset(seed=args.seed)
        ep_ret, ep_len = 0.0, 0
        recent: deque = deque(maxlen=20)
        final: Dict[str, float] = {}
        last_eval_step = -1

        def run_eval(step: int) -> None:
            rets, lens, succ, traj = evaluate(agent.actor, args.env_id, args.eval_episodes, args.seed + 10_000, device)
            writer.add_scalar("eval/episodic_return", rets.mean(), step)
            writer.add_scalar("eval/episodic_length", lens.mean(), step)
            writer.add_scalar("eval/success_rate", succ.mean(), step)
            draw_trajectory(env, traj, os.path.join(run_dir, f"eval_{step:07d}.png"),
                            f"{args.env_id} step {step}: return {rets.mean():.1f}, success {succ.mean():.2f}")
            print(f"global_step={step}, eval/episodic_return={rets.mean():.1f}, eval/success_rate={succ.mean():.2f}")
            final.update({"eval/episodic_return": float(rets.mean()), "eval/success_rate": float(succ.mean()),
                          "eval/episodic_length": float(lens.mean()), "global_step": float(step)})

        def do_inject(step: int, reason: Optional[str] = None) -> None:
            log = agent.inject(probe)
            log["injection/adaptive"] = float(reason is not None)
            injections.append({"global_step": step, **log})
            for k, v in log.items():
                writer.add_scalar(k, v, step)
            if reason is not None:
                writer.add_text("injection/adaptive_reason", reason, step)
            print(f"global_step={step}, injected plasticity into {args.inject_target}"
                  f"{' (adaptive: ' + reason + ')' if reason else ''}: "
                  f"output change {log['injection/output_change']:.3g}, trainable {int(log['injection/trainable_params'])}")

        def log_intervention(step: int, kind: str, target: str, log: Dict[str, float]) -> None:
            interventions.append({"global_step": step, "kind": kind, "target": target, **log})
            for k, v in log.items():
                writer.add_scalar(k, v, step)
            print(f"global_step={step}, {kind} of {target}: " + ", ".join(f"{k}={v:g}" for k, v in log.items()))

        start_time = time.time()
        for global_step in range(total):
            online = global_step >= args.offline_steps
            if global_step in inject_steps:
                do_inject(global_step)
            if global_step in reset_steps:
                log_intervention(global_step, "reset", args.reset_target, agent.reset(args.reset_target))
            if global_step in sp_steps:
                log_intervention(global_step, "shrink_perturb", args.shrink_perturb_target,
                                 agent.shrink_perturb(args.shrink_perturb_target, args.sp_shrink, args.sp_perturb))

            if metrics_probe is not None and global_step % args.metrics_every == 0:
                metrics = agent.plasticity_metrics(metrics_probe, args.dormant_tau)
                for k, v in metrics.items():
                    writer.add_scalar(k, v, global_step)
                reason = trigger.check(global_step, metrics) if trigger is not None else None
                if reason:
                    do_inject(global_step, reason)

            if online:  # one environment step with the current policy
                action = agent.act(obs, rng, args.online_exploration, args.online_epsilon)
                next_obs, reward, term, trunc, info = env.step(action)
                rb.add(obs, action, reward, next_obs, term)
                ep_ret += reward
                ep_len += 1
                obs = next_obs
                if term or trunc:
                    writer.add_scalar("charts/episodic_return", ep_ret, global_step)
                    writer.add_scalar("charts/episodic_length", ep_len, global_step)
                    writer.add_scalar("charts/success", float(info["success"]), global_step)
                    recent.append(ep_ret)
                    obs, _ = env.reset()
                    ep_ret, ep_len = 0.0, 0

            lam = l2_coef_from_args(args, global_step, total)
            stats = agent.update(rb.sample(args.batch_size, rng), l2=lam)
            losses = torch.stack([stats["losses/q_loss"], stats["losses/v_loss"], stats["losses/actor_loss"]])
            if not bool(torch.isfinite(losses).all()):  # one check per step; names the loss at fault
                for name in ("losses/q_loss", "losses/v_loss", "losses/actor_loss"):
                    check_finite(stats[name], name, global_step)
            if global_step % args.log_every == 0 or global_step == total - 1:
                for k, v in stats.items():
                    writer.add_scalar(k, v.item(), global_step)
                writer.add_scalar("charts/learning_rate", agent.q_opt.param_groups[0]["lr"], global_step)
                if args.l2_schedule != "none":
                    writer.add_scalar("losses/l2_coef", lam, global_step)
                sps = int((global_step + 1) / (time.time() - start_time))
                writer.add_scalar("charts/SPS", sps, global_step)
                writer.add_scalar("charts/online", float(online), global_step)
                if recent and global_step % (10 * args.log_every) == 0:
                    print(f"global_step={global_step}, SPS={sps}, charts/episodic_return(last {len(recent)})={np.mean(recent):.1f}")

            if (global_step + 1) % args.eval_every == 0:
                run_eval(global_step + 1)
                last_eval_step = global_step + 1
        if last_eval_step != total:
            run_eval(total)

        final["charts/SPS"] = float(total / (time.time() - start_time))
        final["train_time_s"] = float(time.time() - start_time)
        final["online_episodic_return_last20"] = float(np.mean(recent)) if recent else float("nan")
        final["injection/count"] = float(len(injections))
        final["injection/adaptive_count"] = float(len(trigger.fired)) if trigger is not None else 0.0
        final["injections"] = injections
        final["interventions"] = interventions
        final.update({k: float(v) for k, v in stats.items()})
        final["dataset_goal_transitions"] = float(data["terminals"].sum())
        final["run_dir"] = run_dir
        if args.save_model:
            model_path = os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
            atomic_save({"model": agent.state_dict(), "args": vars(args), "global_step": total,
                         "adaptive_trigger": trigger.state_dict() if trigger is not None else None}, model_path)
            print(f"model saved to {model_path}")
            final["model_path"] = model_path
    finally:
        writer.close()  # flush the logs even when the run stops early (e.g. a non-finite loss)
    if args.track:
        import wandb

        wandb.finish()
    return final


if __name__ == "__main__":
    train(tyro.cli(Args))
