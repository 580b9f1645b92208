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
* Diagnostics and baselines from the shared blocks: `--metrics-every` (plasticity/... on a fixed probe
  batch), `--reset-at`, `--shrink-perturb-at`, `--l2-schedule`, `--layer-norm`, `--activation`, and an
  adaptive injection trigger (`--adaptive-inject-metric/-threshold`).

Saved models (`--save-model`) reload with
    ckpt = torch.load(path, weights_only=False)
    agent = Agent(**ckpt["agent_config"]); load_injected_state_dict(agent, ckpt["model"])
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

    # Plasticity diagnostics
    metrics_every: int = 10000
    """measure plasticity diagnostics (`plasticity/...`) every this many global steps (0: never)"""
    metrics_batch_size: int = 256
    """size of the fixed probe batch (drawn once from the first measured rollout)"""
    dormant_tau: float = 0.025
    """threshold of the dormant-unit ratio (ReDo)"""

    # Interventions to compare injection against (applied at the first rollout boundary at or after each step)
    reset_at: List[int] = field(default_factory=list)
    """global steps at which to re-initialise `--reset-target` (trainable parameters only; their Adam state is cleared)"""
    reset_target: Literal["encoder", "heads", "all"] = "heads"
    """what to reset: `encoder`, `heads` (action_net and value_net) or `all`"""
    shrink_perturb_at: List[int] = field(default_factory=list)
    """global steps at which to shrink-and-perturb `--shrink-perturb-target`: theta <- S*theta + P*fresh init"""
    shrink_perturb_target: Literal["encoder", "heads", "all"] = "all"
    """what to shrink-and-perturb: `encoder`, `heads` or `all`"""
    sp_shrink: float = 1.0
    """shrink factor S of shrink-and-perturb"""
    sp_perturb: float = 0.01
    """perturbation scale P of shrink-and-perturb"""
    l2_schedule: Literal["none", "constant", "incremental", "periodic"] = "none"
    """L2 penalty on the trainable weights, added to the PPO loss: none, constant, incremental, periodic"""
    l2_coef: float = 1e-5
    """L2 coefficient for `constant`, and for `periodic` while on"""
    l2_start: float = 0.0
    """`incremental`: coefficient at step 0"""
    l2_end: float = 1e-4
    """`incremental`: coefficient at the last step (linear in between)"""
    l2_period_on: int = 500_000
    """`periodic`: steps with the penalty on"""
    l2_period_off: int = 100_000
    """`periodic`: steps with the penalty off"""
    layer_norm: bool = False
    """LayerNorm (GroupNorm(1, C) after convolutions) after every hidden layer; not with `--pretrained`"""
    activation: Literal["relu", "leaky_relu", "tanh"] = "relu"
    """hidden activation"""
    adaptive_inject_metric: Optional[str] = None
    """inject (into `--inject-target`) when this `plasticity/...` key crosses `--adaptive-inject-threshold`"""
    adaptive_inject_threshold: Optional[float] = None
    """setting it turns the adaptive trigger on (needs `--metrics-every`)"""
    adaptive_inject_direction: Literal["below", "above"] = "below"
    """fire when the metric is below / above the threshold"""
    adaptive_inject_min_gap: int = 0
    """at least this many global steps between two adaptive injections"""
    adaptive_inject_max_count: int = 1
    """at most this many adaptive injections"""

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


