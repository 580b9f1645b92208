"""PPO on Atari with plasticity injection (Nikishin et al., NeurIPS 2023), cleanRL style.

    python ppo_atari_injection.py --inject-at 10000000
    python ppo_atari_injection.py --env-id SpaceInvadersNoFrameskip-v4 \
        --pretrained sb3/ppo-SpaceInvadersNoFrameskip-v4 --inject-at 0 --inject-target encoder

* PPO with cleanRL's `ppo_atari.py` defaults (8 envs x 128 steps, 4 epochs x 4 minibatches, lr 2.5e-4
  annealed, clip 0.1, entropy 0.01, value coef 0.5, grad-norm 0.5, GAE 0.95, gamma 0.99).
* Environments: ale-py's threaded `AtariVectorEnv`, driven so that every observation, reward and
  episode boundary equals what Stable-Baselines3's `AtariWrapper` + `VecFrameStack(4)` +
  `VecTransposeImage` produce (noop 30, frame skip 4 with max-pool, life loss = episode end, the
  FIRE/2 reset steps after every reset and life loss, 84x84 grey, sign-clipped rewards, a 4-stack,
  oldest frame first, zeroed at every episode end). Pretrained SB3 agents therefore see exactly
  what they were trained on. Reported returns are raw game scores of whole games.
* Network: SB3's `ActorCriticCnnPolicy` with NatureCNN, same parameter names, optionally with
  separate policy/value feature extractors (`share_features_extractor=False`).
* `--pretrained PATH.zip|HUB-ID` continues an SB3 PPO CnnPolicy agent (weights, optionally Adam).
* `--inject-at STEP [STEP ...]` injects plasticity into `--inject-target` (encoder, heads, all) at the
  first rollout boundary at or after each step. Frozen terms get no gradients, and when nothing
  trainable feeds them (encoder / whole network) their outputs from the rollout are reused by all
  update epochs instead of being recomputed.
"""
import io
import json
import os
import pickletools
import re
import time
import zipfile
import base64
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import tyro
from torch.distributions.categorical import Categorical
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda (or mps) will be used when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "plasticity-injection"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """whether to save videos of the agent's view (84x84 grey) of games of the first environment to `videos/`"""
    save_model: bool = False
    """whether to save the model (atomically) to `runs/{run_name}/{exp_name}.cleanrl_model` at the end"""

    # Algorithm specific arguments (cleanRL ppo_atari.py defaults)
    env_id: str = "BreakoutNoFrameskip-v4"
    """the id of the environment: `<Game>NoFrameskip-v4` (no sticky actions) or `ALE/<Game>-v5` (sticky 0.25)"""
    total_timesteps: int = 20_000_000
    """total timesteps of the experiment (20M so that the headline `--inject-at 10000000` injects midway)"""
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 8
    """the number of parallel game environments"""
    num_steps: int = 128
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """Toggle learning rate annealing for policy and value networks"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 4
    """the number of mini-batches"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """Toggles advantages normalization"""
    clip_coef: float = 0.1
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """Toggles whether or not to use a clipped loss for the value function, as per the paper."""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold"""

    # Environment details (SB3 AtariWrapper semantics)
    noop_max: int = 30
    """maximum number of no-op frames at every game reset (0 disables)"""
    max_episode_frames: int = 108_000
    """games are truncated after this many emulator frames (30 minutes of play)"""
    env_threads: int = 0
    """threads of ale-py's vector environment (0: one per environment, capped by the CPU count)"""
    share_features_extractor: bool = True
    """one NatureCNN for actor and critic (SB3 default); `--no-share-features-extractor` builds two.
    With `--pretrained` the zip decides."""

    # Pretrained SB3 agent
    pretrained: Optional[str] = None
    """an SB3 PPO `CnnPolicy` zip to continue from, or a model-hub id such as `sb3/ppo-BreakoutNoFrameskip-v4`"""
    pretrained_load_optimizer: bool = False
    """also load the zip's Adam state (moments and step counts; the learning rate stays ours)"""

    # Plasticity injection
    inject_at: List[int] = field(default_factory=list)
    """global steps at which to inject plasticity (at the first rollout boundary at or after each step)"""
    inject_target: Literal["encoder", "heads", "all"] = "encoder"
    """what to inject into: `encoder` (NatureCNN conv+linear), `heads` (action_net and value_net), `all` (whole network)"""
    inject_keep_trainable: bool = False
    """ablation: the original module and both new copies all stay trainable"""
    inject_no_third_term: bool = False
    """ablation: leave out the frozen copy -h_theta'2, so the output jumps at injection"""
    inject_reset_optimizer: bool = False
    """clear Adam's moments of every parameter at injection (default: surviving parameters keep them)"""
    inject_cache_frozen: bool = True
    """reuse the frozen terms' outputs computed during the rollout in every update epoch
    (encoder/all targets); `--no-inject-cache-frozen` recomputes them (for comparison)"""

    # Evaluation
    eval_every: int = 0
    """evaluate every this many global steps (0: never; checked at rollout boundaries)"""
    eval_episodes: int = 10
    """number of whole games per evaluation"""
    eval_deterministic: bool = True
    """evaluate the greedy policy (argmax); `--no-eval-deterministic` samples actions"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    minibatch_size: int = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


# ---------------------------------------------------------------------------------------------
# Environment: ale-py's vector env driven to reproduce SB3's AtariWrapper + VecFrameStack(4)
# ---------------------------------------------------------------------------------------------
INJECT_TARGETS = ("encoder", "heads", "all")
NOOP, FIRE, SECOND = 0, 1, 2  # SB3's FireResetEnv presses action 1 (FIRE) then action 2


def parse_env_id(env_id: str) -> Tuple[str, float]:
    """`BreakoutNoFrameskip-v4` -> ("breakout", 0.0); `ALE/Breakout-v5` -> ("breakout", 0.25)."""
    m = re.fullmatch(r"(?:ALE/)?([A-Z][A-Za-z0-9]*?)(NoFrameskip-v4|-v5)", env_id)
    if m is None:
        raise UserError(
            f"--env-id {env_id!r} is not an Atari id of the form <Game>NoFrameskip-v4 or ALE/<Game>-v5 "
            "(e.g. BreakoutNoFrameskip-v4)"
        )
    game = re.sub(r"(?<!^)(?=[A-Z])", "_", m.group(1)).lower()
    import warnings

    from ale_py import roms

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if roms.get_rom_path(game) is None:
            raise UserError(f"--env-id {env_id!r}: ale-py has no ROM named {game!r}")
    return game, (0.0 if m.group(2) == "NoFrameskip-v4" else 0.25)


class AtariEnvs:
    """`num_envs` Atari games with SB3 `AtariWrapper` + `VecFrameStack(4)` + `VecTransposeImage` semantics.

    ale-py steps the games (frame skip 4 with max-pool, 84x84 grey, noops at reset, next-step
    autoreset). On top of it this class reproduces what SB3 does differently:
      * a life loss is an episode end for the agent (terminated), but the game goes on;
      * after every reset SB3 presses FIRE then action 2, and after every life loss NOOP, FIRE,
        action 2 (NOOP only for games without FIRE); the agent never sees these steps;
      * the 4-frame stack (oldest first, channels first) is zeroed at every episode end.
    Steps the agent does not decide (those forced steps and ale-py's autoreset step, whose action
    is ignored) are still taken in lock-step with the other games; `step` returns `valid=False` for
    an environment whose NEXT step is such a step, and the learner leaves them out of its batch.
    Raw (unclipped) scores of whole games are accumulated here and returned in `info["games"]`.
    """

    def __init__(self, env_id: str, num_envs: int, seed: int, noop_max: int = 30,
                 max_episode_frames: int = 108_000, num_threads: int = 0):
        from ale_py.vector_env import AtariVectorEnv

        game, sticky = parse_env_id(env_id)
        self.num_envs = num_envs
        self.seed = seed
        self.env = AtariVectorEnv(
            game, num_envs, stack_num=1, noop_max=noop_max, use_fire_reset=False, episodic_life=False,
            life_loss_info=False, reward_clipping=False, repeat_action_probability=sticky,
            max_num_frames_per_episode=max_episode_frames,
            num_threads=num_threads or min(num_envs, os.cpu_count() or 1),
        )
        self.n_actions = int(self.env.single_action_space.n)
        import ale_py

        actions = list(self.env.ale.get_action_set())
        self.has_fire = len(actions) >= 3 and actions[FIRE] == ale_py.Action.FIRE
        self.observation_shape = (4, 84, 84)

    def _reset_state(self):
        n = self.num_envs
        self.stack = np.zeros((n, 4, 84, 84), dtype=np.uint8)
        self.lives = np.zeros(n, dtype=np.int64)
        self.autoreset = np.zeros(n, dtype=bool)
        self.pending: List[List[int]] = [[] for _ in range(n)]
        self.game_return = np.zeros(n, dtype=np.float64)
        self.game_steps = np.zeros(n, dtype=np.int64)

    def _after_reset(self, i: int) -> None:
        self.pending[i] = [FIRE, SECOND] if self.has_fire else []

    def valid(self) -> np.ndarray:
        """True where the next step is decided by the agent."""
        return ~self.autoreset & np.array([not p for p in self.pending])

    def reset(self) -> Tuple[np.ndarray, np.ndarray]:
        self._reset_state()
        frames, info = self.env.reset(seed=self.seed)
        self.lives[:] = info["lives"]
        self.stack[:, -1] = frames[:, 0]
        for i in range(self.num_envs):
            self._after_reset(i)
        return self.stack.copy(), self.valid()

    def step(self, actions: np.ndarray):
        """Returns obs, clipped reward, terminated (life loss or game over), truncated, valid, info."""
        actions = np.asarray(actions, dtype=np.int64).copy()
        hidden = ~self.valid()
        for i in np.flatnonzero(hidden & ~self.autoreset):
            actions[i] = self.pending[i].pop(0)
        was_autoreset = self.autoreset.copy()
        frames, raw, game_over, truncated, info = self.env.step(actions)
        raw = raw.astype(np.float64)
        lives = info["lives"].astype(np.int64)
        life_loss = (0 < lives) & (lives < self.lives) & ~was_autoreset & ~game_over
        self.lives = lives
        self.game_return += raw
        self.game_steps += 1
        games = []
        for i in np.flatnonzero(game_over | truncated):
            games.append((int(i), float(self.game_return[i]), int(info["episode_frame_number"][i])))
            self.game_return[i] = 0.0
            self.game_steps[i] = 0
            self.pending[i] = []
        for i in np.flatnonzero(was_autoreset):
            self._after_reset(i)
        for i in np.flatnonzero(life_loss):
            self.pending[i] = [NOOP, FIRE, SECOND] if self.has_fire else [NOOP]
        self.autoreset = (game_over | truncated).copy()
        # frame stack: roll for decided steps; during a reset sequence start from zeros, so that the
        # first decided observation is [0, 0, 0, frame] exactly like SB3's VecFrameStack after a done
        self.stack[:, :-1] = self.stack[:, 1:]
        self.stack[hidden, :-1] = 0
        self.stack[:, -1] = frames[:, 0]
        terminated = game_over | life_loss
        trunc = truncated & ~game_over
        reward = np.sign(raw).astype(np.float32)
        return self.stack.copy(), reward, terminated, trunc, self.valid(), {"games": games, "raw_reward": raw}

    def close(self):
        self.env.close()


# ---------------------------------------------------------------------------------------------
# Network: SB3's ActorCriticCnnPolicy (NatureCNN) with cleanRL's orthogonal init
# ---------------------------------------------------------------------------------------------
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class NatureCNN(nn.Module):
    """SB3's NatureCNN: `cnn.{0,2,4}` convolutions and `linear.0`, same names as in SB3 zips."""

    def __init__(self, in_channels: int = 4, features_dim: int = 512):
        super().__init__()
        self.cnn = nn.Sequential(
            layer_init(nn.Conv2d(in_channels, 32, 8, stride=4)), nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(),
            nn.Flatten(),
        )
        self.linear = nn.Sequential(layer_init(nn.Linear(64 * 7 * 7, features_dim)), nn.ReLU())

    def forward(self, x):
        return self.linear(self.cnn(x))


