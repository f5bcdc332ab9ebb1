"""The curious server of a run, built from its configuration: the strategy with its attacks,
runner, auditor and client selection; the global model's first state; and the evaluation of
each round's global model.

Whoever runs the study (`fedleak.simulations.study`) builds these and hands the strategy the
sink that keeps its records (`fedleak.server.rounds`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg, Strategy

from fedleak.attacks.learned.store import (
    InverterStore,
    InverterStoreError,
    check_saved_inverters,
    run_folder_at,
)
from fedleak.attacks.registry import attack_entry, build_attack
from fedleak.attacks.types import AttackerKnowledge, Budget, is_reference
from fedleak.config import ConfigError, RunConfig, attacked_rounds
from fedleak.data import FederatedData, auxiliary
from fedleak.lines import error_line, listed
from fedleak.models import ModelSpec, build_model
from fedleak.seeds import attacker_seed
from fedleak.server.auditor import Auditor
from fedleak.server.central_dp import CentralDP
from fedleak.server.rounds import RoundSink
from fedleak.server.runner import AttackRunner, InlineRunner
from fedleak.server.selection import ClientSelection
from fedleak.server.strategy import CuriousStrategy, PublicSetting, train_metrics
from fedleak.settings import means_none
from fedleak.training.loss import task_scores


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, fd: FederatedData, device: torch.device
) -> tuple[float, float]:
    """Test loss and accuracy of the global model on the held-out split (NaN when it is empty,
    and both NaN when the loss is: the argmax of NaN logits is no prediction): per image, or
    per predicted next token of a language model."""
    x, y = fd.dataset.test_x, fd.dataset.test_y
    if len(x) == 0:
        return float("nan"), float("nan")
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for start in range(0, len(x), 256):
        logits = model(x[start : start + 256].to(device))
        scores = task_scores(logits, y[start : start + 256].to(device))
        loss, correct, count = loss + scores[0], correct + scores[1], count + scores[2]
    if not math.isfinite(loss):
        return float("nan"), float("nan")
    return loss / count, correct / count


class EvaluationFailed(RuntimeError):
    """The model's forward failed on the held-out split (a plug-in's forward that cannot take
    the evaluation's batches): the run stops, naming the model rather than Flower's engine."""


class GlobalEvaluation:
    """Flower's `evaluate_fn`: test loss and accuracy of each round's global model."""

    def __init__(self, spec: ModelSpec, fd: FederatedData, device: torch.device) -> None:
        self.spec = spec
        self.model = build_model(spec)
        self.fd = fd
        self.device = device

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Load the global state and evaluate it."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        self.model.to(self.device)
        try:
            loss, accuracy = evaluate(self.model, self.fd, self.device)
        except (Exception, SystemExit) as error:  # the model's forward is often the user's
            raise EvaluationFailed(
                f"model.name={self.spec.name!r}: evaluating round {server_round}'s global model "
                f"on the held-out split failed ({error_line(error)})"
            ) from None
        return MetricRecord({"test-loss": loss, "test-accuracy": accuracy})


def initial_state(spec: ModelSpec, *states: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The run's first global state: the model built from torch's global seed, with each of
    `states` loaded in turn (a foreign app's initial weights, a resumed run's checkpoint).
    Raises `RuntimeError` (torch's) when a state does not fit the model."""
    model = build_model(spec)
    for state in states:
        model.load_state_dict(state)
    return ArrayRecord(model.state_dict())


def with_attack_caches(config: RunConfig, cache_dir: Callable[[str], Path]) -> RunConfig:
    """Point attacks that cache trained state (LTI's inverter) at `cache_dir(attack)`, unless
    the user chose a folder: `resume` then picks the state up again."""
    params = {name: dict(p) for name, p in config.attack.params.items()}
    for name in config.attack.names:
        if not attack_entry(name).accepts("cache-dir"):
            continue
        given = params.setdefault(name, {})
        if not any(key.replace("_", "-") == "cache-dir" for key in given):
            given["cache-dir"] = str(cache_dir(name))
    return dataclasses.replace(config, attack=dataclasses.replace(config.attack, params=params))


def restarted_attacks(config: RunConfig) -> str | None:
    """Why a resumed run's attacks may not continue the uninterrupted run: a plug-in attack
    that keeps state across rounds (`stateful`) and saves none (no `cache-dir` setting, as
    LTI's inverter has) starts afresh (audit DM2: every resumed row of one differed)."""
    fresh = [
        name
        for name in config.attack.names
        if attack_entry(name).stateful and not attack_entry(name).accepts("cache-dir")
    ]
    if not fresh:
        return None
    return (
        f"{listed(fresh)} {'keeps' if len(fresh) == 1 else 'keep'} state across rounds "
        "(stateful) and saves none (no cache-dir setting), so the resumed rounds start it "
        "afresh and its rows may differ from an uninterrupted run's; declare stateful = False "
        "if it keeps nothing, or give it a cache-dir setting to save and restore its state"
    )


def cache_dirs(config: RunConfig) -> dict[str, Path]:
    """The folders attacks keep their saved state in (`cache-dir`), by attack: the user's
    choice, and after `with_attack_caches` the run's own folders for the others."""
    return {
        name: Path(str(folder)).expanduser()
        for name in config.attack.names
        for key, folder in config.attack.params.get(name, {}).items()
        if key.replace("_", "-") == "cache-dir" and not means_none(folder)
    }


