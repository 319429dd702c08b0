import pytest
import torch
import torch.nn.functional as F

from bitalloc.cost import LayerShape, block_macs, layer_bytes
from bitalloc.kernels import layout, packing
from bitalloc.kernels.quant_linear import QuantLinear
from bitalloc.quant import parse, quantize
from conftest import tiny_llama


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("cols", [1, 31, 32, 100, 576])
def test_pack_unpack_round_trip(bits, cols):
    codes = torch.randint(0, 2**bits, (3, cols), dtype=torch.uint8)
    words = packing.pack(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (3, layout.packed_words(cols, bits))
    assert torch.equal(packing.unpack(words, bits, cols), codes)


@pytest.mark.parametrize("option", ["rtn:int4:g64:asym", "rtn:int3:g128:sym", "rtn:int2:g64:asym", "rtn:nf4:g64",
                                    "rtn:fp8e4m3:pc", "rtn:int8:pc:sym:a8", "rtn:fp4:g32"])
@pytest.mark.parametrize("bias", [False, True])
def test_quant_linear_computes_the_dequantized_weight_and_stores_the_predicted_bytes(option, bias):
    torch.manual_seed(0)
    w, b = torch.randn(48, 200), (torch.randn(48) if bias else None)
    qw = quantize(w, parse(option))
    layer = QuantLinear.from_weight(qw, b)
    x = torch.randn(5, 200)
    from bitalloc.quant.activation import fake_quantize_tokens

    bias16 = b.half().float() if bias else None
    expected = F.linear(fake_quantize_tokens(x, qw.option.act_bits), qw.dequantize(), bias16)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    stored = sum(t.numel() * t.element_size() for t in layer.buffers())
    assert stored == layer_bytes(LayerShape("x", 48, 200, bias), parse(option))


def test_bits_per_weight_of_common_options():
    shape = LayerShape("x", 4096, 4096, False)
    assert 8 * layer_bytes(shape, parse("rtn:int4:g128:sym")) / shape.numel == pytest.approx(4.125)
    assert 8 * layer_bytes(shape, parse("rtn:int4:g64:asym")) / shape.numel == pytest.approx(4.5)
    ragged = LayerShape("y", 10, 576, False)  # 576 = 4.5 groups of 128: 5 scales per row, 18 chunks of 3 words
    assert layer_bytes(ragged, parse("rtn:int3:g128:asym")) == 10 * (18 * 3 * 4 + 5 * 2 * 2)


def test_fvcore_counts_every_linear_and_attention():
    model = tiny_llama(hidden=64)
    per_block, total = block_macs(model, batch=1, seqlen=16)
    hidden, inter, kv, tokens = 64, 160, 32, 16
    linear = tokens * (hidden * (hidden + 2 * kv + hidden) + 3 * hidden * inter)
    attention = 2 * 4 * tokens * tokens * (hidden // 4)  # QK^T and AV over 4 heads
    assert per_block == [linear + attention] * 2
    assert total == sum(per_block) + tokens * hidden * 320