def make_action_net(n_actions: int) -> nn.Module:
    return layer_init(nn.Linear(512, n_actions), std=0.01)


def make_value_net() -> nn.Module:
    return layer_init(nn.Linear(512, 1), std=1.0)


def _call(module: nn.Module, x: torch.Tensor, frozen_out):
    return module(x, frozen_out=frozen_out) if frozen_out is not None else module(x)


class ActorCriticCnn(nn.Module):
    """Features extractor(s) + `action_net` + `value_net`; input scaled to [0, 1]; output [logits | value].

    One tensor out (not a tuple) so that the whole network can itself be an injected module.
    """

    def __init__(self, n_actions: int, share_features_extractor: bool = True):
        super().__init__()
        self.n_actions = n_actions
        self.share_features_extractor = share_features_extractor
        if share_features_extractor:
            self.features_extractor = NatureCNN()
        else:
            self.pi_features_extractor = NatureCNN()
            self.vf_features_extractor = NatureCNN()
        self.action_net = make_action_net(n_actions)
        self.value_net = make_value_net()

    def extractor_names(self) -> List[str]:
        return ["features_extractor"] if self.share_features_extractor else ["pi_features_extractor", "vf_features_extractor"]

    def forward(self, x: torch.Tensor, frozen: Optional[Dict[str, list]] = None) -> torch.Tensor:
        frozen = frozen or {}
        if self.share_features_extractor:
            pi = vf = _call(self.features_extractor, x, frozen.get("features_extractor"))
        else:
            pi = _call(self.pi_features_extractor, x, frozen.get("pi_features_extractor"))
            vf = _call(self.vf_features_extractor, x, frozen.get("vf_features_extractor"))
        return torch.cat([self.action_net(pi), self.value_net(vf)], dim=1)