def make_encoder(layer_norm: bool = False, activation: str = "relu") -> nn.Module:
    """SB3's NatureCNN (`cnn.{0,2,4}` convolutions, `linear.0`; same names as in SB3 zips), orthogonal init."""
    return NatureCNNEncoder(4, 512, layer_norm=layer_norm, activation=activation, orthogonal=True)


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

    def __init__(self, n_actions: int, share_features_extractor: bool = True, layer_norm: bool = False,
                 activation: str = "relu"):
        super().__init__()
        self.n_actions = n_actions
        self.share_features_extractor = share_features_extractor
        if share_features_extractor:
            self.features_extractor = make_encoder(layer_norm, activation)
        else:
            self.pi_features_extractor = make_encoder(layer_norm, activation)
            self.vf_features_extractor = make_encoder(layer_norm, activation)
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

    def __init__(self, n_actions: int, share_features_extractor: bool = True, layer_norm: bool = False,
                 activation: str = "relu"):
        super().__init__()
        self.n_actions = n_actions
        self.share_features_extractor = share_features_extractor
        self.layer_norm, self.activation = layer_norm, activation
        self.policy = ActorCriticCnn(n_actions, share_features_extractor, layer_norm, activation)

    def config(self) -> dict:
        """Constructor arguments: `Agent(**config)` rebuilds the (un-injected) network for reloading."""
        return {"n_actions": self.n_actions, "share_features_extractor": self.share_features_extractor,
                "layer_norm": self.layer_norm, "activation": self.activation}

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
    obs_shape = list(obs.get("_shape", obs.get("shape", [])))  # older SB3 versions wrote `shape`
    if obs_shape != [4, 84, 84] or obs.get("dtype") != "uint8":
        raise UserError(f"{flag}: observation space {obs_shape} {obs.get('dtype')} is not the 4x84x84 uint8 Atari stack")
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
    """Fresh modules drawn with the network's own (cleanRL/SB3 orthogonal) init scheme, per path of `target`."""
    n, share, ln, act = agent.n_actions, agent.share_features_extractor, agent.layer_norm, agent.activation
    if target == "encoder":
        return {p: (lambda: make_encoder(ln, act)) for p in injection_paths(agent, target)}
    if target == "heads":
        return {"policy.action_net": lambda: make_action_net(n), "policy.value_net": make_value_net}
    return {"policy": lambda: ActorCriticCnn(n, share, ln, act)}


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


def boundary_iterations(flag: str, steps, args: Args) -> Dict[int, int]:
    """iteration (1-based) at whose start each step of `flag` takes effect: the first rollout boundary >= step."""
    out = {}
    for s in check_steps(flag, steps, args.total_timesteps):
        it = -(-s // args.batch_size) + 1  # boundary before iteration `it` is at (it-1)*batch_size
        if it > args.num_iterations:
            raise UserError(
                f"{flag} {s}: no rollout starts at or after it (the last starts at step "
                f"{(args.num_iterations - 1) * args.batch_size}); raise --total-timesteps or choose an earlier step"
            )
        if it in out:
            raise UserError(f"{flag} {out[it]} and {s} fall before the same rollout (batch of {args.batch_size} steps)")
        out[it] = s
    return out


def injection_iterations(args: Args) -> Dict[int, int]:
    return boundary_iterations("--inject-at", args.inject_at, args)


# ---------------------------------------------------------------------------------------------
# PPO update
# ---------------------------------------------------------------------------------------------
def ppo_loss(agent: Agent, mb: dict, args: Args, frozen: Optional[Dict[str, list]] = None):
    """cleanRL's PPO loss on one minibatch; returns (loss, parts)."""
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb["obs"], mb["actions"], frozen=frozen)
    logratio = newlogprob - mb["logprobs"]
    ratio = logratio.exp()
    mb_advantages = mb["advantages"]
    if args.norm_adv and len(mb_advantages) > 1:
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
    pg_loss1 = -mb_advantages * ratio
    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    newvalue = newvalue.view(-1)
    if args.clip_vloss:
        v_loss_unclipped = (newvalue - mb["returns"]) ** 2
        v_clipped = mb["values"] + torch.clamp(newvalue - mb["values"], -args.clip_coef, args.clip_coef)
        v_loss_clipped = (v_clipped - mb["returns"]) ** 2
        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
    else:
        v_loss = 0.5 * ((newvalue - mb["returns"]) ** 2).mean()
    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
    return loss, {"pg_loss": pg_loss, "v_loss": v_loss, "entropy": entropy_loss, "logratio": logratio.detach()}


