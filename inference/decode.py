"""End-to-end decoding: tokens/s and per-token latency of a packed model against float16, same harness.

    python inference/decode.py --config llama-2-7b --mix mixed4 --out results/decode_h100
    python inference/decode.py --saved runs/smollm2/packed --out results/decode_saved
    python inference/decode.py --config llama-2-7b --mix mixed4-tied --fuse --compile --out results/decode_fused

A model built from a config gets random float16 weights on the GPU and is
packed in place by a mix of options (bitalloc.benchmarks.MIXES); a saved model
(`apply --save`) is reloaded.  The baseline is the same model with dense
float16 weights.  --fuse stacks the linears that read one input and share an
option into one wider linear each (bitalloc.fuse), in the baseline and the
packed model alike.  Decoding is greedy with a static KV cache, each step a CUDA
graph replay (bitalloc.decode).  Writes <out>.json, <out>.txt, <out>.png and
the plan of a built model as <out>_plan.json and the launch the tuner chose per
packed shape as <out>_tuner.json; --tuner-choices takes such a file back, so a
rerun launches the same kernels (where choices time alike, processes that time
afresh keep different ones and the packed step moves by a few percent).  Without
it, choices come from the tuner's cache file where an earlier process on this GPU
left them (bitalloc.kernels.tuner; BITALLOC_TUNER_CACHE=off times afresh, as
inference/run_gpu.sh does).
"""
import contextlib
import logging
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bitalloc import atomic
from bitalloc.benchmarks import LLAMA_CONFIGS, MIXES, mix_assignment, pack_in_place, random_llama
from bitalloc.cost import average_bits, layer_shapes
from bitalloc.decode import decode
from bitalloc.errors import BitallocError, cli_entry
from bitalloc.fuse import four_tokens, fusable, fuse_layers, fuse_packed, options_after_fusing, shared_input_groups
from bitalloc.help_format import script_parser
from bitalloc.kernels import tuner
from bitalloc.kernels.decode_attention import use_for_decoding
from bitalloc.plan import Plan
from bitalloc.safe_json import load_json


# SDPA kernels that take a mask (flash attention does not), as torch.nn.attention names them; "triton": the
# one-token kernel of bitalloc.kernels.decode_attention wherever the tuner finds it faster than torch's pick
ATTENTION = {"torch": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "math": SDPBackend.MATH, "triton": None}


def parse_args(argv):
    parser = script_parser(__file__, __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", choices=sorted(LLAMA_CONFIGS), help="build this shape with random weights")
    source.add_argument("--saved", help="a directory written by python -m bitalloc.apply --save")
    parser.add_argument("--mix", default="mixed4", choices=sorted(MIXES), help="options for a built model")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder blocks (quick checks)")
    parser.add_argument("--backend", default="auto", help="backend of the packed layers")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="decode steps timed per model")
    parser.add_argument("--no-graphs", action="store_true", help="eager decode steps (no CUDA graphs)")
    parser.add_argument("--fuse", action="store_true",
                        help="compute the linears that read one input and share an option (q/k/v, gate/up) as one "
                             "wider linear each, in both models (mix mixed4-tied gives every group one option)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (fuses the small operations between linears; "
                             "triton layers are one opaque operator in its graph, other packed layers graph "
                             "breaks); compiling takes minutes")
    parser.add_argument("--attention", default="torch", choices=sorted(ATTENTION),
                        help="the attention kernel of both models' decode steps: torch's own SDPA pick (cuDNN on "
                             "the H200), one SDPA backend that takes the static cache's mask, or triton: "
                             "bitalloc's one-token kernel where the tuner times it faster than torch's pick")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="profile this many further steps per model (torch.profiler): <out>_profile.txt "
                             "lists the GPU time of each kernel, after a line with the GPU operations per step, "
                             "their GPU time and the time between them")
    parser.add_argument("--tuner-choices", metavar="FILE",
                        help="launch choices of an earlier run (its <out>_tuner.json) to take instead of timing "
                             "(each still checked against the reference once)")
    parser.add_argument("--out", default="results/decode",
                        help="output path prefix: <out>.json, <out>.txt, <out>_tuner.json, <out>_profile.txt")
    return parser.parse_args(argv)


