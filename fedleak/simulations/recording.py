"""The run directory of a study, written as its rounds end: the curious server's records kept.

`RunRecorder` is the `RoundSink` (`fedleak.server.rounds`) a study's `CuriousStrategy` reports
to: it saves each scored job's images as the job is scored, and once a round has ended and all
of its attack jobs are scored (a worker pool finishes them while the next round trains) writes
the round's leakage rows and utility row, the global checkpoint and a console line.
The helpers here describe the run for its directory (environment, data provenance, its path).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import math
import platform
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from fedleak.config import ConfigError, RunConfig
from fedleak.data import FederatedData
from fedleak.data.content import data_fingerprint
from fedleak.data.registry import dataset_modality
from fedleak.metrics.lpips import lpips_status, lpips_warning
from fedleak.report.lock import RunLock
from fedleak.report.progress import Progress
from fedleak.report.rundir import (
    ATTACK_SETTINGS_KEY,
    LOCK_FILE,
    Accounting,
    RunDirectory,
    RunDirectoryError,
    console_line,
)
from fedleak.report.texts import save_token_pairs
from fedleak.server.privacy import PrivacyLedger, uncounted_noise
from fedleak.server.provenance import attack_settings, plugin_sources
from fedleak.server.rounds import RoundLog, Row, ScoredJob
from fedleak.server.validate import (
    hidden_batchnorm_statistics,
    ineffective_settings,
    unused_batchnorm_prior,
    unused_public_pool,
    uses_batchnorm,
)


def default_run_dir(config: RunConfig, root: Path | None = None) -> Path:
    """`runs/<time>-<name>` under `root` (the current directory by default), absolute.

    `name` is a safe slug (`fedleak.config.NAME_PATTERN`); the check below keeps a name that
    bypassed the configuration's rule from leaving `runs/` all the same."""
    runs = ((root or Path.cwd()) / "runs").resolve()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = (runs / f"{stamp}-{config.name}").resolve()
    if path.parent != runs:
        raise ConfigError(f"name={config.name!r}: expected one folder name inside {runs}")
    return path


def claim_run_dir(path: Path) -> Path:
    """`path`, made here, or where another process made it first (two runs started in the same
    second name the same `default_run_dir`, and one was refused as in use, audit ED4) the first
    of `path-2`, `path-3`, ... that this process makes."""
    candidate, attempt = path, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            attempt += 1
            candidate = path.with_name(f"{path.name}-{attempt}")
        except OSError as error:
            raise RunDirectoryError(
                f"{candidate}: cannot be created ({error.strerror}); choose an out-dir"
            ) from None


def release_claimed(path: Path) -> None:
    """Remove a folder `claim_run_dir` made for a run that was then refused: it holds nothing
    but its released lock file, and later checks would take it for a run's folder (audit
    EJ4). Anything else in it is kept."""
    with contextlib.suppress(OSError):
        if {entry.name for entry in path.iterdir()} <= {LOCK_FILE} and not RunLock(path).holder():
            (path / LOCK_FILE).unlink(missing_ok=True)
            path.rmdir()


def data_record(fd: FederatedData) -> dict[str, object]:
    """Where the data came from, a digest of what it held (a resume checks it) and, for text,
    which tokenizer the federation uses."""
    record: dict[str, object] = {
        "source": fd.dataset.source,
        "modality": fd.dataset.modality,
        "fingerprint": data_fingerprint(fd.dataset),
    }
    tokenizer = getattr(fd.dataset, "tokenizer", None)
    if tokenizer is not None:
        record["tokenizer"] = tokenizer.record()
        unknown = tokenizer.unknown_warning(fd.dataset.train_x)
        if unknown is not None:  # the report repeats it beside the token scores
            record["tokenizer"]["warning"] = unknown
        record["seq_len"] = fd.dataset.input_shape[0]
    return record


def scored_lpips_nets(config: RunConfig) -> tuple[str, ...]:
    """The LPIPS backbones the run scores with: none on text, where LPIPS does not apply (so a
    text run neither warns about nor records missing image weights)."""
    return config.metrics.lpips_nets if dataset_modality(config.data.dataset) == "image" else ()


def setup_warnings(config: RunConfig, fd: FederatedData) -> list[str]:
    """What a run warns about before its first round, and `fedleak check` with it: LPIPS
    weights it cannot load, a BPE vocabulary short of `data.vocab-size`, a tokenizer that
    turns much of the text into its unknown token, DP-SGD without a reported ε, a BatchNorm
    prior with no BatchNorm to match, BatchNorm statistics the attacks leave unused, settings
    the run never reads or a public pool it never mixes from."""
    tokenizer = getattr(fd.dataset, "tokenizer", None)
    warnings = [
        lpips_warning(scored_lpips_nets(config)),
        PrivacyLedger.from_config(config, fd).warning,
        uncounted_noise(config),
        unused_batchnorm_prior(config, fd),
        hidden_batchnorm_statistics(config, fd),
        ineffective_settings(config, fd),
        unused_public_pool(config),
        tokenizer.shortfall(config.data.vocab_size) if tokenizer is not None else None,
        tokenizer.unknown_warning(fd.dataset.train_x) if tokenizer is not None else None,
    ]
    return [warning for warning in warnings if warning]


