"""`CuriousStrategy`: aggregates exactly as the strategy it wraps, and attacks what it sees.

The wrapped strategy (FedAvg by default) never sees the extra records a simulated client
sends (the audit batch, per-sample updates, BatchNorm statistics, buffers): they are split off
into the attacker's `Observation` and the auditor's `GroundTruth` first, then stripped. The
clients' buffers (BatchNorm running statistics, and any other buffer their local computation
changed) are averaged with FedAvg's weights into the new global state beside the aggregated
parameters, so that evaluation, and attacks that use running statistics, see what the clients
computed.

Same seed, same bits: replies are put in a canonical order (partition id, errors last) before
anything reads them, because FedAvg sums float32 arrays in the order it is given them and
replies arrive in whatever order the clients finish; and each round's clients are drawn by a
`ClientSelection` seeded from the run's seed and the round (`fedleak.server.selection`).

A foreign Flower app audited through fedleak's client mod (`fedleak.client.audit`) replies with
its new weights: the wrapped strategy (the app's own) aggregates them as they are, and the
attacks see their difference to w_t (a FedSGD client's gradient is that difference over -lr).

What happened goes to the `RoundSink` the strategy was built with (`fedleak.server.rounds`):
every scored attack job, and one `RoundLog` per round after its evaluation (`start`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedleak.attacks.types import Modality, Observation, UpdateKind
from fedleak.interrupt import raise_if_stopped
from fedleak.lines import one_line
from fedleak.messages import (
    ARRAYS,
    AUDIT,
    BN_STATS,
    BUFFERS,
    DECLARED,
    EXTRA_RECORDS,
    INJECTED_FAILURE,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    PER_SAMPLE,
    tensors_of,
)
from fedleak.models import build_model
from fedleak.models.spec import ModelSpec
from fedleak.server.auditor import Auditor, GroundTruth
from fedleak.server.central_dp import CentralDP
from fedleak.server.payload import reply_bytes
from fedleak.server.rounds import RoundHistory, RoundLog, RoundSink, ScoredJob
from fedleak.server.runner import AttackJob, AttackRunner
from fedleak.server.selection import (
    ClientSelection,
    FederationError,
    canonical_order,
    check_distinct_partitions,
)
from fedleak.server.step import unit_step

log = logging.getLogger(__name__)

SETTLE_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class PublicSetting:
    """What the server legitimately knows about every update: the protocol, not the data."""

    model: ModelSpec
    update_kind: UpdateKind
    learning_rate: float
    server_lr: float
    defense: str
    share_bn_statistics: bool
    view: str = "client"
    modality: Modality = "image"


@dataclass(frozen=True)
class ClientReply:
    """One reply, split at the wall."""

    observation: Observation
    truth: GroundTruth | None  # None: a foreign client that declared no batch


# The error code `check_failures` gets for a client whose reply never came (Flower's are >= 0).
TIMED_OUT = -1


class ClientCrashed(RuntimeError):
    """A simulated client was lost for a reason the study did not inject (its Ray actor died,
    or fedleak's own client code raised): later rounds would silently drop its updates."""


class AppStrategyFailed(RuntimeError):
    """The audited app's own strategy raised: the user's code, which ends the run as failed
    (FAILED, one line) rather than with a traceback that leaves the folder unfinished."""


def error_line(reason: str) -> str:
    """The one line of a failed reply's reason that says what went wrong: Flower wraps the
    client's exception in Ray's traceback text (colour codes included)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1].removesuffix("'>")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else "no reason given"
    if len(line) <= 300:
        return line
    # Ray's reasons run on for several sentences: keep whole ones.
    end = line.rfind(". ", 0, 300)
    return line[: end + 1] if end > 0 else one_line(line)


def _reading_order(text: str) -> tuple[tuple[str | int, ...], str]:
    """A sort key that orders the digit runs in `text` by value (client 3 before client 10),
    then by the text itself (1.5 and 1.05 read alike as numbers)."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(part) if i % 2 else part for i, part in enumerate(parts)), text


def train_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """The round's training metrics that mean something once aggregated (FedAvg's
    `train_metrics_aggr_fn`): the example-weighted mean training loss, the examples and the
    clients. Per-client declarations (partition id, batch size, learning rate) are left out:
    their mean describes no one. A client whose Poisson batch was empty has no loss (NaN)
    and no weight in the mean."""
    metrics = [next(iter(record.metric_records.values())) for record in records]
    weights = [float(m[weighting_metric_name]) for m in metrics]
    aggregated = MetricRecord({"num-examples": int(sum(weights)), "clients": len(metrics)})
    losses = [
        (float(m["train-loss"]), w)
        for m, w in zip(metrics, weights, strict=True)
        if "train-loss" in m and not math.isnan(float(m["train-loss"]))
    ]
    total = sum(w for _, w in losses)
    if losses and total > 0:
        aggregated["train-loss"] = sum(loss * w for loss, w in losses) / total
    return aggregated


def _metric(metrics: MetricRecord, key: str, default: float) -> float:
    value = metrics.get(key, default)
    return float(value)


def average_buffers(
    replies: list[Message], sent: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The clients' buffers (BatchNorm running statistics and batch counts, any other buffer
    their computation changed) averaged with FedAvg's `num-examples` weights, by Flower's own
    helper, as FedAvg averages a full state: a reply without a buffer another reply carries
    counts with the value `sent` to it (its computation left it there).

    Integer buffers (`num_batches_tracked`) are averaged like the rest and rounded to the
    nearest integer: every client of a round runs the same declared number of local steps, so
    the counts agree and the average is exact; it only matters to BatchNorm layers without
    momentum.
    """
    carried = [
        (tensors_of(msg.content[BUFFERS]), msg.content[METRICS])
        for msg in replies
        if BUFFERS in msg.content
    ]
    names = sorted({name for buffers, _ in carried for name in buffers if name in sent})
    if not names:
        return {}
    records = [
        RecordDict(
            {
                BUFFERS: ArrayRecord({n: buffers.get(n, sent[n]).contiguous() for n in names}),
                METRICS: metrics,
            }
        )
        for buffers, metrics in carried
    ]
    averaged = tensors_of(aggregate_arrayrecords(records, NUM_EXAMPLES))
    return {
        name: (value if sent[name].is_floating_point() else value.round()).to(sent[name].dtype)
        for name, value in averaged.items()
    }


class CuriousStrategy(Strategy):
    """An honest-but-curious server: honest aggregation, plus attacks on every reply it sees.

    Its collaborators come in through the constructor: the wrapped strategy, the public
    setting, the attack runner (None: no attacks), the auditor, the sink that receives every
    scored job and round log (a `RoundHistory` in memory by default), the seeded client
    selection (None: the wrapped strategy selects) and a payload check run before each round.
    """

    def __init__(
        self,
        inner: Strategy,
        public: PublicSetting,
        runner: AttackRunner | None,
        auditor: Auditor,
        *,
        attacks: tuple[str, ...],
        references: frozenset[str] = frozenset(),
        clients_per_round: int,
        seed: int,
        round_offset: int = 0,
        row_context: dict[str, object] | None = None,
        sink: RoundSink | None = None,
        payload_check: Callable[[int], object] | None = None,
        selection: ClientSelection | None = None,
        attacked_rounds: frozenset[int] | None = None,
        simulated: bool = False,
        own_clients: bool = True,
    ) -> None:
        self.inner = inner
        self.simulated = simulated
        self.own_clients = own_clients
        self.selection = selection
        self.public = public
        self.runner = runner
        self.auditor = auditor
        self.attacks = attacks
        self.references = references
        self.clients_per_round = clients_per_round
        self.attacked_rounds = attacked_rounds
        self.seed = seed
        self.round_offset = round_offset
        self.row_context = row_context or {}
        self.sink: RoundSink = sink if sink is not None else RoundHistory()
        self.payload_check = payload_check
        self.global_weights: dict[str, torch.Tensor] = {}
        self._truths: dict[int, GroundTruth | None] = {}
        self._job_rounds: dict[int, int] = {}  # outstanding job id -> its round
        self._next_job = 0
        self._sent = 0
        self._asked = 0  # clients addressed this round: those that never reply failed too
        self._timeout = math.inf
        self._round = RoundLog(round=0)  # the current round's log, completed by `start`
        self._parameters: tuple[str, ...] | None = None

    # -- the run ----------------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's round loop. After each round's evaluation (`evaluate_fn`; round 0 is the
        initial model, not reported again when the run resumes) the round's `RoundLog` goes to
        the sink; once the rounds are done, outstanding attack jobs are awaited and scored.
        The runner is closed however the loop ends (a stop request, a failure)."""

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            # Counted from the run's first round, as the records are (a resumed run's too).
            counted = server_round + self.round_offset
            metrics = evaluate_fn(counted, arrays) if evaluate_fn is not None else None
            if server_round > 0 or self.round_offset == 0:
                self.end_round(counted, arrays, metrics)
            return metrics

        self._timeout = timeout
        try:
            result = super().start(
                grid=grid,
                initial_arrays=initial_arrays,
                num_rounds=num_rounds,
                timeout=timeout,
                train_config=train_config,
                evaluate_config=evaluate_config,
                evaluate_fn=evaluate,
            )
            self.settle()
        finally:
            if self.runner is not None:
                self.runner.close()
        return result

    def end_round(
        self, server_round: int, arrays: ArrayRecord, metrics: MetricRecord | None
    ) -> RoundLog:
        """Close `server_round` (counted from the run's first round): its log, with the global
        model's evaluation, goes to the sink with the new global state."""
        self.settle(before=server_round)
        tally = self._round if self._round.round == server_round else RoundLog(server_round)
        scalars = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, int | float)}
        log_ = dataclasses.replace(
            tally,
            central_epsilon=self.central_epsilon(),
            central_releases=dict(self.inner.releases) if isinstance(self.inner, CentralDP) else {},
            evaluation=scalars,
        )
        self.sink.round_finished(log_, arrays)
        return log_

    # -- rounds -----------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember w_t (the attacker's view and the FedSGD step both need it), draw the
        round's clients (seeded), then let the wrapped strategy address them."""
        raise_if_stopped(f"before round {server_round + self.round_offset}")
        self.global_weights = tensors_of(arrays)
        server_round += self.round_offset
        if self.selection is not None:
            grid = self.selection.grid_for(server_round, grid)
        with self._app_code("configure_train", server_round):
            messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if self.payload_check is not None:
            self.payload_check(len(messages))  # refuse the round before any client works
        self._sent = len(messages) * sum(len(array.data) for array in arrays.values())
        self._asked = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Split, attack, score, strip, then aggregate exactly as the wrapped strategy would."""
        server_round += self.round_offset
        raise_if_stopped(f"in round {server_round}, before it was recorded")
        known = self.selection.partitions if self.selection is not None else None
        replies = canonical_order(replies, known)
        valid = [msg for msg in replies if not msg.has_error()]
        # Failed replies by what they say, not by node ids, which every run draws afresh: the
        # round's first error (FAILED, the summary) is the same in every run.
        failed = sorted(
            ((error_line(msg.error.reason), msg.error.code) for msg in replies if msg.has_error()),
            key=lambda failure: _reading_order(failure[0]),
        )
        errors = [line for line, _ in failed]
        # Flower hands over only the replies that came within the timeout.
        unanswered = max(0, self._asked - len(replies))
        errors += [f"no reply within sim.timeout={self._timeout:g} s"] * unanswered
        # A round refused for its failures says so in one line, without a warning per reply.
        self.check_failures(
            server_round, [code for _, code in failed] + [TIMED_OUT] * unanswered, errors
        )
        for reason in errors:
            log.warning("round %d: client reply failed: %s", server_round, reason)
        split = [self.split(server_round, msg) for msg in valid]
        check_distinct_partitions(
            [reply.observation.client_id for reply in split], f"in round {server_round}"
        )
        jobs = self.attack(server_round, split) if self.runner is not None else 0
        self._round = RoundLog(
            round=server_round,
            replies=len(valid),
            failures=len(errors),
            payload_bytes=self._sent + sum(reply_bytes(msg) for msg in valid),
            participants=tuple(reply.observation.client_id for reply in split),
            first_error=errors[0] if errors else None,
            attack_jobs=jobs,
        )
        # A foreign app's clients send weights, which its own strategy aggregates as they are.
        foreign = any(DECLARED in msg.content for msg in valid)
        buffers = {} if foreign else average_buffers(valid, self.global_weights)
        # Attacks cut short by a stop request must not be recorded as the round's leakage.
        raise_if_stopped(f"in round {server_round}, before it was recorded")
        for msg in valid:
            for key in EXTRA_RECORDS:
                if key in msg.content:
                    del msg.content[key]
        with self._app_code("aggregate_train", server_round):
            aggregate, metrics = self.inner.aggregate_train(server_round, replies)
        if aggregate is None or foreign:
            return aggregate, metrics
        return ArrayRecord(self.step(tensors_of(aggregate), buffers)), metrics

    def check_failures(self, server_round: int, codes: list[int], errors: list[str]) -> None:
        """In a simulation, refuse a round that lost a client to the engine (a dead Ray actor,
        which Flower never replaces, so every later round would lose clients too) or, for
        fedleak's own clients, to anything but `sim.fail-rate`'s seeded draw: the study would
        no longer be the configured one. An audited app's own exceptions, and a deployment's
        nodes that leave, are failed clients of the round, as its strategy counts them."""
        if not self.simulated:
            return
        for code, reason in zip(codes, errors, strict=True):
            raised = code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            if not raised or (self.own_clients and INJECTED_FAILURE not in reason):
                raise ClientCrashed(
                    f"round {server_round}: a client failed ({reason}); in a simulation only "
                    "sim.fail-rate's seeded failures belong to the study, so the run stops "
                    "before recording this round: remove the cause and resume with sim.resume=true "
                    "(--set with fedleak run, --run-config with flwr run, in the settings "
                    "passed to fedleak.audit)"
                )

    def split(self, server_round: int, msg: Message) -> ClientReply:
        """The attacker's view and the auditor's view of one reply."""
        content = msg.content
        if DECLARED in content:
            return self.split_foreign(server_round, msg)
        if AUDIT not in content or METRICS not in content:  # not fedleak's own client either
            raise FederationError(
                f"round {server_round}: a reply carries no fedleak declaration: the app's "
                "ClientApp needs fedleak's client mod (ClientApp(mods=[fedleak_mod]), from "
                "fedleak.client.audit)"
            )
        metrics = content[METRICS]
        client_id = int(_metric(metrics, PARTITION_ID, -1))
        per_sample = tensors_of(content[PER_SAMPLE]) if PER_SAMPLE in content else None
        bn_stats = None
        if self.public.share_bn_statistics and BN_STATS in content:
            bn_stats = tensors_of(content[BN_STATS])
        observation = Observation(
            round=server_round,
            client_id=client_id,
            model=self.public.model,
            weights=self.global_weights,
            update=tensors_of(content[ARRAYS]),
            update_kind=self.public.update_kind,
            num_examples=int(_metric(metrics, "num-examples", 0)),
            batch_size=int(_metric(metrics, "batch-size", 0)),
            local_steps=int(_metric(metrics, "local-steps", 1)),
            learning_rate=_metric(metrics, "learning-rate", self.public.learning_rate),
            defense=self.public.defense,
            per_sample_updates=per_sample,
            bn_statistics=bn_stats,
            modality=self.public.modality,
        )
        truth = GroundTruth.from_audit(client_id, tensors_of(content[AUDIT]))
        return ClientReply(observation, truth)

    def split_foreign(self, server_round: int, msg: Message) -> ClientReply:
        """A foreign app's reply (through fedleak's client mod): its arrays are the client's
        new weights w, so the update is w - w_t, or (w_t - w) / lr for a client that declared
        FedSGD (one step on one batch). The protocol is what the client declared, else one
        step of the run's learning rate on the examples its metrics report; without a declared
        batch there is no ground truth (the rows say so)."""
        content = msg.content
        declared = content[DECLARED]
        client_id = int(declared[PARTITION_ID])
        where = f"round {server_round}, client {client_id}"
        # The records the app's strategy reads, under the keys it reads them by.
        arrays_key = _strategy_setting(self.inner, "arrayrecord_key", ARRAYS)
        if arrays_key not in content.array_records:
            raise FederationError(
                f"{where}: the reply holds no ArrayRecord {arrays_key!r} (the strategy's "
                f"arrayrecord_key); it holds {sorted(content.array_records)}"
            )
        after = tensors_of(content[arrays_key])
        names = self.parameter_names()
        lr = float(declared.get("learning-rate", self.public.learning_rate))
        weighted_by = _strategy_setting(self.inner, "weighted_by_key", NUM_EXAMPLES)
        reported = next(
            (
                record[weighted_by]
                for record in content.metric_records.values()
                if weighted_by in record
            ),
            0,
        )
        examples = int(declared.get(NUM_EXAMPLES, reported))  # type: ignore[arg-type]
        if examples < 1:
            raise FederationError(
                f"{where}: the reply declares no batch and its metrics report no "
                f"{weighted_by!r} (the strategy's weighted_by_key): call declare(...) with the "
                "batch the client trained on, or report how many examples it trained on"
            )
        kind: UpdateKind = "delta"
        update = {n: after[n] - self.global_weights[n] for n in names}
        if declared.get("mode") == "fedsgd":
            kind = "gradient"
            update = {n: -value / lr for n, value in update.items()}
        observation = Observation(
            round=server_round,
            client_id=client_id,
            model=self.public.model,
            weights=self.global_weights,
            update=update,
            update_kind=kind,
            num_examples=examples,
            batch_size=int(declared.get("batch-size", examples)),
            local_steps=int(declared.get("local-steps", 1)),
            learning_rate=lr,
            defense=self.public.defense,
            modality=self.public.modality,
        )
        truth = None
        if AUDIT in content:
            truth = GroundTruth.from_audit(client_id, tensors_of(content[AUDIT]))
            classes = self.public.model.num_classes
            if truth.labels.numel() and int(truth.labels.max()) >= classes:
                raise FederationError(
                    f"{where}: declared labels up to {int(truth.labels.max())}, but "
                    f"model.name={self.public.model.name!r} scores {classes} classes; expected "
                    f"class indices 0..{classes - 1}"
                )
        return ClientReply(observation, truth)

    def parameter_names(self) -> tuple[str, ...]:
        """The model's trainable parameters (a foreign reply's arrays also hold its buffers,
        which are state, not update)."""
        if self._parameters is None:
            model = build_model(self.public.model)
            self._parameters = tuple(name for name, _ in model.named_parameters())
        return self._parameters

    def chosen(self, server_round: int, split: list[ClientReply]) -> list[ClientReply]:
        """The clients attacked this round: all, or a seeded sample of `clients_per_round`."""
        ordered = sorted(split, key=lambda reply: reply.observation.client_id)
        if self.clients_per_round > len(ordered) > 0:
            # An audited app's pool, or failed replies, can leave fewer clients than asked for.
            log.warning(
                "round %d: attack.clients-per-round=%d, but %d clients replied; attacking all",
                server_round,
                self.clients_per_round,
                len(ordered),
            )
        if self.clients_per_round == 0 or self.clients_per_round >= len(ordered):
            return ordered
        rng = np.random.default_rng([self.seed, server_round, 0xA77AC])
        picked = sorted(rng.choice(len(ordered), self.clients_per_round, replace=False))
        return [ordered[i] for i in picked]

    def attack(self, server_round: int, split: list[ClientReply]) -> int:
        """Hand the chosen observations to the runner; score whatever is already finished.
        Returns the number of jobs submitted for the round."""
        if self.attacked_rounds is not None and server_round not in self.attacked_rounds:
            self.collect(wait=False)
            return 0
        targets = self.chosen(server_round, split)
        if self.public.view == "aggregate" and targets:
            targets = [self.aggregate_view(server_round, split)]
        jobs = []
        for target in targets:
            for name in self.attacks:
                jobs.append(AttackJob(self._next_job, name, target.observation))
                self._truths[self._next_job] = target.truth
                self._job_rounds[self._next_job] = server_round
                self._next_job += 1
        self.runner.submit(jobs)
        self.collect(wait=False)
        return len(jobs)

    def settle(self, before: int | None = None) -> None:
        """Wait for, and score, every attack job of the rounds before `before` (all of them
        when None). A worker pool attacks round t while round t + 1 trains; waiting for it at
        the end of round t + 1 keeps that overlap, bounds what is held in memory, and lets
        round t be recorded, whole, before the next one. A stop request ends the wait (the
        rounds not recorded are done again on resume)."""
        if self.runner is None:
            return
        if before is None:
            self.collect(wait=True)
            return
        while any(r < before for r in self._job_rounds.values()):
            raise_if_stopped(f"while waiting for round {min(self._job_rounds.values())}'s attacks")
            if not self.collect(wait=False):
                time.sleep(SETTLE_POLL_SECONDS)

    def collect(self, wait: bool) -> int:
        """Score finished attacks under the round their observation came from; returns how
        many were scored."""
        if self.runner is None:
            return 0
        results = self.runner.ready(wait)
        for result in results:
            observation = result.job.observation
            truth = self._truths.pop(result.job.job_id)
            del self._job_rounds[result.job.job_id]
            context = {
                **self.row_context,
                # What this update was (a foreign client declares its own protocol).
                "mode": "fedsgd" if observation.update_kind == "gradient" else "fedavg",
                "reference": result.job.attack in self.references,
            }
            rows = self.auditor.score(
                observation, result.job.attack, result.reconstruction, truth, context
            )
            self.sink.scored(ScoredJob(result, truth, tuple(rows)))
        return len(results)

    def aggregate_view(self, server_round: int, split: list[ClientReply]) -> ClientReply:
        """What a server behind secure aggregation sees: only the weighted sum of the round."""
        total = sum(r.observation.num_examples for r in split)
        update = {
            name: sum(
                r.observation.update[name] * (r.observation.num_examples / total) for r in split
            )
            for name in split[0].observation.update
        }
        first = split[0].observation
        observation = Observation(
            round=server_round,
            client_id=-1,
            model=first.model,
            weights=first.weights,
            update=update,
            update_kind=first.update_kind,
            num_examples=total,
            batch_size=total,
            local_steps=first.local_steps,
            learning_rate=first.learning_rate,
            defense=first.defense,
            modality=first.modality,
            contributors=len(split),
        )
        truths = [r.truth for r in split]
        known = [t for t in truths if t is not None]
        union = GroundTruth.union(known) if len(known) == len(truths) else None
        return ClientReply(observation, union)

    def step(
        self, aggregate: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Apply the aggregated update to w_t (`unit_step`: an SGD step for gradients, a sum
        for deltas) and take the clients' averaged buffers (w_t's own where no client sent
        any)."""
        new = {name: value.clone() for name, value in self.global_weights.items()}
        public = self.public
        scale = public.server_lr * unit_step(
            public.update_kind, public.learning_rate, public.defense
        )
        for name, value in aggregate.items():
            new[name] = self.global_weights[name] + scale * value
        for name, value in buffers.items():
            if name in new:
                new[name] = value.to(new[name].dtype)
        return new

    # -- delegated hooks --------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation is the wrapped strategy's business."""
        server_round += self.round_offset
        with self._app_code("configure_evaluate", server_round):
            return list(self.inner.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Federated evaluation is the wrapped strategy's business."""
        server_round += self.round_offset
        with self._app_code("aggregate_evaluate", server_round):
            return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log the wrapped strategy and what this one adds."""
        with self._app_code("summary"):
            self.inner.summary()
        log.info(
            "CuriousStrategy: attacks %s on %s clients per round, defense %r",
            ",".join(self.attacks) or "none",
            self.clients_per_round or "all",
            self.public.defense,
        )

    @contextlib.contextmanager
    def _app_code(self, hook: str, server_round: int | None = None) -> Iterator[None]:
        """Around a call into an audited app's strategy: what it raises becomes one line
        naming the app's class, the hook and the round. fedleak's own strategies, and
        fedleak's errors on the way (central DP's settings), raise as they are."""
        try:
            yield
        except Exception as error:
            if self.own_clients or type(error).__module__.startswith("fedleak."):
                raise
            # Central DP wraps the app's strategy in fedleak's own: the app's is inside.
            app = self.inner.dp.strategy if isinstance(self.inner, CentralDP) else self.inner
            when = f"round {server_round}: " if server_round is not None else ""
            raise AppStrategyFailed(
                f"{when}the app's {type(app).__name__}.{hook} raised "
                f"{one_line(f'{type(error).__name__}: {error}', 240)}"
            ) from error

    def central_epsilon(self) -> float:
        """Client-level ε of central DP so far (`CentralDP` as the inner strategy), else NaN."""
        return self.inner.epsilon() if isinstance(self.inner, CentralDP) else math.nan


def _strategy_setting(strategy: Strategy, name: str, default: str) -> str:
    """A setting of an app's strategy, read through wrappers (Flower's DP wrappers hold the
    strategy they wrap as `.strategy`, without its settings)."""
    seen: set[int] = set()
    current: object = strategy
    while current is not None and id(current) not in seen:
        if hasattr(current, name):
            return str(getattr(current, name))
        seen.add(id(current))
        current = getattr(current, "strategy", None)
    return default
