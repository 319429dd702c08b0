"""The launch tuner's bookkeeping (timing itself needs a GPU: tests/test_kernels_gpu.py)."""
import json

from bitalloc.kernels import tuner


def test_untuned_choice_is_the_first_and_is_reported_as_plain_data(monkeypatch):
    monkeypatch.setenv("BITALLOC_TRITON_TUNE", "0")
    monkeypatch.setattr(tuner, "CHOSEN", {})
    key = ("triton", 4, 128, True, (4096, 512), 1, "torch.float16")
    ran = []
    assert tuner.choose(key, [("gemv-mma", (8, 1, 4, 2)), ("gemv-pairs", (4, 4, 1, 2))], ran.append) == \
        ("gemv-mma", (8, 1, 4, 2))
    assert ran == []  # nothing is timed without tuning
    assert tuner.choose(key, [("gemv-pairs", (4, 4, 1, 2))], ran.append) == ("gemv-mma", (8, 1, 4, 2))  # kept
    made = tuner.choices_made()
    assert made == {"triton 4 128 True (4096, 512) 1 torch.float16": "('gemv-mma', (8, 1, 4, 2))"}
    assert json.loads(json.dumps(made)) == made


def test_a_choice_whose_output_disagrees_with_the_reference_is_never_chosen(monkeypatch, caplog):
    """The two fastest choices here compute wrong numbers (one of them NaN): the tuner drops both, with a
    warning, before timing, and keeps the fastest of the choices that agree with the reference."""
    import torch

    monkeypatch.setenv("BITALLOC_TRITON_TUNE", "1")
    monkeypatch.setattr(tuner, "CHOSEN", {})
    expected = torch.randn(3, 64)
    outputs = {"reference": expected, "close": expected + 1e-4, "wrong": expected * 1.5,
               "nan": torch.full_like(expected, float("nan"))}
    seconds = {"reference": 3.0, "close": 2.0, "wrong": 1.0, "nan": 0.5}
    timed = []

    def fake_timing(call):
        out = call()
        timed.append(next(name for name, tensor in outputs.items() if tensor is out))
        return seconds[timed[-1]]

    monkeypatch.setattr(tuner, "cold_timer", lambda: fake_timing)
    key = ("triton", 4, 128, True, (64, 8), 1, "torch.float16")
    with caplog.at_level("WARNING"):
        chosen = tuner.choose(key, ["wrong", "nan", "close", "reference"], outputs.get, reference="reference")
    assert chosen == "close" and sorted(set(timed)) == ["close", "reference"]
    assert "wrong" in caplog.text and "nan" in caplog.text and "dropped" in caplog.text


def test_the_choices_timed_close_to_the_fastest_are_timed_again_and_their_median_decides(monkeypatch):
    """"lucky" was timed low once by chance: the choices within CLOSE of the first fastest figure are
    timed again, interleaved, and the steadily faster one wins; a choice far behind is timed once."""
    monkeypatch.setenv("BITALLOC_TRITON_TUNE", "1")
    monkeypatch.setattr(tuner, "CHOSEN", {})
    figures = {"lucky": iter([1.0, 2.0, 2.0, 2.0]), "steady": iter([1.05, 1.5, 1.4, 1.6]), "slow": iter([3.0])}
    timed = []

    def fake_timing(call):
        timed.append(call())
        return next(figures[timed[-1]])

    monkeypatch.setattr(tuner, "cold_timer", lambda: fake_timing)
    key = ("triton", 4, 128, "integer", (64, 8), 1, "torch.float16")
    assert tuner.choose(key, ["slow", "lucky", "steady"], lambda choice: choice) == "steady"
    assert timed[:3] == ["slow", "lucky", "steady"]
    assert timed[3:] == ["lucky", "steady"] * tuner.RECHECKS


