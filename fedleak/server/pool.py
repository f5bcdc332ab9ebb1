"""Attack jobs on a pool of Ray actors, off the round's critical path.

`RayAttackPool` implements the `AttackRunner` protocol: `submit` hands jobs to long-lived
worker actors and returns at once; `ready` hands back whatever has finished, under the job
(and so the round) it belongs to. It joins the Ray runtime that Flower's simulation engine
started in this process (the ServerApp runs in a thread of it) and never starts its own.

Placement. Flower's client pool claims every CPU (and, with GPU fractions, as many GPU shares
as fit) of every node, so attack workers must not compete for those: they ask Ray for no CPU
and for `attack.worker-cpus` units of the custom resource `fedleak_attack` instead, which
`ray_init_args` reserves on a local machine (taking those CPUs away from the clients) and a
cluster operator declares with `ray start --resources`. Without that resource the workers
share the clients' cores (a warning says so). `attack.worker-gpus` is an ordinary Ray GPU
share, left free by `ray_init_args` capping the number of client actors. Workers start at the
first `submit` (the client pool exists by then) and must be placed within
`PLACEMENT_TIMEOUT` seconds, or the round fails with a message naming what was missing.

Batches. Workers receive batches, not single jobs: the jobs of one attack in one `submit`
(a round's attacked clients) travel as one batch when the attack inverts several
observations at once (`BatchAttack`), exactly as the inline runner groups them, so a batch
gives the same reconstructions on either; other attacks send one job per batch. The round's
weights go to the object store once, and each observation once.

Routing. A batch goes to the worker with the fewest queued jobs, except for attacks that keep
state across rounds (the learned LTI attack trains and keeps an inverter): all batches of
such an attack go to one worker, which runs them in submission order, so it sees the same
sequence of observations as inline execution. An attack is taken as stateless when its
registry entry says so (`stateful=False` at registration, or the class attribute
`stateful = False`); every other attack is pinned.

Failures. An attack's exception becomes a failed row inside the worker (`run_job`). A worker
that dies (a segfault, the OOM killer, a lost node) costs only the job it was running: the
actor is replaced, a batch it was running is retried one job at a time (so a batch too big
for memory still completes, and a job that kills its worker dies alone), a single job is
retried once and recorded as failed ("worker died: ...") when its worker dies again, and the
batches queued behind are resubmitted to the replacement in order. The one retry is there
because a dying worker also loses the reply of the job it finished just before: that job
sits at the head of the queue and reads as dead too, though it did nothing wrong.

Setting `FEDLEAK_KILL_WORKER` to `<attack>@<round>:<client>` makes the worker that runs that
job exit, for tests (`...:once`: only the first worker).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from fedleak.attacks.outcome import failed_reconstruction
from fedleak.attacks.registry import attack_entry, build_attack
from fedleak.attacks.types import (
    Attack,
    AttackerKnowledge,
    Budget,
    Observation,
    Reconstruction,
    RunStateError,
)
from fedleak.config import ConfigError, RunConfig
from fedleak.heap import reuse_freed_memory
from fedleak.interrupt import raise_if_stopped
from fedleak.lines import first_line
from fedleak.runtime import deterministic_kernels
from fedleak.server.runner import (
    AttackJob,
    AttackResult,
    BatchAttack,
    ObservationChanged,
    batches,
    run_batch,
)

log = logging.getLogger(__name__)

ATTACK_RESOURCE = "fedleak_attack"  # no dash: Flower turns dashes in backend keys into "_"
KILL_ENV = "FEDLEAK_KILL_WORKER"
PLACEMENT_TIMEOUT = 120.0
WAIT_POLL_SECONDS = 0.5  # how often a wait for the workers looks for a stop request


class PoolError(RuntimeError):
    """The worker pool cannot run: no Ray runtime, or workers that cannot be placed."""


class ResourceRequestError(ConfigError):
    """Clients or attack workers ask for GPUs (or CPUs) that the machine does not have."""


@dataclass(frozen=True)
class Fault:
    """A job whose worker exits on purpose: `<attack>@<round>:<client>` in `FEDLEAK_KILL_WORKER`,
    with `:once` for a worker that dies only the first time (a transient loss: the workers
    started after it do not carry the fault)."""

    attack: str
    round: int
    client: int
    once: bool = False

    @classmethod
    def parse(cls, text: str | None) -> Fault | None:
        """None for an unset or empty variable; ValueError for a malformed one."""
        if not text:
            return None
        attack, _, rest = text.partition("@")
        server_round, _, client = rest.partition(":")
        client, _, once = client.partition(":")
        try:
            if once not in ("", "once"):
                raise ValueError(once)
            return cls(attack, int(server_round), int(client), once=once == "once")
        except ValueError:
            raise ValueError(
                f"{KILL_ENV}={text!r}: expected <attack>@<round>:<client>[:once], e.g. aux-mean@2:0"
            ) from None

    def hits(self, job: AttackJob) -> bool:
        """Whether `job` is the one to die on."""
        observation = job.observation
        return (job.attack, observation.round, observation.client_id) == (
            self.attack,
            self.round,
            self.client,
        )


def _on_cpu(knowledge: AttackerKnowledge) -> AttackerKnowledge:
    """A copy that can cross to any process: tensors on the CPU."""
    return dataclasses.replace(
        knowledge,
        aux_inputs=knowledge.aux_inputs.cpu(),
        aux_labels=knowledge.aux_labels.cpu(),
        device=torch.device("cpu"),
    )


class AttackWorker:
    """One Ray actor's state: its own attack objects and the knowledge on its own device."""

    def __init__(
        self,
        specs: Mapping[str, Mapping[str, object]],
        seed: int,
        knowledge: AttackerKnowledge,
        budget: Budget,
        device: str,
        threads: int,
        fault: Fault | None,
        deterministic: bool,
    ) -> None:
        reuse_freed_memory()
        torch.set_num_threads(threads)
        # A GPU share makes Ray expose that GPU to this process, so CUDA here is ours.
        self.device = torch.device(
            "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
        )
        if device == "cuda" and self.device.type != "cuda":
            raise RuntimeError("device='cuda' but this attack worker sees no CUDA device")
        deterministic_kernels(self.device, deterministic)
        self.knowledge = dataclasses.replace(
            knowledge,
            aux_inputs=knowledge.aux_inputs.to(self.device),
            aux_labels=knowledge.aux_labels.to(self.device),
            device=self.device,
        )
        self.specs = specs
        self.seed = seed
        self.budget = budget
        self.fault = fault
        self.attacks: dict[str, Attack] = {}

    def ready(self) -> str:
        """The device this worker attacks on; answering at all means it was placed."""
        return str(self.device)

    def run(
        self,
        job_ids: list[int],
        attack: str,
        weights: dict[str, torch.Tensor],
        *observations: Observation,
    ) -> list[Reconstruction]:
        """Run one batch of an attack's jobs; the weights travel separately, once per round
        for all its jobs, and are put back into every observation."""
        jobs = [
            AttackJob(job_id, attack, dataclasses.replace(observation, weights=weights))
            for job_id, observation in zip(job_ids, observations, strict=True)
        ]
        if self.fault is not None and any(self.fault.hits(job) for job in jobs):
            # Ray sends a task's reply after it returns: an exit at once could take the reply
            # of the job before with it, and a test would see two deaths for one.
            time.sleep(1.0)
            os._exit(17)
        if attack not in self.attacks:
            self.attacks[attack] = build_attack(attack, self.specs.get(attack, {}), seed=self.seed)
        results = run_batch(jobs, self.attacks[attack], self.knowledge, self.budget)
        return [result.reconstruction for result in results]


