"""Malformed and adversarial plan files: each ends `python -m bitalloc.apply --plan` with one clear line,
exit code 2, no traceback and no file written.

The corpus lives in tests/fuzz_plans/ (one file per case); EXPECTED says which words the one line must
hold.  Every case runs in-process; a few also run as real subprocesses.  A seeded mutation fuzzer then
checks that no random damage to a valid plan gets past validation as anything but a BitallocError.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bitalloc import apply, safe_json
from bitalloc.cost import LayerShape
from bitalloc.errors import BitallocError
from bitalloc.plan import Plan
from conftest import all_files, run_cli

CORPUS = Path(__file__).parent / "fuzz_plans"
REPO = Path(__file__).resolve().parents[1]
EXPECTED = {
    "activation_bits_3.json": "activation bits must be one of",
    "binary_noise.json": "is not UTF-8 text",
    "bits_9.json": "unsupported format 'int9'",
    "bom_utf8.json": "starts with a UTF-8 byte-order mark",
    "budget_negative.json": "'budget' needs a 'kind' and a positive 'limit'",
    "budget_overrun.json": "over its own budget of 1000 bytes",
    "budget_string_limit.json": "'budget.limit' must be a number",
    "calibration_nsamples_zero.json": "'calibration.nsamples' must be a positive integer",
    "comments.json": "is not valid JSON",
    "control_char_layer.json": "holds control or invisible characters",
    "deep_nesting.json": "nested too deeply",
    "default_bad.json": "'default': option 'int4' is not of the form",
    "duplicate_layer.json": "key 'model.layers.0.mlp.up_proj' appears twice",
    "duplicate_top_key.json": "key 'layers' appears twice",
    "emoji_layer.json": "which the model does not have",
    "empty.json": "is empty",
    "empty_layer_name.json": "a layer name must be a non-empty string",
    "evaluation_seqlen_text.json": "'evaluation.seqlen' must be a positive integer, got '2048'",
    "fingerprint_mismatch.json": "made for model weights 0123456789abcdef",
    "format_nf4_asym.json": "cannot read 'asym'",
    "group_huge.json": "group must be gN (N >= 1) or pc",
    "group_negative.json": "group must be gN (N >= 1) or pc",
    "group_zero.json": "group must be gN (N >= 1) or pc, got 'g0'",
    "homoglyph_layer.json": "(did you mean 'model.layers.0.self_attn.q_proj'?)",
    "huge_float.json": "number '1e999' is out of range",
    "huge_int.json": "is not valid JSON: Exceeds the limit",
    "infinity_loss.json": "-Infinity is not a JSON number",
    "latin1.json": "is not UTF-8 text (byte 0xe9",
    "layers_list.json": "'layers' must map layer names to option strings, got a list",
    "lone_surrogate_layer.json": "holds control or invisible characters",
    "long_layer_name.json": "is longer than 1000 characters",
    "long_int_loss.json": "'predicted.loss' must be a number",
    "method_unknown.json": "unknown quantization method 'gptx'",
    "missing_layers.json": "missing key 'layers'",
    "model_empty.json": "'model' must be a non-empty string",
    "model_null_byte.json": "'model' 'tiny\\x00llama' holds control",
    "model_number.json": "'model' must be a non-empty string, got 135",
    "nan_budget.json": "NaN is not a JSON number",
    "nested_duplicate.json": "key 'status' appears twice",
    "option_number.json": "option must be a string like 'rtn:int4:g64:asym', got 4",
    "predicted_loss_text.json": "'predicted.loss' must be a number",
    "record_not_object.json": "'solver' must be an object, got a list",
    "rtl_override_layer.json": "holds control or invisible characters",
    "single_quotes.json": "is not valid JSON",
    "tie_not_list.json": "'tie_groups' must be a list of lists of layer names",
    "tie_overlap.json": "is in two tie groups",
    "tie_single_layer.json": "must list at least two different layers",
    "tie_unknown_layer.json": "'model.layers.0.self_attn.qkv_proj', which the model does not have",
    "tie_violation.json": "must share one option",
    "top_level_list.json": "expected a JSON object at the top level, got a list",
    "top_level_null.json": "expected a JSON object at the top level, got null",
    "top_level_string.json": "expected a JSON object at the top level, got a string",
    "trailing_garbage.json": "is not valid JSON: Extra data",
    "truncated.json": "is not valid JSON",
    "unknown_key.json": "unknown key 'layer'",
    "unknown_layer.json": "layer 'model.layers.7.mlp.up_proj', which the model does not have",
    "utf16.json": "starts with a UTF-16 byte-order mark",
    "version_2.json": "unsupported plan version 2",
    "version_bool.json": "unsupported plan version True",
    "version_float.json": "unsupported plan version 1.0",
    "version_string.json": "unsupported plan version '1'",
    "whitespace_only.json": "is empty",
    "wrong_format.json": "'format' must be 'bitalloc-plan', got 'gptq'",
    "zero_width_layer.json": "holds control or invisible characters",
}
# made at run time: too big, or not files at all
GENERATED = {"huge_file": "is larger than 16 MiB", "directory": "cannot read plan", "missing": "plan file not found"}
SUBPROCESS_CASES = ["truncated.json", "homoglyph_layer.json"]


def valid_plan() -> dict:
    """The plan every corpus file damages: it applies cleanly to the tiny Llama."""
    return {"format": "bitalloc-plan", "version": 1, "model": "tiny-llama", "default": "rtn:int8:g32:asym",
            "layers": {"model.layers.0.mlp.up_proj": "rtn:int4:g32:asym",
                       "model.layers.0.self_attn.o_proj": "rtn:int3:g32:asym"}}


def generated_case(name: str, root: Path) -> Path:
    path = root / "inputs" / name
    path.parent.mkdir(exist_ok=True)
    if name == "huge_file":
        with open(path, "wb") as handle:  # sparse: no disk or time spent on the 17 MiB
            handle.truncate(17 << 20)
    elif name == "directory":
        path.mkdir()
    return path


def assert_one_line_exit_2(code, err, expected):
    """Exit 2; one line saying what is wrong, last on stderr (log lines such as "loading model" may precede it)."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error")]
    assert code == 2, err
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert expected in errors[0], errors[0]
    assert "Traceback" not in err