class Agent(nn.Module):
    """cleanRL-style agent around `self.policy` (an ActorCriticCnn, or an injected one)."""

    def __init__(self, n_actions: int, share_features_extractor: bool = True):
        super().__init__()
        self.n_actions = n_actions
        self.share_features_extractor = share_features_extractor
        self.policy = ActorCriticCnn(n_actions, share_features_extractor)

    @staticmethod
    def preprocess(obs: torch.Tensor) -> torch.Tensor:
        return obs.float() / 255.0  # SB3 normalize_images

    def forward(self, obs: torch.Tensor, frozen: Optional[Dict[str, list]] = None):
        """(logits, value) for uint8 observations; `frozen` maps injected paths to cached frozen outputs."""
        x = self.preprocess(obs)
        frozen = frozen or {}
        if isinstance(self.policy, InjectedModule):
            out = _call(self.policy, x, frozen.get("policy"))
        else:
            out = self.policy(x, {k[len("policy."):]: v for k, v in frozen.items()})
        return out[:, : self.n_actions], out[:, self.n_actions]

    def frozen_outputs(self, obs: torch.Tensor, paths: List[str]) -> Dict[str, list]:
        """Frozen terms' outputs of the injected modules at `paths` (each fed by the scaled observation)."""
        if not paths:
            return {}
        x = self.preprocess(obs)
        return {p: self.get_submodule(p).frozen_outputs(x) for p in paths}

    def get_value(self, obs, frozen=None):
        return self(obs, frozen)[1]

    def get_action_and_value(self, obs, action=None, frozen=None, deterministic=False):
        logits, value = self(obs, frozen)
        probs = Categorical(logits=logits)
        if action is None:
            action = logits.argmax(dim=1) if deterministic else probs.sample()
        return action, probs.log_prob(action), probs.entropy(), value


