"""Recompute only what a candidate changes.

When a "unit" (one linear, a tie group, or a whole block's linears) of a block
is swapped for its quantized version, much of the block computes exactly what
the unquantized reference pass computed:

* every submodule that finished before the unit's first linear started
  (the attention sub-block when the unit is in the MLP, the input norm, ...);
* every linear that reads the very same input tensor as a unit member but is
  not in the unit (k/v when q is measured, up when gate is);
* a submodule whose output *is* the output of a single-linear unit (an
  attention module ending in o_proj, an MLP ending in down_proj) needs only
  that linear, run on the input it saw in the reference pass.

`trace_block` finds these from one traced pass (call order and tensor
identity; no per-architecture tables).  The reference pass of every batch
records what the shortcuts need (`record`), and each candidate then runs the
block with those submodules answering from the recording (`replaying`), so it
costs only the work downstream of the change.  Results are bit-identical to a
full recompute (tests/test_profile_modes.py checks Llama, OPT and GPT-2).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .hooks import run_hooked
from .models import block_linears


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _clone(value):
    """A recorded output handed out again: cloned, so an in-place op downstream cannot spoil the recording."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _with_first(value, tensor):
    """`value` (a tensor or a tuple led by one) with its leading tensor replaced."""
    if isinstance(value, torch.Tensor):
        return tensor
    return type(value)([tensor, *(_clone(v) for v in value[1:])])


@dataclass
class _Call:
    start: int
    end: int = -1
    calls: int = 0
    input_id: int | None = None
    output_id: int | None = None
    input_numel: int = 0
    output_numel: int = 0


@dataclass
class Shortcuts:
    """How to run the block for one unit: modules replayed, and modules reduced to one linear."""

    frozen: list[str] = field(default_factory=list)
    through: dict[str, str] = field(default_factory=dict)  # module -> the unit's linear that produces its output

    @property
    def outputs(self) -> set[str]:
        return set(self.frozen) | set(self.through)

    @property
    def inputs(self) -> set[str]:
        return set(self.through.values())


class BlockTrace:
    """Call order and tensor identities of one pass through a block."""

    def __init__(self, block: nn.Module, run):
        self.calls: dict[str, _Call] = {}
        self.linears = list(block_linears(block))
        alive, counter = [], [0]

        def before(name, args, kwargs):
            entry = self.calls.setdefault(name, _Call(start=counter[0]))
            entry.calls += 1
            counter[0] += 1
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if isinstance(x, torch.Tensor):
                alive.append(x)
                entry.input_id = id(x)
                entry.input_numel = x.numel()

        def after(name, output):
            entry = self.calls[name]
            entry.end = counter[0]
            counter[0] += 1
            first = _first_tensor(output)
            if first is not None:
                alive.append(first)
                entry.output_id = id(first)
                entry.output_numel = first.numel()

        handles = []
        for name, module in block.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(
                    lambda m, a, k, n=name: before(n, a, k), with_kwargs=True))
                handles.append(module.register_forward_hook(lambda m, a, o, n=name: after(n, o)))
        run_hooked(handles, run)

    def _once(self, name: str) -> bool:
        entry = self.calls.get(name)
        return entry is not None and entry.calls == 1 and entry.end >= 0

    def shortcuts(self, unit: list[str], narrow: bool = False) -> Shortcuts:
        """The replayable submodules of the block when the linears in `unit` change.

        `narrow`: only shortcuts whose recorded tensors are no larger than the block's input, so a
        recording holds no MLP-wide intermediates (for an 8B model at 4 x 2048 tokens that is ~1 GB
        less device memory); what is left out is recomputed, which changes no result.
        """
        if not all(self._once(name) for name in unit):
            return Shortcuts()
        widest = min(self.calls.values(), key=lambda e: e.start).input_numel if narrow else None

        def fits(numel):
            return widest is None or numel <= widest

        leader = min(unit, key=lambda name: self.calls[name].start)
        first = self.calls[leader].start
        shared_input = self.calls[leader].input_id  # existed before the unit ran, so unchanged by it

        def inside_unit(name):  # contains a unit member (or is one)
            return any(member == name or member.startswith(name + ".") for member in unit)

        replayable = []
        for name, entry in self.calls.items():
            if not self._once(name) or inside_unit(name):
                continue
            finished_before = entry.end < first
            sibling = name in self.linears and entry.input_id == shared_input
            if (finished_before or sibling) and fits(entry.output_numel):
                replayable.append(name)
        frozen = [n for n in replayable if not any(n.startswith(other + ".") for other in replayable)]
        through = {}
        if len(unit) == 1:
            member = unit[0]
            produced = self.calls[member].output_id
            owners = [name for name, entry in self.calls.items()
                      if member.startswith(name + ".") and self._once(name) and entry.output_id == produced]
            if owners and fits(self.calls[member].input_numel):
                outer = min(owners, key=len)
                through[outer] = member
                frozen = [n for n in frozen if not n.startswith(outer + ".")]  # never called any more
        return Shortcuts(frozen, through)


@dataclass
class Recording:
    outputs: dict[str, object]
    inputs: dict[str, torch.Tensor]


@torch.no_grad()
def record(block: nn.Module, run, shortcuts: list[Shortcuts]):
    """Run the block once (the reference pass), keeping what `shortcuts` will replay; returns (output, Recording)."""
    want_out = set().union(*(s.outputs for s in shortcuts)) if shortcuts else set()
    want_in = set().union(*(s.inputs for s in shortcuts)) if shortcuts else set()
    recording = Recording({}, {})
    handles = []
    for name, module in block.named_modules():
        if name in want_out:
            handles.append(module.register_forward_hook(
                lambda m, a, o, n=name: recording.outputs.__setitem__(n, _clone(o))))
        if name in want_in:
            handles.append(module.register_forward_pre_hook(
                lambda m, a, n=name: recording.inputs.__setitem__(n, a[0].clone())))
    try:
        output = run()
    finally:
        for handle in handles:
            handle.remove()
    return output, recording


@contextlib.contextmanager
def replaying(block: nn.Module, shortcuts: Shortcuts, recording: Recording):
    """Within the context the shortcut submodules answer from `recording` instead of computing."""
    patched = []

    def patch(module, forward):
        previous = module.__dict__.get("forward")
        patched.append((module, previous))
        module.forward = forward

    try:
        for name in shortcuts.frozen:
            patch(block.get_submodule(name), lambda *a, n=name, **k: _clone(recording.outputs[n]))
        for name, linear in shortcuts.through.items():
            def forward(*a, n=name, linear=linear, **k):
                return _with_first(recording.outputs[n], block.get_submodule(linear)(recording.inputs[linear]))

            patch(block.get_submodule(name), forward)
        yield
    finally:
        for module, previous in reversed(patched):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