def memory() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise BitallocError("the decode benchmark needs a CUDA GPU")
    if args.tuner_choices:
        choices = load_json(args.tuner_choices, "tuner choices")
        if not isinstance(choices, dict):
            raise BitallocError(f"tuner choices {args.tuner_choices}: expected an object of launches by shape")
        tuner.preset(choices)
    device = torch.device("cuda")
    out = Path(args.out)
    torch.manual_seed(0)
    graphs = not args.no_graphs
    fused = {}
    if args.config:
        model = random_llama(args.config, device, args.layers)
        assignment = mix_assignment(model, args.mix)
        bits = average_bits(layer_shapes(model), assignment)
        groups = fusable(shared_input_groups(model, four_tokens(model)), assignment) if args.fuse else []
        plan = Plan(model=f"{args.config} (random weights)", layers={k: str(v) for k, v in assignment.items()},
                    predicted={"avg_bits": bits}, tie_groups=groups)
        fused = fuse_layers(model, groups)
        assignment = options_after_fusing(assignment, fused)
    else:
        import bitalloc

        model = bitalloc.load(args.saved, device, backend="reference").model.half()
        plan, bits, assignment = None, None, None
        if args.fuse:
            fused = fuse_packed(model, four_tokens(model))
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), device=device)
    if args.attention == "triton":
        use_for_decoding(model)
    torch.cuda.reset_peak_memory_stats()
    backend = ATTENTION[args.attention]
    attention = contextlib.nullcontext() if backend is None else sdpa_kernel(backend)
    with attention:  # traced and captured under it: the kernel both models' steps replay
        dense, packed, dense_memory = _decode_both(args, model, prompt, graphs, assignment)
    kernels = sorted({getattr(m, "kernel", None) for m in model.modules() if hasattr(m, "kernel_state")})
    result = {"model": args.config or args.saved, "mix": args.mix if args.config else None, "avg_bits": bits,
              "device": torch.cuda.get_device_name(device), "torch": torch.__version__, "cuda_graphs": graphs,
              "compiled": args.compile, "attention": args.attention, "fused_groups": list(fused.values()),
              "dense_fp16": dense.as_dict() | {"peak_cuda_bytes": dense_memory},
              "packed": packed.as_dict() | {"peak_cuda_bytes": memory(), "kernels": kernels},
              "speedup": packed.tokens_per_second / dense.tokens_per_second}
    _write(args, out, result, plan, len(fused), dense, packed)
    return 0


def _decode_both(args, model, prompt, graphs, assignment):
    """The float16 model's decode, then the same model packed (a built model by `assignment`, a saved one
    by switching its layers from the reference backend); peak memory of the first."""
    if assignment is not None:
        dense = decode(model, prompt, args.new_tokens, graphs=graphs, compile=args.compile, profile=args.profile)
        dense_memory = memory()
        pack_in_place(model, assignment, args.backend)
    else:
        for layer in model.modules():  # dense float16 weights through cuBLAS: the baseline
            if hasattr(layer, "kernel_state"):
                layer.set_backend("reference")
        dense = decode(model, prompt, args.new_tokens, graphs=graphs, compile=args.compile, profile=args.profile)
        dense_memory = memory()
        for layer in model.modules():
            if hasattr(layer, "kernel_state"):
                layer.set_backend(args.backend)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    packed = decode(model, prompt, args.new_tokens, graphs=graphs, compile=args.compile, profile=args.profile)
    return dense, packed, dense_memory


def _write(args, out: Path, result: dict, plan, fused_groups: int, dense, packed) -> None:
    """<out>.json, .txt, .png, the plan and the tuner's choices, and the profiles when asked."""
    kernels = result["packed"]["kernels"]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out.with_suffix(".json"), result)
    if plan is not None:
        plan.save(out.parent / f"{out.name}_plan.json")
    if tuner.CHOSEN:  # runs of the same plan may differ in these: shapes whose choices time alike
        atomic.write_json(out.parent / f"{out.name}_tuner.json", tuner.choices_made())
    text = (f"{result['device']}: {result['model']} mix={result['mix']} avg_bits={result['avg_bits']} "
            f"fused groups={fused_groups} attention={args.attention}\n"
            f"fp16   {dense.tokens_per_second:8.1f} tok/s  p50 {dense.latency_ms['p50']:.3f} ms\n"
            f"packed {packed.tokens_per_second:8.1f} tok/s  p50 {packed.latency_ms['p50']:.3f} ms  "
            f"speed-up {result['speedup']:.2f}x  kernels {kernels}\n")
    atomic.write_text(out.with_suffix(".txt"), text)
    if args.profile:
        runs = (("fp16", dense), ("packed", packed))
        tables = [f"{name}, {args.profile} steps\n{run.kernels}\n" for name, run in runs]
        atomic.write_text(out.parent / f"{out.name}_profile.txt", "".join(tables))
    plot(result, out.with_suffix(".png"))
    print(text)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = ["fp16", f"packed ({result['mix'] or 'saved'})"]
    values = [result["dense_fp16"]["tokens_per_second"], result["packed"]["tokens_per_second"]]
    ax.bar(names, values, color=["gray", "tab:blue"])
    ax.set_ylabel("tokens/s (batch 1)")
    ax.set_title(f"{result['model']}: {result['speedup']:.2f}x", fontsize=9)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