@dataclass
class _Pending:
    """A batch on its way: its jobs, the object-store references to (re)submit it with, and
    the future of its results."""

    jobs: list[AttackJob]
    weights: Any
    observations: list[Any]
    future: Any
    submitted: float
    deaths: int = 0  # workers that died while this batch was the oldest they held

    @property
    def attack(self) -> str:
        """The attack every job of the batch runs."""
        return self.jobs[0].attack

    def args(self) -> tuple[Any, ...]:
        """`AttackWorker.run` arguments; references at the top level, so Ray resolves them."""
        job_ids = [job.job_id for job in self.jobs]
        return (job_ids, self.attack, self.weights, *self.observations)

    def singles(self) -> list[_Pending]:
        """The batch as one-job batches, to retry after its worker died."""
        return [
            _Pending([job], self.weights, [ref], None, time.perf_counter())
            for job, ref in zip(self.jobs, self.observations, strict=True)
        ]


@dataclass
class _Slot:
    """One worker position: its current actor and its jobs, oldest (the running one) first."""

    actor: Any
    queue: deque[_Pending] = field(default_factory=deque)


class RayAttackPool:
    """`attack.workers` Ray actors running attack jobs asynchronously (see the module doc)."""

    def __init__(
        self,
        config: RunConfig,
        knowledge: AttackerKnowledge,
        budget: Budget,
        *,
        placement_timeout: float = PLACEMENT_TIMEOUT,
    ) -> None:
        attack = config.attack
        if attack.workers < 1:
            raise ConfigError(f"attack.workers={attack.workers}: a worker pool needs at least 1")
        if config.device == "cuda" and attack.worker_gpus == 0:
            raise ResourceRequestError(
                "attack.worker-gpus=0 with device='cuda': Ray hides GPUs from workers without "
                "a GPU share; set attack.worker-gpus > 0 or device='auto'"
            )
        self.workers = attack.workers
        self.worker_cpus = attack.worker_cpus
        self.worker_gpus = attack.worker_gpus
        self.device = config.device
        self.deterministic = config.deterministic
        self.seed = knowledge.seed
        self.specs = {name: dict(attack.params.get(name, {})) for name in attack.names}
        # Built here too: bad parameters fail before the run, and routing needs to know state.
        built = {
            name: build_attack(name, self.specs[name], seed=self.seed) for name in attack.names
        }
        self.stateful = {name for name in attack.names if attack_entry(name).stateful}
        self.batched = {name for name, a in built.items() if isinstance(a, BatchAttack)}
        self.knowledge = _on_cpu(knowledge)
        self.budget = budget
        self.placement_timeout = placement_timeout
        self.fault = Fault.parse(os.environ.get(KILL_ENV))
        self.replaced = 0
        self._started = False
        self._slots: list[_Slot] = []
        self._lost: list[AttackResult] = []
        self._pinned: dict[str, _Slot] = {}
        self._options: dict[str, Any] = {}
        self._knowledge_ref: Any = None

    # -- start-up ---------------------------------------------------------------------------
    def _start(self) -> None:
        """Join Flower's Ray, check the cluster can hold the workers, start and place them."""
        if not ray.is_initialized():
            raise PoolError(
                f"attack.workers={self.workers} runs attacks on Ray actors, but Ray is not "
                "initialised in this process; run the study through Flower's simulation engine "
                "(fedleak run, flwr run) or set attack.workers=0"
            )
        total = ray.cluster_resources()
        need_gpus = self.worker_gpus
        if need_gpus > 0 and total.get("GPU", 0.0) < need_gpus:
            raise PoolError(
                f"attack.worker-gpus={need_gpus:g}: the Ray cluster has "
                f"{total.get('GPU', 0.0):g} GPUs; set attack.worker-gpus=0"
            )
        self._options = {"num_cpus": 0, "num_gpus": need_gpus, "max_restarts": 0}
        reserved = total.get(ATTACK_RESOURCE, 0.0)
        wanted = self.workers * self.worker_cpus
        if reserved > 0:
            if reserved + 1e-9 < wanted:
                raise PoolError(
                    f"attack.workers={self.workers} x attack.worker-cpus={self.worker_cpus:g} "
                    f"need {wanted:g} units of the Ray resource {ATTACK_RESOURCE!r}; the "
                    f"cluster offers {reserved:g}"
                )
            self._options["resources"] = {ATTACK_RESOURCE: self.worker_cpus}
        else:
            log.warning(
                "no %r resource in the Ray cluster: attack workers share CPU cores with the "
                "clients (see docs/scale.md to reserve cores for them)",
                ATTACK_RESOURCE,
            )
        self._knowledge_ref = ray.put(self.knowledge)
        actors = [self._new_actor() for _ in range(self.workers)]
        self._await_placement(actors)
        self._slots = [_Slot(actor) for actor in actors]

    def _new_actor(self) -> Any:
        threads = max(1, round(self.worker_cpus))
        remote = ray.remote(AttackWorker).options(**self._options)
        return remote.remote(
            self.specs,
            self.seed,
            self._knowledge_ref,
            self.budget,
            self.device,
            threads,
            self.fault,
            self.deterministic,
        )

    def _await_placement(self, actors: list[Any]) -> None:
        try:
            devices = ray.get([a.ready.remote() for a in actors], timeout=self.placement_timeout)
        except GetTimeoutError:
            for actor in actors:
                ray.kill(actor)
            free = {k: v for k, v in ray.available_resources().items() if "node:" not in k}
            raise PoolError(
                f"attack workers were not placed within {self.placement_timeout:g} s: each "
                f"needs {self._request()}; free now: {free}. Lower attack.worker-gpus or the "
                "clients' share, or add the resource (docs/scale.md)"
            ) from None
        except RayActorError as error:
            raise PoolError(f"an attack worker failed to start: {first_line(error)}") from None
        log.info("attack workers ready on %s", ", ".join(devices))

    def _request(self) -> str:
        parts = [f"GPU={self._options.get('num_gpus', 0):g}"]
        for name, amount in self._options.get("resources", {}).items():
            parts.append(f"{name}={amount:g}")
        return ", ".join(parts)

    # -- the AttackRunner protocol ------------------------------------------------------------
    def submit(self, jobs: Sequence[AttackJob]) -> None:
        """Queue the jobs on the workers and return at once (the first call starts them)."""
        if not jobs:
            return
        if not self._started:
            self._start()
            self._started = True
        # Every job of a round shares w_t, and every attack on a client shares its update:
        # each goes to the object store once.
        stored: dict[int, tuple[object, Any]] = {}

        def ref(key: object, value: object) -> Any:
            if id(key) not in stored:
                stored[id(key)] = (key, ray.put(value))
            return stored[id(key)][1]

        for group in batches(jobs):
            if group[0].attack in self.batched:
                # One weights reference per batch: observations of one round share w_t.
                split: dict[int, list[AttackJob]] = {}
                for job in group:
                    split.setdefault(id(job.observation.weights), []).append(job)
                parts = list(split.values())
            else:
                parts = [[job] for job in group]
            for part in parts:
                weights = part[0].observation.weights
                bare = [
                    ref(job.observation, dataclasses.replace(job.observation, weights={}))
                    for job in part
                ]
                pending = _Pending(part, ref(weights, weights), bare, None, time.perf_counter())
                self._enqueue(pending)

    def _enqueue(self, pending: _Pending) -> None:
        if not self._slots:
            reconstruction = failed_reconstruction("no attack worker left (all died)", 0.0)
            self._lost += [AttackResult(job, reconstruction) for job in pending.jobs]
            return
        slot = self._route(pending.attack)
        pending.future = slot.actor.run.remote(*pending.args())
        slot.queue.append(pending)

    def _route(self, attack: str) -> _Slot:
        if attack in self._pinned:
            return self._pinned[attack]
        slot = min(self._slots, key=lambda s: sum(len(p.jobs) for p in s.queue))
        if attack in self.stateful:
            self._pinned[attack] = slot
        return slot

    def ready(self, wait: bool = False) -> list[AttackResult]:
        """Finished results in each worker's order; with `wait`, every outstanding one (a
        stop request ends the wait: `RunInterrupted`)."""
        results = self._harvest()
        while wait and self.outstanding:
            raise_if_stopped("while waiting for the attack workers")
            futures = [p.future for s in self._slots for p in s.queue]
            ray.wait(futures, num_returns=1, timeout=WAIT_POLL_SECONDS)
            results += self._harvest()
        lost, self._lost = self._lost, []
        return lost + results

    @property
    def queued(self) -> list[list[AttackJob]]:
        """The jobs each worker still holds, the running batch first."""
        return [[job for pending in slot.queue for job in pending.jobs] for slot in self._slots]

    @property
    def outstanding(self) -> int:
        """Jobs submitted and not yet handed back."""
        return sum(len(pending.jobs) for slot in self._slots for pending in slot.queue)

    def _harvest(self) -> list[AttackResult]:
        futures = [p.future for s in self._slots for p in s.queue]
        if not futures:
            return []
        done, _ = ray.wait(futures, num_returns=len(futures), timeout=0)
        done = set(done)
        results = []
        for slot in list(self._slots):
            while slot.queue and slot.queue[0].future in done:
                pending = slot.queue.popleft()
                seconds = (time.perf_counter() - pending.submitted) / len(pending.jobs)
                try:
                    reconstructions = ray.get(pending.future)
                except RayActorError as error:
                    message = f"worker died: {first_line(error)}"
                    pending.deaths += 1
                    if len(pending.jobs) > 1:
                        log.warning(
                            "attack %s: %s; retrying its batch of %d one job at a time",
                            pending.attack,
                            message,
                            len(pending.jobs),
                        )
                        slot.queue.extendleft(reversed(pending.singles()))
                    elif pending.deaths == 1:
                        log.warning("attack %s: %s; retrying the job once", pending.attack, message)
                        slot.queue.appendleft(pending)
                    else:
                        log.warning("attack %s: %s", pending.attack, message)
                        failed = failed_reconstruction(message, seconds)
                        results.append(AttackResult(pending.jobs[0], failed))
                    self._replace(slot)
                    break
                except RayError as error:
                    # An error outside `run_job` (e.g. unpickling); report its cause, not Ray's
                    # wrapper, whose first line is only the task's name.
                    cause = getattr(error, "cause", None) or error
                    if isinstance(cause, RunStateError | ObservationChanged):
                        raise cause from None  # the run stops: see `run_job`
                    failed = failed_reconstruction(cause, seconds)
                    results += [AttackResult(job, failed) for job in pending.jobs]
                else:
                    results += [
                        AttackResult(job, reconstruction)
                        for job, reconstruction in zip(pending.jobs, reconstructions, strict=True)
                    ]
        return results

    def _replace(self, slot: _Slot) -> None:
        """A fresh actor in the dead one's place; the jobs queued behind go to it, in order.

        When no replacement can be placed (a lost node), the slot is dropped and its queue
        moves to the other workers; with none left, those jobs are recorded as failed.
        """
        ray.kill(slot.actor, no_restart=True)
        if self.fault is not None and self.fault.once:
            self.fault = None
        slot.actor = self._new_actor()
        try:
            self._await_placement([slot.actor])
        except PoolError as error:
            log.warning("attack worker not replaced: %s", error)
            self._slots.remove(slot)
            self._pinned = {k: v for k, v in self._pinned.items() if v is not slot}
            orphans, slot.queue = list(slot.queue), deque()
            for pending in orphans:
                self._enqueue(pending)
            return
        self.replaced += 1
        for pending in slot.queue:
            pending.submitted = time.perf_counter()
            pending.future = slot.actor.run.remote(*pending.args())

    def close(self) -> None:
        """Stop the workers; jobs still outstanding are abandoned."""
        if ray.is_initialized():
            for slot in self._slots:
                ray.kill(slot.actor, no_restart=True)
        self._slots, self._pinned = [], {}


