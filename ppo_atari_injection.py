"""PPO on Atari with plasticity injection (Nikishin et al., NeurIPS 2023), cleanRL style (`ppo_atari.py` defaults).
The agent sees exactly what Stable-Baselines3's Atari wrappers give and has SB3's parameter names, so SB3 PPO
CnnPolicy zips continue as they were trained. Flags, logs and tests: README.md, section `ppo_atari_injection.py`."""

import json
import os
import re
import time
import warnings
import zipfile
from collections import OrderedDict
from functools import partial

import ale_py
import numpy as np
import torch
import torch.nn as nn
import tyro
from ale_py.vector_env import AtariVectorEnv
from torch.distributions.categorical import Categorical

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
    """whether to save videos of the agent's view (84x84 grey) of games of the first environment to `videos/`"""
    # Algorithm specific arguments (cleanRL ppo_atari.py defaults)
    env_id: str = "BreakoutNoFrameskip-v4"
    """the id of the environment: `<Game>NoFrameskip-v4` (no sticky actions) or `ALE/<Game>-v5` (sticky 0.25)"""
    total_timesteps: int = bounded(20_000_000, min=1)
    """total timesteps of the experiment (20M so that the headline `--inject-at 10000000` injects midway)"""
    learning_rate: float = bounded(2.5e-4, above=0)
    """the learning rate of the optimizer"""
    num_envs: int = bounded(8, min=1)
    """the number of parallel game environments"""
    num_steps: int = bounded(128, min=1)
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """Toggle learning rate annealing for policy and value networks"""
    gamma: float = bounded(0.99, min=0, max=1)
    """the discount factor gamma"""
    gae_lambda: float = bounded(0.95, min=0, max=1)
    """the lambda for the general advantage estimation"""
    num_minibatches: int = bounded(4, min=1)
    """the number of mini-batches"""
    update_epochs: int = bounded(4, min=1)
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """Toggles advantages normalization"""
    clip_coef: float = bounded(0.1, min=0)
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """Toggles whether or not to use a clipped loss for the value function, as per the paper."""
    ent_coef: float = bounded(0.01, min=0)
    """coefficient of the entropy"""
    vf_coef: float = bounded(0.5, min=0)
    """coefficient of the value function"""
    max_grad_norm: float = bounded(0.5, above=0)
    """the maximum norm for the gradient clipping"""
    target_kl: Optional[float] = bounded(None, above=0)
    """the target KL divergence threshold"""
    # Environment (SB3 AtariWrapper semantics), network, pretrained SB3 agent
    max_episode_frames: int = bounded(108_000, min=1)
    """games are truncated after this many emulator frames (30 minutes of play)"""
    env_threads: int = bounded(0, min=0)
    """threads of ale-py's vector environment (0: one per environment, capped by the CPU count)"""
    share_features_extractor: bool = True
    """one NatureCNN for actor and critic (SB3 default); `--no-...` builds two (with `--pretrained` the zip decides)"""
    pretrained: Optional[str] = None
    """an SB3 PPO `CnnPolicy` zip to continue from, or a model-hub id such as `sb3/ppo-BreakoutNoFrameskip-v4`"""
    pretrained_load_optimizer: bool = False
    """also load the zip's Adam state (moments and step counts; the learning rate stays ours)"""
    # Plasticity injection and the interventions to compare it against (at the first rollout boundary >= each step)
    inject_target: Literal["encoder", "heads", "all"] = "encoder"
    """inject into `encoder` (NatureCNN), `heads` (action_net and value_net) or `all` (the whole network)"""
    inject_cache_frozen: bool = True
    """reuse the frozen terms' outputs of the rollout in every update epoch (encoder/all); `--no-...` recomputes"""
    reset_target: Literal["encoder", "heads", "all"] = "heads"
    """what `--reset-at` re-initialises"""
    shrink_perturb_target: Literal["encoder", "heads", "all"] = "all"
    """what `--shrink-perturb-at` shrinks and perturbs"""
    # Evaluation
    eval_every: int = bounded(0, min=0)
    """evaluate every this many global steps (0: never; checked at rollout boundaries)"""
    eval_episodes: int = bounded(10, min=1)
    """number of whole games per evaluation"""
    eval_deterministic: bool = True
    """evaluate the greedy policy (argmax); `--no-eval-deterministic` samples actions"""
    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


