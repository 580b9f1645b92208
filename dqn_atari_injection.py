"""DQN (Double DQN by default) with plasticity injection (Nikishin et al., NeurIPS 2023), cleanRL style: Atari games
on ale-py's vector env (`NoFrameskip-v4` semantics, Nature DQN), or flat-observation envs (CartPole-v1) with an MLP.
`python dqn_atari_injection.py --env-id PhoenixNoFrameskip-v4 --inject-at 5000000`; flags: `--help`; more: README.md."""

import importlib.util
import os
import pickle
import time

import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

gym.register_envs(ale_py)
ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)

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
    capture_video: bool = False
    """record one greedy episode at each evaluation into `videos/{run_name}`"""
    # Algorithm specific arguments
    env_id: str = "PhoenixNoFrameskip-v4"
    """an Atari game (`<Game>NoFrameskip-v4`, `ALE/<Game>-v5`) or an env with flat Box obs and Discrete actions"""
    total_timesteps: int = bounded(10000000, min=1)
    """total timesteps of the experiments (environment steps, summed over all envs)"""
    learning_rate: float = bounded(1e-4, above=0)
    """the learning rate of the optimizer (Adam)"""
    num_envs: int = bounded(1, min=1)
    """the number of parallel game environments (steps, frequencies and the buffer size count env steps)"""
    buffer_size: int = 1000000
    """the replay memory buffer size (transitions; each 84x84 frame is stored once)"""
    gamma: float = bounded(0.99, min=0, max=1)
    """the discount factor gamma"""
    tau: float = bounded(1.0, above=0, max=1)
    """the target network update rate (1.0 = hard copy, <1 = Polyak averaging)"""
    target_network_frequency: int = bounded(1000, min=1)
    """the timesteps it takes to update the target network"""
    batch_size: int = bounded(32, min=1)
    """the batch size of sample from the reply memory"""
    start_e: float = bounded(1.0, min=0, max=1)
    """the starting epsilon for exploration"""
    end_e: float = bounded(0.01, min=0, max=1)
    """the ending epsilon for exploration"""
    exploration_fraction: float = bounded(0.10, above=0, max=1)
    """the fraction of `total-timesteps` it takes from start-e to go end-e"""
    learning_starts: int = bounded(80000, min=0)
    """timestep to start learning"""
    train_frequency: int = bounded(4, min=1)
    """the frequency of training (one gradient step every this many env steps)"""
    double_dqn: bool = True
    """Double DQN targets (online net picks the next action, target net values it); off = vanilla DQN max"""
    loss: Literal["huber", "mse"] = "huber"
    """TD loss: `huber` (smooth L1, as the Nature DQN's error clipping) or `mse` (cleanRL's dqn_atari)"""
    max_grad_norm: float = bounded(0.0, min=0)
    """clip the global gradient norm to this value (0 = no clipping, as cleanRL)"""
    eval_every: int = bounded(250000, min=0)
    """evaluate the greedy policy every this many env steps (0 = only at the end)"""
    eval_episodes: int = bounded(10, min=0)
    """number of whole episodes (real games, all lives) per evaluation; 0 = no evaluation"""
    eval_epsilon: float = bounded(0.0, min=0, max=1)
    """epsilon of the evaluation policy (0 = greedy)"""
    # Plasticity injection and the interventions (the shared flags are PlasticityArgs')
    inject_target: Literal["head", "all"] = "head"
    """where to inject: `head` = the MLP head after the encoder (the paper), `all` = the whole Q-network"""
    inject_sync_target: bool = True
    """copy the online net into the target net before injecting (`--no-inject-sync-target`: keep it lagging)"""
    probe_batch_size: int = bounded(256, min=1)
    """observations in the (seeded) probe batch sampled from the replay buffer to measure output changes"""
    reset_target: Literal["head", "all"] = "head"
    """what --reset-at re-initialises"""
    shrink_perturb_target: Literal["head", "all"] = "all"
    """what --shrink-perturb-at changes"""
    # Continual mode (vector observations only)
    task_switch_every: int = bounded(0, min=0)
    """continual learning: a new task every this many env steps (task k > 0: the observation features in a seeded
    order with random signs), with new episodes, an empty buffer, --learning-starts and epsilon anew; 0 = off"""
    task_permute_actions: bool = False
    """continual mode: each task also relabels the actions (a seeded random permutation)"""
    # Atari-only options (an error on other envs when changed from the default)
    frame_stack: int = bounded(4, min=1)
    """Atari only: number of stacked frames"""
    noop_max: int = bounded(30, min=0)
    """Atari only: maximum number of no-op actions at the start of a game"""
    repeat_action_probability: float = bounded(0.0, min=0, max=1)
    """Atari only: sticky actions (0 = NoFrameskip-v4 semantics; v5 ids also use this value)"""
    episodic_life: bool = True
    """Atari only: a life loss ends the episode for training (the game continues; scores are whole games)"""
    max_episode_frames: int = bounded(108000, min=1)
    """Atari only: truncate a game after this many emulator frames (108000 = 30 minutes)"""


