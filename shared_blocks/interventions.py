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
