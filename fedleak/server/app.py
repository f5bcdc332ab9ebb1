"""The ServerApp: builds the model, the curious strategy and the attacks, runs the rounds, and
records every round's leakage and utility in the run directory as it finishes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import platform
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

from fedleak.attacks.registry import attack_entry, build_attack
from fedleak.attacks.types import AttackerKnowledge, Budget, is_reference
from fedleak.config import ConfigError, RunConfig, attacked_rounds, parse_flat
from fedleak.data import FederatedData, auxiliary
from fedleak.data.registry import dataset_modality
from fedleak.interrupt import RunInterrupted
from fedleak.metrics.lpips import lpips_status, lpips_warning
from fedleak.models import build_model
from fedleak.report.progress import Progress
from fedleak.report.rundir import RunDirectory, RunDirectoryError, RunLock, console_line
from fedleak.report.texts import save_token_pairs
from fedleak.runtime import federated_data, model_spec, resolve_device
from fedleak.server.auditor import Auditor, GroundTruth
from fedleak.server.central_dp import CentralDP
from fedleak.server.grid import StoppableGrid
from fedleak.server.payload import check_round_payload
from fedleak.server.privacy import PrivacyLedger
from fedleak.server.runner import AttackResult, AttackRunner, InlineRunner
from fedleak.server.selection import ClientSelection
from fedleak.server.strategy import CuriousStrategy, PublicSetting, train_metrics
from fedleak.server.validate import validate_components
from fedleak.training.loss import task_scores

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """Every round was recorded, but the run failed: every client, or an attack on every
    update it was given. The run directory holds FAILED with the reason instead of DONE."""


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


def data_record(fd: FederatedData) -> dict[str, object]:
    """Where the data came from and, for text, which tokenizer the federation uses."""
    record: dict[str, object] = {"source": fd.dataset.source, "modality": fd.dataset.modality}
    tokenizer = getattr(fd.dataset, "tokenizer", None)
    if tokenizer is not None:
        record["tokenizer"] = tokenizer.record()
        record["seq_len"] = fd.dataset.input_shape[0]
    return record


def scored_lpips_nets(config: RunConfig) -> tuple[str, ...]:
    """The LPIPS backbones the run scores with: none on text, where LPIPS does not apply (so a
    text run neither warns about nor records missing image weights)."""
    return config.metrics.lpips_nets if dataset_modality(config.data.dataset) == "image" else ()


def environment(
    device: torch.device, config: RunConfig, data: dict[str, object] | None = None
) -> dict[str, object]:
    """Versions, device, seed, the data's provenance and where LPIPS's weights came from: what
    a reader needs to reproduce the run."""
    import flwr

    return {
        "fedleak": __import__("fedleak").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "seed": config.seed,
        "lpips": lpips_status(scored_lpips_nets(config)),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        **({"data": data} if data is not None else {}),
    }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, fd: FederatedData, device: torch.device
) -> tuple[float, float]:
    """Test loss and accuracy of the global model on the held-out split (NaN when it is empty):
    per image, or per predicted next token of a language model."""
    x, y = fd.dataset.test_x, fd.dataset.test_y
    if len(x) == 0:
        return float("nan"), float("nan")
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for start in range(0, len(x), 256):
        logits = model(x[start : start + 256].to(device))
        scores = task_scores(logits, y[start : start + 256].to(device))
        loss, correct, count = loss + scores[0], correct + scores[1], count + scores[2]
    return loss / count, correct / count


class RoundRecorder:
    """Writes one round's rows, images, checkpoint and console line when the round ends."""

    def __init__(
        self,
        run_dir: RunDirectory,
        strategy: CuriousStrategy,
        model: torch.nn.Module,
        fd: FederatedData,
        device: torch.device,
        images_per_client: int,
        ledger: PrivacyLedger,
        progress: Progress | None = None,
    ) -> None:
        self.ledger = ledger
        self.progress = progress
        self.run_dir = run_dir
        self.strategy = strategy
        self.model = model
        self.fd = fd
        self.device = device
        self.images_per_client = images_per_client
        self.started = time.perf_counter()
        self.attack_seconds = 0.0

    def on_scored(self, result: AttackResult, truth: GroundTruth | None, rows: list[dict]) -> None:
        """Save ground truth beside the reconstruction, in the auditor's matched order (the
        reconstruction alone when there is no ground truth)."""
        reconstruction = result.reconstruction
        self.attack_seconds += reconstruction.seconds
        if reconstruction.status != "ok" or self.images_per_client == 0:
            return
        if truth is None:
            if result.job.observation.modality == "image":
                observation = result.job.observation
                self.run_dir.save_images(
                    observation.round,
                    observation.client_id,
                    result.job.attack,
                    None,
                    reconstruction.inputs[: self.images_per_client],
                )
            return
        pairs = [
            (int(r["sample"]), int(r["target_index"]))
            for r in rows
            if r["scored_against"] == "original"
        ][: self.images_per_client]
        if pairs and result.job.observation.modality == "tokens":
            samples, targets = zip(*pairs, strict=True)
            observation = result.job.observation
            save_token_pairs(
                self.run_dir.path,
                observation.round,
                observation.client_id,
                result.job.attack,
                truth.inputs[list(targets)],
                reconstruction.inputs[list(samples)],
                self.fd.dataset.tokenizer.pieces,
                targets,
            )
        elif pairs:
            samples, targets = zip(*pairs, strict=True)
            observation = result.job.observation
            self.run_dir.save_images(
                observation.round,
                observation.client_id,
                result.job.attack,
                truth.private[list(targets)],
                reconstruction.inputs[list(samples)],
            )

    def flush_late_rows(self) -> None:
        """Rows of earlier rounds that a worker pool finished after their round was recorded."""
        for server_round, rows in sorted(self.strategy.take_rows().items()):
            self.run_dir.append_leakage(server_round, rows)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Flower's evaluate_fn: evaluate, then flush this round to disk."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        self.model.to(self.device)
        loss, accuracy = evaluate(self.model, self.fd, self.device)
        server_round += self.strategy.round_offset
        if server_round == self.strategy.round_offset and server_round > 0:
            return MetricRecord({"test-loss": loss, "test-accuracy": accuracy})
        ready = self.strategy.take_rows()
        rows = ready.pop(server_round, [])
        utility = {
            "round": server_round,
            "test_loss": loss,
            "test_accuracy": accuracy,
            "epsilon": self.ledger.epsilon(self.strategy.participation),
            "central_epsilon": self.strategy.central_epsilon(),
            "num_replies": self.strategy.replies.get(server_round, 0),
            "num_failures": self.strategy.failures.get(server_round, 0),
            "round_seconds": time.perf_counter() - self.started,
            "attack_seconds": self.attack_seconds,
            "payload_mb": self.strategy.payload.get(server_round, 0) / 1e6,
        }
        self.run_dir.append_round(server_round, rows, utility)
        for late_round, late_rows in sorted(ready.items()):
            self.run_dir.append_leakage(late_round, late_rows)
        self.run_dir.save_global_model(
            server_round, {k: v.cpu() for k, v in arrays.to_torch_state_dict().items()}
        )
        prefix = None
        if self.progress is not None:
            self.progress.advance(server_round)
            prefix = self.progress.text()
        print(console_line(server_round, utility, rows, prefix), flush=True)
        self.started, self.attack_seconds = time.perf_counter(), 0.0
        return MetricRecord({"test-loss": loss, "test-accuracy": accuracy})


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
    server = ForeignServer(strategy, initial_arrays, train_config)
    return serve(grid, parse_flat(dict(settings)), server)


