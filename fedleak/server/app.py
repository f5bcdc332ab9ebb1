"""The ServerApp: builds the model, the curious strategy and the attacks, runs the rounds, and
records every round's leakage and utility in the run directory as it finishes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import logging
import platform
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedleak.attacks.registry import build_attack
from fedleak.attacks.types import AttackerKnowledge, Budget
from fedleak.config import RunConfig, parse_flat
from fedleak.data import FederatedData, auxiliary
from fedleak.models import build_model
from fedleak.report.rundir import RunDirectory, console_line
from fedleak.report.texts import save_token_pairs
from fedleak.runtime import federated_data, model_spec, resolve_device
from fedleak.server.auditor import Auditor, GroundTruth
from fedleak.server.central_dp import CentralDP
from fedleak.server.payload import check_payload
from fedleak.server.privacy import PrivacyLedger
from fedleak.server.runner import AttackResult, AttackRunner, InlineRunner
from fedleak.server.strategy import CuriousStrategy, PublicSetting
from fedleak.server.validate import validate_components
from fedleak.training.loss import task_scores

log = logging.getLogger(__name__)


def default_run_dir(config: RunConfig, root: Path | None = None) -> Path:
    """`runs/<time>-<name>` under `root` (the current directory by default), absolute."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return ((root or Path.cwd()) / "runs" / f"{stamp}-{config.name}").resolve()


def data_record(fd: FederatedData) -> dict[str, object]:
    """Where the data came from and, for text, which tokenizer the federation uses."""
    record: dict[str, object] = {"source": fd.dataset.source, "modality": fd.dataset.modality}
    tokenizer = getattr(fd.dataset, "tokenizer", None)
    if tokenizer is not None:
        record["tokenizer"] = tokenizer.record()
        record["seq_len"] = fd.dataset.input_shape[0]
    return record


def environment(
    device: torch.device, config: RunConfig, data: dict[str, object] | None = None
) -> dict[str, object]:
    """Versions, device, seed and the data's provenance: what a reader needs to reproduce the
    run."""
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
    ) -> None:
        self.ledger = ledger
        self.run_dir = run_dir
        self.strategy = strategy
        self.model = model
        self.fd = fd
        self.device = device
        self.images_per_client = images_per_client
        self.started = time.perf_counter()
        self.attack_seconds = 0.0

    def on_scored(self, result: AttackResult, truth: GroundTruth, rows: list[dict]) -> None:
        """Save ground truth beside the reconstruction, in the auditor's matched order."""
        reconstruction = result.reconstruction
        self.attack_seconds += reconstruction.seconds
        if reconstruction.status != "ok" or self.images_per_client == 0:
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
                truth.inputs[list(targets)],
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
        print(console_line(server_round, utility, rows), flush=True)
        self.started, self.attack_seconds = time.perf_counter(), 0.0
        return MetricRecord({"test-loss": loss, "test-accuracy": accuracy})


def serve(grid: Grid, config: RunConfig) -> Path:
    """Run the whole study on `grid` and return its run directory."""
    validate_components(config)
    device = resolve_device(config.device)
    path = Path(config.out_dir) if config.out_dir else default_run_dir(config)
    config = dataclasses.replace(config, out_dir=str(path))
    fd = federated_data(config, num_partitions=1)
    if config.sim.resume and (path / "config.toml").exists():
        run_dir = RunDirectory.open(path)
    else:
        run_dir = RunDirectory.create(path, config, environment(device, config, data_record(fd)))
    config = with_attack_caches(config, run_dir)
    spec = model_spec(config, fd)
    model = build_model(spec)
    offset = 0
    checkpoint = run_dir.load_global_model() if config.sim.resume else None
    if checkpoint is not None:
        offset, state = checkpoint
        model.load_state_dict(state)
    remaining = config.num_server_rounds - offset
    if remaining <= 0:
        log.info("run %s already has all %d rounds", path, config.num_server_rounds)
        run_dir.write_summary()
        return path

    strategy = build_strategy(config, spec, fd, device, offset)
    # ε needs every client's partition size; the server's own `fd` has a single partition.
    num_clients = len(list(grid.get_node_ids()))
    ledger = PrivacyLedger.from_config(config, federated_data(config, num_clients))
    # Rounds before a resume were not recorded per client: count every client in each of them.
    strategy.participation.update({client: offset for client in range(num_clients)})
    recorder = RoundRecorder(
        run_dir, strategy, build_model(spec), fd, device, config.attack.images_per_client, ledger
    )
    strategy.on_scored = recorder.on_scored
    strategy.payload_check = functools.partial(check_payload, config, spec)
    train = config.train
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=remaining,
        timeout=config.sim.timeout,
        train_config=ConfigRecord({"lr": train.lr, "local-steps": train.local_steps}),
        evaluate_fn=recorder,
    )
    if strategy.runner is not None:
        strategy.collect(wait=True)
        recorder.flush_late_rows()
        strategy.runner.close()
    run_dir.write_summary()
    (path / "DONE").write_text(json.dumps({"rounds": config.num_server_rounds}))
    return path


def with_attack_caches(config: RunConfig, run_dir: RunDirectory) -> RunConfig:
    """Point attacks that cache trained state (LTI's inverter) at `state/<attack>/` of the run
    directory, unless the user chose a folder: `resume` then picks the state up again."""
    params = {name: dict(p) for name, p in config.attack.params.items()}
    for name in config.attack.names:
        given = params.setdefault(name, {})
        attack = build_attack(name, given, seed=config.seed)
        if not hasattr(getattr(attack, "config", None), "cache_dir"):
            continue
        if not any(key.replace("-", "_") == "cache_dir" for key in given):
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


def build_strategy(
    config: RunConfig, spec, fd: FederatedData, device: torch.device, offset: int
) -> CuriousStrategy:
    """FedAvg (inside Flower's central-DP wrapper when configured) wrapped by the curious
    server, with its attacks and their budget."""
    train = config.train
    inner = FedAvg(
        fraction_train=train.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=train.min_clients,
        min_available_nodes=train.min_clients,
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
    budget = Budget(attack.max_iterations, attack.max_seconds, attack.show_progress)
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
        Auditor(decode=fd.dataset.tokenizer.decode if modality == "tokens" else None),
        attacks=attack.names,
        clients_per_round=attack.clients_per_round,
        seed=config.seed,
        round_offset=offset,
        row_context=context,
    )


def make_server_app(config: RunConfig | None = None) -> ServerApp:
    """A ServerApp bound to `config`, or reading Flower's run config when None (`flwr run`)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, config or parse_flat(context.run_config))

    return server


app = make_server_app()