ATARI_ONLY = "frame_stack noop_max repeat_action_probability episodic_life max_episode_frames".split()
INJECT_PATHS = {"head": ["net.1"], "all": ["net"]}  # --inject-target, --reset-target, --shrink-perturb-target


# ---- Environments -------------------------------------------------------------------------------------------------
@dataclass
class EnvSpec:
    env_id: str
    atari_game: Optional[str]  # ALE rom name (e.g. "phoenix"), None for a vector-observation env
    obs_shape: tuple
    n_actions: int
    atari = property(lambda self: self.atari_game is not None)


def make_env_spec(args: Args) -> EnvSpec:
    """What --env-id is (`Phoenix-v5` means `ALE/Phoenix-v5`); a UserError naming the flag that does not fit."""
    ale_id = f"ALE/{args.env_id}"
    env_id = ale_id if args.env_id.endswith("-v5") and ale_id in gym.registry else args.env_id
    try:
        spec, env = gym.spec(env_id), gym.make(env_id)
        env.close()
    except Exception as e:  # gymnasium raises several error types for unknown or malformed ids
        raise UserError(f"--env-id {env_id!r}: unknown or cannot be made ({type(e).__name__}: {e})") from None
    obs_space, n_actions = env.observation_space, getattr(env.action_space, "n", None)
    if str(spec.entry_point).startswith("ale_py"):
        if spec.kwargs.get("obs_type", "rgb") != "rgb" or not env_id.endswith(("NoFrameskip-v4", "-v5")):
            use = "use <Game>NoFrameskip-v4 or ALE/<Game>-v5 (this script does its own frame skip and stacking)"
            raise UserError(f"--env-id {env_id!r}: unsupported Atari variant; {use}")
        if args.task_switch_every:
            raise UserError(f"--task-switch-every permutes observation features: not for the Atari game {env_id!r}")
        return EnvSpec(spec.id, spec.kwargs["game"], (args.frame_stack, 84, 84), int(n_actions))
    if n_actions is None or not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise UserError(f"--env-id {env_id!r}: needs Discrete actions and a flat Box observation, or an Atari game")
    if changed := [f.name for f in fields(args) if f.name in ATARI_ONLY and getattr(args, f.name) != f.default]:
        flag = ("--no-" if getattr(args, changed[0]) is False else "--") + changed[0].replace("_", "-")
        raise UserError(f"{flag} is an Atari-only option; --env-id {args.env_id!r} is not an Atari game")
    return EnvSpec(env_id, None, tuple(obs_space.shape), int(n_actions))


class PermutedTask(gym.ObservationWrapper):
    """Continual mode: task k > 0 renames the observation features (--task-permute-actions: and the actions)."""

    def __init__(self, env: gym.Env, seed: int, task: int, permute_actions: bool):
        super().__init__(env)
        n, rng = env.observation_space.shape[0], np.random.default_rng([seed, task])
        self.task, self.order, self.signs = task, np.arange(n), np.ones(n, np.float32)
        self.actions = np.arange(env.action_space.n)
        if task > 0:
            self.order, self.signs = rng.permutation(n), rng.choice([-1.0, 1.0], n).astype(np.float32)
            self.actions = rng.permutation(env.action_space.n) if permute_actions else self.actions
        low, high = (b[self.order] * self.signs for b in (env.observation_space.low, env.observation_space.high))
        self.observation_space = gym.spaces.Box(np.minimum(low, high), np.maximum(low, high), dtype=np.float32)

    def observation(self, obs) -> np.ndarray:
        return (np.asarray(obs, np.float32)[self.order] * self.signs).astype(np.float32)

    def step(self, action):
        return super().step(int(self.actions[action]))


def task_at(args: Args, step: int) -> int:
    """The continual mode's task index at `step` (always 0 when it is off)."""
    return step // args.task_switch_every if args.task_switch_every else 0


def task_start(args: Args, step: int) -> int:
    """The step at which the task of `step` began (0 when the continual mode is off)."""
    return task_at(args, step) * args.task_switch_every


def make_envs(spec: EnvSpec, args: Args, num_envs: int, task: int = 0):
    """A gymnasium 1.x vector env with next-step autoreset (Atari: ale-py's C++ vector env); its envs show `task`."""
    if not spec.atari:  # float32 observations, as the continual mode's `task` shows them (task 0: the env's own)
        make = lambda: PermutedTask(gym.make(spec.env_id), args.seed, task, args.task_permute_actions)
        return gym.vector.SyncVectorEnv([make for _ in range(num_envs)])
    threads = max(1, min(num_envs, os.cpu_count() or 1))
    frames = dict(stack_num=args.frame_stack, frameskip=4, maxpool=True, noop_max=args.noop_max, use_fire_reset=True)
    games = dict(repeat_action_probability=args.repeat_action_probability)
    games.update(max_num_frames_per_episode=args.max_episode_frames)
    # raw rewards, and a life loss goes on with the game: the EpisodeTracker clips rewards and reads info["lives"]
    raw = dict(episodic_life=False, life_loss_info=False, reward_clipping=False)
    return ale_py.vector_env.AtariVectorEnv(spec.atari_game, num_envs, num_threads=threads, **frames, **games, **raw)