@functools.cache
def source_fingerprint() -> str:
    """A hash of fedleak's own Python files: its version number stays the same across changes
    that move a run's bits (an attack's seed stream, a kernel), so a resume compares this."""
    root = Path(__import__("fedleak").__file__).parent
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def software() -> dict[str, str]:
    """The code a run computes with, as environment.json records it."""
    import flwr

    return {
        "fedleak": __import__("fedleak").__version__,
        "fedleak_source": source_fingerprint(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
    }


def changed_software(recorded: Mapping[str, object], config: RunConfig) -> list[str]:
    """What of `software()` and of the plug-ins' sources differs from a run's environment.json,
    as 'torch 2.14.0 -> 2.14.1' or 'attack blur source 1f2e... -> 9a8b...'."""
    changed = [
        f"{key} {recorded.get(key, 'unrecorded')} -> {value}"
        for key, value in software().items()
        if recorded.get(key) != value
    ]
    before = recorded.get("plugins")
    if not isinstance(before, dict):  # a folder from before plug-ins were recorded (DP6)
        return changed
    now = plugin_sources(config)
    for what in sorted(set(before) | set(now)):
        if before.get(what) != now.get(what):
            was, is_ = before.get(what, "unrecorded"), now.get(what, "none")
            changed.append(f"{what} source {was} -> {is_}")
    return changed


def model_record(config: RunConfig, fd: FederatedData) -> dict[str, object]:
    """What the report says of the model: whether it has BatchNorm (whose running statistics
    the clients send, `hidden_batchnorm_statistics`)."""
    return {"batchnorm": uses_batchnorm(config, fd)}


def environment(
    device: torch.device,
    config: RunConfig,
    data: dict[str, object] | None = None,
    model: dict[str, object] | None = None,
) -> dict[str, object]:
    """Versions, device, seed, the data's provenance and the model's, where LPIPS's weights
    came from: what a reader needs to reproduce the run."""
    return {
        **software(),
        "platform": platform.platform(),
        "device": str(device),
        "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "seed": config.seed,
        "lpips": lpips_status(scored_lpips_nets(config)),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        **({"data": data} if data is not None else {}),
        **({"model": model} if model is not None else {}),
        "plugins": plugin_sources(config),  # {} without plug-ins: recorded all the same
        ATTACK_SETTINGS_KEY: attack_settings(config),
    }


@dataclass(frozen=True)
class _EndedRound:
    """A round that ended and waits for the rest of its attack jobs to be recorded."""

    log: RoundLog
    seconds: float  # wall time from the previous round's end to this one's
    state: dict[str, torch.Tensor]  # the global model after the round, on the CPU


class RunRecorder:
    """Keeps a study's rounds in its run directory (see the module docstring).

    A round is written, rows, utility and checkpoint, only once every attack job submitted on
    it is scored, and rounds are written in order: the checkpoint is always the state after
    the last round whose leakage is complete, so an interrupted run resumes by doing again the
    rounds whose attacks it had not finished (a worker pool runs them after their round).

    `ledger` turns the clients' participation into ε; a resumed run continues from the
    `participation` its checkpoint recorded, or, from a checkpoint written before it recorded
    one, counts every one of `num_clients` in each of the `offset` earlier rounds (an upper
    bound).
    """

    def __init__(
        self,
        run_dir: RunDirectory,
        fd: FederatedData,
        images_per_client: int,
        ledger: PrivacyLedger,
        *,
        num_clients: int = 0,
        offset: int = 0,
        participation: Mapping[int, int] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.fd = fd
        self.images_per_client = images_per_client
        self.ledger = ledger
        self.progress = progress
        self.participation: Counter[int] = Counter(
            {c: offset for c in range(num_clients)} if participation is None else participation
        )
        self.first_error: str | None = None  # the first failed reply's reason in the run
        self._ended: dict[int, _EndedRound] = {}
        self._rows: defaultdict[int, list[Row]] = defaultdict(list)
        # Written with the round's rows: a stopped run leaves no picture of a round it did
        # not record (an attack the stop cut short).
        self._images: defaultdict[int, list[Callable[[], object]]] = defaultdict(list)
        self._scored: Counter[int] = Counter()
        self._attack_seconds: defaultdict[int, float] = defaultdict(float)
        self._started = time.perf_counter()
        self._said_diverged = False

    def scored(self, job: ScoredJob) -> None:
        """Keep the job's rows, and the samples its images show, for its round's record."""
        self._attack_seconds[job.round] += job.result.reconstruction.seconds
        self._rows[job.round].extend(job.rows)
        self._scored[job.round] += 1
        image = self._image_of(job)
        if image is not None:
            self._images[job.round].append(image)
        self._write_complete()

    def round_finished(self, log: RoundLog, arrays: ArrayRecord) -> None:
        """Hold the ended round until its attack jobs are all scored, then write it."""
        state = {k: v.detach().cpu() for k, v in arrays.to_torch_state_dict().items()}
        self._ended[log.round] = _EndedRound(log, time.perf_counter() - self._started, state)
        self._started = time.perf_counter()
        self._write_complete()

    @property
    def unrecorded(self) -> tuple[int, ...]:
        """Rounds that ended and are not written yet (their attack jobs are outstanding)."""
        return tuple(sorted(self._ended))

    def _write_complete(self) -> None:
        while self._ended:
            first = min(self._ended)
            if self._scored[first] < self._ended[first].log.attack_jobs:
                return
            self._write(self._ended.pop(first))

    def _write(self, ended: _EndedRound) -> None:
        """The round's leakage and utility rows, then the global checkpoint, then a console
        line."""
        log = ended.log
        self.run_dir.check_present()  # before the round's images make their folder again
        self.participation.update(log.participants)
        if self.first_error is None:
            self.first_error = log.first_error
        utility = {
            "round": log.round,
            "test_loss": log.evaluation.get("test-loss", float("nan")),
            "test_accuracy": log.evaluation.get("test-accuracy", float("nan")),
            "epsilon": self.ledger.epsilon(self.participation),
            "central_epsilon": log.central_epsilon,
            "num_replies": log.replies,
            "num_failures": log.failures,
            "round_seconds": ended.seconds,
            "attack_seconds": self._attack_seconds.pop(log.round, 0.0),
            "payload_mb": log.payload_bytes / 1e6,
        }
        rows = self._rows.pop(log.round, [])
        del self._scored[log.round]
        for save in self._images.pop(log.round, []):
            save()
        self.run_dir.append_round(log.round, rows, utility)
        accounting = Accounting(dict(self.participation), dict(log.central_releases))
        self.run_dir.save_global_model(log.round, ended.state, accounting)
        prefix = None
        if self.progress is not None:
            self.progress.advance(log.round)
            prefix = self.progress.text()
        print(console_line(log.round, utility, rows, prefix), flush=True)
        self._warn_if_diverged(log.round, utility["test_loss"])

    def _warn_if_diverged(self, server_round: int, test_loss: float) -> None:
        """Say once that the global model's test loss stopped being finite: the run goes on as
        configured, but what it attacks from then on is not a model that learns."""
        if self._said_diverged or server_round == 0 or not len(self.fd.dataset.test_x):
            return
        if not math.isfinite(test_loss):
            self._said_diverged = True
            print(
                f"fedleak: warning: the global model's test loss is not finite after round "
                f"{server_round}: training diverged (a lower train.lr may help); the run goes "
                "on and its report says so",
                file=sys.stderr,
                flush=True,
            )

    def _image_of(self, job: ScoredJob) -> Callable[[], object] | None:
        """What saves ground truth beside the reconstruction, in the auditor's matched order
        (the reconstruction alone when there is no ground truth); it holds only the samples
        shown."""
        reconstruction, observation = job.result.reconstruction, job.result.job.observation
        if reconstruction.status != "ok" or self.images_per_client == 0:
            return None
        where = (observation.round, observation.client_id, job.result.job.attack)
        if job.truth is None:
            if observation.modality != "image":
                return None
            shown = reconstruction.inputs[: self.images_per_client].clone()
            return functools.partial(self.run_dir.save_images, *where, None, shown)
        pairs = [
            (int(r["sample"]), int(r["target_index"]))  # type: ignore[call-overload]
            for r in job.rows
            if r["scored_against"] == "original" and int(r["sample"]) >= 0  # type: ignore[call-overload]
        ][: self.images_per_client]
        if not pairs:
            return None
        samples, targets = zip(*pairs, strict=True)
        guesses = reconstruction.inputs[list(samples)]
        if observation.modality == "tokens":
            return functools.partial(
                save_token_pairs,
                self.run_dir.path,
                *where,
                job.truth.inputs[list(targets)],
                guesses,
                self.fd.dataset.tokenizer.pieces,
                targets,
            )
        truth = job.truth.private[list(targets)]
        return functools.partial(self.run_dir.save_images, *where, truth, guesses)
