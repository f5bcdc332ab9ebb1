"""The optimisation loop shared by the attacks: T independent problems as one batched problem.

The objective returns one loss per problem; the loop sums them before `backward`, which keeps
the problems independent (each problem's variables only receive its own gradient), and the
optimisers act per coordinate (Adam) or per problem (the batched L-BFGS below), so a batch of
T problems gives the result of T separate runs, only faster, up to the round-off by which a
stacked replay differs from a lone one (L-BFGS amplifies it: DLG solves each client alone).

Nothing in the inner loop moves data to the host: NaN detection, snapshots and progress run
every `check_every` iterations (the only synchronisations), the clock is read on the host every
iteration, and the learning-rate schedule is computed on the host from the iteration number.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedleak.attacks.progress import progress_bar
from fedleak.attacks.types import Budget
from fedleak.interrupt import stop_requested

# objective(variables, iteration) -> (total loss [T], matching loss [T]); iteration None asks for
# the final evaluation (full matching, no stochastic terms such as gradient dropout).
Objective = Callable[[Sequence[Tensor], int | None], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class StepDecay:
    """IG's schedule: the rate times `decay` at each milestone (fractions of the iterations);
    with `stages` > 1 the schedule restarts at the start of each equal stage (stepwise)."""

    learning_rate: float
    milestones: tuple[float, ...] = (3 / 8, 5 / 8, 7 / 8)
    decay: float = 0.1
    stages: int = 1

    def rate(self, iteration: int, total: int) -> float:
        """The learning rate at `iteration` of `total`."""
        length = max(1, math.ceil(total / self.stages))
        position = (iteration % length) / length
        passed = sum(position >= m for m in self.milestones)
        return self.learning_rate * self.decay**passed


@dataclass(frozen=True)
class Settings:
    """How to optimise: `adam` (optionally on gradient signs) or `lbfgs`; `box` projects the
    first variable (the inputs) after each step."""

    optimizer: str = "adam"
    schedule: StepDecay = StepDecay(0.1)
    signed: bool = True
    box: tuple[float, float] | None = None
    history: int = 100
    check_every: int = 50
    description: str = "inversion"
    keep_best: bool = False


@dataclass(frozen=True)
class Lost:
    """How a run's kept targets ended: `diverged` targets went non-finite (their last finite
    iterate is returned), `never_finite` of them had no finite matching loss even at the start
    (a NaN update, a loss that overflows): those hold their starting guess, not a result."""

    diverged: int
    never_finite: int
    targets: int

    @classmethod
    def of(cls, matching: Tensor, initial: Tensor) -> Lost:
        """From the kept targets' final and starting matching losses (+inf where lost)."""
        lost = torch.isinf(matching)
        never = lost & ~torch.isfinite(initial)
        return cls(int(lost.sum()), int(never.sum()), len(matching))

    @property
    def nothing(self) -> bool:
        """Every target never had a finite loss: the run has no result."""
        return self.never_finite == self.targets

    def note(self) -> str:
        """What the run's message adds ('' when nothing was lost)."""
        note = ""
        if self.never_finite:
            note += (
                f"; the matching loss of {self.never_finite} of {self.targets} targets was never "
                "finite (the update or its loss is not finite)"
            )
        if self.diverged > self.never_finite:
            note += (
                f"; {self.diverged} of {self.targets} targets diverged (last finite iterate "
                "returned)"
            )
        return note


