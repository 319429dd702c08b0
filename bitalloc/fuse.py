"""Linears that read the same input (q/k/v, gate/up) computed as one wider linear.

At batch 1 a layer's time is mostly the ramp-up and tail of one kernel over a
few megabytes: at 4 bits a 4096x4096 GEMV moves its bytes at a quarter of the
HBM bandwidth where the 70B MLP shapes reach 57-65 % (docs/RESULTS.md, issue 8).
Stacking the rows of layers that share an input makes one larger kernel and one
launch out of several.  The model's code is left as it is: each member becomes a
`SharedSlice` whose call returns its columns of the wider layer's output, which
is computed once per input tensor (matched by identity, as `models.tie_groups`
finds the groups).  A packed group needs one option for all its members (the
solver's `--tie fused` plans have it); `fusable` splits groups by option.
Members are nn.Linear (stack them, then pack the wider one: per-row quantizers
give every row the codes it had alone) or packed QuantLinears (their stored rows
are stacked as they are).

The gate and up projections of a gated SiLU MLP (Llama's down(silu(gate(x)) *
up(x))) become one `GatedLinear` instead, their rows alternating eight by eight
(`layout.gated_order`), and the MLP a `GatedMLP`: the layer returns silu(gate)
* up, which the tensor-core GEMV computes in its epilogue, so the kernel that
took the product between the two GEMVs is gone.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import replace_module
from .errors import BitallocError
from .kernels import triton_backend
from .kernels.layout import GATE_ROWS, gate_rows, gated_order, storage
from .kernels.quant_linear import QuantLinear
from .models import is_linear, tie_groups


class SharedInput(nn.Module):
    """The wider layer of a group and the output of its last input, handed out member by member."""

    def __init__(self, fused: nn.Module, sizes: list[int]):
        super().__init__()
        self.fused = fused
        self.sizes = sizes
        self._clear()

    def _clear(self) -> None:
        # nothing is held between a group's calls, so a compiled caller sees the same state every step
        self._input, self._parts, self._left = None, None, 0

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._input is not x:
            self._input, self._parts, self._left = x, self.fused(x).split(self.sizes, dim=-1), len(self.sizes)
        out = self._parts[index]
        self._left -= 1
        if self._left == 0:
            self._clear()
        return out


class SharedSlice(nn.Module):
    """Stands where a member linear stood: its output columns of the group's wider layer."""

    def __init__(self, shared: SharedInput, index: int):
        super().__init__()
        self.shared = shared
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.part(x, self.index)


class GatedLinear(nn.Module):
    """A gated MLP's gate and up projections as one layer (rows in `gated_order`): silu(gate) * up."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.layer, QuantLinear) and triton_backend.gates_in_kernel(self.layer):
            return triton_backend.gated_matmul(self.layer, x)
        return gate_rows(self.layer(x))  # also builds the layer's kernel state on its first call


class GatedMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)) with gate and up as one `GatedLinear`."""

    def __init__(self, gated: GatedLinear, down_proj: nn.Module):
        super().__init__()
        self.gated = gated
        self.down_proj = down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gated(x))


def four_tokens(model: nn.Module):
    """A run of a causal LM on four tokens: enough for `shared_input_groups` to see which linears share
    an input."""
    ids = torch.zeros(1, 4, dtype=torch.long, device=next(model.parameters()).device)
    return lambda: model(input_ids=ids)


def shared_input_groups(model: nn.Module, run) -> list[list[str]]:
    """Names of the linears (nn.Linear or packed) of `model` that read one input tensor when `run()` runs it,
    two or more a group."""
    layers = {name: m for name, m in model.named_modules() if is_linear(m) or isinstance(m, QuantLinear)}
    return [group for group in tie_groups(model, run, layers) if len(group) > 1]


