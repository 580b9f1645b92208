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