# ---- Environment: ale-py's vector env driven to reproduce SB3's AtariWrapper + VecFrameStack(4) + VecTransposeImage --
class AtariEnvs:
    """ale-py steps the games (frame skip 4 with max-pool, 84x84 grey, noops, next-step autoreset); on top, as SB3:
    a life loss ends the agent's episode but not the game; after a reset FIRE, 2 and after a life loss NOOP, FIRE, 2
    (NOOP only without FIRE) are pressed unseen; the 4-frame stack (oldest first) is zeroed at every episode end.
    Steps the agent does not decide (those, and the autoreset step) run in lock-step: `valid` is False for an env
    whose NEXT step is one, and the learner leaves them out. `info["games"]`: (env, raw score, frames) per game."""

    def __init__(self, env_id, num_envs, seed, max_episode_frames=108_000, num_threads=0, noop_max=30):
        m = re.fullmatch(r"(?:ALE/)?([A-Z][A-Za-z0-9]*?)(NoFrameskip-v4|-v5)", env_id)
        if m is None:
            raise UserError(f"--env-id {env_id!r} is not an Atari id <Game>NoFrameskip-v4 or ALE/<Game>-v5")
        game = re.sub(r"(?<!^)(?=[A-Z])", "_", m.group(1)).lower()  # SpaceInvaders -> space_invaders
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if ale_py.roms.get_rom_path(game) is None:
                raise UserError(f"--env-id {env_id!r}: ale-py has no ROM named {game!r}")
        kw = dict(stack_num=1, use_fire_reset=False, episodic_life=False, life_loss_info=False, reward_clipping=False)
        kw.update(noop_max=noop_max, max_num_frames_per_episode=max_episode_frames)
        kw["repeat_action_probability"] = 0.0 if m.group(2) == "NoFrameskip-v4" else 0.25  # -v5: sticky actions
        self.env = AtariVectorEnv(game, num_envs, num_threads=num_threads or min(num_envs, os.cpu_count() or 1), **kw)
        self.num_envs, self.seed, self.n_actions = num_envs, seed, int(self.env.single_action_space.n)
        actions = list(self.env.ale.get_action_set())
        self.fire = [1, 2] if len(actions) >= 3 and actions[1] == ale_py.Action.FIRE else []  # as SB3's FireResetEnv
        self.stack = np.zeros((num_envs, 4, 84, 84), dtype=np.uint8)
        self.autoreset = np.zeros(num_envs, dtype=bool)
        self.game_return = np.zeros(num_envs, dtype=np.float64)

    def valid(self) -> np.ndarray:
        return ~self.autoreset & np.array([not p for p in self.pending])

    def reset(self):
        frames, info = self.env.reset(seed=(self.seed + np.arange(self.num_envs)) % 2**31)  # ale-py: seeds < 2**31
        self.lives = info["lives"].astype(np.int64)
        self.stack[:, -1] = frames[:, 0]
        self.pending = [list(self.fire) for _ in range(self.num_envs)]
        return self.stack.copy(), self.valid()

    def step(self, actions: np.ndarray):
        """obs, clipped reward, terminated (life loss or game over), truncated, valid, info."""
        actions = np.asarray(actions, dtype=np.int64).copy()
        hidden, was_autoreset = ~self.valid(), self.autoreset.copy()
        for i in np.flatnonzero(hidden & ~self.autoreset):
            actions[i] = self.pending[i].pop(0)
        frames, raw, game_over, truncated, info = self.env.step(actions)
        lives = info["lives"].astype(np.int64)
        life_loss = (0 < lives) & (lives < self.lives) & ~was_autoreset & ~game_over
        self.lives, self.autoreset = lives, game_over | truncated
        self.game_return += raw.astype(np.float64)
        done = np.flatnonzero(game_over | truncated)
        games = [(int(i), float(self.game_return[i]), int(info["episode_frame_number"][i])) for i in done]
        for i in np.flatnonzero(life_loss):
            self.pending[i] = [0, *self.fire]  # NOOP, then FIRE and 2
        for i in done:  # the presses wait for the autoreset step, which takes no action
            self.game_return[i], self.pending[i] = 0.0, list(self.fire)
        self.stack[:, :-1] = self.stack[:, 1:]
        self.stack[hidden, :-1] = 0  # so the first decided observation after a reset is [0, 0, 0, frame], as SB3's
        self.stack[:, -1] = frames[:, 0]
        reward = np.sign(raw).astype(np.float32)
        return self.stack.copy(), reward, game_over | life_loss, truncated & ~game_over, self.valid(), {"games": games}

    def close(self):
        self.env.close()


# ---- Network: SB3's ActorCriticCnnPolicy (NatureCNN, same parameter names) with cleanRL's orthogonal init ------------
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def nature_cnn(layer_norm: bool = False, activation: str = "relu") -> nn.Sequential:
    """Mnih et al. (2015) encoder of 4x84x84 images in [0, 1], with SB3's keys (`cnn.0/2/4`, `linear.0`)."""
    convs = [nn.Conv2d(4, 32, 8, 4), nn.Conv2d(32, 64, 4, 2), nn.Conv2d(64, 64, 3, 1)]
    cnn = nn.Sequential(
        *[m for conv in convs for m in hidden_layer(layer_init(conv), layer_norm, activation)], nn.Flatten()
    )
    linear = nn.Sequential(*hidden_layer(layer_init(nn.Linear(64 * 7 * 7, 512)), layer_norm, activation))
    return nn.Sequential(OrderedDict(cnn=cnn, linear=linear))