# ---------------------------------------------------------------------------------------------
# Rollout buffer
# ---------------------------------------------------------------------------------------------
class RolloutBuffer:
    """One rollout of `num_steps` x `num_envs` on `device`, plus the frozen-term outputs to reuse."""

    def __init__(self, num_steps: int, num_envs: int, obs_shape, device):
        self.num_steps, self.num_envs, self.device = num_steps, num_envs, device
        shape = (num_steps, num_envs)
        self.obs = torch.zeros(shape + tuple(obs_shape), dtype=torch.uint8, device=device)
        self.actions = torch.zeros(shape, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(shape, device=device)
        self.rewards = torch.zeros(shape, device=device)
        self.terminated = torch.zeros(shape, device=device)
        self.valid = torch.zeros(shape, dtype=torch.bool, device=device)
        self.values = torch.zeros(shape, device=device)
        self.frozen: Dict[str, List[Optional[torch.Tensor]]] = {}

    def store_frozen(self, step: int, frozen: Dict[str, list]) -> None:
        for path, outs in frozen.items():
            if path not in self.frozen:
                self.frozen[path] = [
                    None if o is None else torch.zeros((self.num_steps,) + tuple(o.shape), dtype=o.dtype, device=o.device)
                    for o in outs
                ]
            for buf, o in zip(self.frozen[path], outs):
                if o is not None:
                    buf[step] = o

    def flat_frozen(self) -> Dict[str, list]:
        return {p: [None if b is None else b.reshape((-1,) + tuple(b.shape[2:])) for b in bufs] for p, bufs in self.frozen.items()}


def compute_gae(rewards, values, terminated, valid, next_value, next_valid, gamma, gae_lambda):
    """GAE over a rollout where some steps are not real transitions.

    terminated[t]: step t ended an episode (life loss / game over): no bootstrap.
    valid[t]: step t was decided by the agent. A truncated game's step t is followed by the
    autoreset step t+1, which is invalid but whose observation is the final one, so V(final)
    bootstraps step t while the lambda-chain is cut at invalid steps.
    """
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(next_value)
    for t in reversed(range(num_steps)):
        if t == num_steps - 1:
            nextvalues, nextvalid = next_value, next_valid.float()
        else:
            nextvalues, nextvalid = values[t + 1], valid[t + 1].float()
        nonterminal = 1.0 - terminated[t]
        delta = rewards[t] + gamma * nextvalues * nonterminal - values[t]
        lastgaelam = delta + gamma * gae_lambda * nonterminal * nextvalid * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + values


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


# ---------------------------------------------------------------------------------------------
# Stable-Baselines3 zips
# ---------------------------------------------------------------------------------------------
SB3_PREFIX_SHARED = {"features_extractor.": "policy.features_extractor."}
SB3_PREFIX_SEPARATE = {"pi_features_extractor.": "policy.pi_features_extractor.",
                       "vf_features_extractor.": "policy.vf_features_extractor."}


def _pickled_class_name(serialized: str) -> str:
    """`module.Name` of a class pickled in an SB3 `data` entry, read without unpickling anything."""
    names = []
    for op, arg, _ in pickletools.genops(base64.b64decode(serialized)):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            names.append(arg)
        elif op.name == "GLOBAL":
            names.extend(arg.split(" "))
    return ".".join(names[-2:])


def resolve_pretrained(spec: str) -> str:
    """A local zip path, or a model-hub id (`org/name`) downloaded with huggingface_sb3/huggingface_hub."""
    if os.path.exists(spec) or spec.endswith(".zip") or not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        if not os.path.isfile(spec):
            raise UserError(f"--pretrained {spec}: no such file")
        return spec
    filename = spec.split("/")[1] + ".zip"
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise UserError(
            f"--pretrained {spec}: looks like a model-hub id but huggingface_hub is not installed; "
            "`pip install huggingface_sb3` or download the zip and pass its local path"
        ) from None
    try:
        return hf_hub_download(repo_id=spec, filename=filename)
    except Exception as e:  # offline, unknown repo, missing file
        raise UserError(
            f"--pretrained {spec}: could not download {filename} from the model hub ({type(e).__name__}); "
            "pass a local path to the zip instead"
        ) from None


def read_sb3_zip(path: str, map_location="cpu") -> dict:
    """Read and check an SB3 PPO CnnPolicy zip without unpickling: policy weights, optimizer, metadata."""
    flag = f"--pretrained {path}"
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{flag}: not a readable zip file ({e})") from None
    with zf:
        names = set(zf.namelist())
        if "data" not in names or "policy.pth" not in names:
            raise UserError(f"{flag}: not a Stable-Baselines3 model zip (no 'data' or 'policy.pth' inside)")
        try:
            data = json.loads(zf.read("data"))
            policy_class = _pickled_class_name(data["policy_class"][":serialized:"])
            state = torch.load(io.BytesIO(zf.read("policy.pth")), map_location=map_location, weights_only=True)
            opt_state = None
            if "policy.optimizer.pth" in names:
                opt_state = torch.load(io.BytesIO(zf.read("policy.optimizer.pth")), map_location=map_location,
                                       weights_only=True)
        except Exception as e:
            raise UserError(f"{flag}: corrupt Stable-Baselines3 zip ({type(e).__name__}: {e})") from None
    if "clip_range" not in data or "n_epochs" not in data:
        algo = "DQN" if "exploration_rate" in data else ("A2C" if "n_steps" in data else "another algorithm")
        raise UserError(f"{flag}: not a PPO model (saved by {algo}, policy {policy_class}); need an SB3 PPO CnnPolicy zip")
    if not policy_class.endswith("ActorCriticCnnPolicy"):
        raise UserError(f"{flag}: policy is {policy_class}, need PPO with 'CnnPolicy' (ActorCriticCnnPolicy)")
    act = data.get("action_space", {})
    if "Discrete" not in act.get(":type:", "") or "n" not in act:
        raise UserError(f"{flag}: action space {act.get(':type:')} is not Discrete")
    obs = data.get("observation_space", {})
    if list(obs.get("_shape", [])) != [4, 84, 84] or obs.get("dtype") != "uint8":
        raise UserError(f"{flag}: observation space {obs.get('_shape')} {obs.get('dtype')} is not the 4x84x84 uint8 Atari stack")
    kwargs = data.get("policy_kwargs") or {}
    if kwargs.get("normalize_images", True) is False:
        raise UserError(f"{flag}: policy was trained with normalize_images=False; not supported")
    share = bool(kwargs.get("share_features_extractor", True))
    n_actions = int(act["n"])
    # the expected weights, nothing more (custom net_arch / extractors are not supported)
    expected = Agent(n_actions, share).state_dict()
    prefixes = SB3_PREFIX_SHARED if share else SB3_PREFIX_SEPARATE
    mapped = {}
    for k, v in state.items():
        if share and k.startswith(("pi_features_extractor.", "vf_features_extractor.")):
            continue  # aliases of features_extractor
        if not share and k.startswith("features_extractor."):
            continue  # alias of pi_features_extractor
        new = next((dst + k[len(src):] for src, dst in prefixes.items() if k.startswith(src)), "policy." + k)
        mapped[new] = v
    missing = sorted(set(expected) - set(mapped))
    extra = sorted(set(mapped) - set(expected))
    bad = [k for k in expected if k in mapped and tuple(mapped[k].shape) != tuple(expected[k].shape)]
    if missing or extra or bad:
        raise UserError(
            f"{flag}: weights do not match SB3's NatureCNN CnnPolicy (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"wrong shape {bad[:3]}); custom net_arch or features extractors are not supported"
        )
    # SB3's optimizer indexes policy.parameters(): unique tensors in state_dict order
    seen, sb3_order = set(), []
    for k, v in state.items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        if share and k.startswith(("pi_features_extractor.", "vf_features_extractor.")):
            continue
        if not share and k.startswith("features_extractor."):
            k = "pi_" + k
        sb3_order.append(next((dst + k[len(src):] for src, dst in prefixes.items() if k.startswith(src)), "policy." + k))
    return {"path": path, "data": data, "state_dict": mapped, "optimizer": opt_state, "share": share,
            "n_actions": n_actions, "param_order": sb3_order, "num_timesteps": int(data.get("num_timesteps", 0))}


