"""Verify a packed model end to end on the CPU: kernels agree, save/reload is exact, bytes are as predicted.

    python scripts/verify_packed.py --model smollm2-135m \\
        --data-dir ../shared/data --windows 24 --seqlen 512 --out results/verify_smollm2.json

Quantizes the model with a mixed plan (bitalloc.benchmarks.MIXES-style rule
below, written out as plan.json), then:
1. WikiText-2 perplexity through `reference` and through `cpu` (same packed layers);
2. saves the packed model, reloads it with `bitalloc.load`, and compares logits
   bit for bit with the model that was saved;
3. compares the bytes of the saved tensors with the cost model's prediction
   (`bitalloc.cost.assignment_bytes` for the packed layers, `other_bytes` for
   the rest in its dtype).
Prints PASS or FAIL per check and exits 1 when any fails (PPL within 0.05:
fewer windows than the documented 24 x 512 give noisier perplexities).
"""
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

import bitalloc
from bitalloc import atomic
from bitalloc.cost import assignment_bytes, average_bits, layer_shapes, other_bytes
from bitalloc.data import eval_windows
from bitalloc.errors import cli_entry
from bitalloc.evaluate import evaluate
from bitalloc.help_format import script_parser
from bitalloc.kernels.quant_linear import QuantLinear
from bitalloc.models import linear_layers, load_model
from bitalloc.plan import Plan
from bitalloc.quant import parse
from bitalloc.quantize_model import quantize_model
from bitalloc.saving import save

# a mix over every kind the cpu backend meets: int4 and int3 groups (576 = 4.5 groups of 128: ragged),
# per-channel int8, and layers it cannot pack (nf4 codebook) that stay on reference
RULE = {"q_proj": "rtn:int4:g64:asym", "k_proj": "rtn:int4:g64:asym", "v_proj": "rtn:int8:pc:sym",
        "o_proj": "rtn:int4:g128:asym", "gate_proj": "rtn:int4:g128:asym", "up_proj": "rtn:int3:g64:asym",
        "down_proj": "rtn:int4:g64:sym"}
EDGE = "rtn:nf4:g64"  # block 0's mlp: a codebook format
PPL_AGREEMENT = 0.05  # issue 8's bound on |PPL(cpu) - PPL(reference)|; exit 1 (a FAIL line) beyond it


def mixed_plan(model, spec: str) -> Plan:
    layers = {}
    for name in linear_layers(model):
        short = name.rsplit(".", 1)[-1]
        layers[name] = EDGE if ".0.mlp." in name else RULE[short]
    return Plan(model=spec, layers=layers)


def set_backend(model, name: str) -> None:
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            layer.set_backend(name)


@cli_entry
def main(argv=None):
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--model", default="smollm2-135m", help="model spec (see bitalloc.models)")
    parser.add_argument("--data-dir", default=None, help="local data directory (default: $BITALLOC_DATA, else the hub)")
    parser.add_argument("--windows", type=int, default=24, help="WikiText-2 test windows evaluated")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    parser.add_argument("--out", default="results/verify_packed.json", help="where the checks are written")
    args = parser.parse_args(argv)
    loaded = load_model(args.model)
    plan = mixed_plan(loaded.model, args.model)
    shapes = layer_shapes(loaded.model)
    assignment = {s.name: parse(plan.layers[s.name]) for s in shapes}
    rest = other_bytes(loaded.model, dtype=torch.float32)
    windows = eval_windows(loaded.tokenizer, "wikitext2", args.seqlen, args.windows, args.data_dir)
    quantize_model(loaded, assignment, backend="reference", progress=False)
    result = {"model": args.model, "windows": int(windows.shape[0]), "seqlen": args.seqlen, "ppl": {}}
    for backend in ("reference", "cpu"):
        set_backend(loaded.model, backend)
        start = time.perf_counter()
        result["ppl"][backend] = evaluate(loaded.model, windows, progress=False)["ppl"]
        result[f"eval_seconds_{backend}"] = time.perf_counter() - start
    result["ppl_difference"] = abs(result["ppl"]["reference"] - result["ppl"]["cpu"])
    result["kernels_cpu"] = sorted({m.kernel for m in loaded.model.modules() if isinstance(m, QuantLinear)})
    probe = windows[:2]
    with torch.no_grad():
        before = loaded.model(input_ids=probe).logits
    with tempfile.TemporaryDirectory() as tmp:
        meta = save(loaded, Path(tmp) / "packed")
        plan.save(Path(args.out).with_name(Path(args.out).stem + "_plan.json"))
        reloaded = bitalloc.load(Path(tmp) / "packed")
        with torch.no_grad():
            after = reloaded.model(input_ids=probe).logits
    result["reloaded_logits_identical"] = bool(torch.equal(before, after))
    result["saved_bytes"] = meta["bytes"]
    result["predicted_bytes"] = {"linears": assignment_bytes(shapes, assignment), "other": rest}
    result["bytes_match"] = meta["bytes"]["linears"] == result["predicted_bytes"]["linears"] and \
        meta["bytes"]["other"] == rest
    result["avg_bits"] = average_bits(shapes, assignment)
    atomic.write_json(args.out, result)
    print(json.dumps(result, indent=2))
    checks = {f"PPL through cpu and reference within {PPL_AGREEMENT}": result["ppl_difference"] <= PPL_AGREEMENT
              and math.isfinite(result["ppl"]["cpu"]),
              "reloaded logits identical": result["reloaded_logits_identical"],
              "saved bytes as predicted": result["bytes_match"]}
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
