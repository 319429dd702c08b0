"""Predicted vs measured: does the sensitivity table rank real plans the way quantizing them does?

    python -m bitalloc.fidelity --plans 20 --bits 3:5 --metrics rel,kl,fisher --out runs/fidelity

Draws N random plans whose average bits per weight (scales and zeros
included) fall in the range, predicts each plan's loss from the table as the
solvers do (the sum of its layers' values, per metric), quantizes the model as
the plan says through the same path as apply, and measures KL divergence to the
unquantized model and perplexity.  Reports, for every metric, the Spearman rank
correlation between predicted loss and measured KLD and PPL.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from . import atomic
from .cli_args import (add_data_args, add_model_args, calibration, check_non_negative, check_positive, evaluator,
                       resolve_device)
from .cost import LayerShape, bits_per_weight, layer_shapes
from .errors import BitallocError, cli_entry
from .help_format import HelpFormatter, from_docstring, program
from .metrics import METRICS, parse_metrics
from .models import load_model
from .paths import PRESET_SPACES, cache_root
from .profile import profile
from .quant.option import Option
from .quantize_model import quantize_model, restore

log = logging.getLogger(__name__)


def _average_bits(shapes: list[LayerShape], choice: np.ndarray, bits: np.ndarray) -> float:
    numel = np.array([s.numel for s in shapes], dtype=float)
    return float((bits[np.arange(len(shapes)), choice] * numel).sum() / numel.sum())


def random_plans(shapes: list[LayerShape], options: list[Option], count: int, low: float, high: float,
                 seed: int = 0, tolerance: float = 0.02) -> list[dict[str, Option]]:
    """`count` random assignments, each with average bits drawn uniformly from [low, high].

    Each layer's option is drawn with probability proportional to exp(lam * bits), lam set so
    the expected average hits the target; single-layer steps up or down then close the gap.
    """
    rng = np.random.default_rng(seed)
    bits = np.array([[bits_per_weight(s, o) for o in options] for s in shapes])
    order = np.argsort(bits[0])
    numel = np.array([s.numel for s in shapes], dtype=float)
    if (bits.min(1) * numel).sum() / numel.sum() > high or (bits.max(1) * numel).sum() / numel.sum() < low:
        raise BitallocError(f"the option space cannot make plans between {low} and {high} bits")
    plans = []
    for _ in range(count):
        target = rng.uniform(low, high)

        def expected(lam):
            weights = np.exp(lam * (bits - bits.mean()))
            p = weights / weights.sum(1, keepdims=True)
            return float(((p * bits).sum(1) * numel).sum() / numel.sum()), p

        lo, hi = -50.0, 50.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if expected(mid)[0] < target else (lo, mid)
        probs = expected((lo + hi) / 2)[1]
        choice = np.array([rng.choice(len(options), p=p) for p in probs])
        rank = np.argsort(order)  # position of each option in bit order
        for _ in range(10 * len(shapes)):
            average = _average_bits(shapes, choice, bits)
            if abs(average - target) <= tolerance:
                break
            layer = rng.integers(len(shapes))
            step = 1 if average < target else -1
            position = rank[choice[layer]] + step
            if 0 <= position < len(options):
                choice[layer] = order[position]
        plans.append({s.name: options[c] for s, c in zip(shapes, choice)})
    return plans


def spearman(predicted, measured) -> float | None:
    """None where the correlation is undefined (a constant series): JSON has no NaN."""
    from scipy.stats import spearmanr

    value = spearmanr(predicted, measured).statistic
    return float(value) if value == value else None


def predicted_loss(table, assignment: dict[str, Option], metric: str) -> float:
    lookup = table.lookup()
    return sum(lookup[(layer, str(option))][metric] for layer, option in assignment.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program("python -m bitalloc.fidelity"), formatter_class=HelpFormatter,
                                     **from_docstring(__doc__))
    parser.add_argument("--space", default="rtn-g64", help="option space (as search.sh --space)")
    parser.add_argument("--space-dir", default=str(PRESET_SPACES), help="where preset option spaces live")
    parser.add_argument("--metrics", default=",".join(METRICS), help="metrics to profile and compare")
    parser.add_argument("--plans", type=int, default=20, help="random plans to measure")
    parser.add_argument("--bits", default="3:5", help="average-bits range LOW:HIGH of the random plans")
    parser.add_argument("--plan-seed", type=int, default=0, help="seed of the random plans")
    parser.add_argument("--kl-windows", type=int, default=2, help="windows the kl metric carries to the logits")
    parser.add_argument("--kl-stride", type=int, default=1, help="the kl metric scores every N-th position")
    parser.add_argument("--fisher-samples", type=int, default=1, help="label samples of the Fisher metrics")
    parser.add_argument("--profile-batch-size", type=int, default=4, help="windows per profiling batch")
    parser.add_argument("--out", default="runs/fidelity", help="where fidelity.json and fidelity.txt go")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_args(parser)
    add_data_args(parser, seqlen=512, windows=16)
    return parser


def bits_range(text: str) -> tuple[float, float]:
    """--bits LOW:HIGH, read before any work so a typo costs nothing."""
    try:
        low, high = (float(v) for v in text.split(":"))
    except ValueError:
        raise BitallocError(f"--bits must be LOW:HIGH, got '{text}'") from None
    if not 0 < low <= high < float("inf"):
        raise BitallocError(f"--bits LOW:HIGH needs 0 < LOW <= HIGH (finite), got '{text}'")
    return low, high


def render(results: dict) -> str:
    shown = lambda value, spec: "-" if value is None else format(value, spec)
    lines = [f"{'metric':<11} {'Spearman KLD':>12} {'Spearman PPL':>12}  predicted/measured KLD (median)"]
    for metric, entry in results["correlation"].items():
        lines.append(f"{metric:<11} {shown(entry['kld'], '>12.3f')} {shown(entry['ppl'], '>12.3f')}  "
                     f"{shown(entry['scale'], '.3g')}")
    return "\n".join(lines)


@cli_entry
def main(argv=None) -> int:
    from .pipeline import load_space

    args = build_parser().parse_args(argv)
    check_positive(args, "kl_windows", "kl_stride", "fisher_samples", "profile_batch_size")
    check_non_negative(args, "eval_windows", "plan_seed")
    if args.plans < 2:
        raise BitallocError(f"--plans must be at least 2 (a rank correlation needs two), got {args.plans}")
    low, high = bits_range(args.bits)
    metrics = parse_metrics(args.metrics)
    device = resolve_device(args.device)
    options = load_space(args.space, args.space_dir, None)
    loaded = load_model(args.model)
    shapes = layer_shapes(loaded.model)
    plans = random_plans(shapes, options, args.plans, low, high, args.plan_seed)  # before the long work: may refuse
    evaluation = evaluator(args, loaded, device, not args.quiet)
    calib = calibration(args, loaded)
    table = profile(loaded, calib, options, cache_root(args.cache_dir) / "profile", args.profile_batch_size, device,
                    progress=not args.quiet, metrics=metrics, kl_windows=args.kl_windows,
                    fisher_samples=args.fisher_samples, seed=args.seed, kl_stride=args.kl_stride)
    loaded.model.to(device)
    base = evaluation.unquantized()
    by_name = {s.name: s for s in shapes}
    measured = []
    for number, plan in enumerate(plans):
        originals = quantize_model(loaded, plan, calib, "reference", device, args.batch_size, False)
        result = evaluation(f"plan {number + 1}/{len(plans)}")
        restore(loaded.model, originals)
        bits = sum(bits_per_weight(by_name[n], o) * by_name[n].numel for n, o in plan.items()) / \
            sum(s.numel for s in shapes)
        entry = {"avg_bits": bits, "kld": result["kl"]["mean"], "ppl": result["ppl"],
                 "predicted": {m: predicted_loss(table, plan, m) for m in metrics}}
        log.info("plan %d: %.3f bits, KLD %.4f, PPL %.2f", number + 1, bits, entry["kld"], entry["ppl"])
        measured.append(entry)
    kld = [e["kld"] for e in measured]
    ppl = [e["ppl"] for e in measured]
    correlation = {}
    for metric in metrics:
        predicted = [e["predicted"][metric] for e in measured]
        ratios = [p / k for p, k in zip(predicted, kld) if k > 0]
        correlation[metric] = {"kld": spearman(predicted, kld), "ppl": spearman(predicted, ppl),
                               "scale": float(np.median(ratios)) if ratios else None}
    results = {"model": loaded.spec, "fingerprint": loaded.fingerprint, "options": [str(o) for o in options],
               "bits": [low, high], "plans": measured, "unquantized": base, "correlation": correlation,
               "evaluation": evaluation.protocol, "table": table.meta}
    out = Path(args.out)
    atomic.write_json(out / "fidelity.json", results)
    text = render(results)
    atomic.write_text(out / "fidelity.txt", text + "\n")
    print(text)
    print(f"\nwritten: {out / 'fidelity.json'}, {out / 'fidelity.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
