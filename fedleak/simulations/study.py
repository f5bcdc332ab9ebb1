"""One study on a Flower grid: the curious server (`fedleak.server`) wired to the run directory
(`fedleak.simulations.recording`), from the first round (or the last recorded one, on resume)
to DONE or FAILED and the report.

`serve` runs fedleak's own study (the ServerApp of `fedleak.simulations.apps`); `audit` runs a
foreign Flower app's strategy wrapped in `CuriousStrategy`, in place of `strategy.start(...)`
in that app's ServerApp.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pandas as pd
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedleak.config import ConfigError, RunConfig, attacked_rounds, parse_flat
from fedleak.data import FederatedData
from fedleak.data.content import data_fingerprint
from fedleak.heap import reuse_freed_memory
from fedleak.interrupt import RunInterrupted
from fedleak.lines import MAX_LINE, error_line, one_line
from fedleak.registry import is_own_error
from fedleak.report.lock import RunLock
from fedleak.report.progress import Progress
from fedleak.report.rundir import (
    AUDITED_STRATEGY_KEY,
    CACHE_LOCK_FILE,
    CHECKPOINT_FILE,
    UTILITY_FILE,
    RunDirectory,
    RunDirectoryError,
)
from fedleak.report.tables import row_diagnostics
from fedleak.runtime import deterministic_kernels, federated_data, model_spec, resolve_device
from fedleak.server.build import (
    EvaluationFailed,
    GlobalEvaluation,
    build_strategy,
    cache_dirs,
    check_attack_state,
    check_fresh_caches,
    initial_state,
    restarted_attacks,
    with_attack_caches,
)
from fedleak.server.central_dp import CentralNoiseOverflow
from fedleak.server.grid import ClientsMissing, StoppableGrid
from fedleak.server.payload import check_round_payload
from fedleak.server.privacy import PrivacyLedger
from fedleak.server.runner import ObservationChanged
from fedleak.server.selection import FederationError, declared_federation
from fedleak.server.strategy import AppStrategyFailed, ClientCrashed
from fedleak.server.validate import (
    canonical,
    check_absolute_paths,
    check_seen_by_ray,
    resume_form,
    validate_components,
    validate_federation,
)
from fedleak.simulations.recording import (
    RunRecorder,
    changed_software,
    claim_run_dir,
    data_record,
    default_run_dir,
    environment,
    model_record,
    release_claimed,
    setup_warnings,
)

log = logging.getLogger(__name__)


class OneLineErrors(logging.Filter):
    """Flower logs whatever a ServerApp raises with its traceback. fedleak's own errors (a bad
    setting, missing data, a failed run) are for the user, so under `flwr run` they read as
    one line, as `fedleak run` prints them; anything else keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and is_own_error(error):
            record.msg = f"{record.getMessage()}: {error_line(error, MAX_LINE)}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def log_own_errors_in_one_line() -> None:
    """Put `OneLineErrors` on Flower's logger (once): under `flwr run` a ServerApp's error
    reaches the user only through it, for fedleak's app as for an audited one."""
    if not any(isinstance(f, OneLineErrors) for f in FLOWER_LOGGER.filters):
        FLOWER_LOGGER.addFilter(OneLineErrors())


class RunFailed(RuntimeError):
    """Every round was recorded, but the run failed: every client, or an attack on every
    update it was given. The run directory holds FAILED with the reason instead of DONE."""


@dataclass(frozen=True)
class ForeignServer:
    """The server side of a Flower app audited by fedleak: the app's own strategy (which selects
    its clients and aggregates their new weights), its initial weights (None: the configured
    model's) and the configuration its clients are sent each round (None: fedleak's)."""

    strategy: Strategy
    initial_arrays: ArrayRecord | None = None
    train_config: ConfigRecord | None = None


