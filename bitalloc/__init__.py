"""bitalloc: mixed-precision bit allocation for LLMs (profile -> solve -> plan.json -> apply -> evaluate)."""
__version__ = "0.1.0"


def load(directory, device="cpu", backend=None, fuse=False):
    """Reload a model saved by `python -m bitalloc.apply --save DIR` (no re-quantization).

    Returns a LoadedModel: `.model` (packed QuantLinear layers, each on its saved
    backend unless `backend` overrides it; "auto" picks per layer) and `.tokenizer`.
    `fuse=True` computes packed layers that read one input and share an option (q/k/v, gate/up of a
    plan searched with `--tie fused`) as one wider layer: fewer, larger kernels at batch 1.
    """
    from .saving import load as load_saved

    return load_saved(directory, device, backend, fuse)