def make_video_env(spec: EnvSpec, args: Args, run_name: str):
    """A one-env vector env recording every episode; None (and a warning) on failure: video never ends a run."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame draws rgb_array frames without a display: no noise
    try:
        atari = dict(frameskip=1, repeat_action_probability=args.repeat_action_probability)
        atari.update(max_episode_steps=args.max_episode_frames)
        env = gym.make(spec.env_id, render_mode="rgb_array", **(atari if spec.atari else {}))
        env = gym.wrappers.RecordVideo(env, f"videos/{run_name}", episode_trigger=lambda i: True, disable_logger=True)
        if spec.atari:
            env = gym.wrappers.AtariPreprocessing(env, noop_max=args.noop_max, terminal_on_life_loss=False)
            env = gym.wrappers.FrameStackObservation(env, args.frame_stack, padding_type="zero")
        else:  # float32 observations as in training (continual mode: evaluate() re-points it to the evaluated task)
            env = PermutedTask(env, args.seed, 0, args.task_permute_actions)
        return gym.vector.SyncVectorEnv([lambda: env])
    except Exception as e:
        print(f"warning: --capture-video disabled ({type(e).__name__}: {e})")


class EpisodeTracker:
    """Vector-env outputs -> training signals and RAW per-game scores; the autoreset step is no transition."""

    def __init__(self, num_envs: int, episodic_life: bool, clip_reward: bool):
        self.num_envs, self.episodic_life, self.clip_reward = num_envs, episodic_life, clip_reward

    def reset(self, info: dict) -> None:
        """New games in every env (`info` of env.reset())."""
        self.returns, self.lengths = np.zeros(self.num_envs, np.float64), np.zeros(self.num_envs, np.int64)
        self.prev_last = np.zeros(self.num_envs, bool)
        self.lives = np.array(info["lives"]) if "lives" in info else None

    def step(self, rewards, terminated, truncated, info):
        """Returns (train_rewards, train_terminated, last, finished[(env, raw_return, length)])."""
        rewards, terminated = np.asarray(rewards, np.float64), np.asarray(terminated)
        live = ~self.prev_last  # not the autoreset step
        last = (terminated | np.asarray(truncated)) & live
        self.returns[live] += rewards[live]
        self.lengths[live] += 1
        finished = [(int(e), float(self.returns[e]), int(self.lengths[e])) for e in np.flatnonzero(last)]
        self.returns[last] = 0
        self.lengths[last] = 0
        lives = np.array(info["lives"]) if "lives" in info else None  # Atari: a life loss ends a training episode
        life_loss = live & (lives < self.lives) if self.episodic_life else np.zeros_like(last)
        self.lives = lives
        self.prev_last = last
        train_rewards = np.sign(rewards) if self.clip_reward else rewards
        return train_rewards.astype(np.float32), (terminated | life_loss) & live, last, finished


# ---- Network: Q(s) = head(encoder(s)), `net = nn.Sequential(encoder, head)`; --inject-target paths "net.1", "net" --
class ScaleObs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # uint8 frames -> float in [0, 1]
        return x.float() / 255.0


class QNetwork(nn.Module):
    """Atari: the Nature DQN conv torso, head 3136-512-actions; vector obs: encoder obs-120, head 120-84-actions."""

    def __init__(self, obs_shape, n_actions: int, atari: bool, layer_norm: bool = False, activation: str = "relu"):
        super().__init__()
        self.obs_shape, self.n_actions, self.atari = tuple(obs_shape), int(n_actions), atari
        hidden = lambda layer: hidden_layer(layer, layer_norm, activation)  # [layer, (norm), activation]
        if atari:
            convs = [nn.Conv2d(obs_shape[0], 32, 8, 4), nn.Conv2d(32, 64, 4, 2), nn.Conv2d(64, 64, 3, 1)]
            encoder = nn.Sequential(ScaleObs(), *[m for conv in convs for m in hidden(conv)], nn.Flatten())
            features, width = 64 * 7 * 7, 512
        else:
            features, width = 120, 84
            encoder = nn.Sequential(*hidden(nn.Linear(int(np.prod(obs_shape)), features)))
        head = nn.Sequential(*hidden(nn.Linear(features, width)), nn.Linear(width, n_actions))
        self.net = nn.Sequential(encoder, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_network(spec: EnvSpec, args: Args) -> QNetwork:
    return QNetwork(spec.obs_shape, spec.n_actions, spec.atari, args.layer_norm, args.activation)


def save_model(path: str, q_network: QNetwork, args: Args, global_step: int, injections: list, fired=()) -> None:
    """The Q-network (injected or not), its configuration, the injections and the adaptive trigger's fired steps."""
    model = {"model": q_network.state_dict(), "args": vars(args), "global_step": global_step}
    model.update(obs_shape=list(q_network.obs_shape), n_actions=q_network.n_actions, atari=q_network.atari)
    atomic_save({**model, "injections": injections, "adaptive_trigger": {"fired": list(fired)}}, path)