def serve(grid: Grid, config: RunConfig, app: ForeignServer | None = None) -> Path:
    """Run the whole study on `grid` and return its run directory; with `app`, the strategy
    of a foreign Flower app is the one wrapped (`audit`).

    Holds the run directory's lock throughout. Raises `RunFailed` when the recorded rounds
    make a failed run (FAILED is written instead of DONE), and `RunInterrupted` when a stop
    was requested (every finished round is on disk; resume continues after the last one).
    """
    validate_components(config)
    device = resolve_device(config.device)
    path = Path(config.out_dir) if config.out_dir else default_run_dir(config)
    config = dataclasses.replace(config, out_dir=str(path))
    lock = RunLock(path)
    lock.probe()
    RunDirectory.check_target(path, resume=config.sim.resume)
    with lock:
        check_resumable(config, path)
        return _serve(StoppableGrid(grid), config, path, device, app)


def check_resumable(config: RunConfig, path: Path) -> None:
    """For `sim.resume` on an existing run: its settings match (`RunDirectory.check_resume`)
    and its checkpoint is a fedleak checkpoint that fits the configured model."""
    if not (config.sim.resume and (path / "config.toml").exists()):
        return
    run_dir = RunDirectory.open(path)
    run_dir.check_resume(config)
    checkpoint = run_dir.load_global_model()
    if checkpoint is None:
        return
    spec = model_spec(config, federated_data(config, num_partitions=1))
    try:
        build_model(spec).load_state_dict(checkpoint[1])
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:200]
        raise RunDirectoryError(
            f"{path / 'checkpoints' / 'global.pt'}: does not fit model {spec.name} on "
            f"{spec.input_shape} ({detail}); restore it or start again in a new out-dir"
        ) from None


