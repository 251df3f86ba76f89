"""Step schedules: warm-up, cosine, and the prior's halving on plateaus of the smoothed training loss."""

import math

import pytest

from megadalle.engine.schedules import LRSchedule, cosine


def run(s: LRSchedule, losses: list[float], start: int = 0) -> list[float]:
    """The lr of each update from `start` on, feeding each update's loss after it (as train.py does)."""
    lrs = []
    for step, loss in enumerate(losses, start):
        lrs.append(s.lr(step))
        s.observe(step, loss)
    return lrs


def test_warmup_then_cosine():
    s = LRSchedule("cosine", 1.0, warmup=4, floor=0.1, decay_steps=10)
    assert [s.lr(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.lr(4) == 1.0 and s.lr(9) == pytest.approx(cosine(5, 1.0, 0.1, 10)) and s.lr(14) == 0.1 and s.lr(99) == 0.1


def test_plateau_halves_only_after_patience_without_improvement():
    s = LRSchedule("plateau", 1.0, warmup=2, patience=3, threshold=0.01, smoothing=0.0)  # smoothing 0: raw loss
    losses = [9, 9, 5, 4, 3, 3, 3, 3, 3, 2, 2, 2, 2]
    lrs = run(s, losses)
    # warm-up ignores losses; 5, 4, 3 improve; three updates at 3 without improvement -> halve after the third
    assert lrs[:9] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5]
    assert s.state.halvings == 2  # then 2 improves once, stalls three times -> halved again
    assert lrs[-1] == 0.5 and s.lr(len(losses)) == 0.25


def test_plateau_stops_after_max_halvings_and_ignores_non_finite_losses():
    s = LRSchedule("plateau", 1.0, patience=1, smoothing=0.0, max_halvings=5)
    run(s, [1.0] * 50 + [math.nan, math.inf])
    assert s.state.halvings == 5 and s.lr(60) == 1 / 32
    assert s.state.smoothed == 1.0


def test_plateau_uses_the_smoothed_loss_and_is_deterministic():
    """One lucky low loss must not count as progress: on the raw loss it becomes an unbeatable best and the
    steadily improving run is halved; on the smoothed loss it is not."""
    losses = [3 - 0.01 * i for i in range(100)]
    losses[5] = 1.0
    smooth = LRSchedule("plateau", 1.0, patience=20, threshold=1e-4, smoothing=0.95)
    raw = LRSchedule("plateau", 1.0, patience=20, threshold=1e-4, smoothing=0.0)
    lrs = run(smooth, losses)
    assert lrs == run(LRSchedule("plateau", 1.0, patience=20, threshold=1e-4, smoothing=0.95), losses)
    run(raw, losses)
    assert smooth.state.halvings == 0 and set(lrs) == {1.0}
    assert raw.state.halvings == 1


def test_state_round_trip_resumes_the_same_schedule():
    """Stop after the first halving, resume from the saved state: the same lrs as the uninterrupted run, and a
    schedule restarted without the state would differ."""
    losses = [5, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 3]
    make = lambda: LRSchedule("plateau", 1.0, patience=2, smoothing=0.0)  # noqa: E731
    whole = run(make(), losses)
    assert len(set(whole)) >= 3, whole  # halved at least twice
    first = make()
    head = run(first, losses[:5])
    assert first.state.halvings == 1
    second = make()
    second.load_state_dict(first.state_dict())
    assert head + run(second, losses[5:], start=5) == whole
    assert head + run(make(), losses[5:], start=5) != whole


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="'linear' is not one of constant, cosine, plateau"):
        LRSchedule("linear", 1.0)