def load_model(path: str, device="cpu") -> QNetwork:
    """Rebuild a saved (possibly injected) Q-network; a UserError naming the file when it is unusable."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        layers = {k: v for k, v in ckpt["args"].items() if k in ("layer_norm", "activation")}
        net = QNetwork(ckpt["obs_shape"], ckpt["n_actions"], atari=ckpt["atari"], **layers).to(device)
        load_injected_state_dict(net, ckpt["model"])
    except Exception as e:  # unreadable, not a model of this script, or weights that do not fit
        raise UserError(f"{path}: not a model saved by dqn_atari_injection.py ({type(e).__name__}: {e})") from None
    return net


# ---- Replay buffer ------------------------------------------------------------------------------------------------
class ReplayBuffer:
    """Replay memory storing each frame ONCE (`stacked`: the newest frame of each stack) in one circular stream of
    `capacity // num_envs` slots per env. Slot t % cap holds observation t's frame, `first` / `last` (it starts / ends
    an episode: no transition starts at `last`), and the action, reward and `terminated` that followed it. A sampled
    transition from t stacks frames t-stack+1 .. t+1, zero before the episode's first, as the Atari env does."""

    def __init__(self, capacity: int, num_envs: int, frame_shape, frame_dtype, stack: int, stacked: bool, seed: int):
        self.num_envs, self.stack, self.stacked, self.cap = num_envs, stack, stacked, capacity // num_envs
        if self.cap < stack + 2:
            need = (stack + 2) * num_envs
            raise UserError(f"--buffer-size {capacity} is too small: need at least {need} for {num_envs} env(s)")
        try:
            self.frames = np.zeros((num_envs, self.cap, *frame_shape), dtype=frame_dtype)  # lazily allocated pages
            self.actions = np.zeros((num_envs, self.cap), np.int64)
            self.rewards = np.zeros((num_envs, self.cap), np.float32)
        except MemoryError:
            raise UserError(f"--buffer-size {capacity} does not fit in memory (84x84 bytes per Atari frame)") from None
        self.terminated, self.first, self.last = (np.zeros((num_envs, self.cap), bool) for _ in range(3))
        self.t = 0  # observations written per env
        self.rng = np.random.default_rng(seed)

    def reset(self, obs: np.ndarray) -> None:
        """The observations of env.reset(): each env's first (the newest before them end their episodes)."""
        if self.t > 0:
            self.last[:, (self.t - 1) % self.cap] = True
        p = self.t % self.cap
        self.frames[:, p] = obs[:, -1] if self.stacked else obs
        self.first[:, p], self.last[:, p] = True, False
        self.t += 1

    def add(self, actions, rewards, terminated, next_obs, next_last) -> None:
        """One env step: completes the newest observations' transitions, stores the next (`next_last`: episode over)."""
        p, q = (self.t - 1) % self.cap, self.t % self.cap
        self.actions[:, p] = actions
        self.rewards[:, p] = rewards
        self.terminated[:, p] = terminated
        self.frames[:, q] = next_obs[:, -1] if self.stacked else next_obs
        self.first[:, q] = self.last[:, p]
        self.last[:, q] = next_last
        self.t += 1

    def sample_indices(self, n: int, rng: Optional[np.random.Generator] = None) -> tuple:
        """n (env, step) pairs drawn uniformly from the valid transitions (rejection sampling)."""
        rng = self.rng if rng is None else rng
        hi = self.t - 1  # the newest observation has no successor yet
        lo = self.t - self.cap + self.stack - 1 if self.t > self.cap else 0  # the oldest one's stack must be intact
        envs, steps, have = [], [], 0
        for _ in range(1000):
            e = rng.integers(0, self.num_envs, 2 * (n - have) + 8)
            s = rng.integers(lo, hi, len(e))
            ok = ~self.last[e, s % self.cap]
            envs.append(e[ok])
            steps.append(s[ok])
            have += int(ok.sum())
            if have >= n:
                return np.concatenate(envs)[:n], np.concatenate(steps)[:n]
        raise RuntimeError("the replay buffer holds no valid transition")

    def get(self, envs: np.ndarray, steps: np.ndarray) -> tuple:
        """(obs, actions, rewards, terminated, next_obs) numpy arrays of the given transitions."""
        k = self.stack
        slots = (steps[:, None] + np.arange(-(k - 1), 2)) % self.cap  # (B, k+1) window
        window = self.frames[envs[:, None], slots]
        first = self.first[envs[:, None], slots[:, 1:k]]  # (B, k-1): first flags of steps t-k+2 .. t
        window[:, : k - 1][np.flip(np.logical_or.accumulate(np.flip(first, 1), 1), 1)] = 0  # frames before a first
        p = slots[:, k - 1]
        obs, next_obs = (window[:, :k], window[:, 1:]) if self.stacked else (window[:, 0], window[:, 1])
        return obs, self.actions[envs, p], self.rewards[envs, p], self.terminated[envs, p], next_obs

    def sample(self, n: int, device, rng: Optional[np.random.Generator] = None) -> tuple:
        """A batch of torch tensors on `device`: obs, actions, rewards, terminated (float), next_obs."""
        obs, a, r, d, nxt = self.get(*self.sample_indices(n, rng))
        to = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)
        return to(obs), to(a), to(r), to(d.astype(np.float32)), to(nxt)

    ARRAYS = ("frames", "actions", "rewards", "terminated", "first", "last")

    def state_dict(self) -> dict:
        """The filled slots (as tensors: torch.save writes them without a pickled copy) and the write position."""
        n = min(self.t, self.cap)
        return dict({k: torch.from_numpy(np.ascontiguousarray(getattr(self, k)[:, :n])) for k in self.ARRAYS}, t=self.t)

    def load_state_dict(self, state: dict) -> None:
        for k in self.ARRAYS:
            getattr(self, k)[:, : state[k].shape[1]] = state[k].numpy()
        self.t = state["t"]


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


