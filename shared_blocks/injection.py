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
