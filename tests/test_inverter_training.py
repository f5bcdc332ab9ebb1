"""The training loop and the on-disk store every learned attack shares."""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from fedleak.attacks.learned.store import InverterStore, InverterStoreError
from fedleak.attacks.learned.trainer import EpochTrainer


class Scripted(nn.Module):
    """A one-weight 'inverter' whose validation score is scripted per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.register_buffer("feature_mean", torch.zeros(1))

    def fit_standardisation(self, features: Tensor) -> None:
        self.feature_mean.copy_(features.mean(0))

    def forward(self, features: Tensor) -> Tensor:
        return features * self.weight


class ScriptedTrainer(EpochTrainer):
    """Each epoch moves the weight by one SGD step of size 1 towards +inf, and reports the
    next scripted score; `calls` records the epochs' pairs."""

    def __init__(self, scores: list[float], patience: int | None) -> None:
        inverter = Scripted()
        super().__init__(
            inverter,
            torch.optim.SGD(inverter.parameters(), lr=1.0),
            batch_size=4,
            patience=patience,
            cpu_gen=torch.Generator().manual_seed(0),
            score_name="score",
        )
        self.scores = iter(scores)
        self.calls: list[int] = []

    def epoch_pairs(self, epoch: int, deadline: float) -> tuple[Tensor, Tensor] | None:
        self.calls.append(epoch)
        return torch.full((4, 1), 2.0), torch.arange(4)

    def loss(self, features: Tensor, index: Tensor) -> Tensor:
        return -self.inverter(features).mean() / 2.0  # gradient -1 on the weight

    def score(self) -> float | None:
        return next(self.scores)


def run(trainer: EpochTrainer, epochs: int, seconds: float = 1e9):
    began = time.perf_counter()
    return trainer.run(epochs, began + seconds, began, False, "test")


def test_the_best_epochs_weights_are_kept() -> None:
    trainer = ScriptedTrainer([1.0, 3.0, 2.0, 0.5], patience=None)
    outcome = run(trainer, 4)
    assert (outcome.epochs, outcome.steps, outcome.pairs) == (4, 4, 16)
    assert outcome.score == 3.0 and outcome.stopped_by == "epochs"
    assert float(trainer.inverter.weight.detach()) == 2.0  # the weights after the second epoch
    assert float(trainer.inverter.feature_mean) == 2.0  # standardisation fitted at epoch 0


def test_patience_stops_after_epochs_without_improvement() -> None:
    trainer = ScriptedTrainer([1.0, 0.5, 0.7, 9.0], patience=2)
    outcome = run(trainer, 4)
    assert outcome.early_stopped and outcome.stopped_by == "early-stop"
    assert outcome.epochs == 3 and trainer.calls == [0, 1, 2]
    assert outcome.score == 1.0 and float(trainer.inverter.weight.detach()) == 1.0


def test_a_stop_inside_an_epoch_counts_the_steps_not_the_epoch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Epochs of 8 pairs in batches of 4: a stop (Ctrl-C, or the budget) after the third step
    # ends training half way through the second epoch.
    trainer = ScriptedTrainer([1.0, 2.0, 3.0], patience=None)
    trainer.epoch_pairs = lambda epoch, deadline: (torch.full((8, 1), 2.0), torch.arange(8))  # type: ignore[method-assign]
    checks = iter(range(100))
    monkeypatch.setattr("fedleak.attacks.learned.trainer.stop_requested", lambda: next(checks) >= 4)
    outcome = run(trainer, 3)
    assert outcome.timed_out and outcome.stopped_by == "seconds"
    assert (outcome.epochs, outcome.steps, outcome.pairs) == (1, 3, 12)