def with_cache(module: nn.Module, x: torch.Tensor, cache: dict, path: str) -> torch.Tensor:
    """module(x); an injected module takes its frozen terms' outputs from a batch `cache` (Agent.frozen_outputs)."""
    if isinstance(module, InjectedModule) and cache:
        return module(x, frozen_out=[cache.get(f"frozen/{path}/{i}") for i in range(len(module.terms))])
    return module(x, cache) if isinstance(module, ActorCritic) else module(x)


class ActorCritic(nn.Module):
    """Features extractor(s), action_net, value_net; one tensor out, [logits | value], so it can itself be injected."""

    def __init__(self, n_actions, share_features_extractor=True, layer_norm=False, activation="relu"):
        super().__init__()
        shared = ["features_extractor"]
        self.encoders = shared if share_features_extractor else ["pi_features_extractor", "vf_features_extractor"]
        for name in self.encoders:
            setattr(self, name, nature_cnn(layer_norm, activation))
        self.action_net = layer_init(nn.Linear(512, n_actions), std=0.01)
        self.value_net = layer_init(nn.Linear(512, 1), std=1.0)

    def forward(self, x: torch.Tensor, cache: dict = None) -> torch.Tensor:
        features = [with_cache(getattr(self, name), x, cache, "policy." + name) for name in self.encoders]
        return torch.cat([self.action_net(features[0]), self.value_net(features[-1])], dim=1)


class Agent(nn.Module):
    """cleanRL-style agent around `self.policy`; `Agent(**agent.config)` rebuilds it (un-injected) for reloading."""

    def __init__(self, n_actions, share_features_extractor=True, layer_norm=False, activation="relu"):
        super().__init__()
        self.config = dict(n_actions=n_actions, share_features_extractor=share_features_extractor)
        self.config.update(layer_norm=layer_norm, activation=activation)
        self.policy = ActorCritic(**self.config)
        self.n_actions, self.encoders = n_actions, self.policy.encoders  # an injection into `all` wraps the policy

    def forward(self, obs: torch.Tensor, cache: dict = None) -> torch.Tensor:
        """[logits | value] of uint8 observations: what injection leaves unchanged."""
        return with_cache(self.policy, obs.float() / 255.0, cache, "policy")  # / 255: SB3's normalize_images

    @torch.no_grad()
    def frozen_outputs(self, obs: torch.Tensor, paths: list) -> dict:
        """{"frozen/<path>/<term>": output} of the frozen terms of the injected modules at `paths` (fed by obs)."""
        outs = {path: self.get_submodule(path).frozen_outputs(obs.float() / 255.0) for path in paths}
        return {f"frozen/{p}/{i}": o for p, terms in outs.items() for i, o in enumerate(terms) if o is not None}

    def get_action_and_value(self, obs, action=None, cache=None, deterministic=False, step=None):
        out = self(obs, cache)
        logits = out[:, : self.n_actions]
        probs = Categorical(logits=logits, validate_args=False)
        if action is None:  # acting needs finite logits; in an update non-finite ones make the loss non-finite
            check_finite(logits, "the policy's logits", step)
            action = logits.argmax(dim=1) if deterministic else probs.sample()
        return action, probs.log_prob(action), probs.entropy(), out[:, self.n_actions]


def target_modules(agent: Agent, target: str) -> dict:
    """{module path: () -> a fresh module with the network's own init, not PyTorch's} of an --{kind}-target."""
    if target == "all":
        return {"policy": partial(ActorCritic, **agent.config)}
    if target == "heads":
        action_net = lambda: layer_init(nn.Linear(512, agent.n_actions), std=0.01)
        return {"policy.action_net": action_net, "policy.value_net": lambda: layer_init(nn.Linear(512, 1), std=1.0)}
    encoder = partial(nature_cnn, agent.config["layer_norm"], agent.config["activation"])
    return {f"policy.{name}": encoder for name in agent.encoders}


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


# ---- PPO (cleanRL's): advantages, the flat batch of the decided steps, the update; plasticity metrics, the cache -----
def compute_gae(buf: dict, next_value, next_valid, gamma, gae_lambda):
    """GAE where some steps are not the agent's (valid[t]: it decided step t). A truncated game's step t is followed by
    the invalid autoreset step t+1, whose observation is the final one: V(final) bootstraps t, the chain is cut."""
    rewards, values, terminated, valid = buf["rewards"], buf["values"], buf["terminated"], buf["valid"]
    advantages, lastgaelam = torch.zeros_like(rewards), torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        last = t == rewards.shape[0] - 1
        nextvalues, nextvalid = (next_value, next_valid.float()) if last else (values[t + 1], valid[t + 1].float())
        nonterminal = 1.0 - terminated[t]
        delta = rewards[t] + gamma * nextvalues * nonterminal - values[t]
        lastgaelam = delta + gamma * gae_lambda * nonterminal * nextvalid * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + values