def audit(
    grid: Grid,
    strategy: Strategy,
    settings: Mapping[str, object],
    *,
    initial_arrays: ArrayRecord | None = None,
    train_config: ConfigRecord | None = None,
) -> Path:
    """Run a Flower app's own `strategy` wrapped in `CuriousStrategy`, in place of
    `strategy.start(...)` in its ServerApp, and return the run directory.

    `settings`: fedleak's flat settings (`fedleak config-keys`), e.g. `model.name` (the app's
    model as an import path `package.module:factory`), `data.dataset` (the attacker's
    auxiliary data and the held-out test set), `attack.names`, `num-server-rounds`, `out-dir`.
    The app's ClientApp adds `fedleak.client.audit.fedleak_mod` and calls `declare(...)`.
    """
    log_own_errors_in_one_line()  # before the settings are read: they may be refused
    # Checked before a run folder exists: a wrong argument failed deep inside, as an
    # AttributeError, after the folder was made (audit DV7). The grid once the settings are.
    for name, value, kind, expected in (
        ("strategy", strategy, Strategy, "a flwr.serverapp.strategy.Strategy, e.g. FedAvg()"),
        ("settings", settings, Mapping, 'a mapping of fedleak settings, e.g. {"seed": 0}'),
        ("initial_arrays", initial_arrays, ArrayRecord | None, "an ArrayRecord or None"),
        ("train_config", train_config, ConfigRecord | None, "a ConfigRecord or None"),
    ):
        if not isinstance(value, kind):
            raise ConfigError(f"{name}: expected {expected}, got {type(value).__name__}")
    server = ForeignServer(strategy, initial_arrays, train_config)
    config = parse_flat(dict(settings))
    check_absolute_paths(config)
    return serve(grid, config, server)


def serve(
    grid: Grid,
    config: RunConfig,
    app: ForeignServer | None = None,
    clients: int | None = None,
    client_threads: int | None = None,
) -> Path:
    """Run the whole study on `grid` and return its run directory; with `app`, the strategy
    of a foreign Flower app is the one wrapped (`audit`). `clients`: the federation's size
    when the caller knows it (a simulation); the first round waits for all of them to connect
    (else for `train.min-clients`). `client_threads`: the torch threads each client computes
    with, when the caller pins them (a simulation): recorded, and a resume must use as many.

    Holds the run directory's lock throughout. Raises `RunFailed` when the recorded rounds
    make a failed run (FAILED is written instead of DONE), and `RunInterrupted` when a stop
    was requested (every finished round is on disk; resume continues after the last one).
    """
    reuse_freed_memory()
    validate_components(config, own_clients=app is None)
    if app is not None:
        _check_foreign_app(app, config)
        if not callable(getattr(grid, "get_node_ids", None)):
            raise ConfigError(
                f"grid: expected the Grid its ServerApp's main receives, got {type(grid).__name__}"
            )
    config = canonical(config)
    device = resolve_device(config.device)
    deterministic_kernels(device, config.deterministic)
    # Made before it is locked, as `fedleak run` does: two servers started in one second
    # would name the same folder (audit ED4).
    claimed = not config.out_dir
    path = Path(config.out_dir) if config.out_dir else claim_run_dir(default_run_dir(config))
    config = dataclasses.replace(config, out_dir=str(path))
    lock = RunLock(path)
    lock.probe()
    RunDirectory.check_target(path, resume=config.sim.resume)
    # One intra-op thread on every path (`fedleak run`, `flwr run`, a deployment's ServerApp):
    # sums split over another number of threads round differently (LPIPS scores differed in
    # the 8th digit under `flwr run`), and the run directory must not depend on the path.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    refused = False
    try:
        with lock, contextlib.ExitStack() as caches:
            try:
                # A cache folder of the user's is this run's alone while it runs: another run
                # writing its inverters there would have this one resume from them. One inside
                # the run's folder is under the run's lock (and must not exist before it
                # starts).
                for name, folder in cache_dirs(config).items():
                    if not folder.resolve().is_relative_to(path.resolve()):
                        caches.enter_context(
                            RunLock(
                                folder,
                                instead=f"give attack.{name}.cache-dir another folder",
                                file_name=CACHE_LOCK_FILE,
                            )
                        )
                check_resumable(config, path, clients, client_threads, strategy_name(app))
            except BaseException:
                refused = True
                raise
            return _serve(StoppableGrid(grid), config, path, device, app, clients, client_threads)
    finally:
        torch.set_num_threads(threads)
        if refused and claimed:  # a refused run leaves no folder of its own name behind
            release_claimed(path)


