"""DQN (Double DQN by default) on Atari with plasticity injection (Nikishin et al., NeurIPS 2023).

cleanRL-style single file. Defaults follow cleanRL's `dqn_atari.py` (Nature DQN network, Adam 1e-4,
1M replay, 10M steps), with Double DQN and the Huber loss switched on. Atari games come from
ale-py's native vector environment (`ale_py.vector_env.AtariVectorEnv`: noop 30, frame skip 4 with
max-pool, 84x84 grey, 4-frame stack, fire reset, no sticky actions = `*NoFrameskip-v4` semantics).
Vector-observation gymnasium envs (CartPole-v1, LunarLander-v3, ...) work too, with an MLP encoder.

Plasticity injection at step t (`--inject-at t [t2 ...]`) turns the head h into
    Q(s) = h_θ(φ(s)) + h_θ'1(φ(s)) − h_θ'2(φ(s))
with θ frozen, θ'1 = θ'2 one fresh initialisation (θ'1 trainable, θ'2 frozen): the Q-values and the
number of trainable parameters are unchanged at t, the target network gets the same θ' values.

Episodes, rewards and the replay buffer:
* Training treats a life loss as terminal (episodic life) and learns from sign-clipped rewards;
  `charts/episodic_return` and `eval/episodic_return` are RAW game scores of whole games.
* The replay buffer stores every 84x84 frame once and rebuilds the 4-frame stacks when sampling,
  zero-padding frames from before an episode's first observation exactly as the env does at reset.
* Gymnasium 1.x vector envs auto-reset on the step AFTER an episode ends (that step ignores the
  action and returns the first observation of the next episode); it is never stored as a transition.
  Truncated episodes (time limit) bootstrap from their last observation; terminated ones do not.

Usage:
    python dqn_atari_injection.py --env-id PhoenixNoFrameskip-v4 --inject-at 5000000 --cuda
    python dqn_atari_injection.py --env-id CartPole-v1 --total-timesteps 40000 --learning-starts 1000 \
        --buffer-size 20000 --learning-rate 2.5e-4 --target-network-frequency 500 --batch-size 128 \
        --train-frequency 2 --exploration-fraction 0.2 --end-e 0.05 --eval-every 10000 --inject-at 20000
"""
import os
import random
import time
from dataclasses import dataclass, field, fields
from typing import Dict, List, Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, use the accelerator (cuda/mps) when there is one"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "plasticity-injection"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """whether to capture videos of one greedy episode at each evaluation (saved into `videos/{run_name}`)"""
    save_model: bool = False
    """whether to save the model into `runs/{run_name}/{exp_name}.cleanrl_model` (reload with `load_model`)"""

    # Algorithm specific arguments
    env_id: str = "PhoenixNoFrameskip-v4"
    """the id of the environment: an Atari game (`<Game>NoFrameskip-v4`, `<Game>-v5`, `ALE/<Game>-v5`) or a
    gymnasium env with a flat Box observation and Discrete actions (`CartPole-v1`, `LunarLander-v3`)"""
    total_timesteps: int = 10000000
    """total timesteps of the experiments (environment steps, summed over all envs)"""
    learning_rate: float = 1e-4
    """the learning rate of the optimizer (Adam)"""
    num_envs: int = 1
    """the number of parallel game environments (steps, frequencies and the buffer size count env steps)"""
    buffer_size: int = 1000000
    """the replay memory buffer size (transitions; each 84x84 frame is stored once)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 1.0
    """the target network update rate (1.0 = hard copy, <1 = Polyak averaging)"""
    target_network_frequency: int = 1000
    """the timesteps it takes to update the target network"""
    batch_size: int = 32
    """the batch size of sample from the reply memory"""
    start_e: float = 1
    """the starting epsilon for exploration"""
    end_e: float = 0.01
    """the ending epsilon for exploration"""
    exploration_fraction: float = 0.10
    """the fraction of `total-timesteps` it takes from start-e to go end-e"""
    learning_starts: int = 80000
    """timestep to start learning"""
    train_frequency: int = 4
    """the frequency of training (one gradient step every this many env steps)"""
    double_dqn: bool = True
    """Double DQN targets (online net picks the next action, target net values it); off = vanilla DQN max"""
    loss: Literal["huber", "mse"] = "huber"
    """TD loss: `huber` (smooth L1, as the Nature DQN's error clipping) or `mse` (cleanRL's dqn_atari)"""
    max_grad_norm: float = 0.0
    """clip the global gradient norm to this value (0 = no clipping, as cleanRL)"""

    # Evaluation
    eval_every: int = 250000
    """evaluate the greedy policy every this many env steps (0 = only at the end)"""
    eval_episodes: int = 10
    """number of whole episodes (real games, all lives) per evaluation; 0 = no evaluation"""
    eval_epsilon: float = 0.0
    """epsilon of the evaluation policy (0 = greedy)"""

    # Network (hooks for interventions)
    layer_norm: bool = False
    """LayerNorm after every conv/linear layer except the output layer"""
    activation: Literal["relu", "leaky_relu"] = "relu"
    """activation function of the network"""

    # Plasticity injection
    inject_at: List[int] = field(default_factory=list)
    """global step(s) at which to inject plasticity: one step = single injection, more = multiple injections"""
    inject_target: Literal["head", "all"] = "head"
    """where to inject: `head` = the MLP head after the encoder (the paper), `all` = the whole Q-network"""
    inject_keep_trainable: bool = False
    """ablation: keep every term trainable (old head, θ'1 and θ'2): trainable parameters triple"""
    inject_no_third_term: bool = False
    """ablation: drop the frozen −h_θ'2 term, so the Q-values jump at injection"""
    inject_reset_optimizer: bool = False
    """clear the Adam state (moments, step counts) at injection; default keeps the encoder's moments"""
    inject_sync_target: bool = True
    """copy the online network into the target network right before injecting, so both are equal after
    it; `--no-inject-sync-target` keeps the lagging target (it gets the same θ' pair; its function is
    unchanged and it catches up at the next target update)"""
    probe_batch_size: int = 256
    """observations in the (seeded) probe batch sampled from the replay buffer to measure output changes"""

    # Atari-only options (an error on other envs when changed from the default)
    frame_stack: int = 4
    """Atari only: number of stacked frames"""
    noop_max: int = 30
    """Atari only: maximum number of no-op actions at the start of a game"""
    repeat_action_probability: float = 0.0
    """Atari only: sticky actions (0 = NoFrameskip-v4 semantics; v5 ids also use this value)"""
    episodic_life: bool = True
    """Atari only: a life loss ends the episode for training (the game continues; scores are whole games)"""
    clip_reward: bool = True
    """Atari only: learn from sign(reward) (scores are always logged raw)"""
    max_episode_frames: int = 108000
    """Atari only: truncate a game after this many emulator frames (108000 = 30 minutes)"""