def flatten_rollout(buf: dict, advantages, returns) -> dict:
    """The decided steps, flat: obs, actions, logprobs, values, advantages, returns and any frozen/... outputs."""
    keep = torch.nonzero(buf["valid"].reshape(-1)).squeeze(1)
    data = dict(buf, advantages=advantages, returns=returns)
    return {k: v.flatten(0, 1)[keep] for k, v in data.items() if k not in ("rewards", "terminated", "valid")}


def ppo_loss(agent: Agent, mb: dict, args: Args):
    """cleanRL's PPO loss on one minibatch (its frozen/... entries, if any, spare the frozen terms); (loss, parts)."""
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb["obs"], mb["actions"], cache=mb)
    logratio = newlogprob - mb["logprobs"]
    ratio = logratio.exp()
    mb_advantages = mb["advantages"]
    if args.norm_adv and len(mb_advantages) > 1:
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
    pg_loss1 = -mb_advantages * ratio
    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    if args.clip_vloss:
        v_loss_unclipped = (newvalue - mb["returns"]) ** 2
        v_clipped = mb["values"] + torch.clamp(newvalue - mb["values"], -args.clip_coef, args.clip_coef)
        v_loss_clipped = (v_clipped - mb["returns"]) ** 2
        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
    else:
        v_loss = 0.5 * ((newvalue - mb["returns"]) ** 2).mean()
    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
    return loss, {"policy_loss": pg_loss, "value_loss": v_loss, "entropy": entropy_loss, "logratio": logratio.detach()}


def ppo_update(agent: Agent, optimizer, batch: dict, args: Args, global_step: int = 0, l2: float = 0.0) -> dict:
    """Epochs of shuffled minibatches of a flat rollout batch; l2: the `--l2-schedule` coefficient now."""
    if len(batch["obs"]) == 0:  # every step of the rollout was a forced reset step (only with tiny --num-steps)
        return {}
    b_inds = np.arange(len(batch["obs"]))
    clipfracs = []
    for _ in range(args.update_epochs):
        np.random.shuffle(b_inds)
        for mb_inds in np.array_split(b_inds, min(args.num_minibatches, len(b_inds))):  # none empty
            mb = torch.as_tensor(mb_inds, device=batch["obs"].device)
            loss, parts = ppo_loss(agent, {k: v[mb] for k, v in batch.items()}, args)
            if l2 > 0:
                loss = loss + l2 * l2_penalty(agent)
            with torch.no_grad():
                logratio, ratio = parts["logratio"], parts["logratio"].exp()
                old_approx_kl, approx_kl = (-logratio).mean(), ((ratio - 1) - logratio).mean()
                clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean())  # on the device: no sync
            check_finite(loss, "PPO loss", global_step)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)  # injection clears frozen .grad
            optimizer.step()
        if args.target_kl is not None and approx_kl > args.target_kl:
            break
    y_pred, y_true = batch["values"].cpu().numpy(), batch["returns"].cpu().numpy()
    var_y = np.var(y_true)
    explained_var = np.nan if var_y == 0 else float(1 - np.var(y_true - y_pred) / var_y)
    stats = {f"losses/{k}": parts[k].item() for k in ("value_loss", "policy_loss", "entropy")}
    stats.update({"losses/old_approx_kl": old_approx_kl.item(), "losses/approx_kl": approx_kl.item()})
    stats["losses/clipfrac"], stats["losses/explained_variance"] = torch.stack(clipfracs).mean().item(), explained_var
    return stats


def plasticity_metrics(agent: Agent, batch: dict, summary: dict, args: Args) -> dict:
    """plasticity/... on the run's fixed probe batch (drawn once with its own generator, without the frozen/...
    outputs: it outlives later injections; a resumed run has it on the CPU), with the PPO loss for the gradients."""
    if summary["probe"] is None:
        n = len(batch["obs"])
        idx = np.random.default_rng(args.seed + 12345).choice(n, min(args.metrics_batch_size, n), replace=False)
        summary["probe"] = {k: v[np.sort(idx)] for k, v in batch.items() if not k.startswith("frozen/")}
    probe = summary["probe"] = {k: v.to(batch["obs"].device) for k, v in summary["probe"].items()}
    return measure_plasticity(agent, probe["obs"], lambda model: ppo_loss(model, probe, args)[0], args.dormant_tau)