def test_corpus_is_complete_and_large_enough():
    files = {p.name for p in CORPUS.iterdir()}
    assert files == set(EXPECTED), files ^ set(EXPECTED)
    assert len(files) + len(GENERATED) >= 30


def test_the_undamaged_plan_applies(cli_env, tiny_dir, capsys):
    path = cli_env / "valid.json"
    path.write_text(json.dumps(valid_plan()))
    code, _, err = run_cli(apply.main, ["--plan", str(path), "--model", str(tiny_dir), "--no-eval", "--quiet"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("name", sorted(EXPECTED) + sorted(GENERATED))
def test_bad_plan_gives_one_line_and_exit_2(name, cli_env, tiny_dir, capsys):
    plan = CORPUS / name if name in EXPECTED else generated_case(name, cli_env)
    before = all_files(cli_env) | all_files(CORPUS)
    argv = ["--plan", str(plan), "--model", str(tiny_dir), "--no-eval", "--quiet", "--json", "out.json"]
    code, out, err = run_cli(apply.main, argv, capsys)
    assert_one_line_exit_2(code, err, EXPECTED.get(name) or GENERATED[name])
    assert all_files(cli_env) | all_files(CORPUS) == before, "a rejected plan must write nothing"


def test_bad_plans_in_real_processes(cli_env, tiny_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "bitalloc.apply", "--plan", str(CORPUS / name), "--model", str(tiny_dir),
             "--no-eval", "--quiet", "--json", "out.json"],
            cwd=cli_env, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in SUBPROCESS_CASES
    }
    before = all_files(cli_env)
    for name, process in runs.items():
        out, err = process.communicate(timeout=120)
        assert_one_line_exit_2(process.returncode, err, EXPECTED[name])
    assert all_files(cli_env) == before


# --- random damage ------------------------------------------------------------------------------------

SHAPES = [LayerShape(f"model.layers.{b}.{n}", 96, 96, False) for b in range(2)
          for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
ODD_VALUES = [None, True, 0, -1, 1.5, 10**30, "", "x", "fp16", "rtn:int4:g32:asym", "rtn:int4:g0", [], [[]], {},
              {"kind": "bytes"}, ["a", "a"], "\u0430", "\x00", "model.layers.0.mlp.up_proj", 1e308]


def mutate(data, rng: random.Random):
    """One random structural change somewhere in a JSON value."""
    if isinstance(data, dict) and data and rng.random() < 0.7:
        key = rng.choice(sorted(data))
        choice = rng.random()
        if choice < 0.15:
            data.pop(key)
        elif choice < 0.3:
            data[rng.choice(["", "x", "layer", key + "_"])] = rng.choice(ODD_VALUES)
        elif choice < 0.6:
            data[key] = rng.choice(ODD_VALUES)
        else:
            data[key] = mutate(data[key], rng)
        return data
    if isinstance(data, list) and data and rng.random() < 0.7:
        index = rng.randrange(len(data))
        data[index] = mutate(data[index], rng)
        return data
    return rng.choice(ODD_VALUES)


def rich_plan() -> dict:
    data = valid_plan()
    data.update(tie_groups=[[s.name for s in SHAPES[:3]]], fingerprint="abc",
                budget={"kind": "bytes", "limit": 1e9, "spec": "1GB"}, predicted={"bytes": 1, "loss": 0.5},
                calibration={"source": "wiki", "nsamples": 4, "seqlen": 32, "seed": 0},
                evaluation={"corpus": "wikitext2", "split": "test", "seqlen": 32, "windows": 6, "subset": True})
    return data


def test_random_damage_is_rejected_as_bad_input_or_accepted_whole():
    """2000 seeded mutations: validation raises only BitallocError, and what it accepts apply can use."""
    rng = random.Random(1234)
    rejected = 0
    for _ in range(2000):
        data = json.loads(json.dumps(rich_plan()))
        for _ in range(rng.randint(1, 3)):
            data = mutate(data, rng)
        try:
            plan = Plan.from_json(data)
            plan.check_against(SHAPES, "abc")
            args = apply.build_parser().parse_args(["--plan", "p.json"])
            apply.protocol_defaults(args, plan)
            apply.check_positive(args)
            json.dumps(plan.to_json(), allow_nan=False)
        except BitallocError:
            rejected += 1
    assert 0.3 < rejected / 2000 < 1.0


def test_random_bytes_damage_is_rejected_as_bad_input_or_accepted_whole():
    """2000 seeded byte-level corruptions of a valid plan.json: only BitallocError ever escapes."""
    rng = random.Random(99)
    text = json.dumps(rich_plan(), indent=2).encode()
    outcomes = {"rejected": 0, "accepted": 0}
    for _ in range(2000):
        data = bytearray(text)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            action = rng.random()
            if action < 0.4:
                data[at] = rng.randrange(256)
            elif action < 0.7:
                del data[at: at + rng.randint(1, 20)]
            else:
                data[at:at] = rng.choice([b"\xff", b"\x00", b"[", b"{", b'"', b"\\u", b"NaN", b"1e999", b",", b"\xef\xbb\xbf"])
        try:
            Plan.from_json(safe_json.loads(bytes(data), "plan")).check_against(SHAPES, "abc")
            outcomes["accepted"] += 1
        except BitallocError:
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 1000 and outcomes["accepted"] > 0, outcomes
