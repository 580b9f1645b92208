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
  5. evaluates every --eval-every steps and draws the map with an evaluation trajectory (PNG).

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
    offline_steps: int = 30000
    """gradient steps on the offline data (global steps 0..N-1)"""
    online_steps: int = 30000
    """online fine-tuning steps, one env step + one gradient step each (global steps N..N+M-1)"""
    batch_size: int = 256
    """the batch size of every update"""
    learning_rate: float = 3e-4
    """learning rate of the critics, the value network and the actor (Adam)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """soft target-critic update rate"""
    expectile: float = 0.9
    """expectile of the V regression (0.5 = mean; higher = closer to max_a Q)"""
    beta: float = 5.0
    """inverse temperature of advantage-weighted regression: weight = exp(beta * A)"""
    max_weight: float = 100.0
    """AWR weights are clipped at this value"""
    hidden_sizes: List[int] = field(default_factory=lambda: [256, 256])
    """hidden layer sizes of every network (critics, value, actor)"""
    critic_encoder_layers: int = 1
    """hidden layers of each critic that form the shared encoder; the rest (and the output layer) is the
    head that gets injected. 0 = inject into the whole network (no encoder sharing)"""
    layer_norm: bool = False
    """LayerNorm after every hidden linear layer"""
    activation: Literal["relu", "leaky_relu", "tanh"] = "relu"
    """activation of every hidden layer"""
    online_exploration: Literal["policy", "eps-greedy"] = "policy"
    """online action choice: sample the softmax policy, or eps-greedy on the actor's argmax"""
    online_epsilon: float = 0.1
    """epsilon of `--online-exploration eps-greedy`"""

    # Evaluation and logging
    eval_every: int = 5000
    """evaluate the greedy policy every this many global steps (and at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    log_every: int = 1000
    """write losses and SPS every this many global steps"""

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
_ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh}


def mlp(in_dim: int, hidden: Sequence[int], out_dim: Optional[int], layer_norm: bool = False,
        activation: str = "relu") -> nn.Sequential:
    """Linear (+ LayerNorm) + activation per hidden size, then a Linear to out_dim (None: no output layer)."""
    layers: List[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers.append(nn.Linear(d, h))
        if layer_norm:
            layers.append(nn.LayerNorm(h))
        layers.append(_ACTIVATIONS[activation]())
        d = h
    if out_dim is not None:
        layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


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


class IQLAgent:
    """Twin Q (+ soft targets), V and a softmax actor, their optimizers, the IQL update and injection."""

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
        self.q_opt = torch.optim.Adam(self.qf.parameters(), lr=args.learning_rate)
        self.v_opt = torch.optim.Adam(self.vf.parameters(), lr=args.learning_rate)
        self.a_opt = torch.optim.Adam(self.actor.parameters(), lr=args.learning_rate)

    def update(self, batch) -> Dict[str, torch.Tensor]:
        """One IQL gradient step on (obs, actions, rewards, next_obs, terminals); returns detached stats."""
        args = self.args
        o, a, r, o2, d = batch
        with torch.no_grad():
            tq1, tq2 = self.qf_target(o)
            q_t = torch.min(tq1, tq2).gather(1, a[:, None]).squeeze(1)
            q_target = r + args.gamma * (1.0 - d) * self.vf(o2).squeeze(1)
        # V: expectile regression towards min(Q_target)(s, a)
        v = self.vf(o).squeeze(1)
        v_loss = expectile_loss(q_t - v, args.expectile)
        self.v_opt.zero_grad(set_to_none=True)
        v_loss.backward()
        self.v_opt.step()
        # Q: regression towards r + gamma (1 - terminal) V(s')
        q1, q2 = self.qf(o)
        q1a, q2a = q1.gather(1, a[:, None]).squeeze(1), q2.gather(1, a[:, None]).squeeze(1)
        q_loss = F.mse_loss(q1a, q_target) + F.mse_loss(q2a, q_target)
        self.q_opt.zero_grad(set_to_none=True)
        q_loss.backward()
        self.q_opt.step()
        # actor: advantage-weighted regression, weights exp(beta A) clipped
        adv = q_t - v.detach()
        weights = torch.exp(args.beta * adv).clamp(max=args.max_weight)
        logp = torch.log_softmax(self.actor(o), dim=1).gather(1, a[:, None]).squeeze(1)
        actor_loss = -(weights * logp).mean()
        self.a_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.a_opt.step()
        with torch.no_grad():
            for p, tp in zip(self.qf.parameters(), self.qf_target.parameters()):
                tp.lerp_(p, args.tau)
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

    @torch.no_grad()
    def act(self, obs: np.ndarray, rng: np.random.Generator, mode: str = "greedy", epsilon: float = 0.0) -> int:
        logits = self.actor(torch.as_tensor(obs, device=self.device)[None])[0]
        if mode == "policy":
            p = torch.softmax(logits.double(), 0).cpu().numpy()
            return int(rng.choice(self.n_actions, p=p / p.sum()))
        if mode == "eps-greedy" and rng.random() < epsilon:
            return int(rng.integers(self.n_actions))
        return int(logits.argmax())

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
    if args.critic_encoder_layers == len(args.hidden_sizes) and args.inject_at:
        pass  # head = output layer only: allowed
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

    start_time = time.time()
    for global_step in range(total):
        online = global_step >= args.offline_steps
        if global_step in inject_steps:
            log = agent.inject(probe)
            for k, v in log.items():
                writer.add_scalar(k, v, global_step)
            print(f"global_step={global_step}, injected plasticity into {args.inject_target}: "
                  f"output change {log['injection/output_change']:.3g}, trainable {int(log['injection/trainable_params'])}")

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

        stats = agent.update(rb.sample(args.batch_size, rng))
        losses = torch.stack([stats["losses/q_loss"], stats["losses/v_loss"], stats["losses/actor_loss"]])
        if not bool(torch.isfinite(losses).all()):  # one check per step; names the loss at fault
            for name in ("losses/q_loss", "losses/v_loss", "losses/actor_loss"):
                check_finite(stats[name], name, global_step)
        if global_step % args.log_every == 0 or global_step == total - 1:
            for k, v in stats.items():
                writer.add_scalar(k, v.item(), global_step)
            writer.add_scalar("charts/learning_rate", agent.q_opt.param_groups[0]["lr"], global_step)
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
    final["injection/count"] = float(len(args.inject_at))
    final.update({k: float(v) for k, v in stats.items()})
    final["dataset_goal_transitions"] = float(data["terminals"].sum())
    final["run_dir"] = run_dir
    if args.save_model:
        model_path = os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
        atomic_save({"model": agent.state_dict(), "args": vars(args), "global_step": total}, model_path)
        print(f"model saved to {model_path}")
        final["model_path"] = model_path
    writer.close()
    if args.track:
        import wandb

        wandb.finish()
    return final


if __name__ == "__main__":
    train(tyro.cli(Args))
