"""The one-token attention kernel (bitalloc.kernels.decode_attention) against torch's SDPA: in Triton's CPU
interpreter here, on CUDA in test_kernels_gpu.py."""
import torch
from test_kernels_backends import _interpreted, needs_triton

from bitalloc.kernels import decode_attention as da

EVERY_LAUNCH = """
import torch
from bitalloc.kernels import decode_attention as da

torch.manual_seed(0)
worst = 0.0
for batch, heads, kv_heads, keys, dim, dtype in ((1, 4, 4, 37, 64, torch.float32), (2, 6, 2, 100, 32, torch.float16),
                                                 (1, 2, 1, 5, 128, torch.bfloat16)):
    q = torch.randn(batch, 1, heads, dim, dtype=dtype).transpose(1, 2)  # as a Llama layer views its projection
    k, v = (torch.randn(batch, kv_heads, keys, dim, dtype=dtype) for _ in range(2))
    valid = torch.arange(keys) < keys - 3  # a static cache: positions past the token are masked
    masks = [None, valid.view(1, 1, 1, keys).expand(batch, 1, 1, keys),
             torch.where(valid, 0.0, float("-inf")).to(dtype).view(1, 1, 1, keys),
             torch.rand(batch, heads, 1, keys) > 0.3]
    for mask in masks:
        exact = None if mask is None or mask.dtype == torch.bool else mask.float()
        ref = da._sdpa(q.float(), k.float(), v.float(), mask if exact is None else exact, 0.3)
        for kind, config in da.LAUNCHES:
            out = da._launch(kind, config, q, k, v, mask, 0.3).float()
            worst = max(worst, float((out - ref).norm() / ref.norm()))
assert int(da._TICKETS[torch.device("cpu")].abs().sum()) == 0  # every split launch left its tickets at zero
print(worst)
"""

LLAMA_DECODE = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from bitalloc.decode import decode
from bitalloc.kernels import decode_attention as da, tuner

config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=100)
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
prompt = torch.randint(0, 100, (1, 8))
plain = decode(model, prompt, 6)
da.use_for_decoding(model)
ours = decode(model, prompt, 6)
chosen = [choice for key, choice in tuner.CHOSEN.items() if key[0] == "attention"]
assert chosen == [da.LAUNCHES[0]], chosen  # the interpreter takes the first launch: the kernel ran
print(int(plain.tokens == ours.tokens))
"""


@needs_triton
def test_every_launch_matches_sdpa_in_the_interpreter(tmp_path):
    """Every launch (split caches merged by the last program of a head, one program per head), with no mask,
    a boolean and an added one, a mask per head, grouped heads, ragged blocks."""
    assert float(_interpreted(tmp_path, EVERY_LAUNCH)) < 1e-2


@needs_triton
def test_a_llama_decoding_through_the_kernel_makes_the_same_tokens_in_the_interpreter(tmp_path):
    """Registered as a Hugging Face attention implementation: static cache, grouped heads, greedy steps."""
    assert _interpreted(tmp_path, LLAMA_DECODE) == "1"


def test_prompts_and_cpu_tensors_take_sdpa():
    """Several query tokens (a prompt) or tensors off the GPU: Hugging Face's SDPA function, unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    generator = torch.Generator().manual_seed(0)
    for tokens in (1, 5):
        q, k, v = (torch.randn(1, 4, tokens, 16, generator=generator) for _ in range(3))
        ours, _ = da.attention_forward(module, q, k, v, None, scaling=0.25)
        expected, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)
        assert torch.equal(ours, expected)


def test_a_growing_cache_is_timed_once_per_doubling():
    """A dynamic cache grows by a key a step: the tuner's key buckets its length, so it times at most once per
    power of two instead of at every step."""
    query = torch.zeros(1, 4, 1, 64)
    keys = {length: da._tuner_key(query, torch.zeros(1, 2, length, 64), None) for length in (65, 100, 128, 129)}
    assert keys[65] == keys[100] == keys[128] != keys[129]
    assert keys[65][2] == (1, 2, 128, 64)