def load_sb3_optimizer(optimizer: torch.optim.Optimizer, agent: nn.Module, zip_info: dict) -> None:
    """Copy the zip's Adam moments/step counts into `optimizer` (param order mapped by name)."""
    flag = f"--pretrained-load-optimizer ({zip_info['path']})"
    opt = zip_info["optimizer"]
    if opt is None:
        raise UserError(f"{flag}: the zip has no policy.optimizer.pth")
    groups = opt.get("param_groups", [])
    if len(groups) != 1 or len(groups[0]["params"]) != len(zip_info["param_order"]):
        raise UserError(f"{flag}: optimizer state does not match the policy's parameters")
    names = [n for n, p in agent.named_parameters() if p.requires_grad]
    params = dict(agent.named_parameters())
    state = {}
    for sb3_idx, name in zip(groups[0]["params"], zip_info["param_order"]):
        s = opt["state"].get(sb3_idx)
        if s is None:
            continue
        if "exp_avg" not in s or tuple(s["exp_avg"].shape) != tuple(params[name].shape):
            raise UserError(f"{flag}: optimizer state is not Adam state for {name}")
        state[names.index(name)] = {k: (v.to(params[name].device) if k != "step" else v) for k, v in s.items()}
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)


def load_pretrained(agent: Agent, zip_info: dict) -> None:
    agent.load_state_dict(zip_info["state_dict"], strict=True)


# ---------------------------------------------------------------------------------------------
# Injection helpers
# ---------------------------------------------------------------------------------------------
def injection_paths(agent: Agent, target: str) -> List[str]:
    if target == "encoder":
        return ["policy." + n for n in agent.policy.extractor_names()]
    if target == "heads":
        return ["policy.action_net", "policy.value_net"]
    return ["policy"]


