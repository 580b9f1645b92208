# Interventions to compare plasticity injection against, generic over any nn.Module: resets, shrink-and-perturb,
# L2 schedules and an adaptive injection trigger; and the cross-flag checks of the shared flags (flags block).
# Targets (DQN/IQL target networks) get the same new values. Pass make_fresh={path: factory} when the network
# has its own init (e.g. orthogonal), since `reset_parameters` gives PyTorch's default init.
# Uses fresh_copy and InjectedModule (injection block) and math (flags block).
import difflib
import re


def _canonical(name: str) -> str:  # a name in the un-injected network: `terms.K.` levels dropped
    return re.sub(r"(^|\.)terms\.\d+\.", r"\1", name)


def trainable_under(model: nn.Module, path: str) -> list:
    """(name, parameter) of every trainable parameter under `model.<path>`, the path read in the un-injected network:
    inside an injected module it names that part of each term (e.g. the head after injecting the whole network)."""
    prefix = f"{path}." if path else ""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and _canonical(n).startswith(prefix)]


def _trainable_with_fresh(model: nn.Module, path: str, make_fresh) -> list:
    """(name, parameter, its fresh value) for every trainable parameter under `model.<path>`: the same-named
    parameter of one fresh draw of the un-injected module at `path`."""
    sub = model
    for part in filter(None, path.split(".")):
        sub = (sub.terms[0] if isinstance(sub, InjectedModule) else sub).get_submodule(part)
    factory = (make_fresh or {}).get(path)
    fresh = dict((factory() if factory else fresh_copy(sub)).named_parameters())
    out = []
    for name, p in trainable_under(model, path):
        key = _canonical(name)[len(path) + 1 if path else 0 :]
        if key not in fresh or fresh[key].shape != p.shape:
            raise ValueError(f"make_fresh['{path}'] gives no parameter '{key}' of shape {tuple(p.shape)}")
        out.append((name, p, fresh[key].to(p.device, p.dtype)))
    return out


@torch.no_grad()
def reset_modules(model, paths, optimizers=(), make_fresh=None, targets=()) -> dict:
    """Re-initialise the trainable parameters under each `model.<path>` in place (on an injected head: the
    trainable terms only); they lose their optimizer state, every other parameter keeps its own."""
    count = 0
    for path in paths:
        for name, p, fresh in _trainable_with_fresh(model, path, make_fresh):
            p.copy_(fresh)
            for opt in optimizers:
                opt.state.pop(p, None)
            for target in targets:
                target.get_parameter(name).copy_(fresh)
            count += p.numel()
    return {"interventions/reset_params": float(count)}


@torch.no_grad()
def shrink_perturb(model, paths=("",), shrink=1.0, perturb=0.01, make_fresh=None, targets=()) -> dict:
    """Shrink-and-perturb (Ash & Adams 2020): θ <- S·θ + P·ε, ε a fresh initialisation, for every trainable
    parameter under each path ("" = the whole network); optimizer state is kept. S=1, P=0 changes nothing and
    draws no random numbers. Logs the relative change ||Δθ|| / ||θ||."""
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
            count += p.numel()
    rel_change = math.sqrt(sq_change / sq_norm) if sq_norm > 0 else 0.0
    return {"interventions/shrink_perturb_params": float(count), "interventions/shrink_perturb_rel_change": rel_change}


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