# ---- DQN ----------------------------------------------------------------------------------------------------------
def linear_schedule(start_e: float, end_e: float, duration: float, t: int) -> float:
    slope = (end_e - start_e) / max(duration, 1)
    return max(slope * t + start_e, end_e) if end_e <= start_e else min(slope * t + start_e, end_e)


def select_actions(q_network, obs, epsilon: float, n_actions: int, rng: np.random.Generator, device) -> np.ndarray:
    """Per-env epsilon-greedy (the network runs only if some env acts greedily)."""
    explore = rng.random(len(obs)) < epsilon
    actions = rng.integers(0, n_actions, len(obs))
    if not explore.all():
        with torch.no_grad():
            greedy = q_network(torch.as_tensor(obs, device=device)).argmax(dim=1).cpu().numpy()
        actions = np.where(explore, actions, greedy)
    return actions.astype(np.int64)


def td_loss(q_network, target_network, batch, args: Args):
    """(TD loss, Q(s, a)) of a replay batch (Double DQN or max targets, Huber or MSE); the target has no gradient."""
    obs, actions, rewards, terminated, next_obs = batch
    with torch.no_grad():  # the next action: the online network's choice (Double DQN) or the target network's
        target_q = target_network(next_obs)
        next_action = (q_network(next_obs) if args.double_dqn else target_q).argmax(dim=1, keepdim=True)
        td_target = rewards + args.gamma * target_q.gather(1, next_action).squeeze(1) * (1.0 - terminated)
    q_sa = q_network(obs).gather(1, actions.long().unsqueeze(1)).squeeze(1)
    loss = F.smooth_l1_loss(q_sa, td_target) if args.loss == "huber" else F.mse_loss(q_sa, td_target)
    return loss, q_sa


def dqn_update(q_network, target_network, optimizer, batch, args: Args, global_step: int = 0, l2: float = 0.0):
    """One gradient step on the TD loss (+ l2 * Σw² of the trainable weights); returns detached (loss, mean Q(s, a))."""
    loss, q_sa = td_loss(q_network, target_network, batch, args)
    check_finite(loss, "losses/td_loss", global_step)
    if l2 > 0:
        loss = loss + l2 * l2_penalty(q_network)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.max_grad_norm > 0:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], args.max_grad_norm)
    optimizer.step()
    return loss.detach(), q_sa.detach().mean()


@torch.no_grad()
def update_target(target_network: nn.Module, q_network: nn.Module, tau: float) -> None:
    if tau >= 1.0:
        target_network.load_state_dict(q_network.state_dict())
    else:
        for tp, p in zip(target_network.parameters(), q_network.parameters()):
            tp.lerp_(p, tau)


def apply_intervention(kind: str, q_network, target_network, optimizer, probe, args: Args) -> dict:
    """Plasticity injection (`kind` "injection") or a baseline ("reset", "shrink_perturb", "redo") as the flags say,
    mirrored in the target network; `probe`: observations (the output change; ReDo's dormant units). The log values."""
    targets = [target_network]
    if kind == "injection":
        adam = dict(optimizers=[optimizer], reset_optimizer=args.inject_reset_optimizer)
        ablations = dict(keep_trainable=args.inject_keep_trainable, third_term=not args.inject_no_third_term)
        paths, sync = INJECT_PATHS[args.inject_target], args.inject_sync_target
        return inject_plasticity(q_network, paths, probe, targets=targets, sync_targets=sync, **adam, **ablations)
    if kind == "redo":
        return redo(q_network, probe, args.redo_tau, optimizers=[optimizer], targets=targets)
    if kind == "reset":
        return reset_modules(q_network, INJECT_PATHS[args.reset_target], optimizers=[optimizer], targets=targets)
    paths = INJECT_PATHS[args.shrink_perturb_target]
    return shrink_perturb(q_network, paths, args.sp_shrink, args.sp_perturb, targets=targets)


