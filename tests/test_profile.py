import pytest
import torch

from bitalloc import linear_pass, profile as profile_module
from bitalloc.block_cache import BlockCache
from bitalloc.models import from_module
from bitalloc.profile import profile
from bitalloc.quant import parse
from conftest import tiny_llama

OPTIONS = [parse(f"rtn:int{b}:g32:asym") for b in (2, 3, 4, 8)]
ALL = ["rel", "mse", "kl", "layer_out", "fisher", "fisher_tok", "wfisher", "hawq"]


@pytest.fixture
def setup():
    loaded = from_module(tiny_llama(seed=3))
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    return loaded, ids


def test_sensitivity_falls_as_bits_rise(setup):
    loaded, ids = setup
    table = profile(loaded, ids, OPTIONS, cache_dir=None, batch_size=2, progress=False, metrics=ALL)
    assert len(table.rows) == 14 * 4 and table.metrics == ALL
    for layer in table.layers:
        for metric in ("rel", "mse", "layer_out", "fisher_tok", "wfisher", "hawq"):
            values = [table.lookup()[(layer, str(o))][metric] for o in OPTIONS]
            assert values == sorted(values, reverse=True) and values[0] > 0, (layer, metric)
        for metric in ("kl", "fisher"):  # noisier estimates: only the extremes are compared
            values = [table.lookup()[(layer, str(o))][metric] for o in OPTIONS]
            assert values[0] > values[-1], (layer, metric)


def test_the_profile_leaves_the_model_unchanged(setup):
    loaded, ids = setup
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in loaded.model.named_parameters()}
    profile(loaded, ids, OPTIONS[:2], cache_dir=None, batch_size=2, progress=False, metrics=["rel", "fisher"])
    after = loaded.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {k: p.requires_grad for k, p in loaded.model.named_parameters()}