def check_resumable(
    config: RunConfig,
    path: Path,
    clients: int | None = None,
    client_threads: int | None = None,
    strategy: str | None = None,
) -> None:
    """For `sim.resume` on an existing run: its settings, its number of clients and their
    threads (when the caller knows them) match (`RunDirectory.check_resume`, `check_clients`),
    so does the audited app's strategy (`strategy`, none for fedleak's own clients), a text
    run's tokenizer is the one it ran with, and its checkpoint is a fedleak checkpoint that
    fits the configured model. For a new run: the cache folders it was given hold no other
    run's inverters (`check_fresh_caches`)."""
    if not (config.sim.resume and (path / "config.toml").exists()):
        check_fresh_caches(config)  # a new run
        return
    config = canonical(config)
    run_dir = RunDirectory.open(path)
    run_dir.check_format()
    _check_same_app(run_dir, strategy)
    # A run recorded before specs were stored canonically is the same study, and so is one
    # that names an attack parameter at its default value (`flwr run`'s table lists keys).
    try:
        stored = resume_form(canonical(run_dir.config), recorded=True)
    except ConfigError as error:
        raise RunDirectoryError(
            f"{path}: {error}; it cannot be continued: `fedleak report` still reads it; run the "
            "study again in a new out-dir"
        ) from None
    run_dir.check_resume(resume_form(config), stored)
    leakage = run_dir.leakage()  # damaged records are said now, not after the resumed work
    recorded = run_dir.utility()["round"]
    if clients is not None:
        run_dir.check_clients(clients, client_threads)
    _check_same_device(run_dir, resolve_device(config.device))
    checkpoint = run_dir.load_global_model()
    if checkpoint is None and len(recorded) and int(recorded.max()) >= 1:
        # Saved after every round's records, round 0's included: this one was removed, and a
        # resume would start every round again without a word (audit DW3).
        raise RunDirectoryError(
            f"{path / CHECKPOINT_FILE}: missing, though {UTILITY_FILE} records rounds up to "
            f"{int(recorded.max())}; a resume would start them all again: restore it, or "
            "start the run again in a new out-dir"
        )
    up_to = checkpoint[0] if checkpoint is not None else 0
    try:
        check_attack_state(
            with_attack_caches(config, run_dir.state_path), _last_trained(leakage, up_to)
        )
    except ValueError as error:  # a saved inverter that does not read back, or is gone
        raise RunDirectoryError(str(error)) from None
    fd = federated_data(config, num_partitions=1)
    _check_same_tokenizer(run_dir, config, fd)
    _check_same_data(run_dir, config, fd)
    if checkpoint is None:
        return
    spec = model_spec(config, fd)
    detail = _misfit(config, fd, checkpoint[1])
    if detail is not None:
        raise RunDirectoryError(
            f"{path / 'checkpoints' / 'global.pt'}: does not fit model {spec.name} on "
            f"{spec.input_shape} ({detail}); restore it or start again in a new out-dir"
        )


def _last_trained(leakage: pd.DataFrame, up_to: int) -> dict[str, int]:
    """attack -> the last round up to `up_to` whose rows show it trained (a learned attack's
    inverter, saved in that round)."""
    rounds: dict[str, int] = {}
    # Parsed only where the key is: a long run holds a row per reconstructed sample.
    kept = leakage[
        (leakage["round"] <= up_to)
        & leakage["diagnostics"].astype(str).str.contains("train_seconds", regex=False)
    ]
    for attack, round_, text in zip(
        kept["attack"], kept["round"], kept["diagnostics"], strict=True
    ):
        if row_diagnostics(text).get("train_seconds", 0.0) > 0:
            rounds[attack] = max(rounds.get(attack, 0), int(round_))
    return rounds