def test_a_continued_training_runs_the_epochs_it_had_left() -> None:
    trainer = ScriptedTrainer([1.0, 2.0, 3.0], patience=None)
    began = time.perf_counter()
    outcome = trainer.run(5, began + 1e9, began, False, "test", first_epoch=2)
    # Epochs 2, 3 and 4 (their schedule's), this call's 3 counted; standardisation is not
    # refitted after the first epoch of the whole training.
    assert trainer.calls == [2, 3, 4] and outcome.epochs == 3
    assert float(trainer.inverter.feature_mean) == 0.0


def test_a_spent_budget_trains_nothing_and_says_so() -> None:
    trainer = ScriptedTrainer([1.0], patience=None)
    outcome = run(trainer, 3, seconds=-1.0)
    assert outcome.timed_out and outcome.stopped_by == "seconds"
    assert outcome.epochs == 0 and math.isnan(outcome.score)


def test_pairs_the_budget_cut_short_end_the_training_before_their_epoch() -> None:
    """An epoch's pairs cost as many client computations as it has pairs: a budget spent
    while they were computed ends the training there (audit DV2)."""
    trainer = ScriptedTrainer([1.0, 2.0, 3.0], patience=None)
    built = trainer.epoch_pairs
    trainer.epoch_pairs = lambda epoch, deadline: None if epoch == 1 else built(epoch, deadline)  # type: ignore[method-assign]
    outcome = run(trainer, 3)
    assert outcome.timed_out and outcome.stopped_by == "seconds"
    assert (outcome.epochs, outcome.steps, outcome.score) == (1, 1, 1.0)


def test_store_round_trip_and_refusal_of_another_setting(tmp_path: Path) -> None:
    store = InverterStore(tmp_path / "state", "lti")
    inverter = Scripted()
    with torch.no_grad():
        inverter.weight.fill_(1.5)
    store.save(inverter, "setting-a", "weights-1", 3, {"val_psnr": 17.25})
    path = tmp_path / "state" / "lti-inverter-r000003.pt"
    assert store.file(3) == path and path.exists() and not path.with_suffix(".tmp").exists()
    saved = store.load("setting-a", torch.device("cpu"), before=4)
    assert saved is not None and saved.fingerprint == "weights-1"
    assert saved.score("val_psnr") == 17.25 and math.isnan(saved.score("val_token_acc"))
    assert float(saved.state_dict["weight"]) == 1.5 and saved.meta["round"] == 3
    assert store.load("setting-b", torch.device("cpu"), before=4) is None
    assert InverterStore(None, "lti").file(3) is None
    elsewhere = InverterStore(tmp_path / "elsewhere", "lti")
    assert elsewhere.load("setting-a", torch.device("cpu"), before=4) is None


def test_two_saves_of_one_round_write_through_temporary_files_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes saving one round shared `<file>.tmp`: one renamed the other's away and
    failed with FileNotFoundError (audit BF1)."""
    import fedleak.attacks.learned.store as store_module

    written = []
    mkstemp = store_module.tempfile.mkstemp

    def recorded(**kwargs: object) -> tuple[int, str]:
        handle, name = mkstemp(**kwargs)
        written.append(name)
        return handle, name

    monkeypatch.setattr(store_module.tempfile, "mkstemp", recorded)
    store = InverterStore(tmp_path, "lti")
    store.save(Scripted(), "setting-a", None, 1, {})
    first = (tmp_path / "lti-inverter-r000001.pt").read_bytes()
    store.save(Scripted(), "setting-a", None, 1, {})
    assert len(set(written)) == 2
    assert all(Path(p).parent == tmp_path and str(p).endswith(".tmp") for p in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lti-inverter-r000001.pt"]
    # The same inverter, the same bytes (the temporary name is not in the archive), and
    # readable by others as the run's other files.
    saved = tmp_path / "lti-inverter-r000001.pt"
    assert saved.read_bytes() == first
    assert saved.stat().st_mode & 0o777 == 0o644


def test_a_disk_that_refuses_the_inverter_stops_the_run_not_the_attack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk failed every later LTI call as an attack failure while the run went on to
    DONE (audit DE1): the save's error names the file and passes the attack runner."""
    import fedleak.attacks.learned.store as store_module
    from fedleak.attacks.types import StateNotSaved
    from fedleak.server import runner

    def full(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.tempfile, "mkstemp", full)
    store = InverterStore(tmp_path, "lti")
    with pytest.raises(StateNotSaved, match=r"No space left on device: .*lti-inverter-r000002\.pt"):
        store.save(Scripted(), "setting-a", None, 2, {})

    class Saving:
        name = "lti"

        def reconstruct(self, *args: object) -> None:
            store.save(Scripted(), "setting-a", None, 2, {})

    class Failing:
        name = "ig"

        def reconstruct(self, *args: object) -> None:
            raise OSError(28, "No space left on device")  # the attack's own: recorded

    empty = dict.fromkeys(["weights", "update", "per_sample_updates", "bn_statistics"])
    job = SimpleNamespace(observation=SimpleNamespace(round=2, client_id=0, **empty), attack="lti")
    knowledge = SimpleNamespace(seed=0, aux_inputs=torch.zeros(1), aux_labels=torch.zeros(1))
    with pytest.raises(StateNotSaved):
        runner.run_job(job, Saving(), knowledge, None)  # type: ignore[arg-type]
    failed = runner.run_job(job, Failing(), knowledge, None)  # type: ignore[arg-type]
    assert failed.reconstruction.status == "failed"


