"""The GPU kernels against `reference` on CUDA (float16 activations); skipped where there is no GPU."""
import pytest
import torch

from bitalloc.kernels.quant_linear import QuantLinear
from bitalloc.quant import parse, quantize

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")]

OUT_FEATURES, IN_FEATURES = 264, 1000  # ragged last group for g64/g128, rows not a multiple of any block
BATCHES = (1, 17, 300)
WEIGHT_ONLY = [f"rtn:int{b}:{g}" for b in (2, 3, 4, 8) for g in ("g32:sym", "g128:asym", "pc:asym")]
INTEGER = ["rtn:int8:pc:sym:a8", "rtn:int8:pc:asym:a8", "rtn:int4:pc:sym:a4", "rtn:int4:pc:asym:a8"]


@pytest.fixture(autouse=True)
def first_config(monkeypatch):
    monkeypatch.setenv("BITALLOC_TRITON_TUNE", "0")  # correctness only: one compilation per kernel


def layers(option: str, backend: str, outliers: int = 0):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator) * 0.05
    qw = quantize(weight, parse(option))  # outliers attached by hand: choosing them needs calibration inputs
    if outliers:
        qw.outlier_idx = torch.arange(outliers) * 37
        qw.outlier_weight = weight[:, qw.outlier_idx].half().float()
        qw.option = parse(f"{option}:outliers={outliers}")
    bias = torch.randn(OUT_FEATURES, generator=generator)
    reference = QuantLinear.from_weight(qw, bias).cuda()
    layer = QuantLinear.from_weight(qw, bias).cuda()
    layer.set_backend(backend)
    return reference, layer


def check(reference, layer, backend, tolerance):
    assert layer.kernel == backend, layer.kernel
    for batch in BATCHES:
        x = torch.randn(batch, IN_FEATURES, device="cuda", dtype=torch.float16)
        x[:, 37] *= 30
        out, ref = layer(x), reference(x)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        error = float((out.float() - ref.float()).norm() / ref.float().norm())
        assert error < tolerance, (batch, error)


@pytest.mark.parametrize("option", WEIGHT_ONLY)
def test_triton_matches_reference_on_cuda(option):
    check(*layers(option, "triton", outliers=2 if "g128:asym" in option else 0), "triton", 3e-3)


@pytest.mark.parametrize("option", ["rtn:int4:g128:asym", "rtn:int2:g32:sym", "rtn:int8:pc:asym", "rtn:int3:g128:asym",
                                    "rtn:int3:g32:sym", "hqq:int4:g128:asym"])  # HQQ: real zero points
def test_every_gemv_choice_matches_reference(option):
    """The tuner may pick any GEMV configuration (float16-pair or float32 kernel) or dequantize + cuBLAS."""
    from bitalloc.kernels import triton_backend as tb
    from bitalloc.kernels import tuner

    reference, layer = layers(option, "triton")
    opt = layer.option
    group = tb.kernel_group(opt.group_size, IN_FEATURES)
    key = tb.tuner_key(opt.bits, group, tb.zero_points(layer.zeros), layer.qweight.shape, 1, torch.float16)
    choices = tb.candidates(1, group, opt.bits, torch.float16, IN_FEATURES)
    assert any(kind == tb.PAIRS for kind, _ in choices) and any(kind == tb.MMA for kind, _ in choices)
    x = torch.randn(1, IN_FEATURES, device="cuda", dtype=torch.float16)
    x[:, 37] *= 30
    ref = reference(x).float()
    try:
        for choice in choices:
            tuner.CHOSEN[key] = choice
            error = float((layer(x).float() - ref).norm() / ref.norm())
            assert error < 3e-3, (choice, error)
    finally:
        tuner.CHOSEN.pop(key, None)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_tensor_core_gemv_matches_reference_without_masks(bits):
    """Rows a multiple of 16 and units a multiple of every configuration's step: gemv_mma's unmasked path
    (the one real layers take), every configuration the tuner offers, batches 1 and 3."""
    from bitalloc.kernels import triton_backend as tb

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 4096, generator=generator) * 0.05
    qw = quantize(weight, parse(f"rtn:int{bits}:g128:asym"))
    reference = QuantLinear.from_weight(qw, None).cuda()
    for batch in (1, 3):
        x = torch.randn(batch, 4096, device="cuda", dtype=torch.float16)
        ref = reference(x).float()
        for config in [c for kind, c in tb.candidates(batch, 128, bits, torch.float16, 4096) if kind == tb.MMA]:
            out = tb._launch(tb.MMA, config, x, reference.qweight, reference.scales, reference.zeros, bits, 128,
                             4096).float()
            error = float((out - ref).norm() / ref.norm())
            assert error < 3e-3, (config, batch, error)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_tensor_core_gemv_launched_as_a_programmatic_dependent_waits_for_its_input(bits):
    """Configurations with PDL (fifth element 1): two GEMVs in one CUDA graph, the second reading the first's
    output, so its loads of x must wait for the first; masked shapes (1000 rows, K 1000) and unmasked."""
    from bitalloc.kernels import triton_backend as tb

    generator = torch.Generator().manual_seed(0)
    for first_shape, second_shape in (((1000, 1000), (264, 1000)), ((1024, 1024), (256, 1024))):
        first, second = (QuantLinear.from_weight(quantize(torch.randn(*shape, generator=generator) * 0.05,
                                                          parse(f"rtn:int{bits}:g128:asym")), None).cuda()
                         for shape in (first_shape, second_shape))
        x = torch.randn(1, first_shape[1], device="cuda", dtype=torch.float16)
        expected = second(first(x)).float()
        for config in [c for c in ((8, 1, 4, 2, 1), (4, 1, 4, 2, 1), (4, 1, 16, 2, 1), (4, 2, 4, 2, 1))
                       if tb.unfit(tb.MMA, c, bits, 128, 1024) is None]:
            def chain():
                y = tb._launch(tb.MMA, config, x, first.qweight, first.scales, first.zeros, bits, 128,
                               first_shape[1])
                return tb._launch(tb.MMA, config, y, second.qweight, second.scales, second.zeros, bits, 128,
                                  second_shape[1])

            chain()  # compiles outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = chain()
            graph.replay()
            error = float((out.float() - expected).norm() / expected.norm())
            assert error < 5e-3, (config, first_shape, error)