def ppo_update(agent: Agent, optimizer, batch: dict, args: Args, frozen: Optional[Dict[str, list]] = None,
               global_step: int = 0, l2: float = 0.0) -> dict:
    """cleanRL's PPO update on the valid samples of a flattened rollout.

    batch: obs, actions, logprobs, advantages, returns, values (flat, valid samples only).
    frozen: path -> per-term cached outputs aligned with the batch (None: recompute them).
    l2: coefficient of the L2 penalty on the trainable weights (`--l2-schedule`), 0 for none.
    """
    n = batch["obs"].shape[0]
    if n == 0:  # every step of the rollout was a forced reset step (only with tiny --num-steps)
        return {}
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
            mb_batch = {k: v[mb] for k, v in batch.items()}
            loss, parts = ppo_loss(agent, mb_batch, args, frozen=mb_frozen)
            pg_loss, v_loss, entropy_loss = parts["pg_loss"], parts["v_loss"], parts["entropy"]
            if l2 > 0:
                loss = loss + l2 * l2_penalty(agent)
            with torch.no_grad():
                logratio, ratio = parts["logratio"], parts["logratio"].exp()
                old_approx_kl = (-logratio).mean()
                approx_kl = ((ratio - 1) - logratio).mean()
                clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean().item()]
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


def log_intervention(writer, summary: dict, kind: str, target: str, log: dict, global_step: int) -> None:
    for k, v in log.items():
        writer.add_scalar(k, v, global_step)
    summary["interventions"].append(dict(log, kind=kind, global_step=global_step))
    print(f"global_step={global_step}, {kind} of {target}: " + ", ".join(f"{k.split('/')[1]}={v:g}" for k, v in log.items()))


def draw_probe(batch: dict, size: int, seed: int) -> dict:
    """A fixed probe batch for the plasticity diagnostics, drawn with its own generator (the training
    RNG stream is untouched), kept for the whole run so every point of a curve measures the same inputs."""
    n = batch["obs"].shape[0]
    idx = np.random.default_rng(seed + 12345).choice(n, size=min(size, n), replace=False)
    idx = torch.as_tensor(np.sort(idx), device=batch["obs"].device)
    return {k: v[idx].clone() for k, v in batch.items()}


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
    resets = boundary_iterations("--reset-at", args.reset_at, args)
    shrink_perturbs = boundary_iterations("--shrink-perturb-at", args.shrink_perturb_at, args)
    if args.adaptive_inject_min_gap < 0:
        raise UserError(f"--adaptive-inject-min-gap {args.adaptive_inject_min_gap} must be >= 0")
    check_intervention_args(args, args.total_timesteps,
                            plasticity_keys(Agent(4, args.share_features_extractor, args.layer_norm, args.activation)))
    zip_info = None
    if args.pretrained_load_optimizer and not args.pretrained:
        raise UserError("--pretrained-load-optimizer needs --pretrained")
    if args.pretrained and args.layer_norm:
        raise UserError("--layer-norm cannot be combined with --pretrained: SB3 CnnPolicy weights have no norm layers")
    if args.pretrained:
        zip_info = read_sb3_zip(resolve_pretrained(args.pretrained))
        probe_env = AtariEnvs(args.env_id, 1, 0, 0, 100, 1)
        game_actions = probe_env.n_actions
        probe_env.close()
        if zip_info["n_actions"] != game_actions:
            raise UserError(
                f"--pretrained {args.pretrained}: the agent has {zip_info['n_actions']} actions but --env-id "
                f"{args.env_id} has {game_actions}; use the game the agent was trained on"
            )
        if args.pretrained_load_optimizer and zip_info["optimizer"] is None:
            raise UserError(f"--pretrained-load-optimizer: {args.pretrained} has no policy.optimizer.pth")
        args.share_features_extractor = zip_info["share"]
        if args.pretrained_load_optimizer:  # check the Adam state now, before any run folder exists
            build_agent(args, zip_info["n_actions"], torch.device("cpu"), zip_info)
    return {"inject_plan": plan, "zip_info": zip_info, "resets": resets, "shrink_perturbs": shrink_perturbs}