def test_a_resume_goes_on_from_the_round_before_the_one_it_attacks(tmp_path: Path) -> None:
    # Rounds 1, 2 and 3 trained; round 3 was interrupted (its round never recorded). A resume
    # attacking round 3 again must start from round 2's inverter, as the uninterrupted run did.
    store = InverterStore(tmp_path, "lti")
    for round_ in (1, 2, 3):
        inverter = Scripted()
        with torch.no_grad():
            inverter.weight.fill_(float(round_))
        store.save(inverter, "setting-a", f"weights-{round_}", round_, {})
    resumed = store.load("setting-a", torch.device("cpu"), before=3)
    assert resumed is not None and float(resumed.state_dict["weight"]) == 2.0
    later = store.load("setting-a", torch.device("cpu"), before=5)
    assert later is not None and float(later.state_dict["weight"]) == 3.0
    # Under a worker pool, LTI trains round 4 while round 2 is the last recorded (round 3's
    # other attacks still run): a resume attacking round 3 still needs round 2's file.
    store.save(Scripted(), "setting-a", "weights-4", 4, {})
    assert [r for r, _ in store.saved()] == [2, 3, 4]
    resumed = store.load("setting-a", torch.device("cpu"), before=3)
    assert resumed is not None and float(resumed.state_dict["weight"]) == 2.0
    assert store.load("setting-a", torch.device("cpu"), before=2) is None
    # A file of an earlier version (one per run) still resumes, as round 0.
    legacy = InverterStore(tmp_path / "old", "lti")
    legacy.save(Scripted(), "setting-a", None, 1, {})
    (tmp_path / "old" / "lti-inverter-r000001.pt").rename(tmp_path / "old" / "lti-inverter.pt")
    assert legacy.load("setting-a", torch.device("cpu"), before=1) is not None


def test_store_loads_tensors_only(tmp_path: Path) -> None:
    """A saved file that carries arbitrary Python objects is refused (weights_only)."""
    store = InverterStore(tmp_path, "lti")
    path = store.file(1)
    assert path is not None
    torch.save({"state_dict": {}, "meta": {"key": "k", "payload": Path("x")}}, path)
    with pytest.raises(InverterStoreError, match="UnpicklingError: Weights only load failed") as e:
        store.load("k", torch.device("cpu"), before=2)
    message = str(e.value)
    assert "\n" not in message and message.endswith("start the run again in a new out-dir")
    # Cut at a word, not inside one.
    assert " ...); the run's later rounds go on from it" in message
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InverterStoreError, match=r"lti-inverter-r000001\.pt: unreadable"):
        store.load("k", torch.device("cpu"), before=2)