ATARI_ONLY = ("frame_stack", "noop_max", "repeat_action_probability", "episodic_life", "clip_reward", "max_episode_frames")
INJECT_PATHS = {"head": ["net.1"], "all": ["net"]}


# ----------------------------------------------------------------------------------------------
# Environments
# ----------------------------------------------------------------------------------------------
@dataclass
class EnvSpec:
    env_id: str
    atari_game: Optional[str]  # ALE rom name (e.g. "phoenix") or None for a vector-obs env
    obs_shape: tuple
    n_actions: int

    @property
    def atari(self) -> bool:
        return self.atari_game is not None


def resolve_env(env_id: str) -> tuple:
    """(atari game or None) for an env id; UserError naming --env-id when it is unknown/unsupported."""
    import ale_py

    gym.register_envs(ale_py)
    if env_id.endswith("-v5") and "/" not in env_id and f"ALE/{env_id}" in gym.registry:
        env_id = f"ALE/{env_id}"  # accept `Phoenix-v5` for `ALE/Phoenix-v5`
    try:
        spec = gym.spec(env_id)
    except Exception as e:  # gymnasium raises several error types for unknown / malformed ids
        raise UserError(f"--env-id {env_id!r}: unknown environment ({type(e).__name__}: {e})") from None
    if spec.entry_point == "ale_py.env:AtariEnv" or str(spec.entry_point).startswith("ale_py"):
        kwargs = spec.kwargs or {}
        if kwargs.get("obs_type", "rgb") != "rgb" or not (env_id.endswith("NoFrameskip-v4") or env_id.endswith("-v5")):
            raise UserError(
                f"--env-id {env_id!r}: unsupported Atari variant; use <Game>NoFrameskip-v4 or ALE/<Game>-v5 "
                "(this script does its own frame skip, stacking and preprocessing)"
            )
        return kwargs["game"], spec
    return None, spec