def test_an_earlier_runs_choices_are_taken_back_without_timing(monkeypatch, caplog):
    """`preset(choices_made())` of one run makes another launch the same: no timing where the preset agrees
    with the reference; timing where it disagrees or is not offered; a malformed file stops with one line."""
    import pytest
    import torch

    from bitalloc.errors import BitallocError

    monkeypatch.setenv("BITALLOC_TRITON_TUNE", "1")
    monkeypatch.setattr(tuner, "CHOSEN", {})
    monkeypatch.setattr(tuner, "PRESET", {})
    expected = torch.randn(3, 64)
    outputs = {"reference": expected, ("gemv-mma", (8, 1, 4, 2)): expected + 1e-4, ("wrong", ()): expected * 2}
    timed = []
    monkeypatch.setattr(tuner, "_fastest", lambda key, choices, run, reference: timed.append(key) or choices[-1])
    agrees, disagrees, absent = (("triton", 4, 128, "integer", (n, 8), 1, torch.float16) for n in (64, 128, 256))
    earlier = {tuner._written(agrees): str(("gemv-mma", (8, 1, 4, 2))),
               tuner._written(disagrees): str(("wrong", ())), tuner._written(absent): str(("gone", (1,)))}
    tuner.preset(json.loads(json.dumps(earlier)))
    choices = [("gemv-mma", (8, 1, 4, 2)), ("wrong", ()), "reference"]
    with caplog.at_level("WARNING"):
        assert tuner.choose(agrees, choices, outputs.get, reference="reference") == ("gemv-mma", (8, 1, 4, 2))
        assert tuner.choose(disagrees, choices, outputs.get, reference="reference") == "reference"
        assert tuner.choose(absent, choices, outputs.get, reference="reference") == "reference"
    assert timed == [disagrees, absent]
    assert "off the reference" in caplog.text and "not among" in caplog.text
    with pytest.raises(BitallocError, match="not a launch"):
        tuner.preset({"triton 4": "gemv-mma, (8"})


def test_timed_choices_are_kept_for_the_next_process_and_a_corrupt_cache_stops_with_one_line(monkeypatch, tmp_path):
    """What one process times is written to the cache file; the next takes it back (checked against the
    reference once, not timed); an explicit preset wins over the cache; a corrupt file is named."""
    import pytest
    import torch

    from bitalloc.errors import BitallocError

    cache = tmp_path / "tuner" / "gpu.json"
    monkeypatch.setenv("BITALLOC_TUNER_CACHE", str(cache))
    monkeypatch.setenv("BITALLOC_TRITON_TUNE", "1")
    expected = torch.randn(3, 64)
    outputs = {"reference": expected, "fast": expected + 1e-4, "other": expected - 1e-4}
    key, second = (("triton", 4, 128, "integer", (n, 8), 1, torch.float16) for n in (64, 128))

    def new_process(fastest):
        for name, value in (("CHOSEN", {}), ("PRESET", {}), ("_recalled", False), ("_fastest", fastest)):
            monkeypatch.setattr(tuner, name, value)

    new_process(lambda key, choices, run, reference: "fast")
    assert tuner.choose(key, ["reference", "fast"], outputs.get, reference="reference") == "fast"
    assert json.loads(cache.read_text()) == {tuner._written(key): "'fast'"}

    timed = []
    new_process(lambda key, choices, run, reference: timed.append(key) or "other")
    assert tuner.choose(key, ["reference", "fast"], outputs.get, reference="reference") == "fast"
    assert tuner.choose(second, ["reference", "other"], outputs.get, reference="reference") == "other"
    assert timed == [second]  # only the key the cache did not hold was timed, and both are kept now
    assert json.loads(cache.read_text()) == {tuner._written(key): "'fast'", tuner._written(second): "'other'"}

    new_process(lambda key, choices, run, reference: "never")
    tuner.preset({tuner._written(key): "'other'"})
    assert tuner.choose(key, ["reference", "fast", "other"], outputs.get, reference="reference") == "other"

    cache.write_text("{not json")
    new_process(lambda key, choices, run, reference: "fast")
    with pytest.raises(BitallocError, match="tuner cache .*gpu.json is not valid JSON.*; delete it"):
        tuner.choose(key, ["reference", "fast"], outputs.get, reference="reference")
    cache.write_text('{"a": "1", "a": "2"}')  # strict reading: a duplicate key is refused, not kept silently
    new_process(lambda key, choices, run, reference: "fast")
    with pytest.raises(BitallocError, match="key 'a' appears twice"):
        tuner.choose(key, ["reference", "fast"], outputs.get, reference="reference")
    cache.write_text(json.dumps({tuner._written(key): "fast, ("}))
    new_process(lambda key, choices, run, reference: "fast")
    with pytest.raises(BitallocError, match="tuner cache .*gpu.json: tuner choice .* is not a launch"):
        tuner.choose(key, ["reference", "fast"], outputs.get, reference="reference")


def test_the_cache_file_is_off_without_a_gpu_or_when_asked(monkeypatch):
    monkeypatch.setenv("BITALLOC_TUNER_CACHE", "off")
    assert tuner.cache_file() is None
    monkeypatch.delenv("BITALLOC_TUNER_CACHE")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.get_device_name", lambda: "NVIDIA H200")
    monkeypatch.setenv("BITALLOC_CACHE", "/somewhere")
    path = tuner.cache_file()
    assert path.parent.as_posix() == "/somewhere/tuner" and path.name.startswith("NVIDIA-H200-")