@pytest.mark.parametrize("option", WEIGHT_ONLY)
def test_triton_dequantization_is_bit_identical_on_cuda(option):
    """What the profiler's candidates use instead of `dequantize_codes` (bfloat16 rounding included)."""
    from bitalloc.kernels.triton_backend import dense_weight

    _, layer = layers(option, "reference", outliers=2 if "g128:asym" in option else 0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert torch.equal(dense_weight(layer, dtype), layer.dequantize_codes(dtype)), dtype


@pytest.mark.parametrize("backend", ["int8", "mixed-outlier"])
@pytest.mark.parametrize("option", INTEGER)
def test_integer_backends_match_reference_on_cuda(backend, option):
    # float16 rounding of x / scale may move a code by one step: a few 1e-3 of relative error
    check(*layers(option, backend, outliers=3 if backend == "mixed-outlier" else 0), backend, 1e-2)


def test_every_w8a8_product_choice_is_the_same_product():
    """The tuner may pick `_int_mm` + rescaling or any fused configuration: all compute the same numbers."""
    from bitalloc.kernels import int8

    generator = torch.Generator(device="cuda").manual_seed(0)
    n, k = 264, 1000  # K not a multiple of any BLOCK_K, N not a multiple of any BLOCK_N
    weight = {"q": torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8, generator=generator),
              "scales": torch.rand(n, device="cuda") * 1e-3, "correction": torch.randn(n, device="cuda") * 1e-3}
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    for rows in (1, 17, 300):
        q = torch.randint(-128, 128, (rows, k), device="cuda", dtype=torch.int8, generator=generator)
        sx, rowsum = torch.rand(rows, device="cuda"), q.sum(-1, dtype=torch.int32)
        expected = int8.run_product(int8.CUBLAS, q, sx, rowsum, weight, bias, torch.float16).float()
        for config in int8.FUSED_CONFIGS:
            out = int8.run_product(config, q, sx, rowsum, weight, bias, torch.float16).float()
            assert ((out - expected).abs() <= 1e-3 * expected.abs() + 1e-3).all(), (rows, config)


