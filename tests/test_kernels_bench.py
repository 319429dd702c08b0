"""The benchmark library on the CPU with a tiny shape: rows, the cost model's latency table, plots."""
import csv

from bitalloc.benchmarks import kernel_rows, plot_speedups, summary, write_csv, write_latency_table
from conftest import load_script

LATENCY_COLUMNS = ["backend", "batch", "out_features", "in_features", "option", "latency_ms"]


def test_kernel_rows_feed_the_latency_table(tmp_path):
    backends = {"cpu": ["rtn:int4:g64:asym", "rtn:nf4:g64"], "reference": ["rtn:int3:g64:sym"]}
    rows = kernel_rows("cpu", backends, {"tiny": {"proj": (64, 256)}}, batches=(1, 3), progress=False)
    assert [(r["backend"], r["batch"]) for r in rows] == [(b, n) for b in ("dense", "cpu", "cpu", "reference")
                                                          for n in (1, 3)]
    assert all(r["seconds"] > 0 and r["weight_bytes"] > 0 for r in rows)
    assert rows[2]["weight_bytes"] == 64 * (8 * 4 * 4 + 4 * 2 * 2)  # 8 chunks x 4 words, 4 scales + 4 zeros
    write_latency_table(rows, tmp_path / "latency.csv")
    with open(tmp_path / "latency.csv") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0])[:6] == LATENCY_COLUMNS
    keys = {(t["backend"], t["option"], t["batch"]) for t in table}
    assert ("cpu", "fp16", "1") in keys and ("reference", "fp16", "3") in keys  # dense rows serve fp16 layers
    assert ("cpu", "rtn:int4:g64:asym", "3") in keys
    write_csv(rows, tmp_path / "rows.csv")
    plot_speedups(rows, tmp_path / "speedups.png", "tiny")
    assert (tmp_path / "speedups.png").stat().st_size > 0
    text = summary(rows)
    assert "rtn:int3:g64:sym" in text
    assert "cpu->ref" in text and "cpu->ref rtn:nf4:g64: computed by reference (cpu: " in text  # nf4: no CPU kernel


def test_compiled_decoding_gives_the_eager_tokens():
    """decode(compile=True): torch.compile around the step, a graph break at each packed layer (whose
    kernels run eagerly), the same greedy tokens as the eager step."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitalloc.benchmarks import pack_in_place
    from bitalloc.decode import decode
    from bitalloc.models import linear_layers
    from bitalloc.quant import parse

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    pack_in_place(model, {n: parse("rtn:int4:g32:asym") for n in linear_layers(model)}, "reference", progress=False)
    prompt = torch.randint(0, 256, (1, 6))
    eager = decode(model, prompt, 4, graphs=False).tokens
    assert decode(model, prompt, 4, graphs=False, compile=True).tokens == eager


def test_decode_profiles_further_steps_kernel_by_kernel():
    """decode(profile=N): N more steps under torch.profiler, their time per operator/kernel as a table."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitalloc.decode import decode

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    result = decode(LlamaForCausalLM(config).eval(), torch.randint(0, 128, (1, 4)), 2, graphs=False, profile=2)
    assert len(result.step_seconds) == 2 and "aten::mm" in result.kernels


def test_profile_line_counts_gpu_operations_and_the_time_between_them():
    """What a GPU profile adds above its table: operations per step, their GPU time, and the wall time they
    leave idle (CPU-side rows are not GPU time)."""
    from types import SimpleNamespace

    import torch

    from bitalloc.decode import gpu_time_line

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(device_type=cuda, count=300, self_device_time_total=4000.0),  # us
              SimpleNamespace(device_type=cuda, count=100, self_device_time_total=2000.0),
              SimpleNamespace(device_type=cpu, count=50, self_device_time_total=0.0)]
    line = gpu_time_line(events, steps=2, seconds=0.008)
    assert line == ("per step: 200 GPU operations, 3.000 ms of GPU time, 4.000 ms wall under the profiler: "
                    "1.000 ms (25 %) between operations\n")


def test_a_models_own_shapes_give_a_latency_table_that_serves_its_latency_budget(tiny_dir, tmp_path):
    """inference/kernel_bench.py --model: every decoder-linear shape of that model timed, so a latency budget
    over its layers can be counted from the table."""
    from bitalloc.budget import parse_budget
    from bitalloc.cost import LatencyTable, layer_shapes
    from bitalloc.models import load_model

    kernel_bench = load_script("inference/kernel_bench.py")
    out = tmp_path / "k"
    assert kernel_bench.main(["--device", "cpu", "--model", str(tiny_dir), "--batches", "1",
                              "--backends", '{"cpu": ["rtn:int4:g32:asym"]}', "--out", str(out)]) == 0
    shapes = layer_shapes(load_model(str(tiny_dir)).model)
    latency = LatencyTable.load(tmp_path / "k_latency.csv")
    budget = parse_budget("rtn:int4:g32:asym@latency", shapes, latency.lookup())
    assert budget.kind == "latency" and budget.limit > 0


def test_outlier_options_are_benchmarked_without_calibration_data():
    """The GPU default set times mixed-outlier options: their fp16 channels are spread evenly (their
    cost is what counts), not refused for want of calibration inputs."""
    rows = kernel_rows("cpu", {"mixed-outlier": ["rtn:int8:pc:sym:a8:outliers=16"]}, {"tiny": {"proj": (64, 256)}},
                       batches=(1,), progress=False)
    assert rows[-1]["kernel"] == "mixed-outlier" and rows[-1]["weight_bytes"] > 64 * 256