def fresh_factories(agent: Agent, target: str) -> dict:
    """Fresh modules drawn with the network's own (cleanRL/SB3 orthogonal) init scheme."""
    n, share = agent.n_actions, agent.share_features_extractor
    if target == "encoder":
        return {p: NatureCNN for p in injection_paths(agent, target)}
    if target == "heads":
        return {"policy.action_net": lambda: make_action_net(n), "policy.value_net": make_value_net}
    return {"policy": lambda: ActorCriticCnn(n, share)}


def cacheable_paths(agent: Agent, target: str) -> List[str]:
    """Injected modules whose input carries no gradient: their frozen terms are computed once per rollout."""
    if target == "heads":
        return []  # fed by the trainable encoder: frozen heads stay in the graph so the encoder learns
    return [p for p in injection_paths(agent, target) if isinstance(agent.get_submodule(p), InjectedModule)]


def do_injection(agent: Agent, optimizer, args: Args, probe: torch.Tensor) -> Dict[str, float]:
    paths = injection_paths(agent, args.inject_target)
    return apply_injection(
        agent, paths, probe, optimizers=[optimizer], reset_optimizer=args.inject_reset_optimizer,
        make_fresh=fresh_factories(agent, args.inject_target), keep_trainable=args.inject_keep_trainable,
        third_term=not args.inject_no_third_term, forward=agent_output,
    )


def agent_output(agent: Agent, obs: torch.Tensor) -> torch.Tensor:
    """[logits | value] of the agent: what injection must leave unchanged."""
    logits, value = agent(obs)
    return torch.cat([logits, value[:, None]], dim=1)


def injection_iterations(args: Args) -> Dict[int, int]:
    """iteration (1-based) at whose start each --inject-at step takes effect: first boundary >= step."""
    out = {}
    for s in check_steps("--inject-at", args.inject_at, args.total_timesteps):
        it = -(-s // args.batch_size) + 1  # boundary before iteration `it` is at (it-1)*batch_size
        if it > args.num_iterations:
            raise UserError(
                f"--inject-at {s}: no rollout starts at or after it (the last starts at step "
                f"{(args.num_iterations - 1) * args.batch_size}); raise --total-timesteps or inject earlier"
            )
        if it in out:
            raise UserError(f"--inject-at {out[it]} and {s} fall before the same rollout (batch of {args.batch_size} steps)")
        out[it] = s
    return out


# ---------------------------------------------------------------------------------------------
# PPO update
# ---------------------------------------------------------------------------------------------
def ppo_update(agent: Agent, optimizer, batch: dict, args: Args, frozen: Optional[Dict[str, list]] = None,
               global_step: int = 0) -> dict:
    """cleanRL's PPO update on the valid samples of a flattened rollout.

    batch: obs, actions, logprobs, advantages, returns, values (flat, valid samples only).
    frozen: path -> per-term cached outputs aligned with the batch (None: recompute them).
    """
    n = batch["obs"].shape[0]
    b_inds = np.arange(n)
    clipfracs = []
    for epoch in range(args.update_epochs):
        np.random.shuffle(b_inds)
        for mb_inds in np.array_split(b_inds, args.num_minibatches):
            if len(mb_inds) == 0:
                continue
            mb = torch.as_tensor(mb_inds, device=batch["obs"].device)
            mb_frozen = None if frozen is None else {
                p: [None if o is None else o[mb] for o in outs] for p, outs in frozen.items()}
            _, newlogprob, entropy, newvalue = agent.get_action_and_value(batch["obs"][mb], batch["actions"][mb], frozen=mb_frozen)
            logratio = newlogprob - batch["logprobs"][mb]
            ratio = logratio.exp()

            with torch.no_grad():
                old_approx_kl = (-logratio).mean()
                approx_kl = ((ratio - 1) - logratio).mean()
                clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean().item()]

            mb_advantages = batch["advantages"][mb]
            if args.norm_adv and len(mb_inds) > 1:
                mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)

            pg_loss1 = -mb_advantages * ratio
            pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
            pg_loss = torch.max(pg_loss1, pg_loss2).mean()

            newvalue = newvalue.view(-1)
            if args.clip_vloss:
                v_loss_unclipped = (newvalue - batch["returns"][mb]) ** 2
                v_clipped = batch["values"][mb] + torch.clamp(newvalue - batch["values"][mb], -args.clip_coef, args.clip_coef)
                v_loss_clipped = (v_clipped - batch["returns"][mb]) ** 2
                v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
            else:
                v_loss = 0.5 * ((newvalue - batch["returns"][mb]) ** 2).mean()

            entropy_loss = entropy.mean()
            loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
            check_finite(loss, "PPO loss", global_step)

            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_([p for p in agent.parameters() if p.requires_grad], args.max_grad_norm)
            optimizer.step()

        if args.target_kl is not None and approx_kl > args.target_kl:
            break

    y_pred, y_true = batch["values"].cpu().numpy(), batch["returns"].cpu().numpy()
    var_y = np.var(y_true)
    explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
    return {
        "losses/value_loss": v_loss.item(), "losses/policy_loss": pg_loss.item(), "losses/entropy": entropy_loss.item(),
        "losses/old_approx_kl": old_approx_kl.item(), "losses/approx_kl": approx_kl.item(),
        "losses/clipfrac": float(np.mean(clipfracs)), "losses/explained_variance": float(explained_var),
    }