def cached_paths(agent: Agent, args: Args) -> list:
    """Injected modules fed by the observation (encoder, all): their frozen terms run per rollout step, not epoch."""
    if not args.inject_cache_frozen or args.inject_target == "heads":
        return []
    return [p for p in target_modules(agent, args.inject_target) if isinstance(agent.get_submodule(p), InjectedModule)]


# ---- Flag checks, the agent, Stable-Baselines3 zips, evaluation, videos ----------------------------------------------
def validate_args(args: Args) -> tuple:
    """One-line errors naming the flag or file; fills the runtime fields. Returns the SB3 zip's contents (or None) and
    {kind: {iteration: step}} of --{kind}-at: each step acts at the first rollout boundary at or after it."""
    check_ranges(args)
    check_compile(args)
    check_intervention_args(args, args.total_timesteps, plasticity_keys(Agent(4)))  # the same keys for every variant
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // args.batch_size
    if args.num_iterations < 1:
        raise UserError(f"--total-timesteps {args.total_timesteps} is less than one rollout ({args.batch_size} steps)")
    if args.total_timesteps % args.batch_size:  # rounded down, as cleanRL does, but said
        steps = f"{args.num_iterations * args.batch_size} steps ({args.num_iterations} rollouts of {args.batch_size})"
        print(f"--total-timesteps {args.total_timesteps} is not a whole number of rollouts: running {steps}")
    if args.batch_size % args.num_minibatches:
        raise UserError(
            f"--num-minibatches {args.num_minibatches} does not divide --num-envs x --num-steps = {args.batch_size}"
        )
    args.inject_at = sorted(args.inject_at)
    plan = {}
    for kind in ("inject", "reset", "shrink_perturb"):
        flag, steps = f"--{kind.replace('_', '-')}-at", getattr(args, f"{kind}_at")
        plan[kind] = {-(-s // args.batch_size) + 1: s for s in check_steps(flag, steps, args.total_timesteps)}
        if max(plan[kind], default=0) > args.num_iterations or len(plan[kind]) < len(steps):
            raise UserError(
                f"{flag} {steps}: each step must fall before a rollout of its own (one every {args.batch_size} steps, "
                f"the last at step {(args.num_iterations - 1) * args.batch_size})"
            )
    if args.pretrained_load_optimizer and not args.pretrained:
        raise UserError("--pretrained-load-optimizer needs --pretrained")
    if args.pretrained and args.layer_norm:
        raise UserError("--layer-norm cannot be combined with --pretrained: SB3 CnnPolicy weights have no norm layers")
    if not args.pretrained:
        return None, plan
    info = read_sb3_zip(args.pretrained)
    envs = AtariEnvs(args.env_id, 1, 0, 100, 1, noop_max=0)
    envs.close()
    if info["n_actions"] != envs.n_actions:
        raise UserError(
            f"--pretrained {args.pretrained}: the agent has {info['n_actions']} actions but --env-id {args.env_id} "
            f"has {envs.n_actions}; use the game the agent was trained on"
        )
    print(f"continuing the {envs.n_actions}-action agent of {args.pretrained} on {args.env_id} (a zip names no game)")
    args.share_features_extractor = info["share"]
    return info, plan


def build_agent(args: Args, n_actions: int, device, zip_info: dict = None):
    """The agent and its Adam; with an SB3 zip, its weights (and Adam state under --pretrained-load-optimizer)."""
    agent = Agent(n_actions, args.share_features_extractor, args.layer_norm, args.activation).to(device)
    if zip_info is not None:
        agent.load_state_dict(zip_info["state_dict"])
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, foreach=True)  # = per-tensor loop
    if zip_info is None or not args.pretrained_load_optimizer:
        return agent, optimizer
    # SB3's Adam indexes policy.parameters(), agent.parameters()' order (an aliased extractor once, first); lr: ours
    saved, params = zip_info["optimizer"], list(agent.parameters())
    if saved is None:
        raise UserError(f"--pretrained-load-optimizer: {zip_info['path']} has no policy.optimizer.pth")
    shapes = {i: getattr(s.get("exp_avg"), "shape", None) for i, s in saved.get("state", {}).items()}
    groups = [len(g["params"]) for g in saved.get("param_groups", [])]
    if groups != [len(params)] or any(i >= len(params) or shape != params[i].shape for i, shape in shapes.items()):
        raise UserError(f"--pretrained-load-optimizer: {zip_info['path']}: its Adam state does not fit the policy")
    optimizer.load_state_dict({"state": saved.get("state", {}), "param_groups": optimizer.state_dict()["param_groups"]})
    return agent, optimizer


def read_sb3_zip(path: str) -> dict:
    """An SB3 PPO CnnPolicy zip (a file, or a model-hub id `org/name` fetched with huggingface_hub), read by SB3's
    loader and checked: weights (our names), Adam state, action count, extractor sharing. Spaces are not unpickled
    (old `gym` in the public sb3/ agents): their facts are in `data`."""
    from stable_baselines3.common.save_util import load_from_zip_file

    flag = f"--pretrained {path}"
    if not os.path.isfile(path):
        if os.path.exists(path) or path.endswith(".zip") or not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
            raise UserError(f"{flag}: no such file")
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(repo_id=path, filename=path.split("/")[1] + ".zip")
        except Exception as e:  # not installed, offline, unknown repo, missing file
            raise UserError(f"{flag}: model-hub download failed ({type(e).__name__}); pass a local path") from None
    unused = ("learning_rate", "lr_schedule", "clip_range", "clip_range_vf", "observation_space", "action_space")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data, params, _ = load_from_zip_file(path, device="cpu", custom_objects=dict.fromkeys(unused))
        with zipfile.ZipFile(path) as zf:
            raw = json.loads(zf.read("data"))
    except Exception as e:
        raise UserError(f"{flag}: Stable-Baselines3 cannot read it ({type(e).__name__}: {' '.join(str(e).split())})")
    if "policy" not in params:
        raise UserError(f"{flag}: not a Stable-Baselines3 model zip (no 'policy.pth' inside)")
    cls = data.get("policy_class")
    policy = f"{cls.__module__}.{cls.__name__}" if isinstance(cls, type) else repr(cls)
    if "clip_range" not in data or "n_epochs" not in data:
        algo = "DQN" if "exploration_rate" in data else ("A2C" if "n_steps" in data else "another algorithm")
        raise UserError(f"{flag}: not a PPO model (saved by {algo}, policy {policy}); need an SB3 PPO CnnPolicy zip")
    if not policy.endswith("ActorCriticCnnPolicy"):
        raise UserError(f"{flag}: policy is {policy}, need PPO with 'CnnPolicy' (ActorCriticCnnPolicy)")
    act, obs, kwargs = raw.get("action_space", {}), raw.get("observation_space", {}), data.get("policy_kwargs") or {}
    if "Discrete" not in str(act.get(":type:")) or not str(act.get("n", "")).isdigit():
        raise UserError(f"{flag}: action space {act.get(':type:')} is not Discrete")
    shape = obs.get("_shape", obs.get("shape"))  # `shape` in zips of older SB3 versions
    if list(shape or []) != [4, 84, 84] or obs.get("dtype") != "uint8":
        raise UserError(f"{flag}: observation space {shape} {obs.get('dtype')} is not the 4x84x84 uint8 Atari stack")
    if kwargs.get("normalize_images", True) is False:
        raise UserError(f"{flag}: policy was trained with normalize_images=False; not supported")
    n_actions, share = int(act["n"]), bool(kwargs.get("share_features_extractor", True))
    alias = ("pi_features_extractor.", "vf_features_extractor.") if share else ("features_extractor.",)
    state = {"policy." + k: v for k, v in params["policy"].items() if not k.startswith(alias)}
    expected = {k: v.shape for k, v in Agent(n_actions, share).state_dict().items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and state[k].shape != expected[k]]
    if missing or extra or bad:
        raise UserError(
            f"{flag}: weights do not match SB3's NatureCNN CnnPolicy (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"wrong shape {bad[:3]}); custom net_arch or features extractors are not supported"
        )
    if bad := [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]:
        raise UserError(f"{flag}: its weights hold NaN or inf values ({bad[0]})")
    return dict(path=path, state_dict=state, optimizer=params.get("policy.optimizer"), share=share, n_actions=n_actions)


