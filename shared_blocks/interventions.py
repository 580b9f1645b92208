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
