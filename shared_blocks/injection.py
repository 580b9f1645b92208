# Plasticity injection (Nikishin et al., NeurIPS 2023). SELF-CONTAINED: copy this block into your script (torch only).
# inject_plasticity makes the sub-module h at each path compute h_θ(x) + h_θ'1(x) − h_θ'2(x): θ frozen, θ'1 = θ'2 one
# fresh draw, θ'1 trainable, θ'2 frozen. The output is bit-for-bit unchanged, the trainable-parameter count the same,
# gradients still reach a shared encoder; a second call freezes the head as it is and adds a new pair.
#     log = inject_plasticity(q_network, ["head"], probe_obs, targets=[target_network], sync_targets=True,
#                             optimizers=[optimizer])   # then log each value; train on as before
# Reload a saved injected model into a freshly built one with load_injected_state_dict(model, state_dict).
import copy

import torch
from torch import nn


class InjectedModule(nn.Module):
    """Σ_k sign_k · term_k(x): term 0 is the original head, then a (+θ'1, −θ'2) pair per injection. Signs and
    trainable flags are buffers, so a state_dict describes the injected network completely."""

    def __init__(self, original: nn.Module):
        super().__init__()
        device = next(original.parameters()).device
        self.terms = nn.ModuleList([original])
        self.register_buffer("signs", torch.ones(1, device=device))
        self.register_buffer("term_trainable", torch.ones(1, dtype=torch.bool, device=device))
        self.register_buffer("injection_count", torch.zeros((), dtype=torch.long, device=device))
        self._read_flags()

    def _read_flags(self):  # Python copies of the buffers: forward() never waits on an accelerator
        self._signs, self._trainable = self.signs.tolist(), self.term_trainable.tolist()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._read_flags()

    def add_term(self, module: nn.Module, sign: float, trainable: bool) -> None:
        self.terms.append(module.requires_grad_(trainable))
        self.signs = torch.cat([self.signs, self.signs.new_tensor([sign])])
        self.term_trainable = torch.cat([self.term_trainable, self.term_trainable.new_tensor([trainable])])
        self._read_flags()

    def frozen_outputs(self, x: torch.Tensor) -> list:
        """Outputs of the frozen terms (None for trainable ones): pass them back as forward(x, frozen_out)
        to skip recomputing them while x repeats (e.g. PPO epochs over one rollout)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
            return [None if trainable else t(x) for t, trainable in zip(self.terms, self._trainable)]

    def forward(self, x: torch.Tensor, frozen_out: list = None) -> torch.Tensor:
        ys = [t(x) if y is None else y for t, y in zip(self.terms, frozen_out or self.frozen_outputs(x))]
        out, i = ys[0], 1
        while i < len(ys):  # h + (h'1 − h'2) + ...: each pair is exactly 0 when injected
            if i + 1 < len(ys) and self._signs[i] == 1.0 and self._signs[i + 1] == -1.0:
                out, i = out + (ys[i] - ys[i + 1]), i + 2
            else:
                out, i = out.add(ys[i], alpha=self._signs[i]), i + 1
        return out


def _as_injected(model: nn.Module, path: str) -> InjectedModule:  # wrap `model.<path>` once
    head = model.get_submodule(path)
    if not isinstance(head, InjectedModule):
        if not path:
            raise ValueError("cannot inject into the root module: give the path of a sub-module")
        parent, _, name = path.rpartition(".")
        head = InjectedModule(head)
        setattr(model.get_submodule(parent), name, head)
    return head


def _inject_into(model: nn.Module, path: str, fresh: nn.Module, keep_trainable: bool, third_term: bool) -> None:
    head = _as_injected(model, path)
    if not keep_trainable:  # freeze the head as it is now, and drop the gradients it will never use again
        head.term_trainable.fill_(False)
        for p in head.parameters():
            p.requires_grad_(False)
            p.grad = None
    head.add_term(copy.deepcopy(fresh), +1.0, trainable=True)
    if third_term:  # ablation third_term=False: no −h_θ'2, so the output jumps at injection
        head.add_term(copy.deepcopy(fresh), -1.0, trainable=keep_trainable)
    head.injection_count += 1


def fresh_copy(module: nn.Module) -> nn.Module:
    """A fresh draw (each layer's `reset_parameters`) of `module` as it was before any injection."""
    fresh = copy.deepcopy(module.terms[0] if isinstance(module, InjectedModule) else module)
    for parent in list(fresh.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, InjectedModule):
                setattr(parent, name, child.terms[0])
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return fresh


def _output(model: nn.Module, probe) -> torch.Tensor:
    out = model(probe)
    return torch.cat([o.flatten() for o in out]) if isinstance(out, (tuple, list)) else out.flatten()


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
    """Inject into each sub-module `model.<path>` in place; returns the values to log (injection/...).

    probe: real inputs (e.g. replay observations) to check the output on; model(probe): a tensor or a tuple of them.
    targets: networks mirroring `model` (target nets) get the SAME fresh values; sync_targets: copy `model` into them
    first. optimizers: each θ'1 joins its head's param group, frozen parameters leave with their state, the encoder
    keeps its Adam moments unless reset_optimizer. Ablations: keep_trainable (all terms train), third_term=False (no
    −h_θ'2: the output jumps). make_fresh: {path: () -> module} for heads not initialised by `reset_parameters`.
    """
    count = lambda trainable_only: sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
    before, trainable_before = _output(model, probe), count(True)
    for target in targets if sync_targets else ():
        target.load_state_dict(model.state_dict())
    targets_before = [_output(t, probe) for t in targets]
    for path in paths:
        old = {id(p) for p in model.get_submodule(path).parameters() if p.requires_grad}
        factory = (make_fresh or {}).get(path)
        fresh = factory() if factory else fresh_copy(model.get_submodule(path))
        fresh = fresh.to(next(model.get_submodule(path).parameters()).device)
        _inject_into(model, path, fresh, keep_trainable, third_term)
        for target in targets:  # the same θ' values; a target that trains nothing stays untrainable
            frozen = not any(p.requires_grad for p in target.parameters())
            _inject_into(target, path, fresh, keep_trainable, third_term)
            if frozen:
                target.requires_grad_(False)
        new = [p for p in model.get_submodule(path).parameters() if p.requires_grad and id(p) not in old]
        for group in (g for opt in optimizers for g in opt.param_groups):
            if old & {id(p) for p in group["params"]}:
                group["params"].extend(new)
    for opt in optimizers:
        for group in opt.param_groups:
            for p in [p for p in group["params"] if not p.requires_grad]:
                opt.state.pop(p, None)
            group["params"] = [p for p in group["params"] if p.requires_grad]
        if reset_optimizer:
            opt.state.clear()
    changes = [float((_output(t, probe) - t_before).abs().max()) for t, t_before in zip(targets, targets_before)]
    return {
        "injection/count": float(max(int(m.injection_count) for m in model.modules() if isinstance(m, InjectedModule))),
        "injection/output_change": float((_output(model, probe) - before).abs().max()),
        "injection/trainable_params": float(count(True)),
        "injection/trainable_params_before": float(trainable_before),
        "injection/total_params": float(count(False)),
        **({"injection/target_output_change": max(changes)} if targets else {}),
    }


def load_injected_state_dict(model: nn.Module, state_dict: dict, strict: bool = True):
    """Load a state_dict saved from an injected model into a freshly built one: the injected structure (terms,
    signs, frozen flags) is rebuilt from its buffers first, so the reloaded model computes the same function."""
    for key, signs in state_dict.items():
        if key.endswith(".signs") and key[: -len("signs")] + "injection_count" in state_dict:
            head = _as_injected(model, key[: -len(".signs")])
            while len(head.terms) < len(signs):
                head.add_term(copy.deepcopy(head.terms[0]), 1.0, trainable=True)
    result = model.load_state_dict(state_dict, strict=strict)
    for head in (m for m in model.modules() if isinstance(m, InjectedModule)):
        for term, trainable in zip(head.terms, head._trainable):
            term.requires_grad_(trainable)
    return result
