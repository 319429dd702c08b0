"""Weight error versus output error of quantizers on every linear of a model.

    python scripts/weight_vs_output_error.py --options rtn:int3:g64:asym,hqq:int3:g64:asym --data-dir ../shared/data

A quantizer can lower the weight error and still raise what the model feels: the
error of each layer's output on real inputs.  For each option (calibration-free
methods, every decoder linear) this prints three relative L2 errors summed over
the layers: of the weights, of the largest 1 % of weights by magnitude, and of the
outputs X W^T on --nsamples x --calib-seqlen calibration tokens (inputs from the
unquantized model).
"""
from __future__ import annotations

import sys

import torch

from bitalloc.cli_args import add_data_args, add_model_args
from bitalloc.data import calibration_ids
from bitalloc.errors import BitallocError, cli_entry
from bitalloc.help_format import script_parser
from bitalloc.hooks import run_hooked
from bitalloc.models import linear_layers, load_model, weight_matrix
from bitalloc.quant import parse, quantize
from bitalloc.quant.registry import needs_calibration


def layer_inputs(loaded, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each linear's input rows for one forward of `ids` through the unquantized model."""
    inputs: dict[str, torch.Tensor] = {}
    layers = linear_layers(loaded.model)

    def keep(name, args):
        inputs.setdefault(name, args[0].detach().reshape(-1, args[0].shape[-1]))  # returns None: input unchanged

    handles = [module.register_forward_pre_hook(lambda m, args, name=name: keep(name, args))
               for name, module in layers.items()]
    run_hooked(handles, lambda: loaded.model(input_ids=ids, use_cache=False))
    return inputs


@torch.no_grad()
def relative_errors(loaded, inputs, option) -> dict[str, float]:
    error = {"weights": 0.0, "largest 1 %": 0.0, "outputs": 0.0}
    total = dict.fromkeys(error, 0.0)
    for name, module in linear_layers(loaded.model).items():
        weight = weight_matrix(module).detach().float()
        x = inputs[name].float()
        magnitude = weight.abs().flatten()
        largest = weight.abs() >= magnitude[:: max(1, magnitude.numel() // 2**22)].quantile(0.99)
        delta = quantize(weight, option, None, layer=name).dequantize() - weight
        for key, ref, err in (("weights", weight, delta), ("largest 1 %", weight[largest], delta[largest]),
                              ("outputs", x @ weight.T, x @ delta.T)):
            total[key] += float(ref.pow(2).sum())
            error[key] += float(err.pow(2).sum())
    return {key: (error[key] / total[key]) ** 0.5 for key in error}


@cli_entry
def main(argv=None) -> int:
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--options", default="rtn:int3:g64:asym,hqq:int3:g64:asym",
                        help="comma-separated calibration-free options")
    add_model_args(parser)
    add_data_args(parser, evaluation=False)
    parser.set_defaults(nsamples=2)
    args = parser.parse_args(argv)
    options = [parse(text) for text in args.options.split(",")]
    for option in options:
        if needs_calibration(option):
            raise BitallocError(f"{option} needs calibration; this comparison takes calibration-free options")
    loaded = load_model(args.model)
    ids = calibration_ids(loaded.tokenizer, args.calib, args.nsamples, args.calib_seqlen, args.seed, args.data_dir)
    inputs = layer_inputs(loaded, ids)
    print(f"relative L2 error ||error|| / ||reference|| over all {len(inputs)} linears of {loaded.spec}; "
          f"outputs on {args.nsamples} x {args.calib_seqlen} {args.calib} calibration tokens")
    print(f"{'option':<24} " + "  ".join(f"{k:>12}" for k in ("weights", "largest 1 %", "outputs")))
    for option in options:
        errors = relative_errors(loaded, inputs, option)
        print(f"{str(option):<24} " + "  ".join(f"{v:12.4f}" for v in errors.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