def intervene(kind: str, step: int, q_network, target_network, optimizer, rb, rngs: dict, args: Args, writer, history):
    """`apply_intervention` at `step` ("adaptive": an injection the trigger fired), a seeded probe batch; logged."""
    injection, probe = kind in ("injection", "adaptive"), None
    if kind not in ("reset", "shrink_perturb"):
        probe = rb.sample(args.probe_batch_size, next(q_network.parameters()).device, rng=rngs["probe"])[0]
    log = apply_intervention("injection" if injection else kind, q_network, target_network, optimizer, probe, args)
    if injection:
        log["injection/adaptive"] = float(kind == "adaptive")
        log_event(writer, history["injections"], step, "injection", log)
    else:
        log_event(writer, history["interventions"], step, kind, log, kind=kind)


def plasticity_metrics(q_network, target_network, probe, args: Args) -> dict:
    """plasticity/... on the fixed probe batch (moved to the network's device: a resumed run's is on the CPU)."""
    probe = tuple(x.to(next(q_network.parameters()).device) for x in probe)
    loss_fn = lambda model: td_loss(model, target_network, probe, args)[0]
    return measure_plasticity(q_network, probe[0], loss_fn=loss_fn, tau=args.dormant_tau)


def env_seeds(envs, seed: int):
    """The seeds seed, seed + 1, ... of a vector env's envs; ale-py's C++ envs take them below 2**31 (a NumPy array)."""
    return (seed + np.arange(envs.num_envs)) % 2**31 if isinstance(envs, ale_py.vector_env.AtariVectorEnv) else seed


def play(q_network, envs, seed: int, epsilon: float, device) -> Optional[np.ndarray]:
    """One seeded, epsilon-greedy episode per env of `envs`: their raw returns (None if a stop request cut them)."""
    rng = np.random.default_rng(seed)
    returns, done = np.zeros(envs.num_envs), np.zeros(envs.num_envs, bool)
    obs, _ = envs.reset(seed=env_seeds(envs, seed))
    while not done.all() and RUN["stop"] is None:
        actions = select_actions(q_network, obs, epsilon, envs.single_action_space.n, rng, device)
        obs, rewards, terminated, truncated, _ = envs.step(actions)
        returns += np.where(done, 0.0, rewards)
        done |= np.asarray(terminated) | np.asarray(truncated)
    return returns if done.all() else None


def evaluate(q_network, spec: EnvSpec, args: Args, device, step: int, writer, video_env) -> tuple:
    """RAW returns of --eval-episodes games (one per env, on the task of `step`; [] after a stop), then a greedy episode
    of that task into the video env; returns both (the video env None, with a warning, once recording failed)."""
    task = task_at(args, max(step - 1, 0))
    envs = make_envs(spec, args, args.eval_episodes, task)
    returns = play(q_network, envs, args.seed + 100_000, args.eval_epsilon, device)
    envs.close()
    if returns is not None:
        writer.add_scalar("eval/episodic_return", float(np.mean(returns)), step)
        print(f"global_step={step}, eval/episodic_return={np.mean(returns):.2f} (+- {np.std(returns):.2f})")
    try:
        if video_env is not None:
            if args.task_switch_every:  # the video plays the evaluated task
                video_env.envs[0] = PermutedTask(video_env.envs[0].env, args.seed, task, args.task_permute_actions)
            video_env.set_attr("name_prefix", f"rl-video-step{step}")  # a file of its own, a resumed run's too
            play(q_network, video_env, args.seed + 200_000 + step, 0.0, device)
    except Exception as e:
        print(f"warning: --capture-video disabled ({type(e).__name__}: {e})")
        video_env = None
    return ([] if returns is None else returns.tolist()), video_env


def start_games(envs, rb: ReplayBuffer, tracker: EpisodeTracker, seed: int, ckpt=None) -> np.ndarray:
    """The checkpoint's games when it could save them (CartPole), else new seeded episodes in every env."""
    if ckpt and ckpt["envs"] is not None:
        vars(envs).update(pickle.loads(ckpt["envs"]))
        vars(tracker).update(ckpt["tracker"])
        return ckpt["obs"]
    obs, info = envs.reset(seed=env_seeds(envs, seed))
    rb.reset(obs)
    tracker.reset(info)
    return obs


def env_state(envs):
    """The vector env's state as bytes, when its envs can be pickled (CartPole: yes; Box2D and Atari: no)."""
    try:
        return pickle.dumps({k: v for k, v in vars(envs).items() if k != "env_fns"})
    except Exception:
        return None