@pytest.mark.parametrize("refresh", ["retrain", "finetune", "frozen"])
def test_a_training_cut_short_goes_on_in_the_next_call_at_the_same_weights(
    refresh: str,
) -> None:
    # The time budget cut the first client's training after 3 of 10 epochs. `retrain` then
    # started again from scratch in every call (cut again each time) and `frozen` kept the
    # cut inverter for the whole run; every refresh now goes on from epoch 4, once.
    from fedleak.attacks.learned.keeper import InverterKeeper
    from fedleak.attacks.learned.trainer import TrainingOutcome

    calls: list[tuple[bool, int]] = []

    def train(inverter: nn.Module, warm: bool, first_epoch: int) -> TrainingOutcome:
        calls.append((warm, first_epoch))
        cut = len(calls) == 1
        done = 3 if cut else 10 - first_epoch
        return TrainingOutcome(done, done, 4 * done, 1.0, 12.0, cut, False)

    keeper = InverterKeeper(InverterStore(None, "lti"), refresh, "val_psnr")
    cpu = torch.device("cpu")
    first = keeper.current("setting", "weights-1", 1, cpu, Scripted, train)
    second = keeper.current("setting", "weights-1", 1, cpu, Scripted, train)
    third = keeper.current("setting", "weights-1", 1, cpu, Scripted, train)
    assert calls == [(False, 0), (False, 3)]
    assert first.outcome.timed_out and second.continued == 3 and third.outcome is None
    assert second.inverter is first.inverter  # the same weights went on training
    _, how, _ = keeper.account(second, lambda psnr: f"{psnr:.1f} dB")
    assert "cut short by the time budget in an earlier call, continued from epoch 4" in how


@pytest.mark.parametrize("refresh", ["retrain", "finetune"])
def test_a_training_stopped_by_ctrl_c_is_not_reused_as_trained(refresh: str) -> None:
    """A call interrupted while training at new weights left a fresh (retrain) or half-tuned
    (finetune) inverter under the old weights' key: the next call at those weights reused it
    as "trained at these weights" (audit DV1). It now trains again, from scratch."""
    from fedleak.attacks.learned.keeper import InverterKeeper
    from fedleak.attacks.learned.trainer import TrainingOutcome

    calls: list[tuple[bool, int]] = []

    def train(inverter: nn.Module, warm: bool, first_epoch: int) -> TrainingOutcome:
        calls.append((warm, first_epoch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return TrainingOutcome(5, 5, 20, 1.0, 12.0, False, False)

    keeper = InverterKeeper(InverterStore(None, "lti"), refresh, "val_psnr")
    cpu = torch.device("cpu")
    first = keeper.current("setting", "weights-1", 1, cpu, Scripted, train)
    with pytest.raises(KeyboardInterrupt):
        keeper.current("setting", "weights-2", 2, cpu, Scripted, train)
    again = keeper.current("setting", "weights-1", 1, cpu, Scripted, train)
    assert first.outcome is not None and again.outcome is not None
    assert calls[-1] == (False, 0) and again.inverter is not first.inverter
    _, how, _ = keeper.account(again, lambda psnr: f"{psnr:.1f} dB")
    assert "trained from scratch" in how and "reused" not in how


def test_a_training_the_budget_ended_before_its_first_epoch_says_so() -> None:
    """It read "too few auxiliary samples held out" with 120 held out (audit DV3)."""
    from fedleak.attacks.learned.keeper import InverterKeeper
    from fedleak.attacks.learned.trainer import TrainingOutcome

    def train(inverter: nn.Module, warm: bool, first_epoch: int) -> TrainingOutcome:
        return TrainingOutcome(0, 0, 0, 1.3, math.nan, True, False)

    keeper = InverterKeeper(InverterStore(None, "lti"), "finetune", "val_psnr")
    cut = keeper.current("setting", "weights-1", 1, torch.device("cpu"), Scripted, train)
    _, how, _ = keeper.account(cut, lambda psnr: f"{psnr:.1f} dB")
    assert "0 epochs, validation none (no epoch finished)" in how and "held out" not in how


def test_a_cache_folder_that_cannot_be_made_stops_the_call_before_training(
    tmp_path: Path,
) -> None:
    """A `cache-dir` through a file was refused only after the whole training, naming a file
    inside it (audit DV5)."""
    from fedleak.attacks.learned.keeper import InverterKeeper
    from fedleak.attacks.types import StateNotSaved

    (tmp_path / "a-file").write_text("")
    keeper = InverterKeeper(InverterStore(tmp_path / "a-file", "lti"), "finetune", "val_psnr")

    def train(inverter: nn.Module, warm: bool, first_epoch: int) -> None:
        raise AssertionError("trained although its inverter could not be saved")

    with pytest.raises(StateNotSaved) as error:
        keeper.current("setting", "weights-1", 1, torch.device("cpu"), Scripted, train)
    assert str(error.value).endswith(f"'{tmp_path / 'a-file'}'")


def test_a_saved_inverter_that_does_not_fit_fails_every_call_naming_its_file(
    tmp_path: Path,
) -> None:
    """Audit BF3: a file saved under this setting's key but holding another architecture's
    weights failed the first call with torch's cut-off message, and every later call then
    trained from scratch without a word."""
    from fedleak.attacks.learned.keeper import InverterKeeper
    from fedleak.attacks.learned.store import InverterStoreError

    class Wider(Scripted):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3))

    store = InverterStore(tmp_path, "lti")
    store.save(Wider(), "setting", "weights-1", 1, {"val_psnr": 10.0})
    keeper = InverterKeeper(store, "finetune", "val_psnr")

    def train(inverter: nn.Module, warm: bool, first_epoch: int) -> None:
        raise AssertionError("a run must not train anew over its saved inverter")

    for _ in range(2):
        with pytest.raises(InverterStoreError, match=r"lti-inverter-r000001\.pt: does not fit"):
            keeper.current("setting", "weights-2", 2, torch.device("cpu"), Scripted, train)