def _serve(
    grid: Grid, config: RunConfig, path: Path, device: torch.device, app: ForeignServer | None
) -> Path:
    """`serve` once the run directory is checked and locked."""
    fd = federated_data(config, num_partitions=1)
    if config.sim.resume and (path / "config.toml").exists():
        run_dir = RunDirectory.open(path)
        run_dir.update_config(config)
    else:
        run_dir = RunDirectory.create(path, config, environment(device, config, data_record(fd)))
    warning = lpips_warning(scored_lpips_nets(config))
    if warning:
        print(f"fedleak: warning: {warning}", file=sys.stderr, flush=True)
    announce(f"fedleak: run directory {path}")
    config = with_attack_caches(config, run_dir)
    spec = model_spec(config, fd)
    model = build_model(spec)
    offset = 0
    if app is not None and app.initial_arrays is not None:
        model.load_state_dict(app.initial_arrays.to_torch_state_dict())
    checkpoint = run_dir.load_global_model() if config.sim.resume else None
    if checkpoint is not None:
        offset, state = checkpoint
        model.load_state_dict(state)
    remaining = config.num_server_rounds - offset
    if remaining <= 0:
        log.info("run %s already has all %d rounds", path, config.num_server_rounds)
        run_dir.write_summary()
        return _finish(run_dir, {})

    strategy = build_strategy(
        config, spec, fd, device, offset, inner=app.strategy if app is not None else None
    )
    # ε needs every client's partition size; the server's own `fd` has a single partition.
    num_clients = len(list(grid.get_node_ids()))
    ledger = PrivacyLedger.from_config(config, federated_data(config, num_clients))
    # Rounds before a resume were not recorded per client: count every client in each of them.
    strategy.participation.update({client: offset for client in range(num_clients)})
    recorder = RoundRecorder(
        run_dir,
        strategy,
        build_model(spec),
        fd,
        device,
        config.attack.images_per_client,
        ledger,
        Progress("round", config.num_server_rounds, offset),
    )
    strategy.on_scored = recorder.on_scored
    strategy.payload_check = functools.partial(check_round_payload, config, spec)
    train = config.train
    train_config = ConfigRecord({"lr": train.lr, "local-steps": train.local_steps})
    if app is not None and app.train_config is not None:
        train_config = app.train_config
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=remaining,
            timeout=config.sim.timeout,
            train_config=train_config,
            evaluate_fn=recorder,
        )
        if strategy.runner is not None:
            strategy.collect(wait=True)
            recorder.flush_late_rows()
    except RunInterrupted:
        run_dir.write_summary()  # the finished rounds, for whoever looks before resuming
        raise
    finally:
        if strategy.runner is not None:
            strategy.runner.close()
    run_dir.write_summary()
    return _finish(run_dir, strategy.client_errors)


def _finish(run_dir: RunDirectory, client_errors: dict[int, str]) -> Path:
    """Mark the run DONE, or FAILED and raise `RunFailed` when its rounds make a failed run."""
    reason = run_dir.failure()
    if reason.startswith("every client failed") and client_errors:
        first = " ".join(client_errors[min(client_errors)].split())[:300]
        reason += f" (first error: {first})"
    if reason:
        run_dir.mark_failed(reason)
        raise RunFailed(f"{run_dir.path}: {reason}")
    run_dir.mark_done()
    write_report(run_dir.path)
    return run_dir.path


def announce(text: str) -> None:
    """A line for the person running the study: printed (`fedleak run`) and logged through
    Flower's logger, which `flwr run --stream` relays from the ServerApp's process."""
    print(text, flush=True)
    flwr_log(logging.INFO, "%s", text)


def write_report(path: Path) -> None:
    """report.html / report.md in the run directory, as `fedleak report` builds them; a report
    that cannot be built is announced, not raised: the run's records are complete without it."""
    from fedleak.report.build import build_report

    try:
        html, _ = build_report(path)
    except Exception as error:  # the records are what matters; the report can be rebuilt
        announce(
            f"fedleak: report not built ({type(error).__name__}: {error}); rebuild it with "
            f"`fedleak report {path}`"
        )
        return
    announce(f"fedleak: report {html}")