def _misfit(config: RunConfig, fd: FederatedData, state: Mapping[str, torch.Tensor]) -> str | None:
    """Why `state` does not load into the configured model (torch's message, on one line), or
    None. The check draws nothing from the run's own random streams."""
    try:
        with torch.random.fork_rng(devices=[]):
            initial_state(model_spec(config, fd), state)
    except RuntimeError as error:
        return one_line(error, 200)
    return None


def _check_same_device(run_dir: RunDirectory, device: torch.device) -> None:
    """The server attacks and evaluates on its device: a run begun on the CPU and resumed
    where `device=auto` finds a GPU (or on another GPU model) would score its resumed rounds
    with other kernels than an uninterrupted run."""
    environment = run_dir.environment()
    recorded, gpu = environment.get("device"), environment.get("cuda")
    try:
        kind = torch.device(recorded).type if isinstance(recorded, str) else None
    except RuntimeError:  # not a device torch knows: nothing to compare with
        kind = None
    if kind is None:
        return
    now = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    if kind == device.type and gpu == now:
        return
    was, would = (f"{d}{f' ({g})' if g else ''}" for d, g in ((recorded, gpu), (device, now)))
    raise RunDirectoryError(
        f"{run_dir.path}: its server computed on {was}, this process would on {would}; other "
        "kernels round differently, so the resumed rounds would differ from an uninterrupted "
        f"run: resume on the same device (--set device={kind}) or choose another out-dir"
    )


def _check_same_tokenizer(run_dir: RunDirectory, config: RunConfig, fd: FederatedData) -> None:
    """The same settings can give another tokenizer (a `file:` tokenizer edited in place):
    resumed rounds would then train and score on other token ids than the first ones."""
    data = run_dir.environment().get("data")
    recorded = data.get("tokenizer") if isinstance(data, dict) else None
    tokenizer = getattr(fd.dataset, "tokenizer", None)
    if not isinstance(recorded, dict) or tokenizer is None:
        return
    if recorded.get("fingerprint") != tokenizer.fingerprint:
        raise RunDirectoryError(
            f"{run_dir.path}: was run with a tokenizer of fingerprint {recorded.get('fingerprint')}"
            f" (environment.json); data.tokenizer={config.data.tokenizer!r} now gives "
            f"{tokenizer.fingerprint}, so resumed rounds would use other token ids: restore "
            "the run's tokenizer or choose another out-dir"
        )


def _check_same_data(run_dir: RunDirectory, config: RunConfig, fd: FederatedData) -> None:
    """The same `data.dataset` can name other data (a folder edited in place, a relative path
    read from another directory): resumed rounds would train and score on other samples than
    the first ones, in one set of records."""
    data = run_dir.environment().get("data")
    recorded = data.get("fingerprint") if isinstance(data, dict) else None
    if recorded is None:  # a run recorded before data sets were fingerprinted
        return
    now = data_fingerprint(fd.dataset)
    if recorded != now:
        raise RunDirectoryError(
            f"{run_dir.path}: began on data of fingerprint {recorded} (environment.json, from "
            f"{data.get('source')}); data.dataset={config.data.dataset!r} now loads "
            f"{now} from {fd.dataset.source}, so resumed rounds would use other samples: "
            "restore the run's data or choose another out-dir"
        )


# Flower's strategies that keep nothing across rounds but the global weights, which the
# checkpoint holds: a resumed audit of one of them continues the uninterrupted run.
_STATELESS = (FedAvg, FedProx, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan)
_ROUND_HOOKS = ("configure_train", "configure_evaluate", "aggregate_evaluate")


# Settings only fedleak's own clients and client sampling read: an audited app's clients and
# strategy never do, yet its rows and ε would record them as applied (audit EO3).
OWN_CLIENTS_ONLY = ("defense.spec", "train.fraction-train", "sim.fail-rate")


def strategy_name(app: ForeignServer | None) -> str | None:
    """The audited app's strategy as `module.Class`; None for fedleak's own clients."""
    if app is None:
        return None
    kind = type(app.strategy)
    return f"{kind.__module__}.{kind.__qualname__}"