def test_a_folder_removed_mid_run_is_not_made_again_for_an_inverter(tmp_path: Path) -> None:
    """The store made a run folder removed mid-run again for its inverter, which then blocked
    the next run in that folder (audit DZ1), also from a cache-dir inside it (EC3); a user's
    cache-dir elsewhere is made whenever it is missing, before or after a first save (EB1)."""
    import functools
    import shutil

    import fedleak.attacks.learned.store as store_module
    from fedleak.attacks.types import StateNotSaved
    from fedleak.config import RunConfig
    from fedleak.report.rundir import CONFIG_FILE, RunDirectory

    mine = tmp_path / "caches" / "mine"
    InverterStore(mine, "lti").save(Scripted(), "setting-a", None, 1, {})  # made, not there
    new = InverterStore(mine, "lti")  # built while it is there
    shutil.rmtree(mine)
    for round_ in (1, 2):
        new.prepare()
        new.save(Scripted(), "setting-a", None, round_, {})
        assert (mine / f"lti-inverter-r00000{round_}.pt").is_file()
        shutil.rmtree(mine)
    assert CONFIG_FILE == store_module.RUN_CONFIG_FILE
    # The run's own state folder, or a cache-dir inside the run folder (audit EC3).
    for inside in (Path("state") / "lti", Path("inverters")):
        run = RunDirectory.create(tmp_path / "run", RunConfig(), {})
        store = InverterStore(run.path / inside, "lti")
        shutil.rmtree(tmp_path / "run")
        saving = functools.partial(store.save, Scripted(), "setting-a", None, 1, {})
        for save in (store.prepare, saving):
            with pytest.raises(
                StateNotSaved, match=r"removed during the run, so not made again: .*/run"
            ):
                save()
        assert not (tmp_path / "run").exists()
