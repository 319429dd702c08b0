"""The dimensions of a standard decoder-only transformer, read from its config.

Two uses: the analytic MAC formula that cross-checks fvcore's traced count, and
the bytes of a KV cache.  Standard architectures differ, for costs, only in how
the MLP is built: "gated" (Llama-style SwiGLU: gate, up and down matrices) or
"plain" (OPT, GPT-2: up and down).  Config field names are read through
transformers' own aliases (GPT-2's `n_embd` answers to `hidden_size`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import BitallocError

MLP_KIND = {"llama": "gated", "mistral": "gated", "qwen2": "gated", "qwen3": "gated",
            "opt": "plain", "gpt2": "plain"}


@dataclass(frozen=True)
class Architecture:
    model_type: str
    mlp: str  # "gated" or "plain"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    embed_dim: int  # width of the token embeddings and head (OPT's word_embed_proj_dim); usually = hidden

    @property
    def kv_width(self) -> int:
        """Elements of K (or V) per token and layer."""
        return self.kv_heads * self.head_dim


def architecture(config) -> Architecture:
    """Dimensions of a supported model type; BitallocError names the type otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MLP_KIND:
        raise BitallocError(f"no analytic cost formula for model type '{model_type}' "
                            f"(known: {', '.join(sorted(MLP_KIND))})")
    hidden, heads = config.hidden_size, config.num_attention_heads
    if model_type == "gpt2":
        ffn = config.n_inner or 4 * hidden
    elif model_type == "opt":
        ffn = config.ffn_dim
    else:
        ffn = config.intermediate_size
    return Architecture(
        model_type=model_type, mlp=MLP_KIND[model_type], hidden=hidden, layers=config.num_hidden_layers,
        heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads, ffn=ffn, vocab=config.vocab_size,
        embed_dim=getattr(config, "word_embed_proj_dim", None) or hidden,
    )
