"""bitalloc: mixed-precision bit allocation for LLMs (profile -> solve -> plan.json -> apply -> evaluate)."""
__version__ = "0.1.0"


def load(directory, device="cpu", backend=None):
    """Reload a model saved by `python -m bitalloc.apply --save DIR` (no re-quantization).

    Returns a LoadedModel: `.model` (packed QuantLinear layers, each on its saved
    backend unless `backend` overrides it; "auto" picks per layer) and `.tokenizer`.
    """
    from .saving import load as load_saved

    return load_saved(directory, device, backend)
