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
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import replace_module
from .errors import BitallocError
from .models import tie_groups


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


def shared_input_groups(model: nn.Module, run) -> list[list[str]]:
    """Names of the linears of `model` that read one input tensor when `run()` runs it, two or more a group."""
    return [group for group in tie_groups(model, run) if len(group) > 1]


def fusable(groups: list[list[str]], options: dict) -> list[list[str]]:
    """Each group split by the members' option (`options[name]`): the sub-groups of two or more."""
    split = []
    for group in groups:
        by_option: dict[str, list[str]] = {}
        for name in group:
            by_option.setdefault(str(options[name]), []).append(name)
        split += [names for names in by_option.values() if len(names) > 1]
    return split


@torch.no_grad()
def fuse_linears(model: nn.Module, groups: list[list[str]]) -> dict[str, list[str]]:
    """Replace each group of nn.Linear members by slices of one linear with their rows stacked (in group
    order); returns the wider linears' names, each with its members' names.  A pack that follows packs the
    wider linear: per-row quantizers give every row the codes it would have had alone."""
    fused_names = {}
    for group in groups:
        members = [model.get_submodule(name) for name in group]
        first = members[0]
        if not all(isinstance(m, nn.Linear) and m.in_features == first.in_features for m in members):
            raise BitallocError(f"{group} are not linears of one input width")
        has_bias = first.bias is not None
        if any((m.bias is not None) != has_bias for m in members):
            raise BitallocError(f"{group}: some have a bias and some do not")
        fused = nn.Linear(first.in_features, sum(m.out_features for m in members), bias=has_bias,
                          device=first.weight.device, dtype=first.weight.dtype)
        fused.weight.copy_(torch.cat([m.weight for m in members]))
        if has_bias:
            fused.bias.copy_(torch.cat([m.bias for m in members]))
        fused.requires_grad_(first.weight.requires_grad)
        shared = SharedInput(fused, [m.out_features for m in members])
        for index, name in enumerate(group):
            replace_module(model, name, SharedSlice(shared, index))
        fused_names[f"{group[0]}.shared.fused"] = group
    return fused_names