def packed_tiny_llama():
    """A 2-block random Llama on the GPU, every linear int4 g64 on `triton`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitalloc.benchmarks import pack_in_place
    from bitalloc.models import linear_layers

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).cuda().half().eval()
    pack_in_place(model, {n: parse("rtn:int4:g64:asym") for n in linear_layers(model)}, "triton", progress=False)
    return model


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("one_token_attention", [False, True])
def test_graph_decoding_follows_the_full_forward(compile, one_token_attention):
    """Each token decoded by graph replay on the static cache (of a torch.compile'd step with `compile`;
    attention through `decode_attention` with `one_token_attention`) is the full (uncached) forward's
    argmax, up to float16 near-ties (cuBLAS may pick other algorithms inside a graph)."""
    from bitalloc.decode import decode
    from bitalloc.kernels.decode_attention import use_for_decoding

    model = packed_tiny_llama()
    if one_token_attention:
        use_for_decoding(model)
    prompt = torch.randint(0, 512, (1, 12), device="cuda")
    tokens = decode(model, prompt, 16, graphs=True, compile=compile).tokens
    sequence = torch.cat([prompt, torch.tensor([tokens], device="cuda")], dim=1)
    with torch.no_grad():
        logits = model(input_ids=sequence).logits[0, prompt.shape[1] - 1:-1].float()
    chosen = logits.gather(1, torch.tensor(tokens, device="cuda")[:, None])[:, 0]
    assert (logits.max(1).values - chosen).max() < 0.05 * logits.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_one_token_attention_launch_matches_sdpa(dtype):
    """A Llama-2-7B layer's decode attention (32 heads of 128, a static cache of 167 positions, the last 40
    not yet written), every launch and the tuner's choice, against SDPA."""
    from bitalloc.kernels import decode_attention as da

    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(1, 32, 167, 128, device="cuda", dtype=dtype) for _ in range(2))
    mask = (torch.arange(167, device="cuda") < 127).view(1, 1, 1, 167)
    ref = da._sdpa(q.float(), k.float(), v.float(), mask, 128 ** -0.5)
    outs = [da._launch(kind, config, q, k, v, mask, 128 ** -0.5) for kind, config in da.LAUNCHES]
    outs.append(da.decode_attention(q, k, v, mask, 128 ** -0.5))
    for out in outs:
        assert out.dtype == dtype and out.shape == (1, 1, 32, 128)
        assert float((out.float() - ref).norm() / ref.norm()) < 1e-2


def test_fused_triton_layers_compute_the_same_logits():
    """`bitalloc.fuse.fuse_packed` on `triton` layers: q/k/v and gate/up each one wider GEMV (gate/up a
    gated layer whose GEMV returns silu(gate) * up), same logits."""
    from bitalloc.fuse import GatedMLP, fuse_packed

    model = packed_tiny_llama()
    ids = torch.randint(0, 512, (1, 1), device="cuda")
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
        assert len(fuse_packed(model, lambda: model(input_ids=ids))) == 4
        assert sum(isinstance(m, GatedMLP) for m in model.modules()) == 2
        out = model(input_ids=ids).logits.float()
    assert float((out - expected).norm() / expected.norm()) < 3e-3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_a_gated_layer_gives_silu_gate_times_up_through_every_launch(bits):
    """Gate and up rows alternating by eight (`layout.gated_order`): every launch choice at batches 1 and 3,
    the tensor-core GEMV's gated epilogue included, against silu(gate) * up of the reference product."""
    from bitalloc.kernels import triton_backend as tb
    from bitalloc.kernels.layout import gate_rows, gated_order

    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(1024, 4096, generator=generator) * 0.05)[gated_order(512)]
    reference = QuantLinear.from_weight(quantize(weight, parse(f"rtn:int{bits}:g128:asym")), None).cuda()
    for batch in (1, 3):
        x = torch.randn(batch, 4096, device="cuda", dtype=torch.float16)
        expected = gate_rows(reference(x).float())
        for kind, config in tb.candidates(batch, 128, bits, torch.float16, 4096):
            out = tb._launch(kind, config, x, reference.qweight, reference.scales, reference.zeros, bits, 128, 4096,
                             gated=True).float()
            assert out.shape == (batch, 512), (kind, config)
            error = float((out - expected).norm() / expected.norm())
            assert error < 3e-3, (kind, config, batch, error)


def test_a_tuned_launch_is_taken_back_from_the_cache_by_the_next_process(monkeypatch, tmp_path):
    """The first process times the choices and writes the cache file; a second (the tuner's state reset)
    launches the same choice without timing anything."""
    from bitalloc.kernels import tuner

    monkeypatch.setenv("BITALLOC_TRITON_TUNE", "1")
    monkeypatch.setenv("BITALLOC_TUNER_CACHE", str(tmp_path / "tuner.json"))
    x = torch.randn(1, IN_FEATURES, device="cuda", dtype=torch.float16)
    chosen = []
    for fastest in (tuner._fastest, lambda *args: pytest.fail("the second process timed again")):
        for name, value in (("CHOSEN", {}), ("PRESET", {}), ("_recalled", False), ("_fastest", fastest)):
            monkeypatch.setattr(tuner, name, value)
        reference, layer = layers("rtn:int4:g128:asym", "triton")
        error = float((layer(x).float() - reference(x).float()).norm() / reference(x).float().norm())
        assert error < 3e-3
        chosen.append(tuner.choices_made())
    assert chosen[0] == chosen[1] and len(chosen[0]) == 1