@torch.no_grad()
def evaluate(agent: Agent, args: Args, device, seed: int) -> list:
    """Scores of --eval-episodes games of the greedy (or sampling) policy; none if a stop request cuts it short."""
    num_envs = min(args.eval_episodes, args.num_envs)
    envs = AtariEnvs(args.env_id, num_envs, seed, args.max_episode_frames, args.env_threads)
    obs, _ = envs.reset()
    scores = []
    while len(scores) < args.eval_episodes and RUN["stop"] is None:
        obs = torch.as_tensor(obs, device=device)
        action = agent.get_action_and_value(obs, deterministic=args.eval_deterministic)[0]
        obs, _, _, _, _, info = envs.step(action.cpu().numpy())
        scores += [g[1] for g in info["games"]]
    envs.close()
    return scores[: args.eval_episodes] if len(scores) >= args.eval_episodes else []


class VideoRecorder:
    """--capture-video: env 0's games 0, 1, 8, 27, ..., 729, then every 1000th (cleanRL's), to {folder}/game-{k}.mp4."""

    def __init__(self, folder: str):
        self.folder, self.frames, self.game = folder, [], 0

    def add(self, frame: np.ndarray, games: list) -> None:
        if self.game < 1000 and round(self.game ** (1 / 3)) ** 3 == self.game or self.game % 1000 == 0:
            self.frames.append(frame.copy())
        if any(env_i == 0 for env_i, _, _ in games):  # env 0's game ended
            if self.frames:
                from moviepy import ImageSequenceClip

                os.makedirs(self.folder, exist_ok=True)
                clip = ImageSequenceClip([np.repeat(f[:, :, None], 3, axis=2) for f in self.frames], fps=15)
                clip.write_videofile(f"{self.folder}/game-{self.game}.mp4", logger=None)
            self.game, self.frames = self.game + 1, []