def _check_same_app(run_dir: RunDirectory, strategy: str | None) -> None:
    """Refuse to continue an audit with fedleak's own clients or another strategy, or a run of
    fedleak's own clients as an audit: one folder would hold two federations (audits EO4,
    EO5, EP2). A run from before the key was recorded is not checked."""
    environment = run_dir.environment()
    if AUDITED_STRATEGY_KEY not in environment:
        return
    recorded = environment[AUDITED_STRATEGY_KEY]
    if recorded == strategy:
        return
    if recorded is None:
        raise RunDirectoryError(
            f"{run_dir.path}: was run by fedleak's own clients; an audit of a Flower app "
            "cannot continue it: give the audit another out-dir"
        )
    if strategy is None:
        raise RunDirectoryError(
            f"{run_dir.path}: audits a Flower app (its {recorded}); it goes on only in that app, "
            "with sim.resume among the settings it passes to fedleak.audit, not with fedleak's "
            "own clients"
        )
    raise RunDirectoryError(
        f"{run_dir.path}: audited the app's {recorded}, not {strategy}; resume it with the "
        "strategy it ran with, or choose another out-dir"
    )


def _check_foreign_app(app: ForeignServer, config: RunConfig) -> None:
    """Before a run folder exists: no setting that only fedleak's own clients apply, the app's
    initial weights fit `model.name`'s model (else the attacks would replay another model),
    and attack workers find what they build."""
    given, defaults = canonical(config).to_flat(), RunConfig().to_flat()  # "NONE" is none
    unread = [f"{key}={given[key]!r}" for key in OWN_CLIENTS_ONLY if given[key] != defaults[key]]
    if unread:
        raise ConfigError(
            f"{', '.join(unread)}: only fedleak's own clients apply this; the app's clients "
            "and strategy never read it, yet the run would record it as applied; leave it out "
            "of the audit's settings (the app applies its own defenses and sampling)"
        )
    check_seen_by_ray(config, own_clients=False)
    if app.initial_arrays is None:
        return
    fd = federated_data(config, num_partitions=1)
    detail = _misfit(config, fd, app.initial_arrays.to_torch_state_dict())
    if detail is not None:
        raise ConfigError(
            f"model.name={config.model.name!r}: does not take the app's initial_arrays "
            f"({detail}); name the model class the app's strategy trains"
        )


def _restarted_state(app: ForeignServer | None) -> str | None:
    """Why a resumed audit may not be the uninterrupted run: its strategy keeps state of its
    own (a server-side optimiser's moments, momentum, a schedule), which no checkpoint holds."""
    if app is None:
        return None
    kind = type(app.strategy)
    base = next((c for c in kind.__mro__ if c in _STATELESS), None)
    name = kind.__name__
    if base is None or kind.aggregate_train is not base.aggregate_train:
        return (
            f"the app's {name} starts its own state afresh (e.g. a server-side optimiser's "
            "moments): fedleak's checkpoint holds the global weights only, so the resumed "
            "rounds differ from an uninterrupted run"
        )
    # A subclass that aggregates as its base may still count rounds in another hook.
    changed = [hook for hook in _ROUND_HOOKS if getattr(kind, hook) is not getattr(base, hook)]
    if not changed:
        return None  # one of them, or a subclass that runs its rounds as it does
    return (
        f"the app's {name} overrides {base.__name__}'s {', '.join(changed)}, which may keep "
        "state across rounds (e.g. a schedule or a sampling history) that starts afresh: "
        "fedleak's checkpoint holds the global weights only, so the resumed rounds may differ "
        "from an uninterrupted run"
    )


def nothing_to_resume(config: RunConfig, path: Path) -> str | None:
    """The warning for `sim.resume` on a folder without a run: a mistyped out-dir would
    otherwise run the whole study again without a word."""
    if config.sim.resume and not (path / "config.toml").exists():
        return f"sim.resume=true, but {path} holds no run to resume: starting it from round 1"
    return None


