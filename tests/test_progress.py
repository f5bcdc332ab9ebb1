"""Console progress: items done of total, time spent and an ETA from this process's pace; and the
training metrics Flower logs per round."""

from __future__ import annotations

import pytest
from flwr.app import MetricRecord, RecordDict

from fedleak.report.progress import Progress, clock, parallel_eta
from fedleak.server.strategy import train_metrics


def test_eta_extrapolates_the_pace_of_this_process_only() -> None:
    now = [100.0]
    progress = Progress("round", total=10, already=4, now=lambda: now[0])
    assert progress.text() == "round 4/10 (0s)"  # nothing finished here yet: no ETA
    now[0] += 30.0
    progress.advance(6)  # two rounds in 30 s; four left
    assert progress.eta() == pytest.approx(60.0)
    assert progress.text() == "round 6/10 (30s, ETA 1m00s)"
    now[0] += 60.0
    progress.advance(10)
    assert progress.text() == "round 10/10 (1m30s)"
    assert (clock(59.6), clock(3725)) == ("1m00s", "1h02m")


def test_a_parallel_sweeps_eta_schedules_the_cells_left_on_its_workers() -> None:
    """The demo's two cells finish ten seconds apart; timed one after another, the first
    said "cells 1/2 (3m17s, ETA 3m17s)"."""
    assert parallel_eta(197.0, [187.0], 0, 2) == pytest.approx(10.0)
    assert parallel_eta(100.0, [120.0], 0, 2) == 0.0  # overdue: no negative time
    # Two workers, one cell at 40 s of 100, the other idle, three queued: the idle worker
    # takes one (done at 100), the busy one the next (160), the first the last (200).
    assert parallel_eta(100.0, [40.0], 3, 2) == pytest.approx(200.0)
    assert parallel_eta(100.0, [], 0, 2) == 0.0
    now = [0.0]
    running = [[150.0]]
    progress = Progress(
        "cells", 3, now=lambda: now[0], estimate=lambda: parallel_eta(200.0, running[0], 0, 2)
    )
    assert progress.text() == "cells 0/3 (0s)"  # nothing finished: no estimate asked
    now[0] += 200.0
    progress.advance()
    assert progress.text() == "cells 1/3 (3m20s, ETA 50s)"


def test_attacked_rounds_and_the_others_are_timed_apart() -> None:
    """One attacked round of a minute among rounds of a fifth of a second made the demo's
    first ETA 1h26m for five minutes' work."""
    now = [0.0]
    attacked = {1, 26, 50}
    progress = Progress("round", 50, now=lambda: now[0], kind=lambda r: r in attacked)
    now[0] += 60.0
    progress.advance(1)
    assert progress.eta() is None  # no unattacked round timed yet
    now[0] += 0.2
    progress.advance(2)
    assert progress.eta() == pytest.approx(46 * 0.2 + 2 * 60.0)
    assert progress.text() == "round 2/50 (1m00s, ETA 2m09s)"


def test_flower_aggregates_only_meaningful_training_metrics() -> None:
    def reply(partition: int, examples: int, loss: float) -> RecordDict:
        metrics = {"num-examples": examples, "partition-id": partition, "train-loss": loss}
        return RecordDict({"metrics": MetricRecord({**metrics, "batch-size": 2})})

    aggregated = train_metrics([reply(0, 1, 2.0), reply(7, 3, 1.0)], "num-examples")
    assert dict(aggregated) == {"num-examples": 4, "clients": 2, "train-loss": 1.25}
    # A client whose Poisson batch was empty has no loss: it weighs nothing in the mean.
    empty = train_metrics(
        [reply(0, 1, 2.0), reply(7, 3, 1.0), reply(2, 4, float("nan"))], "num-examples"
    )
    assert dict(empty) == {"num-examples": 8, "clients": 3, "train-loss": 1.25}


def test_a_run_without_attacks_times_every_round_as_one_kind() -> None:
    from fedleak.config import parse_flat
    from fedleak.simulations.study import _round_kind

    schedule = {"attack.rounds": "1", "num-server-rounds": 4}
    attacked = _round_kind(parse_flat(schedule))
    assert [attacked(r) for r in range(1, 5)] == [True, False, False, False]
    # 'none' parses to no names: no round is slower, so no round waits for another kind.
    off = _round_kind(parse_flat({**schedule, "attack.names": "none"}))
    assert len({off(r) for r in range(1, 5)}) == 1


def test_an_attack_bar_in_a_log_ends_on_a_line_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`attack.show-progress` into a pipe erased its bar with carriage returns and glued it to
    the round's line (audit CE3): off a terminal the bar is kept and ends with a newline."""
    import io

    from fedleak.attacks.progress import progress_bar

    log = io.StringIO()  # not a terminal
    monkeypatch.setattr("sys.stderr", log)
    bar = progress_bar(20, "ig", show=True)
    bar.update(20)
    bar.close()
    print("round 1/1", file=log)
    last = log.getvalue().rsplit("\r", 1)[-1]
    assert last.startswith("ig: 100%") and last.endswith("\nround 1/1\n")


def test_a_notebooks_attack_bar_stays_live(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a notebook `tqdm.auto` gives a widget bar and stderr is no terminal: the log
    file's 30-second bar would have frozen the widget for half a minute at a time."""
    import io

    import tqdm.auto
    import tqdm.autonotebook

    from fedleak.attacks.progress import progress_bar

    made: list[dict] = []

    class Widget:
        def __init__(self, **options: object) -> None:
            made.append(options)

    monkeypatch.setattr("sys.stderr", io.StringIO())
    monkeypatch.setattr(tqdm.autonotebook, "tqdm", Widget)  # what it picks in a notebook
    monkeypatch.setattr(tqdm.auto, "tqdm", Widget)
    progress_bar(20, "ig", show=True)
    assert made == [{"total": 20, "desc": "ig", "leave": False}]


def test_the_start_up_round_stops_counting_once_another_is_timed() -> None:
    """Round 1 of 50 clients took 22 s (Ray and its client actors starting), the others 0.5 s:
    "round 1/3 (22s, ETA 43s)" for a second's work, and the mean kept it (audit DB4)."""
    now = [0.0]
    progress = Progress("round", 10, now=lambda: now[0])
    now[0] += 22.0
    progress.advance()
    assert progress.eta() == pytest.approx(9 * 22.0)  # all there is to go by
    now[0] += 0.5
    progress.advance()
    assert progress.eta() == pytest.approx(8 * 0.5)
    now[0] += 1.5
    progress.advance()
    assert progress.eta() == pytest.approx(7 * 1.0)  # later rounds all count
