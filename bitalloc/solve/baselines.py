"""The allocations users compare against, on the same Problem as the ILP so tables compare like with like.

- uniform:   one option for every layer, the best that fits.
- rules:     a llama.cpp-style mix (Q3_K_M / Q4_K_M spirit): attention value
             projections get one option more everywhere, MLP down projections one
             more in the first and last eighth of the blocks and every third block
             between; the mix is then fitted to the budget by demoting other
             layers, middle blocks first.  It reads names and positions only,
             never the table.
- greedy:    from the cheapest plan, repeatedly take the upgrade with the largest
             drop in predicted loss per extra byte that still fits.
- annealing: simulated annealing on the summed error (EXL2-style), single and
             paired (one up, one down) moves, never leaving the budget.
"""
from __future__ import annotations

import math
import random
import re
import time

import numpy as np

from ..errors import BitallocError
from .problem import Problem

ROLES = {
    "attn_v": re.compile(r"(^|\.)(v_proj|value|attn_v|wv)$"),
    "ffn_down": re.compile(r"(^|\.)(down_proj|fc2|w2|ffn_down|dense_4h_to_h|mlp\.c_proj)$"),
}


def _trade_kind(problem: Problem) -> str:
    return "bytes" if "bytes" in problem.limits or not problem.limits else next(iter(problem.limits))


def _report(name: str, start: float, **extra) -> dict:
    return {"solver": name, "seconds": round(time.perf_counter() - start, 4), **extra}


def solve_uniform(problem: Problem) -> tuple[np.ndarray, dict]:
    """The one option, applied to every unit, with the lowest objective that fits."""
    problem.check_limits()
    start = time.perf_counter()
    plans = [np.full(len(problem.units), o) for o in range(len(problem.options))]
    feasible = [c for c in plans if problem.feasible(c)]
    if not feasible:
        raise BitallocError("no single option fits the budget for every layer; use a mixed solver")
    choice = min(feasible, key=lambda c: (problem.total("objective", c), problem.total(_trade_kind(problem), c)))
    return choice, _report("uniform", start, option=str(problem.options[choice[0]]))


