"""The runtime picks each model's layout by measuring it on this machine, remembers the choice per
machine, and runs the model in that layout with the same results."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from cache.store import ModelStore
from converters.pipeline import ensure_converted
from runtime.engine import load
from runtime.tuning import (AS_CONVERTED, FLOAT32, TURN_PROMPT_TOKENS, TURN_REPLY_TOKENS, DecodeThreads, Tuner,
                            Tuning, is_float32,
                            machine_fingerprint)
from tests.tiny_models import ARCHS, IDS, Q, build_model, write_gguf


@pytest.fixture(scope="module")
def quantised(tmp_path_factory):
    """A tiny Q4_0 llama, converted: kept as 4-bit codes, so float32 is a second candidate layout."""
    folder = tmp_path_factory.mktemp("tuning")
    arch = ARCHS["llama"]
    source = write_gguf(build_model(arch, seed=5), arch, folder / "tiny.gguf", Q.Q4_0)
    store = ModelStore(folder / "home")
    entry = ensure_converted(source, store).entry
    return entry, store.checkpoint_path(entry)


def logits(model) -> np.ndarray:
    return np.array(model(mx.array([IDS]))[0].astype(mx.float32))


def test_every_candidate_is_measured_and_the_fastest_for_a_turn_is_kept(quantised, tmp_path):
    entry, path = quantised
    loaded = load(entry, path, tuner=Tuner(tmp_path / "tuning.json"))
    tuning = loaded.tuning

    assert tuning.reason == "measured"
    assert {m["layout"] for m in tuning.measurements} == {AS_CONVERTED, FLOAT32}
    assert all(m["prefill_tps"] > 0 and m["decode_tps"] > 0 for m in tuning.measurements)
    def turn(layout: str) -> float:
        mine = [m for m in tuning.measurements if m["layout"] == layout]
        return TURN_PROMPT_TOKENS / max(m["prefill_tps"] for m in mine) + TURN_REPLY_TOKENS / max(m["decode_tps"] for m in mine)

    assert tuning.layout == min((AS_CONVERTED, FLOAT32), key=turn)
    mine = [m for m in tuning.measurements if m["layout"] == tuning.layout]
    assert tuning.threads == max(mine, key=lambda m: m["decode_tps"])["threads"]
    assert tuning.prefill_threads == max(mine, key=lambda m: m["prefill_tps"])["threads"]
    assert is_float32(loaded.model) == (tuning.layout == FLOAT32)


def test_a_choice_is_remembered_for_this_machine_only(quantised, tmp_path):
    entry, path = quantised
    first = load(entry, path, tuner=Tuner(tmp_path / "tuning.json")).tuning
    again = load(entry, path, tuner=Tuner(tmp_path / "tuning.json")).tuning
    assert again.reason == "remembered" and (again.layout, again.threads) == (first.layout, first.threads)

    remembered = json.loads((tmp_path / "tuning.json").read_text())
    assert list(remembered) == [machine_fingerprint()] and entry.key in remembered[machine_fingerprint()]
    other_machine = {"another cpu": remembered[machine_fingerprint()]}
    (tmp_path / "tuning.json").write_text(json.dumps(other_machine))
    assert load(entry, path, tuner=Tuner(tmp_path / "tuning.json")).tuning.reason == "measured"


def test_retune_measures_again_and_a_damaged_file_costs_only_a_measurement(quantised, tmp_path):
    entry, path = quantised
    load(entry, path, tuner=Tuner(tmp_path / "tuning.json"))
    assert load(entry, path, tuner=Tuner(tmp_path / "tuning.json", retune=True)).tuning.reason == "measured"
    (tmp_path / "tuning.json").write_text("{not json")
    assert load(entry, path, tuner=Tuner(tmp_path / "tuning.json")).tuning.reason == "measured"


@pytest.mark.parametrize("layout", [FLOAT32, AS_CONVERTED])
def test_a_pinned_layout_is_used_without_measuring(quantised, layout):
    entry, path = quantised
    loaded = load(entry, path, tuner=Tuner(None, layout=layout))
    assert loaded.tuning.layout == layout and loaded.tuning.reason == "set by settings"
    assert loaded.tuning.measurements == []
    assert is_float32(loaded.model) == (layout == FLOAT32)


def test_both_layouts_compute_the_same_logits(quantised):
    entry, path = quantised
    as_converted = load(entry, path, tuner=Tuner(None, layout=AS_CONVERTED)).model
    widened = load(entry, path, tuner=Tuner(None, layout=FLOAT32)).model
    assert not is_float32(as_converted)
    reference = logits(as_converted)  # computed in the scales' float16: within its rounding of float32
    np.testing.assert_allclose(logits(widened), reference, atol=0.01 * np.abs(reference).max())
    assert (logits(widened).argmax(-1) == reference.argmax(-1)).mean() > 0.9


def serve(chooser: DecodeThreads, steps: int, seconds_by_threads: dict, batch_size=lambda step: 1) -> list:
    """Decode-only steps whose duration depends on the thread count: the counts the chooser used."""
    used = []
    for step in range(steps):
        threads = chooser.next(batch_size(step))
        chooser.record(batch_size(step), threads, seconds_by_threads[threads])
        used.append(threads)
    return used


def probed(threads: int) -> Tuning:
    measurements = [{"layout": FLOAT32, "threads": t, "prefill_tps": 100.0, "decode_tps": 30.0} for t in (1, 2)]
    return Tuning(FLOAT32, threads, "measured", measurements)


def test_decode_threads_are_measured_again_on_real_traffic():
    tuning = probed(2)  # the probe, run alone, preferred two threads; serving, one is faster
    used = serve(DecodeThreads(tuning), 80, {1: 0.020, 2: 0.030})
    assert tuning.threads == 1 and tuning.serving_step_ms == {1: {1: 20.0, 2: 30.0}}
    assert used[:4] == [2] * 4 and sorted(used[4:20]) == [1] * 8 + [2] * 8 and used[20:] == [1] * 60


def test_each_batch_size_keeps_the_thread_count_that_decodes_it_fastest():
    tuning = probed(1)
    alone, batched = {1: 0.020, 2: 0.030}, {1: 0.040, 2: 0.030}  # a second thread helps only the batch
    chooser = DecodeThreads(tuning)
    used = [*serve(chooser, 30, alone), *serve(chooser, 30, batched, batch_size=lambda step: 4)]
    assert tuning.batch_threads == {1: 1, 4: 2} and tuning.threads == 1
    assert tuning.serving_step_ms[4] == {1: 40.0, 2: 30.0}
    assert used[20:30] == [1] * 10 and used[50:] == [2] * 10


def test_a_trial_at_one_batch_size_survives_steps_at_another():
    tuning = probed(2)
    sizes = [1] * 8 + [3] * 6 + [1] * 20  # the batch-of-one trial starts, a batch of three interrupts it
    chooser = DecodeThreads(tuning)
    serve(chooser, len(sizes), {1: 0.020, 2: 0.030}, batch_size=lambda step: sizes[step])
    assert tuning.batch_threads == {1: 1} and tuning.threads == 1