def make_env_spec(args: Args) -> EnvSpec:
    game, spec = resolve_env(args.env_id)
    if game is not None:
        from ale_py import ALEInterface, LoggerMode, roms

        ALEInterface.setLoggerMode(LoggerMode.Error)
        ale = ALEInterface()
        ale.loadROM(roms.get_rom_path(game))
        return EnvSpec(spec.id, game, (args.frame_stack, 84, 84), len(ale.getMinimalActionSet()))
    try:
        env = gym.make(args.env_id)
    except Exception as e:
        raise UserError(f"--env-id {args.env_id!r}: cannot be created ({type(e).__name__}: {e})") from None
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    if not isinstance(act_space, gym.spaces.Discrete) or not (
        isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1
    ):
        raise UserError(
            f"--env-id {args.env_id!r}: needs Discrete actions and a flat Box observation "
            f"(got {obs_space} / {act_space}), or an Atari game"
        )
    return EnvSpec(args.env_id, None, tuple(obs_space.shape), int(act_space.n))


def make_envs(spec: EnvSpec, args: Args, num_envs: int):
    """A gymnasium 1.x vector env with next-step autoreset (Atari: ale-py's native C++ vector env)."""
    if spec.atari:
        from ale_py.vector_env import AtariVectorEnv

        return AtariVectorEnv(
            spec.atari_game,
            num_envs,
            num_threads=max(1, min(num_envs, os.cpu_count() or 1)),
            stack_num=args.frame_stack,
            frameskip=4,
            maxpool=True,
            noop_max=args.noop_max,
            repeat_action_probability=args.repeat_action_probability,
            max_num_frames_per_episode=args.max_episode_frames,
            use_fire_reset=True,
            # Life losses are read from info["lives"] (EpisodeTracker): `terminated` then means game
            # over only, and a life loss never restarts the game. Rewards stay raw; we clip them.
            episodic_life=False,
            life_loss_info=False,
            reward_clipping=False,
        )
    return gym.vector.SyncVectorEnv([lambda: gym.make(spec.env_id) for _ in range(num_envs)])


def make_video_env(spec: EnvSpec, args: Args, run_name: str):
    """Single env recording one greedy episode per evaluation (RecordVideo needs a plain gym env)."""
    if spec.atari:
        env = gym.make(spec.env_id, render_mode="rgb_array", frameskip=1, repeat_action_probability=args.repeat_action_probability,
                       max_episode_steps=args.max_episode_frames)
        env = gym.wrappers.RecordVideo(env, f"videos/{run_name}", episode_trigger=lambda i: True, disable_logger=True)
        env = gym.wrappers.AtariPreprocessing(env, noop_max=args.noop_max, frame_skip=4, screen_size=84,
                                              terminal_on_life_loss=False, grayscale_obs=True, scale_obs=False)
        return gym.wrappers.FrameStackObservation(env, args.frame_stack, padding_type="zero")
    env = gym.make(args.env_id, render_mode="rgb_array")
    return gym.wrappers.RecordVideo(env, f"videos/{run_name}", episode_trigger=lambda i: True, disable_logger=True)


class EpisodeTracker:
    """Turns vector-env outputs into training signals and RAW per-game scores.

    * the step right after an episode's last observation is the autoreset step: no transition,
      no reward, no length;
    * a life loss (info["lives"] went down) is a terminal for training when `episodic_life`;
    * training rewards are sign-clipped when `clip_reward`; returns are accumulated unclipped.
    """

    def __init__(self, num_envs: int, episodic_life: bool, clip_reward: bool):
        self.episodic_life, self.clip_reward = episodic_life, clip_reward
        self.returns = np.zeros(num_envs, np.float64)
        self.lengths = np.zeros(num_envs, np.int64)
        self.prev_last = np.zeros(num_envs, bool)
        self.lives = None

    def reset(self, info: dict) -> None:
        self.returns[:] = 0
        self.lengths[:] = 0
        self.prev_last[:] = False
        self.lives = np.array(info["lives"]) if "lives" in info else None

    def step(self, rewards, terminated, truncated, info):
        """Returns (train_rewards, train_terminated, last, finished[(env, raw_return, length)])."""
        rewards = np.asarray(rewards, np.float64)
        autoreset = self.prev_last
        live = ~autoreset
        last = (np.asarray(terminated) | np.asarray(truncated)) & live
        self.returns[live] += rewards[live]
        self.lengths[live] += 1
        finished = [(int(e), float(self.returns[e]), int(self.lengths[e])) for e in np.flatnonzero(last)]
        self.returns[last] = 0
        self.lengths[last] = 0
        life_loss = np.zeros_like(last)
        if "lives" in info:
            lives = np.array(info["lives"])
            if self.episodic_life and self.lives is not None:
                life_loss = live & (lives < self.lives)
            self.lives = lives
        self.prev_last = last
        train_terminated = (np.asarray(terminated) | life_loss) & live
        train_rewards = np.sign(rewards) if self.clip_reward else rewards
        return train_rewards.astype(np.float32), train_terminated, last, finished


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------
def make_activation(name: str) -> nn.Module:
    return nn.LeakyReLU(0.01) if name == "leaky_relu" else nn.ReLU()