@dataclass(frozen=True)
class Outcome:
    """The optimised variables (detached, the last finite iterate for diverged problems), the
    final matching loss per problem (+inf where diverged), the matching loss of the starting
    point per problem (`initial`, same evaluation as the final one; +inf where not finite),
    and what the run used. `lost_at`: per problem, the iteration of the check that found its
    iterate non-finite (-1 where none did)."""

    variables: list[Tensor]
    matching: Tensor
    diverged: Tensor
    iterations: int
    seconds: float
    stopped_by: str
    initial: Tensor
    lost_at: Tensor | None = None

    def part(self, start: int, stop: int) -> Outcome:
        """Problems `start:stop` of a batched run: every per-problem tensor (leading dimension
        T) sliced, the run's scalars kept, as if those problems had been optimised alone."""
        problems = self.matching.shape[0]

        def cut(value: object) -> object:
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == problems:
                return value[start:stop]
            if isinstance(value, list):
                return [cut(v) for v in value]
            return value

        part = dataclasses.replace(
            self, **{f.name: cut(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )
        if part.diverged.numel() and bool(part.diverged.all()):
            # As alone: the run stops at the check that finds its last problem lost.
            lost_at = part.lost_at
            alone = part.iterations
            if lost_at is not None and bool((lost_at >= 0).all()):
                alone = int(lost_at.max())
            part = dataclasses.replace(part, stopped_by="nan", iterations=alone)
        return part


class BatchedLBFGS:
    """L-BFGS with fixed step size (DLG's setting: no line search) and a separate curvature
    history per problem, so that stacked problems do not influence each other.

    The direction comes from the compact form of the inverse Hessian (Byrd, Nocedal and
    Schnabel 1994, Theorem 2.2), H = gamma I + [S, gamma Y] M [S, gamma Y]^T with M built from
    the products S^T Y and Y^T Y: the same matrix as the two-loop recursion, from two passes
    over the stored pairs and two small triangular solves instead of ~4m vector operations
    (a DLG step on LeNet spent more time in the two-loop's ~400 small operations than in the
    replay; docs/performance.md). A new pair's products with the stored ones come from the
    previous step's projections, without a third pass. A pair of non-positive curvature is
    stored as zeros for its problem, which removes it from that problem's M as
    torch.optim.LBFGS skips it; unlike there it keeps its slot of the shared history until it
    ages out.
    """

    def __init__(self, variables: Sequence[Tensor], lr: float, history: int) -> None:
        self.variables = list(variables)
        self.lr = lr
        self.history = history
        self.problems = self.variables[0].shape[0]
        # By slot, allocated with the first pair: s and y [T, m, 2, n] (the filled slots one
        # block per problem), their products s_i^T y_j and y_i^T y_j in float64 [T, m, m]
        # (a dropped pair's are zero), and the last projections [S, Y]^T g [T, 2m].
        self.pairs: Tensor | None = None
        self.sy: Tensor | None = None
        self.yy: Tensor | None = None
        self.projected: Tensor | None = None
        self.order: list[int] = []  # slots, oldest pair first
        self.gamma: Tensor | None = None
        self.previous_gradient: Tensor | None = None
        self.previous_step: Tensor | None = None

    def _flat_gradient(self) -> Tensor:
        grads = [torch.zeros_like(v) if v.grad is None else v.grad for v in self.variables]
        return torch.cat([g.reshape(self.problems, -1) for g in grads], dim=1)

    @property
    def kept(self) -> Tensor | None:
        """Which stored pairs each problem kept [T, m]: a kept pair has s^T y > 1e-10, a
        dropped one is stored as zeros."""
        return None if self.sy is None else torch.diagonal(self.sy, dim1=1, dim2=2) > 0

    def _filled(self) -> Tensor:
        """The stored pairs' rows s_0, y_0, s_1, y_1, ... of the filled slots [T, 2k, n]."""
        assert self.pairs is not None
        filled = len(self.order)  # slots fill from 0 and are reused once all m are taken
        return self.pairs[:, :filled].reshape(self.problems, 2 * filled, -1)

    def _project(self, g: Tensor) -> Tensor:
        """[S, Y]^T g by slot [T, 2m] in float64 (zeros for empty slots)."""
        out = g.new_zeros(self.problems, 2 * self.history, dtype=torch.float64)
        if not self.order:
            return out
        filled = self._filled()
        if g.device.type == "cpu":
            # torch's batched matrix-vector product on the CPU ran at a third of `mv`'s speed
            # (16 problems of 200 x 3,082: 4.5 against 1.5 ms, 1 thread).
            rows = torch.stack([torch.mv(p, v) for p, v in zip(filled, g, strict=True)])
        else:
            rows = torch.bmm(filled, g.unsqueeze(2)).squeeze(2)
        out[:, : rows.shape[1]] = rows
        return out

    def _remember(self, g: Tensor, projected: Tensor) -> None:
        """Store the pair (previous step, g - previous gradient), in the oldest slot once the
        history is full; `projected` ([S, Y]^T g over the pairs stored before it) then holds
        the new pair's projections in that slot."""
        assert self.previous_step is not None and self.previous_gradient is not None
        s, y = self.previous_step, g - self.previous_gradient
        m, problems = self.history, self.problems
        ys = (y * s).sum(dim=1)
        yy = (y * y).sum(dim=1)
        valid = ys > 1e-10
        previous = torch.ones_like(ys) if self.gamma is None else self.gamma
        self.gamma = torch.where(valid, ys / yy.clamp_min(1e-30), previous)
        if self.pairs is None:
            self.pairs = s.new_zeros(problems, m, 2, s.shape[1])
            self.sy = torch.zeros(problems, m, m, dtype=torch.float64, device=s.device)
            self.yy = torch.zeros_like(self.sy)
        assert self.sy is not None and self.yy is not None
        # Products with the stored pairs: [S, Y]^T y = [S, Y]^T g minus the same at the
        # previous gradient (the last step's projections, over the same pairs).
        change = projected - (self.projected if self.projected is not None else 0.0)
        change = torch.where(valid.unsqueeze(1), change, 0.0)
        slot = len(self.order) if len(self.order) < m else self.order.pop(0)
        self.order.append(slot)
        keep = valid.unsqueeze(1)
        self.pairs[:, slot, 0] = torch.where(keep, s, 0.0)
        self.pairs[:, slot, 1] = torch.where(keep, y, 0.0)
        self.sy[:, :, slot] = change[:, 0::2]  # s_i^T y_new (the solves read i <= new only)
        self.yy[:, :, slot] = change[:, 1::2]
        self.yy[:, slot, :] = change[:, 1::2]
        zero = torch.zeros_like(ys)
        self.sy[:, slot, slot] = torch.where(valid, ys, zero).to(torch.float64)
        self.yy[:, slot, slot] = torch.where(valid, yy, zero).to(torch.float64)
        fresh = torch.bmm(self.pairs[:, slot], g.unsqueeze(2)).squeeze(2)  # s_new^T g, y_new^T g
        projected[:, 2 * slot : 2 * slot + 2] = fresh

    def _direction(self, g: Tensor, projected: Tensor) -> Tensor:
        """H g for each problem, from `projected` = [S, Y]^T g by slot."""
        if not self.order:
            return g.clone()
        assert self.sy is not None and self.yy is not None
        assert self.gamma is not None
        slots = torch.tensor(self.order, device=g.device)
        gamma = self.gamma.to(torch.float64)[:, None, None]
        sg, yg = projected[:, 2 * slots].unsqueeze(2), projected[:, 2 * slots + 1].unsqueeze(2)
        sy = self.sy[:, slots][:, :, slots]
        yy = self.yy[:, slots][:, :, slots]
        dropped = torch.diagonal(sy, dim1=1, dim2=2) <= 0
        # R: the upper triangle of S^T Y (the solves read no other); a dropped pair's zero
        # row and column get a unit diagonal, so its coefficients come out zero.
        r = sy + torch.diag_embed(dropped.to(torch.float64))
        u = torch.linalg.solve_triangular(r, sg, upper=True)
        inner = torch.diagonal(sy, dim1=1, dim2=2).unsqueeze(2) * u
        inner = inner + gamma * (torch.bmm(yy, u) - yg)
        w = torch.linalg.solve_triangular(r.transpose(1, 2), inner, upper=False)
        coefficients = g.new_zeros(self.problems, self.history, 2)
        coefficients[:, slots, 0] = w.squeeze(2).to(g.dtype)
        coefficients[:, slots, 1] = (-gamma * u).squeeze(2).to(g.dtype)
        filled = self._filled()
        hg = torch.bmm(
            coefficients[:, : filled.shape[1] // 2].reshape(self.problems, 1, -1), filled
        )
        return torch.addcmul(hg.squeeze(1), self.gamma.unsqueeze(1), g)

    @torch.no_grad()
    def step(self) -> None:
        """One step from the gradients stored in `.grad` (non-finite entries count as 0)."""
        g = torch.nan_to_num(self._flat_gradient(), nan=0.0, posinf=0.0, neginf=0.0)
        projected = self._project(g)
        if self.previous_gradient is not None:
            self._remember(g, projected)
        q = self._direction(g, projected)
        self.projected = projected
        if self.previous_gradient is None:
            # As torch.optim.LBFGS: the first step is scaled by min(1, 1/|g|_1).
            scale = (1.0 / g.abs().sum(dim=1).clamp_min(1e-30)).clamp(max=1.0)
            step = -self.lr * scale[:, None] * q
        else:
            step = -self.lr * q
        offset = 0
        for v in self.variables:
            size = v[0].numel()
            v += step[:, offset : offset + size].reshape(v.shape)
            offset += size
        self.previous_gradient, self.previous_step = g, step


class BatchedAdam:
    """Adam exactly as `torch.optim.Adam(fused=True)` computes it (default betas and eps, no
    weight decay): its fused kernel, one call for all variables, without the optimiser's
    per-step bookkeeping, which costs more than the update itself on small problems
    (measured ~0.45 ms a step; the kernel takes ~0.01 ms on one 3x32x32 image, the unfused
    elementwise update ~0.09 ms). Coordinate-wise, so stacked problems stay independent; the
    rate is given at each step (IG's step decay)."""

    def __init__(
        self,
        variables: Sequence[Tensor],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.variables = list(variables)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.first = [torch.zeros_like(v) for v in self.variables]
        self.second = [torch.zeros_like(v) for v in self.variables]
        # Per-variable step counts as the fused kernel reads them (float, on the device).
        self.steps = [torch.zeros((), device=v.device) for v in self.variables]

    @torch.no_grad()
    def step(self, rate: float) -> None:
        """One step from the gradients stored in `.grad` (variables without one stay put)."""
        moving = [i for i, v in enumerate(self.variables) if v.grad is not None]
        if not moving:
            return
        steps = [self.steps[i] for i in moving]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            [self.variables[i] for i in moving],
            [self.variables[i].grad for i in moving],
            [self.first[i] for i in moving],
            [self.second[i] for i in moving],
            [],
            steps,
            lr=rate,
            beta1=self.beta1,
            beta2=self.beta2,
            weight_decay=0.0,
            eps=self.eps,
            amsgrad=False,
            maximize=False,
        )


class Best:
    """Each problem's iterate of lowest matching loss so far (non-finite losses never win)."""

    def __init__(self, variables: Sequence[Tensor]) -> None:
        self.variables = [v.detach().clone() for v in variables]
        self.matching = torch.full((variables[0].shape[0],), math.inf, device=variables[0].device)

    @torch.no_grad()
    def offer(self, variables: Sequence[Tensor], matching: Tensor) -> None:
        """Keep the problems of `variables` whose `matching` beats the best so far."""
        value = matching.detach().to(self.matching.dtype)
        better = value < self.matching
        self.matching = torch.where(better, value, self.matching)
        for kept, v in zip(self.variables, variables, strict=True):
            mask = better.reshape((-1,) + (1,) * (v.dim() - 1))
            kept.copy_(torch.where(mask, v.detach(), kept))


def _finite_per_problem(variables: Sequence[Tensor], loss: Tensor) -> Tensor:
    finite = torch.isfinite(loss)
    for v in variables:
        finite &= torch.isfinite(v.reshape(v.shape[0], -1)).all(dim=1)
    return finite


def _keep(snapshot: list[Tensor], variables: Sequence[Tensor], finite: Tensor) -> None:
    for kept, v in zip(snapshot, variables, strict=True):
        mask = finite.reshape((-1,) + (1,) * (v.dim() - 1))
        kept.copy_(torch.where(mask, v.detach(), kept))


def optimise(
    objective: Objective,
    variables: Sequence[Tensor],
    settings: Settings,
    budget: Budget,
) -> Outcome:
    """Minimise the summed per-problem objective over `variables` (each [T, ...], leaves
    requiring grad) within the budget, keeping the last finite iterate of each problem, or
    with `keep_best` the iterate of lowest matching loss seen (checked at every iteration on
    the device, without synchronising)."""
    variables = [v.detach().clone().requires_grad_(True) for v in variables]
    snapshot = [v.detach().clone() for v in variables]
    initial = _final_matching(objective, snapshot)
    best = Best(variables) if settings.keep_best else None
    total = max(0, int(budget.max_iterations))
    adam = BatchedAdam(variables) if settings.optimizer == "adam" else None
    lbfgs = None
    if adam is None:
        lbfgs = BatchedLBFGS(variables, settings.schedule.learning_rate, settings.history)
    start = time.perf_counter()
    stopped_by, iteration = "iterations", 0
    # Problems whose iterate went non-finite at a check: the snapshot kept for them is an
    # older iterate (perhaps the start), whose finite loss must not read as their result.
    lost = torch.zeros(initial.shape, dtype=torch.bool, device=initial.device)
    lost_at = torch.full(initial.shape, -1, dtype=torch.long, device=initial.device)
    progress = progress_bar(total, settings.description, budget.show_progress)
    try:
        while iteration < total:
            for v in variables:
                v.grad = None
            loss, matching = objective(variables, iteration)
            if best is not None:
                best.offer(variables, matching)
            # Only the variables: the single-problem replay's weights are autograd leaves.
            torch.autograd.backward(loss.sum(), inputs=variables)
            if adam is not None:
                for v in variables:
                    if v.grad is not None:
                        torch.nan_to_num_(v.grad, nan=0.0, posinf=0.0, neginf=0.0)
                        if settings.signed:
                            v.grad.sign_()
                adam.step(settings.schedule.rate(iteration, total))
            else:
                assert lbfgs is not None
                lbfgs.step()
            if settings.box is not None:
                with torch.no_grad():
                    variables[0].clamp_(*settings.box)
            iteration += 1
            # The clock is read every iteration (no device sync); the checks below sync.
            # A requested stop (Ctrl-C) ends the run's attacks as the budget would.
            out_of_time = time.perf_counter() - start > budget.max_seconds or stop_requested()
            if iteration % settings.check_every == 0 or iteration == total or out_of_time:
                finite = _finite_per_problem(variables, matching.detach())
                _keep(snapshot, variables, finite)
                lost_at.masked_fill_(~finite & ~lost, iteration)
                lost |= ~finite
                if budget.show_progress:  # shown by the update's redraw, not one of its own
                    mean = matching.detach().mean().item()
                    progress.set_postfix(matching=f"{mean:.4g}", refresh=False)
                progress.update(iteration - progress.n)
                if not bool(finite.any()):
                    stopped_by = "nan"
                    break
                if out_of_time:
                    stopped_by = "seconds"
                    break
    finally:
        progress.close()
    if best is not None:
        with torch.no_grad():
            best.offer(variables, objective(variables, None)[1])
        snapshot = best.variables
        lost[:] = False  # the best iterate seen is a result of the run, however it ended
        lost_at[:] = -1
    matching = _final_matching(objective, snapshot)
    matching = torch.where(lost, torch.full_like(matching, math.inf), matching)
    return Outcome(
        variables=snapshot,
        matching=matching,
        diverged=~torch.isfinite(matching),
        iterations=iteration,
        seconds=time.perf_counter() - start,
        stopped_by=stopped_by,
        initial=initial,
        lost_at=lost_at,
    )


def _final_matching(objective: Objective, variables: Sequence[Tensor]) -> Tensor:
    """The full matching loss per problem (no stochastic terms), +inf where not finite."""
    with torch.no_grad():  # torch.func.grad inside still differentiates w.r.t. the weights
        matching = objective(variables, None)[1].detach()
    return torch.where(torch.isfinite(matching), matching, torch.full_like(matching, math.inf))