# ---- Training -----------------------------------------------------------------------------------------------------
def validate_args(args: Args) -> EnvSpec:
    """Every flag's range, then the rules between flags (one-line errors naming the flag); returns the env."""
    check_ranges(args)
    check_compile(args)
    if args.total_timesteps < args.num_envs:
        raise UserError(f"--total-timesteps {args.total_timesteps} is less than one step of the --num-envs envs")
    if rest := args.total_timesteps % args.num_envs:  # a whole number of vector steps: rounded down, said once
        args.total_timesteps -= rest
        print(f"--total-timesteps rounded down to {args.total_timesteps}, a multiple of --num-envs {args.num_envs}")
    if args.learning_starts >= args.total_timesteps:
        raise UserError(f"--learning-starts {args.learning_starts} must be below --total-timesteps: no training")
    if args.buffer_size < args.batch_size:
        raise UserError(f"--buffer-size {args.buffer_size} is smaller than --batch-size {args.batch_size}")
    check_steps("--inject-at", args.inject_at, args.total_timesteps)
    if early := [s for s in args.inject_at if s - task_start(args, s) < args.learning_starts]:
        task = " of its task" if args.task_switch_every else ""
        raise UserError(f"--inject-at {early} is before --learning-starts {args.learning_starts}{task}: no data yet")
    spec = make_env_spec(args)
    check_intervention_args(args, args.total_timesteps, plasticity_keys(build_network(spec, args)))
    if args.capture_video and importlib.util.find_spec("moviepy") is None:
        raise UserError("--capture-video needs moviepy (pip install moviepy)")
    return spec


