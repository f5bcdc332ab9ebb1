"""The benchmark harness (`benchmarks/timing.py`) refuses ratios it cannot stand behind."""

from __future__ import annotations

import functools
import importlib.util
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "timing.py"
_SPEC = importlib.util.spec_from_file_location("bench_timing", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
timing = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = timing  # dataclasses look their module up
_SPEC.loader.exec_module(timing)


def test_a_steady_pair_gives_the_median_of_paired_ratios():
    ratio = timing.Ratio(
        timing.Series("a", (1.0, 2.0, 1.1, 1.05)), timing.Series("b", (2.0, 4.0, 2.0, 2.0))
    )
    assert ratio.problem() is None
    assert ratio.median == pytest.approx(0.5125)
    assert ratio.of_minima == pytest.approx(0.5)
    assert ratio.text().startswith("0.51 (ratio of minima 0.50, 4 rounds)")


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ((1.0, -0.2, 1.0), "<= 0 or not finite"),
        ((1.0, math.nan, 1.0), "<= 0 or not finite"),
        ((1.0, 1.0), "fewer than 3"),
    ],
)
def test_an_invalid_series_gets_no_ratio(values, reason):
    ratio = timing.Ratio(timing.Series("a", values), timing.Series("b", (1.0,) * len(values)))
    assert reason in ratio.problem()
    assert ratio.text().startswith("no ratio: a:")


def test_scattered_paired_ratios_are_refused():
    ratio = timing.Ratio(
        timing.Series("a", (1.0, 5.0, 1.0, 5.0)), timing.Series("b", (1.0, 1.0, 1.0, 1.0))
    )
    assert "scatter too much" in ratio.problem()


def test_three_rounds_are_judged_by_their_range():
    """Quartiles of three values are half their range: a ratio moved 0.72 -> 0.95 by a load
    burst passed (audit DA3)."""
    ratio = timing.Ratio(timing.Series("a", (1.0, 1.8, 1.0)), timing.Series("b", (1.0, 1.0, 1.0)))
    assert "scatter too much (range 0.80 around a median of 1.00)" in ratio.problem()


def test_a_series_whose_fastest_round_is_a_fraction_of_its_median_is_refused():
    """DLG's difference of two runs printed 0.024 / 29.113 ms as min / median (audit DA3)."""
    noise = timing.Series("one after another", (0.024e-3, 29.1e-3, 30.2e-3))
    assert "its median round took 1212.5x its fastest" in noise.problem()
    assert noise.text() == "one after another: invalid"


def test_a_negative_difference_of_runs_is_recorded_as_not_a_number():
    seconds = {10: timing.Reading(2.0, 1.0), 20: timing.Reading(1.5, 2.0)}
    measure = timing.per_unit(seconds.__getitem__, 10, 20)
    reading = measure()
    assert math.isnan(reading.wall) and reading.cpu == pytest.approx(0.1)


def test_a_wall_difference_below_its_cpu_time_per_thread_is_not_a_number(monkeypatch):
    """A short run slowed by load left 2.2 ms of wall time beside 3.6 ms of CPU on one thread,
    printed as the variant's minimum (audit EE6)."""
    monkeypatch.setattr(timing.torch, "get_num_threads", lambda: 1)
    seconds = {10: timing.Reading(1.0, 1.0), 20: timing.Reading(1.022, 1.036)}
    reading = timing.per_unit(seconds.__getitem__, 10, 20)()
    assert math.isnan(reading.wall) and reading.cpu == pytest.approx(0.0036)
    monkeypatch.setattr(timing.torch, "get_num_threads", lambda: 2)  # two threads can spend it
    assert timing.per_unit(seconds.__getitem__, 10, 20)().wall == pytest.approx(0.0022)


def test_bench_heap_takes_its_difference_by_the_same_rule(monkeypatch):
    """bench_heap took its own difference without the rule: a stalled short run's 0.88 ms
    passed as the minimum (audit EZ1)."""
    monkeypatch.syspath_prepend(str(_PATH.parent))
    heap = importlib.import_module("bench_heap")
    short, long = timing.Reading(1.0, 1.0), timing.Reading(1.022, 1.036)
    monkeypatch.setattr(heap, "clock", lambda work: [short, short, long][len(calls) - 1])
    calls: list[int] = []
    monkeypatch.setattr(heap, "InlineRunner", _FakeRunner.factory(calls))
    monkeypatch.setattr(heap, "round_of", lambda *args: ([], None))
    monkeypatch.setattr(heap, "SHORT", 10)
    monkeypatch.setattr(heap, "LONG", 20)
    monkeypatch.setattr(heap.torch, "get_num_threads", lambda: 1)
    result = heap.one_process(1)
    assert math.isnan(result["wall"]) and result["cpu"] == pytest.approx(0.0036)