def _block_of(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def more_bits_block(index: int, blocks: int) -> bool:
    """llama.cpp's rule of thumb: the first and last eighth of the blocks, and every third between."""
    eighth = max(blocks // 8, 1)
    return index < eighth or index >= blocks - eighth or (index - eighth) % 3 == 2


def rule_levels(problem: Problem) -> tuple[np.ndarray, list[int]]:
    """Option-index ladder per unit (cheapest first) and each unit's rule bump (0 or 1)."""
    ladder = np.argsort(problem.costs[_trade_kind(problem)], axis=1, kind="stable")
    indices = [_block_of(unit[0]) for unit in problem.units]
    blocks = max((i for i in indices if i is not None), default=0) + 1
    bumps = []
    for unit, index in zip(problem.units, indices):
        value = any(ROLES["attn_v"].search(layer) for layer in unit)
        down = any(ROLES["ffn_down"].search(layer) for layer in unit)
        bumps.append(int(value or (down and index is not None and more_bits_block(index, blocks))))
    return ladder, bumps


def solve_rules(problem: Problem) -> tuple[np.ndarray, dict]:
    problem.check_limits()
    start = time.perf_counter()
    ladder, bumps = rule_levels(problem)
    base_choice, _ = solve_uniform(problem)
    bits = np.array([o.bits for o in problem.options])[ladder]
    level = np.array([int(np.nonzero(ladder[u] == base_choice[u])[0][0]) for u in range(len(bumps))])
    for u in np.nonzero(bumps)[0]:  # the cheapest option with more bits than the base
        higher = np.nonzero(bits[u] > bits[u, level[u]])[0]
        level[u] = higher[0] if len(higher) else level[u]
    # demote un-favoured units one level at a time, middle blocks first, until the budget holds
    indices = [_block_of(u[0]) or 0 for u in problem.units]
    middle = (max(indices) + min(indices)) / 2
    others = sorted((u for u in range(len(bumps)) if bumps[u] == 0), key=lambda u: (abs(indices[u] - middle), u))
    choose = lambda lv: ladder[np.arange(len(lv)), lv]
    favoured = [u for u in range(len(bumps)) if bumps[u] > 0]
    demoted = []
    while not problem.feasible(choose(level)):
        movable = [u for u in others if level[u] > 0] or [u for u in favoured if level[u] > 0]
        if not movable:
            raise BitallocError("the rule mix cannot fit the budget")
        unit = max(movable, key=lambda u: level[u])  # highest level first; middle blocks first among equals
        level[unit] -= 1
        demoted.append(unit)
    # give spare budget back to demoted units, last demoted first
    for unit in reversed(demoted):
        level[unit] += 1
        if not problem.feasible(choose(level)):
            level[unit] -= 1
    return choose(level), _report("rules", start, base=str(problem.options[base_choice[0]]),
                                  favoured=int(sum(b > 0 for b in bumps)), demoted=len(set(demoted)))


def greedy_fill(problem: Problem, choice: np.ndarray) -> tuple[np.ndarray, int]:
    """Upgrade a fitting plan by the best drop in objective per extra traded cost until nothing fits."""
    trade = _trade_kind(problem)
    rows = np.arange(len(problem.units))
    choice = np.array(choice)
    used = {k: problem.total(k, choice) for k in problem.limits}
    steps = 0
    while True:
        gain = problem.objective[rows, choice][:, None] - problem.objective
        extra = problem.costs[trade] - problem.costs[trade][rows, choice][:, None]
        fits = np.ones_like(gain, dtype=bool)
        for kind, limit in problem.limits.items():
            delta = problem.costs[kind] - problem.costs[kind][rows, choice][:, None]
            fits &= used[kind] + delta <= limit
        useful = fits & (gain > 0)
        if not useful.any():
            return choice, steps
        with np.errstate(divide="ignore"):
            ratio = np.where(useful, np.where(extra > 0, gain / np.maximum(extra, 1e-300), np.inf), -np.inf)
        unit, option = np.unravel_index(int(ratio.argmax()), ratio.shape)
        for kind in problem.limits:
            used[kind] += problem.costs[kind][unit, option] - problem.costs[kind][unit, choice[unit]]
        choice[unit] = option
        steps += 1


def solve_greedy(problem: Problem) -> tuple[np.ndarray, dict]:
    """Marginal gain per unit of the traded cost, from the cheapest plan upwards."""
    problem.check_limits()
    start = time.perf_counter()
    cheapest = np.lexsort((problem.objective, problem.costs[_trade_kind(problem)]), axis=1)[:, 0]
    if not problem.feasible(cheapest):
        raise BitallocError("greedy: the cheapest plan does not fit every budget; use the ILP")
    choice, steps = greedy_fill(problem, cheapest)
    return choice, _report("greedy", start, steps=steps)


def solve_annealing(problem: Problem, steps: int | None = None, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Metropolis moves on the summed objective within every budget; keeps the best plan seen.

    A move steps one unit one rung up or down its ladder of options (cheapest
    first), or one unit up and another down, which is how a plan moves along a
    full budget.  It starts from the best uniform plan that fits (else the
    cheapest) and cools geometrically from the typical size of one rung.
    """
    problem.check_limits()
    start = time.perf_counter()
    rng = random.Random(seed)
    units, options = problem.loss.shape
    steps = steps or 300 * units
    ladder = np.argsort(problem.costs[_trade_kind(problem)], axis=1, kind="stable")
    rows = np.arange(units)[:, None]
    objective = problem.objective[rows, ladder].tolist()
    kinds = list(problem.limits)
    costs = [problem.costs[k][rows, ladder].tolist() for k in kinds]
    limits = [problem.limits[k] for k in kinds]
    try:
        uniform, _ = solve_uniform(problem)
        level = [int(np.nonzero(ladder[u] == uniform[u])[0][0]) for u in range(units)]
    except BitallocError:
        level = [0] * units
    used = [sum(cost[u][level[u]] for u in range(units)) for cost in costs]
    if any(x > limit for x, limit in zip(used, limits)):
        raise BitallocError("annealing: the cheapest plan does not fit every budget; use the ILP")
    current = sum(objective[u][level[u]] for u in range(units))
    best, best_level = current, list(level)
    rung = np.abs(np.diff(problem.objective[rows, ladder], axis=1))
    temperature = float(np.median(rung[rung > 0])) if (rung > 0).any() else 1.0
    cooling = (1e-4) ** (1.0 / steps)
    accepted = 0
    for _ in range(steps):
        temperature *= cooling
        moves = [(rng.randrange(units), rng.choice((-1, 1)))]
        if rng.random() < 0.5:
            moves.append((rng.randrange(units), -moves[0][1]))
        targets = [(u, level[u] + d) for u, d in moves]
        if any(not 0 <= t < options for _, t in targets) or len({u for u, _ in targets}) < len(targets):
            continue
        delta = sum(objective[u][t] - objective[u][level[u]] for u, t in targets)
        new_used = [x + sum(cost[u][t] - cost[u][level[u]] for u, t in targets) for x, cost in zip(used, costs)]
        if any(x > limit for x, limit in zip(new_used, limits)):
            continue
        if delta <= 0 or rng.random() < math.exp(-delta / temperature):
            for u, t in targets:
                level[u] = t
            used, current = new_used, current + delta
            accepted += 1
            if current < best:
                best, best_level = current, list(level)
    choice = ladder[np.arange(units), best_level]
    return choice, _report("annealing", start, steps=steps, accepted=accepted, seed=seed)
