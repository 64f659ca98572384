"""The training loop's small parts: the stopwatch that leaves validating and saving out of the training time, and the
typed tally a checkpoint carries as the same JSON as before it was typed."""

import json

import pytest

from peftsum.training.train import Stopwatch, Tally, TrainState


def test_the_stopwatch_reads_the_clock_once_a_reading_and_leaves_paused_time_out():
    readings = iter([100.0, 103.0, 110.0, 150.0, 152.0])
    watch = Stopwatch(lambda: next(readings), elapsed=5.0)  # started at 100 with 5 s carried over
    assert watch.elapsed() == 8.0
    with watch.paused() as at_pause:  # paused from 110 to 150
        assert at_pause == 15.0
    assert watch.elapsed() == 17.0  # 152 - 100 + 5 - 40


def test_a_checkpoints_state_is_the_json_it_always_was_and_loads_back():
    state = TrainState(step=7, epoch=2, position=1, tally=Tally(seconds=1.5, tokens=300, loss=2.25, steps=1),
                       log=[{"step": 7, "loss": 2.25}], epochs=[{"epoch": 1, "seconds": 9.0}])
    saved = json.dumps(state.saved())
    assert saved == ('{"step": 7, "epoch": 2, "position": 1, '
                     '"tally": {"seconds": 1.5, "tokens": 300, "loss": 2.25, "steps": 1}, '
                     '"log": [{"step": 7, "loss": 2.25}], "epochs": [{"epoch": 1, "seconds": 9.0}], "validation": []}')
    loaded = TrainState()
    loaded.load({**json.loads(saved), "total_steps": 12})  # a checkpoint's state.json holds more than the progress
    assert loaded == state


def test_a_checkpoint_from_before_validation_loads_and_a_damaged_tally_is_refused():
    old = {"step": 3, "epoch": 1, "position": 3, "tally": {"seconds": 0.5, "tokens": 90, "loss": 6.0, "steps": 3},
           "log": [], "epochs": []}
    state = TrainState()
    state.load(old)
    assert state.validation == [] and state.tally == Tally(0.5, 90, 6.0, 3)
    with pytest.raises(KeyError, match="steps"):  # checkpoint.reading turns it into one line naming the file
        TrainState().load({**old, "tally": {"seconds": 0.5, "tokens": 90, "loss": 6.0}})