# ---- Training --------------------------------------------------------------------------------------------------------
def intervene(kind: str, agent: Agent, optimizer, args: Args, obs: torch.Tensor) -> dict:
    """`inject`, `reset`, `shrink_perturb` (of --{kind}-target) or `redo` (whole network) in place; returns the log."""
    fresh = target_modules(agent, getattr(args, f"{kind}_target", "all"))
    if kind == "inject":
        ablations = dict(keep_trainable=args.inject_keep_trainable, third_term=not args.inject_no_third_term)
        adam = dict(optimizers=[optimizer], reset_optimizer=args.inject_reset_optimizer)
        return inject_plasticity(agent, list(fresh), obs, make_fresh=fresh, **adam, **ablations)
    if kind == "reset":
        return reset_modules(agent, list(fresh), optimizers=[optimizer], make_fresh=fresh)
    if kind == "redo":  # the whole network, each part with its own init
        return redo(agent, obs, args.redo_tau, optimizers=[optimizer], make_fresh=fresh)
    return shrink_perturb(agent, list(fresh), args.sp_shrink, args.sp_perturb, make_fresh=fresh)


def train(args: Args) -> dict:
    """Run PPO; returns a summary (losses, games, injections, interventions, evals, metrics, timing, agent)."""
    stop_on_signals()  # Ctrl-C / SIGTERM from here on: a checkpoint at the next iteration boundary, never a traceback
    zip_info, plan = validate_args(args)  # every flag and file, before anything is written
    ckpt = find_checkpoint(args, "ppo_atari_injection.py")  # --resume: loaded and checked; None for a new run
    seed_everything(args.seed, args.torch_deterministic)
    device = pick_device(args.cuda)
    start_step = ckpt["global_step"] if ckpt else 0  # a resumed run starts new games: ale-py cannot save them
    envs = AtariEnvs(args.env_id, args.num_envs, args.seed + start_step, args.max_episode_frames, args.env_threads)
    agent, optimizer = build_agent(args, envs.n_actions, device, zip_info)
    if args.compile:  # in place: the state_dict keys, injection and the metrics' hooks work as without it
        agent.compile()
    networks, optimizers = {"agent": agent}, {"optimizer": (optimizer, agent)}  # in checkpoints, with the summary
    summary = dict(games=[], injections=[], interventions=[], evals=[], losses={}, timing=[], fired=[], probe=None)
    summary.update(adaptive_reason=None, next_eval=args.eval_every, next_metrics=args.metrics_every)
    if ckpt is not None:  # resume: every state but the games in progress (a misfit stops here, nothing written)
        restore_checkpoint(ckpt, networks, optimizers, {})
        summary = ckpt["history"]
    run_dir, writer = start_run(args, ckpt)  # the run's folder, locked; the first write of the run
    progress = Progress(args, device, start_step, args.num_iterations * args.batch_size)  # a bar or status lines
    video = VideoRecorder(f"videos/{os.path.basename(run_dir)}") if args.capture_video else None
    global_step, start_time = start_step, time.time()
    next_obs, next_valid = (torch.as_tensor(a, device=device) for a in envs.reset())

    for iteration in range(start_step // args.batch_size + 1, args.num_iterations + 1):
        previous_step = max(global_step - args.batch_size, start_step)
        # --- injection (at --inject-at, or when the adaptive trigger fired), reset, shrink-and-perturb, ReDo ----------
        adaptive, summary["adaptive_reason"] = summary["adaptive_reason"], None
        if ckpt is None or global_step > start_step:  # a checkpoint is written after its step's interventions
            if iteration in plan["inject"] or adaptive is not None:
                log = intervene("inject", agent, optimizer, args, next_obs)
                if iteration in plan["inject"]:
                    log["injection/requested_step"] = float(plan["inject"][iteration])
                if adaptive is not None:
                    log["injection/adaptive"] = 1.0
                    print(f"global_step={global_step}, adaptive injection: {adaptive}")
                log_event(writer, summary["injections"], global_step, f"injected into {args.inject_target}", log)
            redo_due = args.redo_every > 0 and global_step // args.redo_every > previous_step // args.redo_every
            for kind in ("reset", "shrink_perturb", "redo"):
                if iteration in plan.get(kind, ()) or kind == "redo" and redo_due:
                    log = intervene(kind, agent, optimizer, args, next_obs)
                    what = f"{kind} of {getattr(args, f'{kind}_target', 'all')}"
                    log_event(writer, summary["interventions"], global_step, what, log, kind=kind)
        # --- checkpoint (--checkpoint-every, Ctrl-C, SIGTERM) after all logged at global_step; resumes log from + 1 --
        if checkpoint_due(args, global_step, previous_step):
            save_checkpoint(global_step, global_step + 1, networks, optimizers, {}, history=summary)
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / args.num_iterations) * args.learning_rate

        # --- rollout ----------------------------------------------------------------------------------------------
        rollout_start, rollout = time.time(), []
        for _ in range(args.num_steps):
            global_step += args.num_envs
            with torch.no_grad():
                cache = agent.frozen_outputs(next_obs, cached_paths(agent, args))
                action, logprob, _, value = agent.get_action_and_value(next_obs, cache=cache, step=global_step)
            rollout.append(dict(cache, obs=next_obs, valid=next_valid, actions=action, logprobs=logprob, values=value))
            next_obs_np, reward, terminated, _, next_valid_np, info = envs.step(action.cpu().numpy())
            rollout[-1].update(rewards=reward, terminated=terminated.astype(np.float32))  # to the device when stacked
            next_obs, next_valid = (torch.as_tensor(a, device=device) for a in (next_obs_np, next_valid_np))
            if video is not None:
                video.add(next_obs_np[0, -1], info["games"])
            for _, score, length in info["games"]:
                progress.episode(global_step, score)
                writer.add_scalar("charts/episodic_return", score, global_step)
                writer.add_scalar("charts/episodic_length", length, global_step)
                summary["games"].append((global_step, score))
        buf = {k: torch.stack([torch.as_tensor(s[k], device=device) for s in rollout]) for k in rollout[0]}
        rollout_time = time.time() - rollout_start

        # --- advantages, update, the iteration's logs --------------------------------------------------------------
        with torch.no_grad():
            next_value = agent(next_obs)[:, -1]
            advantages, returns = compute_gae(buf, next_value, next_valid, args.gamma, args.gae_lambda)
        batch = flatten_rollout(buf, advantages, returns)
        l2 = l2_coef(args, global_step, args.total_timesteps)
        update_start = time.time()
        summary["losses"] = ppo_update(agent, optimizer, batch, args, global_step, l2)
        update_time = time.time() - update_start
        sps = int((global_step - start_step) / (time.time() - start_time))
        progress.update(global_step)
        scalars = {"charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/SPS": sps}
        scalars.update({"charts/rollout_time": rollout_time, "charts/update_time": update_time})
        scalars["charts/valid_fraction"] = float(buf["valid"].float().mean())
        if args.l2_schedule != "none":
            scalars["losses/l2_coef"] = l2
        for k, v in dict(summary["losses"], **scalars).items():
            writer.add_scalar(k, v, global_step)
        timing = {"rollout": rollout_time, "update": update_time, "iteration": time.time() - rollout_start}
        summary["timing"].append(dict(timing, samples=len(batch["obs"])))

        # --- plasticity metrics on the fixed probe batch; the adaptive trigger reads them --------------------------
        if args.metrics_every > 0 and global_step >= summary["next_metrics"] and len(batch["obs"]) > 0:
            metrics = summary["metrics"] = plasticity_metrics(agent, batch, summary, args)
            for k, v in metrics.items():
                writer.add_scalar(k, v, global_step)
            if iteration < args.num_iterations:
                summary["adaptive_reason"] = adaptive_injection_due(args, global_step, metrics, summary["fired"])
            summary["next_metrics"] = (global_step // args.metrics_every + 1) * args.metrics_every

        # --- evaluation -------------------------------------------------------------------------------------------
        if args.eval_every > 0 and global_step >= summary["next_eval"]:
            summary["next_eval"] = (global_step // args.eval_every + 1) * args.eval_every
            scores = evaluate(agent, args, device, args.seed + 10_000 + iteration)
            if scores:  # empty when a stop request cut the evaluation short
                writer.add_scalar("eval/episodic_return", float(np.mean(scores)), global_step)
                summary["evals"].append((global_step, scores))
                print(f"global_step={global_step}, eval/episodic_return={np.mean(scores):.1f} over {len(scores)} games")

    if args.save_model:
        summary["model_path"] = os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
        model = dict(agent.config, model=agent.state_dict(), optimizer=optimizer.state_dict(), args=vars(args))
        model.update(global_step=global_step, agent_config=agent.config, adaptive_trigger={"fired": summary["fired"]})
        atomic_save(model, summary["model_path"])
        print(f"model saved to {summary['model_path']}")
    envs.close()
    finish_run(global_step, summary.get("model_path") or run_dir)  # a stop asked during the last iteration exits here
    return dict(summary, global_step=global_step, run_name=os.path.basename(run_dir), agent=agent, optimizer=optimizer)


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