# -- resources asked of Ray before the simulation starts -------------------------------------
def _cluster_address() -> str | None:
    """The existing cluster `ray.init()` will join (RAY_ADDRESS), or None for a local Ray."""
    address = os.environ.get("RAY_ADDRESS", "")
    return None if address in ("", "local") else address


# How long a cluster's head may take to accept a connection before it counts as absent.
CLUSTER_PROBE_SECONDS = 5.0


def check_cluster_address() -> None:
    """Refuse a `RAY_ADDRESS` no Ray cluster answers at, before the run starts: `ray.init`
    retries the connection without end, and a stop request waits for a safe point that never
    comes. `auto`: the cluster last started on this machine, as Ray finds it."""
    address = _cluster_address()
    if address is None:
        return
    expected = (
        "expected HOST:PORT of a running cluster's head (`ray start --head` prints it), 'auto', "
        "or no RAY_ADDRESS to run on this machine"
    )
    target = address
    if address == "auto":
        try:  # Ray's own lookup (its session files); a Ray without it is left to find it
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:
            return
        try:
            target = canonicalize_bootstrap_address("auto") or ""
        except ConnectionError:
            raise ResourceRequestError(
                f"RAY_ADDRESS='auto': no Ray cluster was started on this machine; {expected}"
            ) from None
    host, colon, port = target.removeprefix("ray://").rpartition(":")
    if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise ResourceRequestError(f"RAY_ADDRESS={address!r}: {expected}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), CLUSTER_PROBE_SECONDS):
            pass
    except OSError as error:
        why = error.strerror or type(error).__name__
        raise ResourceRequestError(
            f"RAY_ADDRESS={address!r}: no Ray cluster answers at {host}:{port} ({why}); {expected}"
        ) from None


def local_cpus() -> int:
    """CPUs this process may run on (what Ray would detect, cgroup quotas aside)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_gpu_request(
    client_gpus: float,
    config: RunConfig,
    *,
    gpus: int | None = None,
) -> None:
    """Refuse GPU shares this machine cannot give, before Ray starts (Ray would wait forever).

    `gpus` defaults to the CUDA devices this process sees. Skipped when joining an existing
    cluster (`RAY_ADDRESS`): its GPUs live on other nodes, and the pool checks them itself.
    """
    if _cluster_address() is not None:
        return
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if config.device == "cuda" and gpus == 0:  # before advice about shares no GPU could give
        raise ResourceRequestError(
            "device='cuda': no CUDA GPU is visible to this process; set device='auto' or 'cpu'"
        )
    attack = config.attack
    worker_gpus = attack.worker_gpus if attack.workers > 0 else 0.0
    asks = (("client-gpus", client_gpus), ("attack.worker-gpus", worker_gpus))
    for name, share in asks:
        if share > 0 and gpus == 0:
            raise ResourceRequestError(
                f"{name}={share:g}: no CUDA GPU is visible to this process; set it to 0"
            )
        if share > 1 and share != int(share):
            raise ResourceRequestError(
                f"{name}={share:g}: Ray gives fractions of one GPU or whole GPUs, not both"
            )
        if share > gpus:
            raise ResourceRequestError(f"{name}={share:g}: this machine has {gpus} GPUs")
    if config.device == "cuda" and client_gpus == 0:
        raise ResourceRequestError(
            "client-gpus=0 with device='cuda': Ray hides GPUs from clients without a GPU "
            "share; give clients a share (e.g. --client-gpus 0.25) or set device='auto'"
        )
    if config.device == "cuda" and attack.workers > 0 and attack.worker_gpus == 0:
        raise ResourceRequestError(
            "attack.worker-gpus=0 with device='cuda': Ray hides GPUs from attack workers "
            "without a GPU share; set attack.worker-gpus > 0 or device='auto'"
        )
    if worker_gpus > 0 and attack.workers > _placeable(worker_gpus, gpus):
        raise ResourceRequestError(
            f"attack.workers={attack.workers} x attack.worker-gpus={worker_gpus:g}: the {gpus} "
            f"GPUs here hold at most {_placeable(worker_gpus, gpus)} such workers; ask for "
            "fewer workers or a smaller share"
        )
    if client_gpus > 0 and client_gpus + attack.workers * worker_gpus > gpus + 1e-9:
        raise ResourceRequestError(
            f"client-gpus={client_gpus:g} + attack.workers={attack.workers} x "
            f"attack.worker-gpus={worker_gpus:g}: more than the {gpus} GPUs here, so no "
            "client would fit beside the attack workers"
        )


def _placeable(share: float, gpus: int) -> int:
    """How many actors asking for `share` of a GPU Ray can place on `gpus` GPUs: a fraction
    stays on one GPU (three 0.6 shares do not fit on two), a whole number takes whole GPUs."""
    if share <= 1:
        return gpus * math.floor(1 / share + 1e-9)
    return math.floor(gpus / share + 1e-9)


def ray_init_args(
    config: RunConfig,
    client_cpus: float,
    client_gpus: float,
    *,
    cpus: int | None = None,
    gpus: int | None = None,
) -> dict[str, Any]:
    """`init_args` for Flower's Ray backend that leave room for the attack workers.

    Flower sizes its client pool from a node's total resources, so cores and GPU shares for
    the workers are taken from the clients here: the clients' logical CPUs shrink by
    ceil(workers x worker-cpus), which become the `fedleak_attack` resource, and the CPU
    count is capped so that the clients' GPU shares leave workers x worker-gpus free.
    Returns {} without workers, and when joining an existing cluster (its nodes declare
    their resources themselves, see docs/scale.md). Raises `ResourceRequestError` when
    the split leaves no room for one client.
    """
    check_gpu_request(client_gpus, config, gpus=gpus)
    attack = config.attack
    if attack.workers == 0 or _cluster_address() is not None:
        return {}
    cpus = local_cpus() if cpus is None else cpus
    gpus = torch.cuda.device_count() if gpus is None else gpus
    reserved = math.ceil(attack.workers * attack.worker_cpus - 1e-9)
    client_total = cpus - reserved
    if client_gpus > 0:
        fits = math.floor((gpus - attack.workers * attack.worker_gpus) / client_gpus + 1e-9)
        client_total = min(client_total, math.floor(fits * client_cpus + 1e-9))
    if client_total < client_cpus:
        raise ResourceRequestError(
            f"attack.workers={attack.workers} x attack.worker-cpus={attack.worker_cpus:g} "
            f"(and GPU shares) leave {max(client_total, 0)} of {cpus} CPUs to the clients, "
            f"fewer than one client needs (client-cpus={client_cpus:g}); lower "
            "attack.workers or attack.worker-cpus"
        )
    return {"num_cpus": client_total, "resources": {ATTACK_RESOURCE: reserved}}
