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

Baselines and diagnostics from the shared blocks: `--metrics-every` (plasticity/... metrics on a fixed
probe batch), `--reset-at`, `--shrink-perturb-at`, `--l2-schedule`, `--layer-norm`, `--activation`,
and an adaptive injection trigger (`--adaptive-inject-metric/-threshold`).

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
    """LayerNorm after every hidden linear layer, GroupNorm(1, C) (LayerNorm over C, H, W) after every conv"""
    activation: Literal["relu", "leaky_relu", "tanh"] = "relu"
    """hidden activation of the network (leaky_relu: slope 0.01)"""

    # Plasticity injection
    inject_at: List[int] = field(default_factory=list)
    """global step(s) at which to inject plasticity: one step = single injection, more = multiple injections"""
    inject_target: Literal["head", "all"] = "head"
    """where to inject: `head` = the MLP head after the encoder (the paper), `all` = the whole Q-network"""
    inject_keep_trainable: bool = False
    """ablation: keep every term trainable (old head, θ'1 and θ'2): the head's trainable parameters triple"""
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

    # Plasticity diagnostics and other interventions (shared blocks `plasticity` / `interventions`)
    metrics_every: int = 10000
    """measure plasticity (`plasticity/...`: effective rank, dormant units, weight magnitude, updated
    units, gradient norms) every this many env steps from --learning-starts on; 0 = never"""
    metrics_batch_size: int = 256
    """size of the fixed probe batch for the plasticity metrics (drawn once from the replay buffer, seeded)"""
    dormant_tau: float = 0.025
    """ReDo threshold: a unit is dormant when its normalised mean activation is <= tau"""
    reset_at: List[int] = field(default_factory=list)
    """global step(s) at which to re-initialise --reset-target (a reset baseline; the buffer is kept)"""
    reset_target: Literal["head", "all"] = "head"
    """what --reset-at re-initialises (the target network gets the same values, Adam state of reset params is cleared)"""
    shrink_perturb_at: List[int] = field(default_factory=list)
    """global step(s) at which to shrink-and-perturb --shrink-perturb-target: θ <- S·θ + P·ε"""
    shrink_perturb_target: Literal["head", "all"] = "all"
    """what --shrink-perturb-at changes"""
    sp_shrink: float = 1.0
    """shrink factor S of shrink-and-perturb"""
    sp_perturb: float = 0.01
    """perturbation factor P of shrink-and-perturb (ε: a fresh initialisation)"""
    l2_schedule: Literal["none", "constant", "incremental", "periodic"] = "none"
    """L2 penalty on the TD loss: constant --l2-coef, incremental --l2-start -> --l2-end, or periodic"""
    l2_coef: float = 1e-5
    """L2 coefficient (constant schedule, and periodic while on)"""
    l2_start: float = 0.0
    """incremental L2: coefficient at step 0"""
    l2_end: float = 1e-4
    """incremental L2: coefficient at the last step"""
    l2_period_on: int = 500000
    """periodic L2: steps with the penalty on"""
    l2_period_off: int = 100000
    """periodic L2: steps with the penalty off"""
    adaptive_inject_metric: Optional[str] = None
    """inject when this plasticity key (e.g. plasticity/erank_features_mean) crosses --adaptive-inject-threshold"""
    adaptive_inject_threshold: Optional[float] = None
    """threshold of the adaptive injection trigger (setting it turns the trigger on; needs --metrics-every)"""
    adaptive_inject_direction: Literal["below", "above"] = "below"
    """fire when the metric is below / above the threshold"""
    adaptive_inject_min_gap: int = 0
    """at least this many env steps between two adaptive injections"""
    adaptive_inject_max_count: int = 1
    """at most this many adaptive injections"""

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
class ScaleObs(nn.Module):
    """uint8 frames -> float in [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255.0


class QNetwork(nn.Module):
    """Q(s) = head(encoder(s)), stored as `self.net = nn.Sequential(encoder, head)`.

    Every hidden layer is followed by [a norm under `layer_norm`] and its own activation module
    (what the plasticity block's per-layer feature metrics hook into).
    Atari: encoder = the Nature DQN conv torso (3 conv layers, flattened to 3136 features), head =
    Linear(3136, 512) + activation + Linear(512, n_actions). Vector obs: encoder = Linear(obs, 120) +
    activation, head = Linear(120, 84) + activation + Linear(84, n_actions) (cleanRL's dqn.py sizes).
    Injection paths: "net.1" (head) and "net" (whole network).
    """

    def __init__(self, obs_shape, n_actions: int, *, atari: bool, layer_norm: bool = False, activation: str = "relu"):
        super().__init__()
        self.obs_shape, self.n_actions, self.atari = tuple(obs_shape), int(n_actions), atari
        def block(layer: nn.Module) -> List[nn.Module]:  # layer [-> norm] -> its own activation module
            return [layer] + ([build_norm(layer)] if layer_norm else []) + [build_activation(activation)]

        if atari:
            c = obs_shape[0]
            convs = [nn.Conv2d(c, 32, 8, 4), nn.Conv2d(32, 64, 4, 2), nn.Conv2d(64, 64, 3, 1)]
            encoder = nn.Sequential(ScaleObs(), *[m for conv in convs for m in block(conv)], nn.Flatten())
            feat, hidden = 64 * 7 * 7, 512
        else:
            feat, hidden = 120, 84
            encoder = nn.Sequential(*block(nn.Linear(int(np.prod(obs_shape)), feat)))
        head = nn.Sequential(*block(nn.Linear(feat, hidden)), nn.Linear(hidden, n_actions))
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
# DQN pieces
# ----------------------------------------------------------------------------------------------
def linear_schedule(start_e: float, end_e: float, duration: float, t: int) -> float:
    slope = (end_e - start_e) / max(duration, 1)
    return max(slope * t + start_e, end_e) if end_e <= start_e else min(slope * t + start_e, end_e)


def td_loss(q_network, target_network, batch, *, gamma: float, double_dqn: bool = True, loss_type: str = "huber"):
    """(TD loss, Q(s, a)) of a replay batch; the bootstrap target carries no gradient."""
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
    return loss, q_sa


def dqn_update(q_network, target_network, optimizer, batch, *, gamma: float, double_dqn: bool = True,
               loss_type: str = "huber", max_grad_norm: float = 0.0, global_step: int = 0, l2: float = 0.0):
    """One gradient step on a replay batch; returns (td_loss, mean Q(s, a)) as detached tensors.
    l2 > 0 adds l2 * Σw² over the trainable weight matrices (`--l2-schedule`) to the loss."""
    loss, q_sa = td_loss(q_network, target_network, batch, gamma=gamma, double_dqn=double_dqn, loss_type=loss_type)
    check_finite(loss, "losses/td_loss", global_step)
    if l2 > 0:
        loss = loss + l2 * l2_penalty(q_network)
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
    check_intervention_args(args, args.total_timesteps, plasticity_keys(build_network(spec, args)))
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
    n = args.num_envs
    try:  # before anything is written
        rb = ReplayBuffer(args.buffer_size, n, (84, 84) if spec.atari else spec.obs_shape,
                          np.uint8 if spec.atari else np.float32, args.frame_stack if spec.atari else 1,
                          stacked=spec.atari, seed=args.seed + 1)
    except MemoryError:
        raise UserError(f"--buffer-size {args.buffer_size} does not fit in memory (84x84 bytes per Atari frame)") from None
    envs = make_envs(spec, args, n)

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

    tracker = EpisodeTracker(n, episodic_life=spec.atari and args.episodic_life, clip_reward=spec.atari and args.clip_reward)
    act_rng = np.random.default_rng(args.seed)
    probe_rng = np.random.default_rng(args.seed + 2)
    inject_steps = set(args.inject_at)
    reset_steps, sp_steps = set(args.reset_at), set(args.shrink_perturb_at)
    trigger = AdaptiveTrigger.from_args(args, start_step=args.learning_starts)
    metrics_rng = np.random.default_rng(args.seed + 3)
    metrics_probe = None
    metrics: Dict[str, float] = {}
    interventions: List[dict] = []
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

    def do_inject(step: int, adaptive: bool = False) -> None:
        probe = rb.sample(args.probe_batch_size, device, rng=probe_rng)[0]
        log = inject_plasticity(q_network, target_network, optimizer, probe, args)
        log["injection/adaptive"] = float(adaptive)
        injections.append({"global_step": step, **log})
        for k, v in log.items():
            writer.add_scalar(k, v, step)
        print(f"global_step={step}, injection: " + ", ".join(f"{k}={v:g}" for k, v in log.items()))

    def log_intervention(step: int, kind: str, log: dict) -> None:
        interventions.append({"global_step": step, "kind": kind, **log})
        for k, v in log.items():
            writer.add_scalar(k, v, step)
        print(f"global_step={step}, {kind}: " + ", ".join(f"{k}={v:g}" for k, v in log.items()))

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
                    do_inject(step)
                if step in reset_steps:
                    log = reset_modules(q_network, INJECT_PATHS[args.reset_target], optimizers=[optimizer],
                                        targets=[target_network])
                    log_intervention(step, "reset", log)
                if step in sp_steps:
                    log = shrink_perturb(q_network, INJECT_PATHS[args.shrink_perturb_target], args.sp_shrink,
                                         args.sp_perturb, targets=[target_network])
                    log_intervention(step, "shrink_perturb", log)
                if step > args.learning_starts:
                    if step % args.train_frequency == 0:
                        batch = rb.sample(args.batch_size, device)
                        lam = l2_coef_from_args(args, step, args.total_timesteps)
                        loss, q_mean = dqn_update(q_network, target_network, optimizer, batch, gamma=args.gamma,
                                                  double_dqn=args.double_dqn, loss_type=args.loss,
                                                  max_grad_norm=args.max_grad_norm, global_step=step, l2=lam)
                        if step % 100 == 0:
                            if args.l2_schedule != "none":
                                writer.add_scalar("losses/l2_coef", lam, step)
                            writer.add_scalar("losses/td_loss", float(loss), step)
                            writer.add_scalar("losses/q_values", float(q_mean), step)
                            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], step)
                            sps = int(step / (time.time() - start_time))
                            writer.add_scalar("charts/SPS", sps, step)
                    if step % args.target_network_frequency == 0:
                        update_target(target_network, q_network, args.tau)
                if args.metrics_every > 0 and step >= args.learning_starts and step % args.metrics_every == 0:
                    if metrics_probe is None:  # ONE fixed batch for the whole run, its own RNG
                        metrics_probe = rb.sample(args.metrics_batch_size, device, rng=metrics_rng)
                    metrics = measure_plasticity(
                        q_network, metrics_probe[0], tau=args.dormant_tau,
                        loss_fn=lambda m: td_loss(m, target_network, metrics_probe, gamma=args.gamma,
                                                  double_dqn=args.double_dqn, loss_type=args.loss)[0],
                    )
                    for k, v in metrics.items():
                        writer.add_scalar(k, v, step)
                    reason = trigger.check(step, metrics) if trigger is not None else None
                    if reason:
                        print(f"global_step={step}, adaptive injection: {reason}")
                        do_inject(step, adaptive=True)
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
        "interventions": interventions,
        "plasticity": metrics,
        "SPS": int(global_step / max(time.time() - start_time, 1e-9)),
    }


if __name__ == "__main__":
    train(tyro.cli(Args))