def fuse_packed(model: nn.Module, run) -> dict[str, list[str]]:
    """Fuse the packed layers of `model` that read one input and share an option (`fuse_layers`)."""
    options = {name: m.option for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    groups = [g for g in shared_input_groups(model, run) if all(name in options for name in g)]
    return fuse_layers(model, fusable(groups, options))


def fusable(groups: list[list[str]], options: dict) -> list[list[str]]:
    """Each group split by the members' option (`options[name]`): the sub-groups of two or more."""
    split = []
    for group in groups:
        by_option: dict[str, list[str]] = {}
        for name in group:
            by_option.setdefault(str(options[name]), []).append(name)
        split += [names for names in by_option.values() if len(names) > 1]
    return split


def options_after_fusing(options: dict, fused: dict[str, list[str]]) -> dict:
    """Layer name -> option with each fused group's members replaced by its wider layer (`fuse_layers`)."""
    members = {name for names in fused.values() for name in names}
    return {**{name: option for name, option in options.items() if name not in members},
            **{name: options[names[0]] for name, names in fused.items()}}


@torch.no_grad()
def fuse_layers(model: nn.Module, groups: list[list[str]]) -> dict[str, list[str]]:
    """Replace each group's members by slices of one layer with their rows stacked (in group order);
    returns the wider layers' names, each with its members' names."""
    fused_names = {}
    for group in groups:
        members = [model.get_submodule(name) for name in group]
        if len({m.in_features for m in members}) != 1 or len({m.bias is None for m in members}) != 1:
            raise BitallocError(f"{group}: members of one input width and all with or all without a bias needed")
        mlp = _gated_mlp(model, group, members)
        order = None if mlp is None else gated_order(members[0].out_features)
        if all(isinstance(m, nn.Linear) for m in members):
            fused = _stacked_linear(members, order)
        elif all(isinstance(m, QuantLinear) for m in members):
            fused = _stacked_packed(members, group, order)
        else:
            raise BitallocError(f"{group}: members must all be nn.Linear or all packed layers")
        if mlp is not None:
            replace_module(model, mlp, GatedMLP(GatedLinear(fused), model.get_submodule(f"{mlp}.down_proj")))
            fused_names[f"{mlp}.gated.layer"] = group
            continue
        shared = SharedInput(fused, [m.out_features for m in members])
        for index, name in enumerate(group):
            replace_module(model, name, SharedSlice(shared, index))
        fused_names[f"{group[0]}.shared.fused"] = group
    return fused_names


def _gated_mlp(model: nn.Module, group: list[str], members: list[nn.Module]) -> str | None:
    """The name of the MLP whose gate and up projections `group` is, when the MLP computes
    down_proj(silu(gate_proj(x)) * up_proj(x)) (a module named *MLP with a SiLU act_fn, as Llama, Mistral
    and Qwen2 have) and its rows can alternate by GATE_ROWS; else None."""
    parent, _, _ = group[0].rpartition(".")
    if group != [f"{parent}.gate_proj", f"{parent}.up_proj"]:
        return None
    module = model.get_submodule(parent)
    silu = type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
    rows = {m.out_features for m in members}
    if not (type(module).__name__.endswith("MLP") and silu and hasattr(module, "down_proj") and len(rows) == 1
            and rows.pop() % GATE_ROWS == 0 and members[0].bias is None):
        return None
    return parent


def _stacked_linear(members: list[nn.Linear], order: torch.Tensor | None = None) -> nn.Linear:
    """The members' rows stacked (then put in `order`, when given)."""
    first = members[0]
    fused = nn.Linear(first.in_features, sum(m.out_features for m in members), bias=first.bias is not None,
                      device=first.weight.device, dtype=first.weight.dtype)
    rows = slice(None) if order is None else order.to(first.weight.device)
    fused.weight.copy_(torch.cat([m.weight for m in members])[rows])
    if first.bias is not None:
        fused.bias.copy_(torch.cat([m.bias for m in members])[rows])
    return fused.requires_grad_(first.weight.requires_grad)


def _stacked_packed(members: list[QuantLinear], group: list[str], order: torch.Tensor | None = None) -> QuantLinear:
    """The members' stored tensors with their rows stacked (per-row tensors, by `layout.storage`; then put in
    `order`, when given) or, for per-input ones (activation scales, outlier channels), the one they all hold;
    on the members' backend."""
    first = members[0]
    if len({str(m.option) for m in members}) != 1:
        raise BitallocError(f"{group}: packed members need one option, not {sorted({str(m.option) for m in members})}")
    has_act = first.act_scale is not None
    spec = storage(first.option, 0, first.in_features, first.bias is not None, has_act)
    with torch.device("meta"):  # every tensor is replaced below
        fused = QuantLinear(first.option, first.in_features, sum(m.out_features for m in members),
                            first.bias is not None, has_act, first.backend)
    for name, (shape, _) in spec.items():
        parts = [getattr(m, name) for m in members]
        if shape[0] == 0:  # one row per output
            stacked = torch.cat(parts)
            setattr(fused, name, stacked if order is None else stacked[order.to(stacked.device)])
        elif all(torch.equal(parts[0], part) for part in parts[1:]):
            setattr(fused, name, parts[0].clone())
        else:
            raise BitallocError(f"{group}: their {name} differ, so one layer cannot stand for them")
    fused.set_backend(first.backend)
    return fused