def check_fresh_caches(config: RunConfig) -> None:
    """A new run's chosen cache folders hold no inverter of its attacks: the attack would go
    on from another run's, trained on other settings, and the same configuration would no
    longer give the same run (`ConfigError`, one line). Nor does one lie in another run's
    folder: both runs' inverters would share it, and that run resume from this one's (audit
    ED1: a cache-dir in a running run's state/lti was taken before it saved there)."""
    run = Path(config.out_dir).resolve() if config.out_dir else None
    for name, folder in cache_dirs(config).items():
        where = folder.resolve()
        owner = run_folder_at(where)
        if owner is not None and (run is None or not where.is_relative_to(run)):
            relation = "is" if owner == where else "lies in"
            raise ConfigError(
                f"attack.{name}.cache-dir={str(folder)!r} {relation} {owner}, another fedleak "
                "run's (or sweep's) folder, whose own inverters may be kept there; expected a "
                "folder of this run's or one outside every run's"
            )
        saved = InverterStore(folder, name).saved()
        if saved:
            raise ConfigError(
                f"attack.{name}.cache-dir={str(folder)!r} holds inverters another run saved "
                f"(the latest {saved[-1][1].name}), which this new run would start from; "
                "expected an empty or new folder, or sim.resume=true to go on with the run "
                "that saved them"
            )


def clear_cached_inverters(config: RunConfig) -> None:
    """Delete the inverters a run saved in its chosen cache folders (a run started over)."""
    for name, folder in cache_dirs(config).items():
        for _, path in InverterStore(folder, name).saved():
            path.unlink(missing_ok=True)


def check_attack_state(config: RunConfig, last_trained: Mapping[str, int]) -> None:
    """What the attacks of a resumed run go on from (`with_attack_caches`' folders) reads
    back, and the file saved in the last training the records show (`last_trained`: attack
    -> round) is there, for the attacks that say where it is (`saved_state`: the learned
    ones); `InverterStoreError` (one line) otherwise. A missing one had the resumed rounds
    train anew, or go on from an older one, without a word (audit DW2: LTI's rows differed
    from the uninterrupted run's). A plug-in keeping state of its own in its cache-dir is
    not checked (audit DZ2)."""
    for name, folder in cache_dirs(config).items():
        check_saved_inverters(folder)
        if name not in last_trained:
            continue
        attack = build_attack(name, config.attack.params.get(name, {}))
        locate = getattr(attack, "saved_state", None)
        if locate is None:
            continue
        file = locate(last_trained[name])
        if file is not None and not file.is_file():
            raise InverterStoreError(
                f"{file}: missing, though the records show {name} trained in round "
                f"{last_trained[name]}; the resumed rounds would train anew: restore it, or "
                "start the run again in a new out-dir"
            )


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
        name: build_attack(name, attack.params.get(name, {}), seed=knowledge.seed)
        for name in attack.names
    }
    return InlineRunner(attacks, knowledge, budget)


def reference_attacks(config: RunConfig) -> frozenset[str]:
    """The configured attacks that are reference baselines (drawn as the report's floor)."""
    return frozenset(
        name
        for name in config.attack.names
        if is_reference(build_attack(name, config.attack.params.get(name, {})))
    )


def build_strategy(
    config: RunConfig,
    spec: ModelSpec,
    fd: FederatedData,
    device: torch.device,
    offset: int,
    inner: Strategy | None = None,
    *,
    sink: RoundSink | None = None,
    payload_check: Callable[[int], object] | None = None,
    central_releases: Mapping[int, int] | None = None,
    simulated: bool = False,
) -> CuriousStrategy:
    """FedAvg (inside Flower's central-DP wrapper when configured) wrapped by the curious
    server, with its attacks and their budget; or `inner`, a foreign app's own strategy,
    which then selects its clients itself. `sink` receives the strategy's records (None: a
    `RoundHistory` in memory); `payload_check` may refuse a round before any client works;
    `central_releases`: central DP's releases before a resume, as its checkpoint recorded them
    (None: the `offset` rounds before it count as releases); `simulated`: the clients run in
    Flower's simulation engine, where a client lost to anything but an injected failure (or,
    for a foreign app, its own exception) ends the run."""
    train = config.train
    selection = None
    own_clients = inner is None
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
        prior = offset if central_releases is None else central_releases
        inner = CentralDP.from_config(inner, config, prior_releases=prior)
    aux_x, aux_y = auxiliary(fd)
    knowledge = AttackerKnowledge(
        aux_inputs=aux_x.to(device),
        aux_labels=aux_y.to(device),
        input_shape=fd.dataset.input_shape,
        num_classes=fd.dataset.num_classes,
        device=device,
        seed=attacker_seed(config.seed),
    )
    attack = config.attack
    budget = Budget(
        attack.max_iterations, attack.max_seconds, attack.show_progress, attack.max_batch
    )
    modality = fd.dataset.modality
    public = PublicSetting(
        modality=modality,
        # Attacks get w_t itself; the seed that drew w_0 is the run's, which would let them
        # redraw the clients' noise and masks (`fedleak.seeds`).
        model=dataclasses.replace(spec, seed=knowledge.seed),
        update_kind="gradient" if train.mode == "fedsgd" else "delta",
        learning_rate=train.lr,
        server_lr=train.server_lr,
        defense=config.defense.spec,
        share_bn_statistics=config.threat.bn_stats == "shared",
        view=config.threat.view,
    )
    context = {
        "defense": config.defense.label,
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
        sink=sink,
        payload_check=payload_check,
        selection=selection,
        attacked_rounds=attacked_rounds(attack.rounds, config.num_server_rounds),
        simulated=simulated,
        own_clients=own_clients,
    )
