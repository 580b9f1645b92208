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
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ReLU6,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardtanh,
    nn.Hardswish,
)
_PL_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PL_PASS_THROUGH = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.Dropout,
    nn.Identity,
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


def updated_units_fraction(
    grad_weight: Optional[torch.Tensor], grad_bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
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
        for _, nxt in leaves[i + 1 :]:
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