def flatten_rollout(buf: RolloutBuffer, advantages, returns, use_cache: bool):
    """Flatten the rollout and keep only the steps the agent decided."""
    keep = buf.valid.reshape(-1)
    idx = torch.nonzero(keep).squeeze(1)
    batch = {
        "obs": buf.obs.reshape((-1,) + tuple(buf.obs.shape[2:]))[idx],
        "actions": buf.actions.reshape(-1)[idx], "logprobs": buf.logprobs.reshape(-1)[idx],
        "advantages": advantages.reshape(-1)[idx], "returns": returns.reshape(-1)[idx], "values": buf.values.reshape(-1)[idx],
    }
    frozen = None
    if use_cache and buf.frozen:
        frozen = {p: [None if o is None else o[idx] for o in outs] for p, outs in buf.flat_frozen().items()}
    return batch, frozen


# ---------------------------------------------------------------------------------------------
# Evaluation and videos
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(agent: Agent, args: Args, device, episodes: int, deterministic: bool, seed: int) -> List[float]:
    """Raw scores of `episodes` whole games played by the greedy (or sampling) policy."""
    envs = AtariEnvs(args.env_id, min(episodes, args.num_envs), seed, args.noop_max, args.max_episode_frames, args.env_threads)
    obs, _ = envs.reset()
    scores: List[float] = []
    while len(scores) < episodes:
        action, _, _, _ = agent.get_action_and_value(torch.as_tensor(obs, device=device), deterministic=deterministic)
        obs, _, _, _, _, info = envs.step(action.cpu().numpy())
        scores += [g[1] for g in info["games"]]
    envs.close()
    return scores[:episodes]


def save_video(frames: List[np.ndarray], path: str, fps: int = 15) -> None:
    from moviepy import ImageSequenceClip

    os.makedirs(os.path.dirname(path), exist_ok=True)
    ImageSequenceClip([np.repeat(f[:, :, None], 3, axis=2) for f in frames], fps=fps).write_videofile(path, logger=None)


def video_trigger(game_idx: int) -> bool:
    """cleanRL/gymnasium's capped cubic schedule: games 0, 1, 8, 27, ..., 729, then every 1000th."""
    return game_idx < 1000 and int(round(game_idx ** (1.0 / 3))) ** 3 == game_idx or game_idx % 1000 == 0


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def validate_args(args: Args) -> dict:
    """Check every flag and file before anything is created; fill the runtime fields."""
    for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "total_timesteps", "eval_episodes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.eval_every < 0:
        raise UserError(f"--eval-every must be >= 0 (got {args.eval_every})")
    if args.noop_max < 0:
        raise UserError(f"--noop-max must be >= 0 (got {args.noop_max})")
    if args.inject_target not in INJECT_TARGETS:
        raise UserError(f"--inject-target {args.inject_target!r}: choose one of {', '.join(INJECT_TARGETS)}")
    parse_env_id(args.env_id)
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    if args.num_iterations < 1:
        raise UserError(
            f"--total-timesteps {args.total_timesteps} is less than one rollout "
            f"(--num-envs x --num-steps = {args.batch_size})"
        )
    if args.num_minibatches > args.batch_size:
        raise UserError(f"--num-minibatches {args.num_minibatches} exceeds the batch size {args.batch_size}")
    args.inject_at = sorted(args.inject_at)
    plan = injection_iterations(args)
    zip_info = None
    if args.pretrained_load_optimizer and not args.pretrained:
        raise UserError("--pretrained-load-optimizer needs --pretrained")
    if args.pretrained:
        zip_info = read_sb3_zip(resolve_pretrained(args.pretrained))
        game_actions = AtariEnvs(args.env_id, 1, 0, 0, 100, 1).n_actions
        if zip_info["n_actions"] != game_actions:
            raise UserError(
                f"--pretrained {args.pretrained}: the agent has {zip_info['n_actions']} actions but --env-id "
                f"{args.env_id} has {game_actions}; use the game the agent was trained on"
            )
        if args.pretrained_load_optimizer and zip_info["optimizer"] is None:
            raise UserError(f"--pretrained-load-optimizer: {args.pretrained} has no policy.optimizer.pth")
        args.share_features_extractor = zip_info["share"]
    return {"inject_plan": plan, "zip_info": zip_info}


def build_agent(args: Args, n_actions: int, device, zip_info: Optional[dict] = None):
    agent = Agent(n_actions, args.share_features_extractor).to(device)
    if zip_info is not None:
        load_pretrained(agent, zip_info)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    if zip_info is not None and args.pretrained_load_optimizer:
        load_sb3_optimizer(optimizer, agent, zip_info)
    return agent, optimizer