class _FakeRunner:
    """An attack runner that records its construction and runs nothing."""

    @staticmethod
    def factory(calls: list[int]):
        def make(*args, **kwargs):
            calls.append(1)
            return _FakeRunner()

        return make

    def ready(self):
        return []


def test_a_garbage_collection_falls_outside_every_measured_call():
    """A collection of 0.1-0.2 s fell in the same round of every run of bench_text.py and
    refused its per-sample ratios, blaming the load (audit EZ2)."""
    import gc

    seen = []
    timing.clock(lambda: seen.append(gc.isenabled()))
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        timing.clock(lambda: None)
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()


@pytest.mark.parametrize(
    ("script", "argv", "says"),
    [
        ("bench_vs_breaching.py", ["--profile", "-5"], "--profile: '-5': expected a whole number"),
        ("bench_vs_breaching.py", ["--threads", "0"], "--threads: '0': expected a whole number"),
        ("bench_attacks.py", ["--rounds", "2"], "'2': expected a whole number >= 3"),
        ("bench_lti.py", ["--pairs", "2"], "--pairs: '2': expected a whole number >= 4"),
        ("bench_scale.py", ["--worker-cpus", "-1"], "'-1': expected a finite number > 0"),
        ("bench_threads.py", ["--load", "-1"], "--load: '-1': expected a whole number >= 1"),
        # fedleak's own refusal, once a traceback (audit EZ3).
        ("bench_demo.py", ["--out", __file__], "bench_demo: error: RunDirectoryError: "),
        ("gpu_utilisation.py", [], "usage: gpu_utilisation.py UTIL_CSV MARKS_TXT"),
        ("gpu_utilisation.py", ["/nowhere/u.csv", __file__], "error: /nowhere/u.csv: no such"),
        ("gpu_utilisation.py", ["/", __file__], "gpu_utilisation: error: /: not a file"),
    ],
)
def test_odd_arguments_are_refused_in_one_line_before_any_work(script, argv, says):
    """A negative profile length printed a negative time; 0 threads and 2 pairs ended in
    tracebacks; 2 rounds measured in full to refuse every ratio (audit EE3-EE5)."""
    done = subprocess.run(
        [sys.executable, str(_PATH.parent / script), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_model_that_cannot_be_built_ends_a_benchmark_in_one_line():
    done = subprocess.run(
        [sys.executable, str(_PATH.parent / "bench_text.py"), "--vocab", "1", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("bench_text: error: ModelSpecError: model 'transformer3'")
    assert len(done.stderr.strip().splitlines()) == 1


def test_interleave_rotates_the_order_and_marks_invalid_rounds():
    calls: list[str] = []

    def variant(name: str, fail_at: int | None = None):
        def run() -> timing.Reading:
            calls.append(name)
            if fail_at is not None and calls.count(name) == fail_at:
                raise timing.InvalidMeasurement("short run slower than the long one")
            return timing.Reading(1.0, 1.0)

        return run

    series = timing.interleave({"x": variant("x", fail_at=3), "y": variant("y")}, 3, warmup=1)
    assert calls == ["x", "y", "x", "y", "y", "x", "x", "y"]
    assert math.isnan(series["x"].values[1]) and series["x"].problem() is not None
    assert series["y"].problem() is None


def test_a_rate_reads_the_fastest_and_the_median_round_and_refuses_bad_ones():
    series = timing.Series("pairs", (0.5, 2.0, 1.0))
    assert series.rate(100).split() == ["200.0", "/", "100.0"]
    broken = timing.Series("pairs", (0.5, -1.0, 1.0))
    assert broken.rate(100) == f"invalid ({broken.problem()})"


def test_gpu_utilisation_groups_nvidia_smi_samples_by_benchmark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _PATH.parent / "gpu_utilisation.py"
    spec = importlib.util.spec_from_file_location("gpu_utilisation", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    util = tmp_path / "util.csv"
    util.write_text(
        "2026/12/02 10:00:00.000, 10, 500\n"
        "2026/12/02 10:00:01.000, 90, 900\n"
        "2026/12/02 10:00:02.000, 70, 800\n"
        "2026/12/02 10:00:0"  # cut when the sampler stopped
    )
    start = module.datetime(2026, 12, 2, 10, 0, 0, 500000).timestamp()
    marks = tmp_path / "marks.txt"
    marks.write_text(
        f"attacks start {start}\nattacks end {start + 2}\nlti start {start + 5}\n"
        f"lti begin {start + 6}\nlti en"
    )  # a mark of another kind, and the last line cut when the session stopped (EZ4, FA2)
    util.write_bytes(util.read_bytes() + b"\n\xff\xfe binary\n")  # not UTF-8 (audit FA1)
    assert module.main([str(util), str(marks)]) is None
    out = capsys.readouterr().out
    assert "attacks: 2 s, 2 samples, utilisation mean 80% median 80% max 90%" in out
    assert "memory max 900 MiB" in out and "lti" not in out  # no end mark: not summarised


def test_the_attacks_run_without_tqdm_when_no_bar_is_shown():
    """The GPU session's benchmarks run on a machine's bare torch, numpy and scipy: the
    optimiser and the inverter's trainer imported tqdm for a bar they did not show."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["tqdm"] = sys.modules["tqdm.auto"] = None  # as if not installed
        import torch
        from torch import nn
        import fedleak
        import fedleak.attacks.learned.trainer

        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        x, y = torch.rand(1, 1, 2, 2), torch.tensor([1])
        grads = torch.autograd.grad(
            nn.functional.cross_entropy(model(x), y), model.parameters()
        )
        observation = fedleak.observe(model, grads, input_shape=(1, 2, 2), num_examples=1)
        result = fedleak.reconstruct(fedleak.build_attack("ig"), observation, max_iterations=3)
        print(result.status)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "ok"


def test_asking_for_cuda_where_there_is_none_stops_the_benchmark(monkeypatch) -> None:
    """`--devices cuda` on a machine without CUDA measured nothing and exited 0 (or failed
    with a traceback): a GPU session's logs would look clean (audit AR3)."""
    monkeypatch.setattr(timing.torch.cuda, "is_available", lambda: False)
    assert timing.chosen_devices(None) == ["cpu"]
    assert timing.chosen_devices("cpu") == ["cpu"]
    assert str(timing.chosen_device(None)) == "cpu"
    for asked in ("cuda", "cpu,cuda"):
        with pytest.raises(SystemExit, match=f"--devices='{asked}': torch .* sees no CUDA"):
            timing.chosen_devices(asked)
    with pytest.raises(SystemExit, match=r"--device='cuda': torch .* sees no CUDA"):
        timing.chosen_device("cuda")
    with pytest.raises(SystemExit, match="expected cpu, cuda or cpu,cuda"):
        timing.chosen_devices("gpu")
    monkeypatch.setattr(timing.torch.cuda, "is_available", lambda: True)
    assert timing.chosen_devices(None) == ["cpu", "cuda"]
    assert timing.chosen_devices("cuda") == ["cuda"]


def test_a_pool_study_with_failed_attack_jobs_is_no_measurement(tmp_path, capsys) -> None:
    """bench_scale stopped with a RuntimeError when one study's attack jobs failed, losing
    the other variants' times (audit AR5): that study's time is invalid, the rest print."""
    path = _PATH.parent / "bench_scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def study(out, num_clients, **flat):
        failed = 1 if flat["attack.workers"] == 2 else 0
        return {"wall": 2.0 - 0.5 * (flat["attack.workers"] == 1), "jobs": 4, "failed": failed}

    module.study = study
    module.ray_init_args = lambda *args, **kwargs: {}  # as on a machine with room for both
    args = module.argparse.Namespace(
        clients=2, rounds=1, iterations=5, workers=[1, 2], worker_cpus=1.0, repeats=3
    )
    module.attacks_inline_vs_pool(tmp_path, args)
    out = capsys.readouterr().out
    assert "1 attack jobs failed with 2 workers" in out
    assert "pool x2: invalid" in out and "wall-time ratio pool x2 / inline: no ratio" in out
    assert "wall-time ratio pool x1 / inline: 0.75" in out


def test_a_pool_the_machine_cannot_hold_is_skipped_not_a_traceback(tmp_path, capsys) -> None:
    """`make bench-scale` on 2 cores ran inline and one worker, then raised on two workers of
    one CPU each and printed nothing it had measured (audit BJ2)."""
    path = _PATH.parent / "bench_scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.study = lambda out, num_clients, **flat: {"wall": 1.0, "jobs": 4, "failed": 0}
    module.ray_init_args = functools.partial(module.ray_init_args, cpus=2)
    args = module.argparse.Namespace(
        clients=2, rounds=1, iterations=5, workers=[1, 2], worker_cpus=1.0, repeats=3
    )
    module.attacks_inline_vs_pool(tmp_path, args)
    out = capsys.readouterr().out
    assert "pool x2: skipped, attack.workers=2 x attack.worker-cpus=1 (and GPU shares)" in out
    assert "wall-time ratio pool x1 / inline: 1.00" in out and "pool x2 /" not in out