def build_agent(args: Args, n_actions: int, device, zip_info: Optional[dict] = None):
    agent = Agent(n_actions, args.share_features_extractor, args.layer_norm, args.activation).to(device)
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
    try:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

        seed_everything(args.seed, args.torch_deterministic)
        device = pick_device(args.cuda)
        envs = AtariEnvs(args.env_id, args.num_envs, args.seed, args.noop_max, args.max_episode_frames, args.env_threads)
        agent, optimizer = exit_on_user_error(build_agent, args, envs.n_actions, device, setup["zip_info"])
        inject_plan = setup["inject_plan"]
        trigger = AdaptiveTrigger.from_args(args)
        adaptive_reason = None  # set when the trigger fires: inject at the next rollout boundary

        buf = RolloutBuffer(args.num_steps, args.num_envs, envs.observation_shape, device)
        global_step = 0
        start_time = time.time()
        next_obs_np, next_valid_np = envs.reset()
        next_obs = torch.as_tensor(next_obs_np, device=device)
        next_valid = torch.as_tensor(next_valid_np, device=device)
        summary = {"games": [], "injections": [], "interventions": [], "evals": [], "losses": {}, "timing": []}
        next_eval = args.eval_every if args.eval_every > 0 else None
        next_metrics = args.metrics_every if args.metrics_every > 0 else None
        probe = None
        video_frames, games_env0, recording = [], 0, args.capture_video

        for iteration in range(1, args.num_iterations + 1):
            # --- injection at the rollout boundary -------------------------------------------------
            if iteration in inject_plan or adaptive_reason is not None:
                log = do_injection(agent, optimizer, args, next_obs)
                if iteration in inject_plan:
                    log["injection/requested_step"] = float(inject_plan[iteration])
                if adaptive_reason is not None:
                    log["injection/adaptive"] = 1.0
                    print(f"global_step={global_step}, adaptive injection: {adaptive_reason}")
                    adaptive_reason = None
                for k, v in log.items():
                    writer.add_scalar(k, v, global_step)
                summary["injections"].append(dict(log, global_step=global_step))
                print(f"global_step={global_step}, injected into {args.inject_target}: " +
                      ", ".join(f"{k.split('/')[1]}={v:g}" for k, v in log.items()))
            if iteration in setup["resets"]:
                log = reset_modules(agent, injection_paths(agent, args.reset_target), optimizers=[optimizer],
                                    make_fresh=fresh_factories(agent, args.reset_target))
                log_intervention(writer, summary, "reset", args.reset_target, log, global_step)
            if iteration in setup["shrink_perturbs"]:
                log = shrink_perturb(agent, injection_paths(agent, args.shrink_perturb_target), args.sp_shrink,
                                     args.sp_perturb, make_fresh=fresh_factories(agent, args.shrink_perturb_target))
                log_intervention(writer, summary, "shrink_perturb", args.shrink_perturb_target, log, global_step)
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
            l2 = l2_coef_from_args(args, global_step, args.total_timesteps)
            update_start = time.time()
            stats = ppo_update(agent, optimizer, batch, args, frozen=frozen, global_step=global_step, l2=l2)
            if args.l2_schedule != "none":
                writer.add_scalar("losses/l2_coef", l2, global_step)
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

            # --- plasticity diagnostics on a fixed probe batch -------------------------------------
            if next_metrics is not None and global_step >= next_metrics and batch["obs"].shape[0] > 0:
                if probe is None:
                    probe = draw_probe(batch, args.metrics_batch_size, args.seed)
                metrics = measure_plasticity(agent, probe["obs"], loss_fn=lambda m: ppo_loss(m, probe, args)[0],
                                             tau=args.dormant_tau, forward=agent_output)
                for k, v in metrics.items():
                    writer.add_scalar(k, v, global_step)
                summary["metrics"] = metrics
                if trigger is not None and iteration < args.num_iterations:
                    adaptive_reason = trigger.check(global_step, metrics)
                while next_metrics <= global_step:
                    next_metrics += args.metrics_every

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
                         "global_step": global_step, "agent_config": agent.config(), "n_actions": agent.n_actions,
                         "share_features_extractor": agent.share_features_extractor,
                         "adaptive_trigger": trigger.state_dict() if trigger is not None else None}, model_path)
            print(f"model saved to {model_path}")
            summary["model_path"] = model_path

        envs.close()
    finally:
        writer.close()  # flush the logs even when the run stops early (e.g. a non-finite loss)
    summary.update(global_step=global_step, run_name=run_name, agent=agent, optimizer=optimizer)
    return summary


if __name__ == "__main__":
    train(tyro.cli(Args))