def train(args: Args) -> dict:
    """Run PPO; returns a summary (final global step, last losses, game scores, injection logs)."""
    setup = exit_on_user_error(validate_args, args)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    seed_everything(args.seed, args.torch_deterministic)
    device = pick_device(args.cuda)
    envs = AtariEnvs(args.env_id, args.num_envs, args.seed, args.noop_max, args.max_episode_frames, args.env_threads)
    agent, optimizer = exit_on_user_error(build_agent, args, envs.n_actions, device, setup["zip_info"])
    inject_plan = setup["inject_plan"]

    buf = RolloutBuffer(args.num_steps, args.num_envs, envs.observation_shape, device)
    global_step = 0
    start_time = time.time()
    next_obs_np, next_valid_np = envs.reset()
    next_obs = torch.as_tensor(next_obs_np, device=device)
    next_valid = torch.as_tensor(next_valid_np, device=device)
    summary = {"games": [], "injections": [], "evals": [], "losses": {}, "timing": []}
    next_eval = args.eval_every if args.eval_every > 0 else None
    video_frames, games_env0, recording = [], 0, args.capture_video

    for iteration in range(1, args.num_iterations + 1):
        # --- injection at the rollout boundary -------------------------------------------------
        if iteration in inject_plan:
            log = do_injection(agent, optimizer, args, next_obs)
            log["injection/requested_step"] = float(inject_plan[iteration])
            for k, v in log.items():
                writer.add_scalar(k, v, global_step)
            summary["injections"].append(dict(log, global_step=global_step))
            print(f"global_step={global_step}, injected into {args.inject_target}: " +
                  ", ".join(f"{k.split('/')[1]}={v:g}" for k, v in log.items()))
        cache_paths = cacheable_paths(agent, args.inject_target) if args.inject_cache_frozen else []
        buf.frozen = {}

        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate

        # --- rollout ---------------------------------------------------------------------------
        rollout_start = time.time()
        for step in range(args.num_steps):
            global_step += args.num_envs
            buf.obs[step] = next_obs
            buf.valid[step] = next_valid
            with torch.no_grad():
                frozen = agent.frozen_outputs(next_obs, cache_paths)
                action, logprob, _, value = agent.get_action_and_value(next_obs, frozen=frozen)
                buf.values[step] = value.flatten()
                buf.store_frozen(step, frozen)
            buf.actions[step] = action
            buf.logprobs[step] = logprob
            next_obs_np, reward, terminated, truncated, next_valid_np, info = envs.step(action.cpu().numpy())
            buf.rewards[step] = torch.as_tensor(reward, device=device)
            buf.terminated[step] = torch.as_tensor(terminated, device=device, dtype=torch.float32)
            next_obs = torch.as_tensor(next_obs_np, device=device)
            next_valid = torch.as_tensor(next_valid_np, device=device)
            if recording:
                video_frames.append(next_obs_np[0, -1].copy())
            for env_i, score, length in info["games"]:
                print(f"global_step={global_step}, episodic_return={score}")
                writer.add_scalar("charts/episodic_return", score, global_step)
                writer.add_scalar("charts/episodic_length", length, global_step)
                summary["games"].append((global_step, score))
                if env_i == 0 and args.capture_video:
                    if recording and video_frames:
                        save_video(video_frames, f"videos/{run_name}/game-{games_env0}.mp4")
                    games_env0 += 1
                    video_frames, recording = [], video_trigger(games_env0)
        rollout_time = time.time() - rollout_start

        # --- advantages and update -------------------------------------------------------------
        with torch.no_grad():
            next_value = agent.get_value(next_obs).reshape(-1)
            advantages, returns = compute_gae(buf.rewards, buf.values, buf.terminated, buf.valid, next_value,
                                              next_valid, args.gamma, args.gae_lambda)
        batch, frozen = flatten_rollout(buf, advantages, returns, use_cache=bool(cache_paths))
        update_start = time.time()
        stats = ppo_update(agent, optimizer, batch, args, frozen=frozen, global_step=global_step)
        update_time = time.time() - update_start

        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        for k, v in stats.items():
            writer.add_scalar(k, v, global_step)
        sps = int(global_step / (time.time() - start_time))
        print("SPS:", sps)
        writer.add_scalar("charts/SPS", sps, global_step)
        writer.add_scalar("charts/rollout_time", rollout_time, global_step)
        writer.add_scalar("charts/update_time", update_time, global_step)
        writer.add_scalar("charts/valid_fraction", float(buf.valid.float().mean()), global_step)
        summary["losses"] = stats
        summary["timing"].append({"rollout": rollout_time, "update": update_time,
                                  "iteration": time.time() - rollout_start, "samples": int(batch["obs"].shape[0])})

        # --- evaluation ------------------------------------------------------------------------
        if next_eval is not None and global_step >= next_eval:
            scores = evaluate(agent, args, device, args.eval_episodes, args.eval_deterministic, args.seed + 10_000 + iteration)
            writer.add_scalar("eval/episodic_return", float(np.mean(scores)), global_step)
            summary["evals"].append((global_step, scores))
            print(f"global_step={global_step}, eval/episodic_return={np.mean(scores):.1f} over {len(scores)} games")
            while next_eval <= global_step:
                next_eval += args.eval_every

    if args.save_model:
        model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
        atomic_save({"model": agent.state_dict(), "optimizer": optimizer.state_dict(), "args": vars(args),
                     "global_step": global_step, "n_actions": agent.n_actions,
                     "share_features_extractor": agent.share_features_extractor}, model_path)
        print(f"model saved to {model_path}")
        summary["model_path"] = model_path

    envs.close()
    writer.close()
    summary.update(global_step=global_step, run_name=run_name, agent=agent, optimizer=optimizer)
    return summary


if __name__ == "__main__":
    train(tyro.cli(Args))