def _serve(
    grid: StoppableGrid,
    config: RunConfig,
    path: Path,
    device: torch.device,
    app: ForeignServer | None,
    clients: int | None,
    client_threads: int | None,
) -> Path:
    """`serve` once the run directory is checked and locked."""
    fd = federated_data(config, num_partitions=1)
    # A resumed run's config and DONE/FAILED change only once its federation is checked:
    # behind a SuperLink the clients say who they are after the run has begun, and a refusal
    # must leave a finished run as it was.
    resumed = config.sim.resume and (path / "config.toml").exists()
    unresumed = nothing_to_resume(config, path)  # before create() writes a config.toml
    if resumed:
        run_dir = RunDirectory.open(path)
    else:
        # Recorded with the cache folders the attacks will use, this run's own by default.
        ran = with_attack_caches(config, RunDirectory(path).state_path)
        recorded = environment(device, ran, data_record(fd), model_record(config, fd))
        recorded[AUDITED_STRATEGY_KEY] = strategy_name(app)  # none: fedleak's own clients
        run_dir = RunDirectory.create(path, config, recorded)
    software = changed_software(run_dir.environment(), config) if resumed else []
    warnings = [
        unresumed,
        _restarted_state(app) if resumed else None,
        restarted_attacks(config) if resumed else None,
        f"{path} began with other software ({'; '.join(software)}): the rounds it adds may "
        "differ from those of an uninterrupted run"
        if software
        else None,
        *setup_warnings(config, fd),
    ]
    for warning in filter(None, warnings):
        print(f"fedleak: warning: {warning}", file=sys.stderr, flush=True)
    announce(f"fedleak: run directory {path}")
    stored = config  # as config.toml holds it: the caches' folders are this run's own
    config = with_attack_caches(config, run_dir.state_dir)
    spec = model_spec(config, fd)
    states = []
    if app is not None and app.initial_arrays is not None:
        states.append(app.initial_arrays.to_torch_state_dict())
    offset = 0
    checkpoint = run_dir.load_global_model() if config.sim.resume else None
    accounting = None
    if checkpoint is not None:
        offset = checkpoint[0]
        states.append(checkpoint[1])
        accounting = run_dir.load_accounting()
    initial = initial_state(spec, *states)
    remaining = config.num_server_rounds - offset
    if remaining <= 0:
        log.info("run %s already has all %d rounds", path, config.num_server_rounds)
        run_dir.update_config(stored)
        run_dir.write_summary()
        return _finish(run_dir, None)

    # ε needs every client's partition size; the server's own `fd` has a single partition.
    try:
        num_clients = grid.wait_for_nodes(clients or config.train.min_clients, config.sim.timeout)
    except ClientsMissing as error:
        # A new run's folder says why it ended; a resumed one is left as it was.
        if resumed:
            raise RunDirectoryError(f"{path}: {error}; the run is left as it was") from None
        _fail(run_dir, f"{error} (train.min-clients={config.train.min_clients})")
    # Behind a SuperLink fedleak's own nodes say how many partitions there are; a foreign
    # ClientApp has no handler for the question (Flower logs an error on each node).
    if clients is None and app is None:
        try:
            declared = declared_federation(grid, config.sim.timeout)
            if declared is not None:
                num_clients = declared.num_partitions
                client_threads = client_threads or declared.client_threads
                # `fedleak run` checks these before Ray starts; here the size is known now.
                validate_federation(config, num_clients)
        except (FederationError, ConfigError) as error:
            if resumed:
                raise RunDirectoryError(f"{path}: {error}; the run is left as it was") from None
            _fail(run_dir, str(error))
    run_dir.record_clients(num_clients, client_threads)
    if resumed:
        run_dir.update_config(stored)
        if software:
            run_dir.record_resumed_with(software)
    ledger = PrivacyLedger.from_config(config, federated_data(config, num_clients))
    if ledger.warning:  # said with the other setup warnings
        run_dir.record_no_epsilon(ledger.not_dp)
    recorder = RunRecorder(
        run_dir,
        fd,
        config.attack.images_per_client,
        ledger,
        num_clients=num_clients,
        offset=offset,
        participation=accounting.participation if accounting is not None else None,
        progress=Progress("round", config.num_server_rounds, offset, kind=_round_kind(config)),
    )
    strategy = build_strategy(
        config,
        spec,
        fd,
        device,
        offset,
        inner=app.strategy if app is not None else None,
        sink=recorder,
        payload_check=functools.partial(check_round_payload, config, spec),
        central_releases=accounting.central_releases if accounting is not None else None,
        simulated=isinstance(grid.inner, InMemoryGrid),
    )
    evaluation = GlobalEvaluation(spec, fd, device)
    train = config.train
    train_config = ConfigRecord({"lr": train.lr, "local-steps": train.local_steps})
    if app is not None and app.train_config is not None:
        train_config = app.train_config
    try:
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=remaining,
            timeout=config.sim.timeout,
            train_config=train_config,
            evaluate_fn=evaluation,
        )
    except RunInterrupted:
        run_dir.write_summary()  # the finished rounds, for whoever looks before resuming
        raise
    except (
        FederationError,
        ClientCrashed,
        CentralNoiseOverflow,
        AppStrategyFailed,
        EvaluationFailed,
        ObservationChanged,
    ) as error:
        _fail(run_dir, str(error))
    run_dir.write_summary()
    return _finish(run_dir, recorder.first_error)