def with_attack_caches(config: RunConfig, run_dir: RunDirectory) -> RunConfig:
    """Point attacks that cache trained state (LTI's inverter) at `state/<attack>/` of the run
    directory, unless the user chose a folder: `resume` then picks the state up again."""
    params = {name: dict(p) for name, p in config.attack.params.items()}
    for name in config.attack.names:
        if not attack_entry(name).accepts("cache-dir"):
            continue
        given = params.setdefault(name, {})
        if not any(key.replace("_", "-") == "cache-dir" for key in given):
            given["cache-dir"] = str(run_dir.state_dir(name))
    return dataclasses.replace(config, attack=dataclasses.replace(config.attack, params=params))


def build_runner(
    config: RunConfig, knowledge: AttackerKnowledge, budget: Budget
) -> AttackRunner | None:
    """Inline by default; a pool of Ray workers when `attack.workers` asks for one."""
    attack = config.attack
    if not attack.names:
        return None
    if attack.workers > 0:
        from fedleak.server.pool import RayAttackPool

        return RayAttackPool(config, knowledge, budget)
    attacks = {
        name: build_attack(name, attack.params.get(name, {}), seed=config.seed)
        for name in attack.names
    }
    return InlineRunner(attacks, knowledge, budget)


def reference_attacks(config: RunConfig) -> frozenset[str]:
    """The configured attacks that are reference baselines (drawn as the report's floor)."""
    return frozenset(
        name
        for name in config.attack.names
        if is_reference(build_attack(name, config.attack.params.get(name, {}), seed=config.seed))
    )


def build_strategy(
    config: RunConfig,
    spec,
    fd: FederatedData,
    device: torch.device,
    offset: int,
    inner: Strategy | None = None,
) -> CuriousStrategy:
    """FedAvg (inside Flower's central-DP wrapper when configured) wrapped by the curious
    server, with its attacks and their budget; or `inner`, a foreign app's own strategy,
    which then selects its clients itself."""
    train = config.train
    selection = None
    if inner is None:
        # The curious strategy draws each round's clients itself (seeded, over partition
        # ids) and shows FedAvg only those, so FedAvg takes every node it is shown.
        inner = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=train.min_clients,
            min_available_nodes=train.min_clients,
            train_metrics_aggr_fn=train_metrics,
        )
        selection = ClientSelection(
            train.fraction_train, train.min_clients, config.seed, timeout=config.sim.timeout
        )
    if config.defense.central_clip > 0:
        inner = CentralDP.from_config(inner, config, prior_releases=offset)
    aux_x, aux_y = auxiliary(fd)
    knowledge = AttackerKnowledge(
        aux_inputs=aux_x.to(device),
        aux_labels=aux_y.to(device),
        input_shape=fd.dataset.input_shape,
        num_classes=fd.dataset.num_classes,
        device=device,
        seed=config.seed,
    )
    attack = config.attack
    budget = Budget(
        attack.max_iterations, attack.max_seconds, attack.show_progress, attack.max_batch
    )
    modality = fd.dataset.modality
    public = PublicSetting(
        modality=modality,
        model=spec,
        update_kind="gradient" if train.mode == "fedsgd" else "delta",
        learning_rate=train.lr,
        server_lr=train.server_lr,
        defense=config.defense.spec,
        share_bn_statistics=config.threat.bn_stats == "shared",
        view=config.threat.view,
    )
    context = {
        "defense": config.defense.spec,
        "mode": train.mode,
        "dataset": config.data.dataset,
        "model": config.model.name,
        "seed": config.seed,
    }
    return CuriousStrategy(
        inner,
        public,
        build_runner(config, knowledge, budget),
        Auditor(
            config.metrics.lpips_nets,
            decode=fd.dataset.tokenizer.decode if modality == "tokens" else None,
        ),
        attacks=attack.names,
        references=reference_attacks(config),
        clients_per_round=attack.clients_per_round,
        seed=config.seed,
        round_offset=offset,
        row_context=context,
        selection=selection,
        attacked_rounds=attacked_rounds(attack.rounds, config.num_server_rounds),
    )


def make_server_app(config: RunConfig | None = None) -> ServerApp:
    """A ServerApp bound to `config`, or reading Flower's run config when None (`flwr run`)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, config or parse_flat(context.run_config))

    return server


app = make_server_app()