def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def spy(block, index_or_candidates, *args, **kwargs):
        calls.append(args)
        return real(block, index_or_candidates, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def test_cached_rows_are_reused_and_new_options_only_measured(setup, tmp_path, monkeypatch):
    loaded, ids = setup
    first = profile(loaded, ids, OPTIONS[:2], cache_dir=tmp_path, batch_size=2, progress=False,
                    metrics=["rel", "fisher"])
    block_calls = []
    _spy(monkeypatch, profile_module, "measure_block", block_calls)
    again = profile(loaded, ids, OPTIONS[:2], cache_dir=tmp_path, batch_size=2, progress=False,
                    metrics=["rel", "fisher"])
    assert block_calls == [] and again.rows == first.rows
    wider = profile(loaded, ids, OPTIONS[:3], cache_dir=tmp_path, batch_size=2, progress=False,
                    metrics=["rel", "fisher"])
    assert all(o == OPTIONS[2] for call in block_calls for _, o in call[1])
    assert [r for r in wider.rows if r["option"] != str(OPTIONS[2])] == first.rows


def test_cache_key_changes_with_model_and_calibration(setup, tmp_path):
    loaded, ids = setup
    profile(loaded, ids, OPTIONS[:1], cache_dir=tmp_path, batch_size=2, progress=False, metrics=["rel"])
    other_model = from_module(tiny_llama(seed=4))
    profile(other_model, ids, OPTIONS[:1], cache_dir=tmp_path, batch_size=2, progress=False, metrics=["rel"])
    profile(loaded, ids.flip(0), OPTIONS[:1], cache_dir=tmp_path, batch_size=2, progress=False, metrics=["rel"])
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3


def test_stale_quantizer_version_or_setting_is_reported_and_not_reused(setup, tmp_path, monkeypatch, caplog):
    loaded, ids = setup
    profile(loaded, ids, OPTIONS[:1], cache_dir=tmp_path, batch_size=2, progress=False, metrics=["rel", "kl"])
    from bitalloc.quant import registry

    quantizer = registry.QUANTIZERS["rtn"]
    monkeypatch.setitem(registry.QUANTIZERS, "rtn", quantizer.__class__(**{**quantizer.__dict__, "version": "999"}))
    block_calls = []
    _spy(monkeypatch, profile_module, "measure_block", block_calls)
    with caplog.at_level("WARNING"):
        table = profile(loaded, ids, OPTIONS[:1], cache_dir=tmp_path, batch_size=2, progress=False,
                        metrics=["rel", "kl"])
    assert "another quantizer version" in caplog.text and len(block_calls) == 2 and len(table.rows) == 14
    caplog.clear()
    block_calls.clear()
    with caplog.at_level("WARNING"):  # a different kl setting makes only kl stale
        profile(loaded, ids, OPTIONS[:1], cache_dir=tmp_path, batch_size=2, progress=False, metrics=["rel", "kl"],
                kl_windows=1)
    assert "metric setting" in caplog.text and len(block_calls) == 2


def test_block_pass_resumes_after_a_failure_and_recomputes_no_finished_block(setup, tmp_path, monkeypatch):
    loaded, ids = setup
    reference = profile(loaded, ids, OPTIONS, cache_dir=None, batch_size=2, progress=False, metrics=["rel", "mse"])
    real = profile_module.measure_block
    calls = []

    def failing(block, index, *args, **kwargs):
        calls.append(index)
        if index == 1:
            raise RuntimeError("injected failure in block 1")
        return real(block, index, *args, **kwargs)

    monkeypatch.setattr(profile_module, "measure_block", failing)
    with pytest.raises(RuntimeError, match="injected"):
        profile(loaded, ids, OPTIONS, cache_dir=tmp_path, batch_size=2, progress=False, metrics=["rel", "mse"])
    calls.clear()
    monkeypatch.setattr(profile_module, "measure_block", lambda block, index, *a, **k: (calls.append(index),
                                                                                        real(block, index, *a, **k))[1])
    resumed = profile(loaded, ids, OPTIONS, cache_dir=tmp_path, batch_size=2, progress=False, metrics=["rel", "mse"])
    assert calls == [1]
    assert resumed.rows == reference.rows


def test_linear_pass_resumes_below_the_last_finished_block(setup, tmp_path, monkeypatch):
    loaded, ids = setup
    reference = profile(loaded, ids, OPTIONS, cache_dir=None, batch_size=2, progress=False, metrics=["fisher"])
    real = linear_pass.measure_block_linears
    measured = []

    def failing(block, candidates, *args, **kwargs):
        measured.append(len(list(candidates.keys())))
        if len(measured) == 2:
            raise RuntimeError("injected failure in the second block of the backward sweep")
        return real(block, candidates, *args, **kwargs)

    monkeypatch.setattr(profile_module, "measure_block_linears", failing)
    with pytest.raises(RuntimeError, match="injected"):
        profile(loaded, ids, OPTIONS, cache_dir=tmp_path, batch_size=2, progress=False, metrics=["fisher"])
    measured.clear()
    resumed = profile(loaded, ids, OPTIONS, cache_dir=tmp_path, batch_size=2, progress=False, metrics=["fisher"])
    assert measured == [7 * 4]  # block 1 was finished and is neither measured nor back-propagated again
    assert resumed.rows == reference.rows


def test_options_that_calibrate_only_for_some_settings_are_profiled(setup):
    """Outlier channels and RTN's output-weighted clip need calibration although RTN itself does not."""
    loaded, ids = setup
    options = [parse("rtn:int4:g32:asym:a8:outliers=2"), parse("rtn:int3:g32:asym:clip=2")]
    table = profile(loaded, ids, options, cache_dir=None, batch_size=2, progress=False, metrics=["rel", "fisher"])
    assert len(table.rows) == 14 * 2
    assert all(row["rel"] > 0 and row["fisher"] > 0 for row in table.rows)


@pytest.mark.parametrize("metric, frontier", [("rel", "frontier"), ("fisher", "gradient_frontier")])
def test_a_kill_between_a_blocks_rows_and_its_frontier_resumes_from_the_older_frontier(tmp_path, monkeypatch,
                                                                                      metric, frontier):
    """Rows of a block are written, then the frontier after it: a kill in between leaves the frontier one
    block behind.  The rerun starts from that frontier (no restart from block 0) and measures nothing twice."""
    loaded = from_module(tiny_llama(layers=4, seed=5))
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    reference = profile(loaded, ids, OPTIONS, cache_dir=None, batch_size=2, progress=False, metrics=[metric])
    real_save = BlockCache.save_tensors
    saves = []

    def killed_at_second_frontier(self, name, index, tensors):
        saves.append(index)
        if name == frontier and len(saves) == 2:
            raise KeyboardInterrupt("killed after the rows, before the frontier")
        return real_save(self, name, index, tensors)

    monkeypatch.setattr(BlockCache, "save_tensors", killed_at_second_frontier)
    with pytest.raises(KeyboardInterrupt):
        profile(loaded, ids, OPTIONS, cache_dir=tmp_path, batch_size=2, progress=False, metrics=[metric])
    monkeypatch.setattr(BlockCache, "save_tensors", real_save)
    messages = []
    monkeypatch.setattr(profile_module.log, "info", lambda text, *args: messages.append(text % args))
    resumed = profile(loaded, ids, OPTIONS, cache_dir=tmp_path, batch_size=2, progress=False, metrics=[metric])
    assert any("resumes" in m for m in messages), messages
    assert resumed.rows == reference.rows