def train(args: Args) -> dict:
    """Run DQN; returns a summary (returns, last losses, injections, interventions, metrics, model path)."""
    stop_on_signals()  # Ctrl-C / SIGTERM from here on: a checkpoint and one line, never a traceback
    spec = validate_args(args)  # every flag, before anything is written
    ckpt = find_checkpoint(args, "dqn_atari_injection.py")  # --resume: loaded and checked; None for a new run
    seed_everything(args.seed, args.torch_deterministic)
    device = pick_device(args.cuda)
    frames = ((84, 84), np.uint8, args.frame_stack) if spec.atari else (spec.obs_shape, np.float32, 1)
    rb = ReplayBuffer(args.buffer_size, args.num_envs, *frames, stacked=spec.atari, seed=args.seed + 1)
    start_step = ckpt["global_step"] if ckpt else 0
    envs = make_envs(spec, args, args.num_envs, task_at(args, start_step))

    q_network = build_network(spec, args).to(device)
    # foreach: one kernel per step for all tensors, the same numbers as the per-tensor loop, ~1.5x faster on a CPU
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, foreach=True)
    target_network = build_network(spec, args).to(device)
    target_network.load_state_dict(q_network.state_dict())
    if args.compile:  # in place: the state_dict keys, injection and the metrics' hooks work as without it
        q_network.compile()
        target_network.compile()
    tracker = EpisodeTracker(args.num_envs, spec.atari and args.episodic_life, clip_reward=spec.atari)  # as cleanRL
    rngs = {k: np.random.default_rng(args.seed + i) for k, i in (("act", 0), ("probe", 2), ("metrics", 3))}
    rngs["buffer"] = rb.rng
    # the run's history, part of each checkpoint (fired: the steps the adaptive trigger fired at)
    history = dict(injections=[], interventions=[], train_returns=[], eval_returns=[], fired=[], metrics={})
    history["metrics_probe"] = None
    networks = dict(q_network=q_network, target_network=target_network)
    optimizers = dict(optimizer=(optimizer, q_network))  # with its model: saved by parameter names
    if ckpt:  # resume: every state as it was (a checkpoint that does not fit stops here, before anything is written)
        restore_checkpoint(ckpt, networks, optimizers, rngs)
        history = ckpt["history"]
        if ckpt["buffer"] is not None:
            rb.load_state_dict(ckpt["buffer"])
    run_dir, writer = start_run(args, ckpt)  # the run's folder, locked; the first write of the run
    progress = Progress(args, device, start_step, args.total_timesteps)  # the start line, then a bar or status lines
    schedule = {"injection": args.inject_at, "reset": args.reset_at, "shrink_perturb": args.shrink_perturb_at}
    video_env = make_video_env(spec, args, os.path.basename(run_dir)) if args.capture_video else None
    loss = q_mean = None
    explore_steps = args.exploration_fraction * (args.task_switch_every or args.total_timesteps)  # of each task

    obs = start_games(envs, rb, tracker, args.seed + start_step, ckpt)
    # learning starts --learning-starts steps after the buffer began to fill (the task's start, or a resume without it)
    filled_from = start_step if ckpt and ckpt["buffer"] is None else task_start(args, start_step)
    learning_starts = filled_from + args.learning_starts
    start_time = time.time()
    for global_step in range(start_step, args.total_timesteps, args.num_envs):
        # checkpoint every --checkpoint-every steps, and when Ctrl-C or SIGTERM asked the run to stop (then exit)
        if checkpoint_due(args, global_step, max(global_step - args.num_envs, start_step)):
            state = dict(history=history, obs=obs, tracker=vars(tracker))
            state["buffer"] = rb.state_dict() if args.checkpoint_buffer else None
            state["envs"] = None if spec.atari else env_state(envs)  # CartPole: exact resume; Atari, Box2D: new games
            save_checkpoint(global_step, global_step, networks, optimizers, rngs, **state)

        # continual mode: a new task (new episodes, an empty buffer, learning and epsilon anew; the networks carry over)
        if global_step > start_step and task_at(args, global_step) != task_at(args, global_step - args.num_envs):
            envs.close()
            envs = make_envs(spec, args, args.num_envs, task_at(args, global_step))
            rb.t, learning_starts = 0, global_step + args.learning_starts  # what the buffer held is out of reach
            obs = start_games(envs, rb, tracker, args.seed + global_step)

        # ALGO LOGIC: epsilon-greedy actions of every env
        epsilon = linear_schedule(args.start_e, args.end_e, explore_steps, global_step - task_start(args, global_step))
        actions = select_actions(q_network, obs, epsilon, spec.n_actions, rngs["act"], device)

        # execute the game and log data; the autoreset step after an episode's end is no transition
        next_obs, rewards, terminated, truncated, info = envs.step(actions)
        train_rewards, train_terminated, last, finished = tracker.step(rewards, terminated, truncated, info)
        for _, ep_return, ep_length in finished:
            history["train_returns"].append(ep_return)
            progress.episode(global_step, ep_return)
            writer.add_scalar("charts/episodic_return", ep_return, global_step)
            writer.add_scalar("charts/episodic_length", ep_length, global_step)
            writer.add_scalar("charts/epsilon", epsilon, global_step)
            if args.task_switch_every:
                writer.add_scalar("charts/task", task_at(args, global_step), global_step)
        rb.add(actions, train_rewards, train_terminated, next_obs, last)
        obs = next_obs

        # every env step of this vector step: interventions, training, metrics, evaluation
        for step in range(global_step, global_step + args.num_envs):
            # plasticity injection, and the baselines it is compared against, at their --*-at steps
            for kind in [kind for kind, steps in schedule.items() if step in steps]:
                intervene(kind, step, q_network, target_network, optimizer, rb, rngs, args, writer, history)
            if args.redo_every > 0 and step > learning_starts and step % args.redo_every == 0:
                intervene("redo", step, q_network, target_network, optimizer, rb, rngs, args, writer, history)

            # ALGO LOGIC: one gradient step every --train-frequency steps; the target network follows
            if step > learning_starts and step % args.train_frequency == 0:
                batch = rb.sample(args.batch_size, device)
                l2 = l2_coef(args, step, args.total_timesteps)
                loss, q_mean = dqn_update(q_network, target_network, optimizer, batch, args, step, l2)
                if step % 100 == 0:
                    writer.add_scalar("losses/td_loss", float(loss), step)
                    writer.add_scalar("losses/q_values", float(q_mean), step)
                    writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], step)
                    writer.add_scalar("charts/SPS", int((step - start_step) / (time.time() - start_time)), step)
                    if args.l2_schedule != "none":
                        writer.add_scalar("losses/l2_coef", l2, step)
            if step > learning_starts and step % args.target_network_frequency == 0:
                update_target(target_network, q_network, args.tau)

            # plasticity metrics on ONE fixed probe batch (its own RNG); the adaptive trigger reads them
            if args.metrics_every > 0 and step >= learning_starts and step % args.metrics_every == 0:
                if history["metrics_probe"] is None:
                    history["metrics_probe"] = rb.sample(args.metrics_batch_size, device, rng=rngs["metrics"])
                history["metrics"] = plasticity_metrics(q_network, target_network, history["metrics_probe"], args)
                for k, v in history["metrics"].items():
                    writer.add_scalar(k, v, step)
                if reason := adaptive_injection_due(args, step, history["metrics"], history["fired"]):
                    print(f"global_step={step}, adaptive injection: {reason}")
                    intervene("adaptive", step, q_network, target_network, optimizer, rb, rngs, args, writer, history)

            if args.eval_episodes > 0 and args.eval_every > 0 and step > 0 and step % args.eval_every == 0:
                history["eval_returns"], video_env = evaluate(q_network, spec, args, device, step, writer, video_env)
        progress.update(global_step + args.num_envs)

    global_step = args.total_timesteps
    if args.eval_episodes > 0:
        history["eval_returns"], video_env = evaluate(q_network, spec, args, device, global_step, writer, video_env)
    model_path = os.path.join(run_dir, f"{args.exp_name}.cleanrl_model") if args.save_model else None
    if model_path:
        save_model(model_path, q_network, args, global_step, history["injections"], history["fired"])
        print(f"model saved to {model_path}")
    envs.close()
    if video_env is not None:
        video_env.close()
    finish_run(global_step, model_path or run_dir)  # a stop asked during the final evaluation or save exits here
    returns, evals = history["train_returns"], history["eval_returns"]
    summary = dict(history, run_name=os.path.basename(run_dir), run_dir=run_dir, model_path=model_path)
    summary.update(global_step=global_step, plasticity=history["metrics"])
    summary["eval/episodic_return"] = float(np.mean(evals)) if evals else None
    summary["charts/episodic_return"] = float(np.mean(returns[-20:])) if returns else None
    summary["losses/td_loss"] = None if loss is None else float(loss)
    summary["losses/q_values"] = None if q_mean is None else float(q_mean)
    summary["SPS"] = int((global_step - start_step) / max(time.time() - start_time, 1e-9))
    return summary


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