def _fail(run_dir: RunDirectory, reason: str) -> NoReturn:
    """End a run that cannot go on: FAILED with the reason, the finished rounds summarised and
    reported, and `RunFailed` (one line) for the caller."""
    _record_failure(run_dir, reason)
    raise RunFailed(f"{run_dir.path}: {reason}")


def _record_failure(run_dir: RunDirectory, reason: str) -> None:
    """FAILED with the reason, then the summary and the report. A disk that refuses them (the
    full disk that failed the run, say) is warned about: the run's own reason stays the error
    the caller reports, not the write's (audit DH2)."""
    try:
        run_dir.mark_failed(reason)
        run_dir.write_summary()
        write_report(run_dir.path)
    except OSError as error:
        print(
            f"fedleak: warning: could not record the failure in {run_dir.path} "
            f"({error.strerror or type(error).__name__})",
            file=sys.stderr,
            flush=True,
        )


def _round_kind(config: RunConfig) -> Callable[[int], bool]:
    """Whether a round is attacked: the ETA times attacked rounds and the others apart."""
    attacked = attacked_rounds(config.attack.rounds, config.num_server_rounds)
    if not config.attack.names or attacked is None:  # 'none' parses to no names
        return lambda server_round: True
    return lambda server_round: server_round in attacked


def _finish(run_dir: RunDirectory, first_error: str | None) -> Path:
    """Mark the run DONE, or FAILED and raise `RunFailed` when its rounds make a failed run."""
    reason = run_dir.failure()
    if reason.startswith("every client failed") and first_error:
        reason += f" (first error: {one_line(first_error)})"
    if reason:
        _fail(run_dir, reason)  # the recorded rounds are reported all the same
    run_dir.mark_done()
    write_report(run_dir.path)
    return run_dir.path


def announce(text: str) -> None:
    """A line for the person running the study. Printed only: Flower's ServerApp processes
    mirror stdout into the log `flwr run --stream` relays, so logging it as well showed it
    twice there (audit DG3)."""
    print(text, flush=True)


def write_report(path: Path) -> None:
    """report.html / report.md in the run directory, as `fedleak report` builds them; a report
    that cannot be built is announced, not raised: the run's records are complete without it."""
    from fedleak.report.build import build_report, discard_report

    try:
        html, _ = build_report(path)
    except Exception as error:  # the records are what matters; the report can be rebuilt
        discard_report(path)
        announce(
            f"fedleak: report not built ({type(error).__name__}: {error}); rebuild it with "
            f"`fedleak report {path}`"
        )
        return
    announce(f"fedleak: report {html}")