class ScaleObs(nn.Module):
    """uint8 frames -> float in [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255.0


class QNetwork(nn.Module):
    """Q(s) = head(encoder(s)), stored as `self.net = nn.Sequential(encoder, head)`.

    Atari: encoder = the Nature DQN conv torso (3 conv layers, flattened to 3136 features), head =
    Linear(3136, 512) + activation + Linear(512, n_actions). Vector obs: encoder = Linear(obs, 120) +
    activation, head = Linear(120, 84) + activation + Linear(84, n_actions) (cleanRL's dqn.py sizes).
    Injection paths: "net.1" (head) and "net" (whole network).
    """

    def __init__(self, obs_shape, n_actions: int, *, atari: bool, layer_norm: bool = False, activation: str = "relu"):
        super().__init__()
        self.obs_shape, self.n_actions, self.atari = tuple(obs_shape), int(n_actions), atari
        act = lambda: make_activation(activation)  # noqa: E731
        if atari:
            c = obs_shape[0]
            layers: List[nn.Module] = [ScaleObs()]
            for cin, cout, k, s, hw in ((c, 32, 8, 4, 20), (32, 64, 4, 2, 9), (64, 64, 3, 1, 7)):
                layers.append(nn.Conv2d(cin, cout, k, s))
                if layer_norm:
                    layers.append(nn.LayerNorm([cout, hw, hw]))
                layers.append(act())
            encoder = nn.Sequential(*layers, nn.Flatten())
            feat, hidden = 3136, 512
        else:
            feat, hidden = 120, 84
            encoder = nn.Sequential(nn.Linear(int(np.prod(obs_shape)), feat), *([nn.LayerNorm(feat)] if layer_norm else []), act())
        head = nn.Sequential(nn.Linear(feat, hidden), *([nn.LayerNorm(hidden)] if layer_norm else []), act(), nn.Linear(hidden, n_actions))
        self.net = nn.Sequential(encoder, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_network(spec: EnvSpec, args: Args) -> QNetwork:
    return QNetwork(spec.obs_shape, spec.n_actions, atari=spec.atari, layer_norm=args.layer_norm, activation=args.activation)


# ----------------------------------------------------------------------------------------------
# Replay buffer
# ----------------------------------------------------------------------------------------------
class ReplayBuffer:
    """Replay memory that stores each frame ONCE and rebuilds frame stacks at sample time.

    One circular stream of slots per env (all envs step together). Slot of observation number t is
    t % capacity and holds the newest frame of that observation, `first` (it is the first
    observation of an episode), `last` (the episode ended with it: the next step is the autoreset
    step, so no transition starts here), and the action taken from it with the reward and
    `terminated` flag that followed. A transition starting at step t uses steps t-stack+1 .. t+1:
    the stack of t is frames t-stack+1..t, frames from before the episode's first observation are
    zero (what the Atari vector env gives at reset), and the next stack shifts by one.
    With `stack == 1` and `stacked=False` it is a plain buffer for vector observations.
    Capacity counts transitions over all envs (`capacity // num_envs` slots per env).
    """

    def __init__(self, capacity: int, num_envs: int, frame_shape, frame_dtype, stack: int, stacked: bool, seed: int):
        self.num_envs, self.stack, self.stacked = num_envs, stack, stacked
        self.cap = capacity // num_envs
        if self.cap < stack + 2:
            raise UserError(f"--buffer-size {capacity} is too small: need at least {(stack + 2) * num_envs} for {num_envs} env(s)")
        self.frames = np.zeros((num_envs, self.cap, *frame_shape), dtype=frame_dtype)  # lazily allocated pages
        self.actions = np.zeros((num_envs, self.cap), np.int64)
        self.rewards = np.zeros((num_envs, self.cap), np.float32)
        self.terminated = np.zeros((num_envs, self.cap), bool)
        self.first = np.zeros((num_envs, self.cap), bool)
        self.last = np.zeros((num_envs, self.cap), bool)
        self.t = 0  # observations written per env
        self.rng = np.random.default_rng(seed)

    def _frame(self, obs: np.ndarray) -> np.ndarray:
        return obs[:, -1] if self.stacked else obs

    def reset(self, obs: np.ndarray) -> None:
        """The observations returned by env.reset(): first observations of every env."""
        p = self.t % self.cap
        self.frames[:, p] = self._frame(obs)
        self.first[:, p], self.last[:, p] = True, False
        self.t += 1

    def add(self, actions, rewards, terminated, next_obs, next_last) -> None:
        """One env step: completes the transitions from the newest slot and stores the next observations.

        next_last[e]: env e's episode ended with next_obs[e] (terminated or truncated, not a life loss).
        On the autoreset step after it, next_obs is the first observation of the new episode.
        """
        p, q = (self.t - 1) % self.cap, self.t % self.cap
        self.actions[:, p] = actions
        self.rewards[:, p] = rewards
        self.terminated[:, p] = terminated
        self.frames[:, q] = self._frame(next_obs)
        self.first[:, q] = self.last[:, p]
        self.last[:, q] = next_last
        self.t += 1

    def step_range(self) -> tuple:
        """[lo, hi) of observation numbers from which a sampled transition may start (before `last`)."""
        hi = self.t - 1  # the newest observation has no successor yet
        lo = self.t - self.cap + self.stack - 1 if self.t > self.cap else 0  # its stack must be intact
        return lo, hi

    def valid_indices(self) -> tuple:
        lo, hi = self.step_range()
        steps = np.arange(lo, max(lo, hi))
        envs, steps = np.repeat(np.arange(self.num_envs), len(steps)), np.tile(steps, self.num_envs)
        ok = ~self.last[envs, steps % self.cap]
        return envs[ok], steps[ok]

    def sample_indices(self, n: int, rng: Optional[np.random.Generator] = None) -> tuple:
        """n (env, step) pairs drawn uniformly from the valid transitions (rejection sampling)."""
        rng = self.rng if rng is None else rng
        lo, hi = self.step_range()
        if hi <= lo:
            raise RuntimeError("the replay buffer holds no transition yet")
        envs, steps, have = [], [], 0
        for _ in range(1000):
            e = rng.integers(0, self.num_envs, 2 * (n - have) + 8)
            s = rng.integers(lo, hi, len(e))
            ok = ~self.last[e, s % self.cap]
            envs.append(e[ok]), steps.append(s[ok])
            have += int(ok.sum())
            if have >= n:
                return np.concatenate(envs)[:n], np.concatenate(steps)[:n]
        raise RuntimeError("the replay buffer holds no valid transition")

    def get(self, envs: np.ndarray, steps: np.ndarray) -> tuple:
        """(obs, actions, rewards, terminated, next_obs) numpy arrays of the given transitions."""
        k = self.stack
        slots = (steps[:, None] + np.arange(-(k - 1), 2)) % self.cap  # (B, k+1) window
        e = envs[:, None]
        window = self.frames[e, slots]
        if k > 1:
            first = self.first[e, slots[:, 1:k]]  # (B, k-1): first flags of steps t-k+2 .. t
            # frame w (< k-1) is before the episode's start when any step after it up to t is `first`
            blocked = np.flip(np.logical_or.accumulate(np.flip(first, 1), 1), 1)
            if blocked.any():
                keep = np.ones(slots.shape, bool)
                keep[:, : k - 1] = ~blocked
                window = window * keep.reshape(keep.shape + (1,) * (window.ndim - 2)).astype(window.dtype)
        p = slots[:, k - 1]
        if self.stacked:
            obs, next_obs = window[:, :k], window[:, 1:]
        else:
            obs, next_obs = window[:, 0], window[:, 1]
        return obs, self.actions[envs, p], self.rewards[envs, p], self.terminated[envs, p], next_obs

    def sample(self, n: int, device, rng: Optional[np.random.Generator] = None) -> tuple:
        """A batch of torch tensors on `device`: obs, actions, rewards, terminated (float), next_obs."""
        obs, a, r, d, nxt = self.get(*self.sample_indices(n, rng))
        to = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
        return to(obs), to(a), to(r), to(d.astype(np.float32)), to(nxt)


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
# DQN pieces
# ----------------------------------------------------------------------------------------------
def linear_schedule(start_e: float, end_e: float, duration: float, t: int) -> float:
    slope = (end_e - start_e) / max(duration, 1)
    return max(slope * t + start_e, end_e) if end_e <= start_e else min(slope * t + start_e, end_e)


def dqn_update(q_network, target_network, optimizer, batch, *, gamma: float, double_dqn: bool = True,
               loss_type: str = "huber", max_grad_norm: float = 0.0, global_step: int = 0):
    """One gradient step on a replay batch; returns (td_loss, mean Q(s, a)) as detached tensors."""
    obs, actions, rewards, terminated, next_obs = batch
    with torch.no_grad():
        target_q = target_network(next_obs)
        if double_dqn:
            next_actions = q_network(next_obs).argmax(dim=1, keepdim=True)
            next_value = target_q.gather(1, next_actions).squeeze(1)
        else:
            next_value = target_q.max(dim=1).values
        td_target = rewards + gamma * next_value * (1.0 - terminated)
    q_sa = q_network(obs).gather(1, actions.long().unsqueeze(1)).squeeze(1)
    loss = F.smooth_l1_loss(q_sa, td_target) if loss_type == "huber" else F.mse_loss(q_sa, td_target)
    check_finite(loss, "losses/td_loss", global_step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    return loss.detach(), q_sa.detach().mean()


@torch.no_grad()
def update_target(target_network: nn.Module, q_network: nn.Module, tau: float) -> None:
    if tau >= 1.0:
        target_network.load_state_dict(q_network.state_dict())
        return
    for tp, p in zip(target_network.parameters(), q_network.parameters()):
        tp.lerp_(p, tau)


def inject_plasticity(q_network, target_network, optimizer, probe: torch.Tensor, args: Args) -> Dict[str, float]:
    """Inject into `args.inject_target`, mirrored into the target network; returns the values to log."""
    if args.inject_sync_target:
        target_network.load_state_dict(q_network.state_dict())
    return apply_injection(
        q_network,
        INJECT_PATHS[args.inject_target],
        probe,
        targets=[target_network],
        optimizers=[optimizer],
        reset_optimizer=args.inject_reset_optimizer,
        keep_trainable=args.inject_keep_trainable,
        third_term=not args.inject_no_third_term,
    )


def select_actions(q_network, obs: np.ndarray, epsilon: float, n_actions: int, rng: np.random.Generator, device) -> np.ndarray:
    """Per-env epsilon-greedy (the network runs only if some env acts greedily)."""
    explore = rng.random(len(obs)) < epsilon
    actions = rng.integers(0, n_actions, len(obs))
    if not explore.all():
        with torch.no_grad():
            greedy = q_network(torch.as_tensor(obs, device=device)).argmax(dim=1).cpu().numpy()
        actions = np.where(explore, actions, greedy)
    return actions.astype(np.int64)


def evaluate(q_network, spec: EnvSpec, args: Args, episodes: int, device, seed: int, epsilon: float = 0.0) -> List[float]:
    """RAW returns of `episodes` whole episodes (one per env of a fresh vector env, all lives)."""
    envs = make_envs(spec, args, episodes)
    rng = np.random.default_rng(seed)
    returns = np.zeros(episodes)
    done = np.zeros(episodes, bool)
    obs, _ = envs.reset(seed=seed)
    try:
        while not done.all():
            actions = select_actions(q_network, obs, epsilon, spec.n_actions, rng, device)
            obs, rewards, terminated, truncated, _ = envs.step(actions)
            returns += np.where(done, 0.0, rewards)
            done |= np.asarray(terminated) | np.asarray(truncated)
    finally:
        envs.close()
    return returns.tolist()


def record_video(q_network, video_env, spec: EnvSpec, device, seed: int) -> None:
    obs, _ = video_env.reset(seed=seed)
    done = False
    while not done:
        with torch.no_grad():
            action = int(q_network(torch.as_tensor(np.asarray(obs)[None], device=device)).argmax(dim=1))
        obs, _, terminated, truncated, _ = video_env.step(action)
        done = terminated or truncated


def save_model(path: str, q_network: QNetwork, args: Args, global_step: int, injections: list) -> None:
    atomic_save(
        {
            "model": q_network.state_dict(),
            "args": vars(args),
            "global_step": global_step,
            "obs_shape": list(q_network.obs_shape),
            "n_actions": q_network.n_actions,
            "atari": q_network.atari,
            "injections": injections,
        },
        path,
    )


def load_model(path: str, device="cpu") -> QNetwork:
    """Rebuild a saved (possibly injected) Q-network; UserError naming the file when it is unusable."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read the model file ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not {"model", "args", "obs_shape", "n_actions", "atari"} <= set(ckpt):
        raise UserError(f"{path}: not a model saved by dqn_atari_injection.py (missing keys)")
    a = ckpt["args"]
    net = QNetwork(ckpt["obs_shape"], ckpt["n_actions"], atari=ckpt["atari"],
                   layer_norm=a.get("layer_norm", False), activation=a.get("activation", "relu")).to(device)
    try:
        load_injected_state_dict(net, ckpt["model"])
    except Exception as e:
        raise UserError(f"{path}: the saved weights do not match the network ({type(e).__name__}: {e})") from None
    return net


def validate_args(args: Args) -> EnvSpec:
    """Check every flag (before anything is written); returns the resolved environment."""
    def need(ok: bool, msg: str):
        if not ok:
            raise UserError(msg)

    need(args.total_timesteps > 0, f"--total-timesteps {args.total_timesteps} must be positive")
    need(args.num_envs >= 1, f"--num-envs {args.num_envs} must be at least 1")
    need(0 <= args.learning_starts < args.total_timesteps,
         f"--learning-starts {args.learning_starts} must lie in [0, --total-timesteps {args.total_timesteps}): no training would happen")
    need(args.learning_rate > 0, f"--learning-rate {args.learning_rate} must be positive")
    need(args.batch_size >= 1, f"--batch-size {args.batch_size} must be at least 1")
    need(args.train_frequency >= 1, f"--train-frequency {args.train_frequency} must be at least 1")
    need(args.target_network_frequency >= 1, f"--target-network-frequency {args.target_network_frequency} must be at least 1")
    need(0 < args.tau <= 1, f"--tau {args.tau} must lie in (0, 1]")
    need(0 <= args.gamma <= 1, f"--gamma {args.gamma} must lie in [0, 1]")
    need(0 <= args.start_e <= 1, f"--start-e {args.start_e} must lie in [0, 1]")
    need(0 <= args.end_e <= 1, f"--end-e {args.end_e} must lie in [0, 1]")
    need(0 < args.exploration_fraction <= 1, f"--exploration-fraction {args.exploration_fraction} must lie in (0, 1]")
    need(args.max_grad_norm >= 0, f"--max-grad-norm {args.max_grad_norm} must be >= 0")
    need(args.eval_every >= 0, f"--eval-every {args.eval_every} must be >= 0 (0 = only at the end)")
    need(args.eval_episodes >= 0, f"--eval-episodes {args.eval_episodes} must be >= 0")
    need(0 <= args.eval_epsilon <= 1, f"--eval-epsilon {args.eval_epsilon} must lie in [0, 1]")
    need(args.probe_batch_size >= 1, f"--probe-batch-size {args.probe_batch_size} must be at least 1")
    need(args.buffer_size >= args.batch_size, f"--buffer-size {args.buffer_size} is smaller than --batch-size {args.batch_size}")
    check_steps("--inject-at", args.inject_at, args.total_timesteps)
    early = [s for s in args.inject_at if s < args.learning_starts]
    need(not early, f"--inject-at {early} is before --learning-starts {args.learning_starts}: "
                    "inject once the replay buffer is filled and training has started")
    need(args.frame_stack >= 1, f"--frame-stack {args.frame_stack} must be at least 1")
    need(args.noop_max >= 0, f"--noop-max {args.noop_max} must be >= 0")
    need(0 <= args.repeat_action_probability <= 1, f"--repeat-action-probability {args.repeat_action_probability} must lie in [0, 1]")
    need(args.max_episode_frames >= 1, f"--max-episode-frames {args.max_episode_frames} must be at least 1")
    spec = make_env_spec(args)
    if not spec.atari:
        defaults = Args()
        for name in ATARI_ONLY:
            if getattr(args, name) != getattr(defaults, name):
                flag = "--" + name.replace("_", "-")
                if isinstance(getattr(defaults, name), bool):
                    flag = flag if getattr(args, name) else "--no-" + name.replace("_", "-")
                raise UserError(f"{flag} is an Atari-only option; --env-id {args.env_id!r} is not an Atari game")
    stack = args.frame_stack if spec.atari else 1
    need(args.buffer_size // args.num_envs >= stack + 2,
         f"--buffer-size {args.buffer_size} is too small: need at least {(stack + 2) * args.num_envs} for {args.num_envs} env(s)")
    if args.capture_video:
        try:
            import moviepy  # noqa: F401
        except ImportError:
            raise UserError("--capture-video needs moviepy (pip install moviepy)") from None
    return spec


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(args: Args) -> dict:
    """Run DQN; returns final metrics (eval/episodic_return, losses, injections, paths)."""
    spec = validate_args(args)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"

    seed_everything(args.seed, args.torch_deterministic)
    device = pick_device(args.cuda)
    envs = make_envs(spec, args, args.num_envs)
    n = args.num_envs

    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, monitor_gym=False, save_code=True)
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    q_network = build_network(spec, args).to(device)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate)
    target_network = build_network(spec, args).to(device)
    target_network.load_state_dict(q_network.state_dict())

    rb = ReplayBuffer(args.buffer_size, n, (84, 84) if spec.atari else spec.obs_shape,
                      np.uint8 if spec.atari else np.float32, args.frame_stack if spec.atari else 1,
                      stacked=spec.atari, seed=args.seed + 1)
    tracker = EpisodeTracker(n, episodic_life=spec.atari and args.episodic_life, clip_reward=spec.atari and args.clip_reward)
    act_rng = np.random.default_rng(args.seed)
    probe_rng = np.random.default_rng(args.seed + 2)
    inject_steps = set(args.inject_at)
    injections: List[dict] = []
    train_returns: List[float] = []
    eval_returns: List[float] = []
    video_env = None
    if args.capture_video:
        try:
            video_env = make_video_env(spec, args, run_name)
        except Exception as e:  # never let video recording end a run
            print(f"warning: --capture-video disabled ({type(e).__name__}: {e})")

    def run_eval(step: int) -> None:
        nonlocal eval_returns, video_env
        if args.eval_episodes <= 0:
            return
        eval_returns = evaluate(q_network, spec, args, args.eval_episodes, device, seed=args.seed + 100_000, epsilon=args.eval_epsilon)
        writer.add_scalar("eval/episodic_return", float(np.mean(eval_returns)), step)
        print(f"global_step={step}, eval/episodic_return={np.mean(eval_returns):.2f} (+- {np.std(eval_returns):.2f})")
        if video_env is not None:
            try:
                record_video(q_network, video_env, spec, device, seed=args.seed + 200_000 + step)
            except Exception as e:
                print(f"warning: --capture-video disabled ({type(e).__name__}: {e})")
                video_env = None

    loss = q_mean = None
    start_time = time.time()
    obs, info = envs.reset(seed=args.seed)
    rb.reset(obs)
    tracker.reset(info)
    global_step = 0
    try:
        for global_step in range(0, args.total_timesteps, n):
            epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_fraction * args.total_timesteps, global_step)
            actions = select_actions(q_network, obs, epsilon, spec.n_actions, act_rng, device)
            next_obs, rewards, terminated, truncated, info = envs.step(actions)
            train_rewards, train_terminated, last, finished = tracker.step(rewards, terminated, truncated, info)
            for _, ep_return, ep_length in finished:
                train_returns.append(ep_return)
                print(f"global_step={global_step}, episodic_return={ep_return}")
                writer.add_scalar("charts/episodic_return", ep_return, global_step)
                writer.add_scalar("charts/episodic_length", ep_length, global_step)
                writer.add_scalar("charts/epsilon", epsilon, global_step)
            rb.add(actions, train_rewards, train_terminated, next_obs, last)
            obs = next_obs

            for step in range(global_step, min(global_step + n, args.total_timesteps)):
                if step in inject_steps:
                    probe = rb.sample(args.probe_batch_size, device, rng=probe_rng)[0]
                    log = inject_plasticity(q_network, target_network, optimizer, probe, args)
                    injections.append({"global_step": step, **log})
                    for k, v in log.items():
                        writer.add_scalar(k, v, step)
                    print(f"global_step={step}, injection: " + ", ".join(f"{k}={v:g}" for k, v in log.items()))
                if step > args.learning_starts:
                    if step % args.train_frequency == 0:
                        batch = rb.sample(args.batch_size, device)
                        loss, q_mean = dqn_update(q_network, target_network, optimizer, batch, gamma=args.gamma,
                                                  double_dqn=args.double_dqn, loss_type=args.loss,
                                                  max_grad_norm=args.max_grad_norm, global_step=step)
                        if step % 100 == 0:
                            writer.add_scalar("losses/td_loss", float(loss), step)
                            writer.add_scalar("losses/q_values", float(q_mean), step)
                            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], step)
                            sps = int(step / (time.time() - start_time))
                            writer.add_scalar("charts/SPS", sps, step)
                    if step % args.target_network_frequency == 0:
                        update_target(target_network, q_network, args.tau)
                if args.eval_every > 0 and step > 0 and step % args.eval_every == 0:
                    run_eval(step)
        global_step = args.total_timesteps
        run_eval(global_step)
        model_path = None
        if args.save_model:
            model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
            save_model(model_path, q_network, args, global_step, injections)
            print(f"model saved to {model_path}")
    finally:
        envs.close()
        writer.close()
        if video_env is not None:
            try:
                video_env.close()
            except Exception:
                pass
        if args.track:
            import wandb

            wandb.finish()

    return {
        "run_name": run_name,
        "run_dir": f"runs/{run_name}",
        "model_path": model_path,
        "global_step": global_step,
        "eval/episodic_return": float(np.mean(eval_returns)) if eval_returns else None,
        "eval_returns": eval_returns,
        "charts/episodic_return": float(np.mean(train_returns[-20:])) if train_returns else None,
        "train_returns": train_returns,
        "losses/td_loss": None if loss is None else float(loss),
        "losses/q_values": None if q_mean is None else float(q_mean),
        "injections": injections,
        "SPS": int(global_step / max(time.time() - start_time, 1e-9)),
    }


if __name__ == "__main__":
    train(tyro.cli(Args))
