import pytest
import torch

from bitalloc import profile as profile_module
from bitalloc.models import from_module
from bitalloc.profile import profile
from bitalloc.quant import parse
from conftest import tiny_llama

OPTIONS = [parse(f"rtn:int{b}:g32:asym") for b in (2, 3, 4, 8)]


@pytest.fixture
def setup():
    loaded = from_module(tiny_llama(seed=3))
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    return loaded, ids


def test_sensitivity_falls_as_bits_rise(setup):
    loaded, ids = setup
    table = profile(loaded, ids, OPTIONS, cache_dir=None, batch_size=2, progress=False)
    assert len(table.rows) == 14 * 4
    for layer in table.layers:
        errors = [table.error(layer, o) for o in OPTIONS]
        assert errors == sorted(errors, reverse=True), layer
        assert errors[0] > 0


def test_the_profile_leaves_the_model_unchanged(setup):
    loaded, ids = setup
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    profile(loaded, ids, OPTIONS[:2], cache_dir=None, batch_size=2, progress=False)
    after = loaded.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_cached_rows_are_reused_and_new_options_only_measured(setup, tmp_path, monkeypatch):
    loaded, ids = setup
    first = profile(loaded, ids, OPTIONS[:2], cache_dir=tmp_path, batch_size=2, progress=False)
    measured = []
    real = profile_module.measure_block

    def spy(*args, **kwargs):
        measured.append(args[6])  # the (layer, option) pairs still wanted
        return real(*args, **kwargs)

    monkeypatch.setattr(profile_module, "measure_block", spy)
    again = profile(loaded, ids, OPTIONS[:2], cache_dir=tmp_path, batch_size=2, progress=False)
    assert measured == [] and again.rows == first.rows
    wider = profile(loaded, ids, OPTIONS[:3], cache_dir=tmp_path, batch_size=2, progress=False)
    assert all(o == str(OPTIONS[2]) for wanted in measured for _, o in wanted)
    assert [r for r in wider.rows if r["option"] != str(OPTIONS[2])] == first.rows


def test_cache_key_changes_with_model_and_calibration(setup, tmp_path):
    loaded, ids = setup
    profile(loaded, ids, OPTIONS[:1], cache_dir=tmp_path, batch_size=2, progress=False)
    other_model = from_module(tiny_llama(seed=4))
    profile(other_model, ids, OPTIONS[:1], cache_dir=tmp_path, batch_size=2, progress=False)
    profile(loaded, ids.flip(0), OPTIONS[:1], cache_dir=tmp_path, batch_size=2, progress=False)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3


def test_stale_quantizer_version_is_not_reused(setup, tmp_path, monkeypatch, caplog):
    loaded, ids = setup
    profile(loaded, ids, OPTIONS[:1], cache_dir=tmp_path, batch_size=2, progress=False)
    from bitalloc.quant import registry

    quantizer = registry.QUANTIZERS["rtn"]
    monkeypatch.setitem(registry.QUANTIZERS, "rtn", quantizer.__class__(**{**quantizer.__dict__, "version": "999"}))
    with caplog.at_level("INFO"):
        table = profile(loaded, ids, OPTIONS[:1], cache_dir=tmp_path, batch_size=2, progress=False)
    assert "another quantizer version" in caplog.text
    assert len(table.rows) == 14


def test_resume_after_a_failure_recomputes_no_finished_block(setup, tmp_path, monkeypatch):
    loaded, ids = setup
    reference = profile(loaded, ids, OPTIONS, cache_dir=None, batch_size=2, progress=False)
    real = profile_module.measure_block
    calls = []

    def failing(block, index, *args, **kwargs):
        calls.append(index)
        if index == 1:
            raise RuntimeError("injected failure in block 1")
        return real(block, index, *args, **kwargs)

    monkeypatch.setattr(profile_module, "measure_block", failing)
    with pytest.raises(RuntimeError, match="injected"):
        profile(loaded, ids, OPTIONS, cache_dir=tmp_path, batch_size=2, progress=False)
    calls.clear()
    monkeypatch.setattr(profile_module, "measure_block", lambda block, index, *a, **k: (calls.append(index),
                                                                                        real(block, index, *a, **k))[1])
    resumed = profile(loaded, ids, OPTIONS, cache_dir=tmp_path, batch_size=2, progress=False)
    assert calls == [1]
    assert resumed.rows == reference.rows
