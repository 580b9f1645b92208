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
