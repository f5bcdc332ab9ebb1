"""The optimisation engine's own optimiser and batch splitting, against their references."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedleak.attacks.optimization.engine import (
    BatchedAdam,
    Outcome,
    Settings,
    StepDecay,
    optimise,
)
from fedleak.attacks.types import Budget


def test_batched_adam_steps_exactly_as_torch_adam():
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(3, 2, 4, generator=g), torch.randn(3, 5, generator=g)]
    ours = [v.clone().requires_grad_() for v in start]
    fused = [v.clone().requires_grad_() for v in start]
    unfused = [v.clone().requires_grad_() for v in start]
    adam = BatchedAdam(ours)
    references = [torch.optim.Adam(fused, lr=0.1, fused=True), torch.optim.Adam(unfused, lr=0.1)]
    for step in range(25):
        rate = 0.1 if step < 10 else 0.01  # IG's step decay changes the rate between steps
        grads = [torch.randn(v.shape, generator=g).sign() for v in start]
        for variables in (ours, fused, unfused):
            for v, grad in zip(variables, grads, strict=True):
                v.grad = grad.clone()
        for reference in references:
            for group in reference.param_groups:
                group["lr"] = rate
            reference.step()
        adam.step(rate)
    for a, b, c, before in zip(ours, fused, unfused, start, strict=True):
        assert torch.equal(a, b) and not torch.equal(a, before)
        # The fused kernel's rounding differs from the elementwise ops' by a few ulps.
        assert torch.allclose(a, c, rtol=0, atol=1e-6)


def test_batched_adam_leaves_a_variable_without_gradient_in_place():
    moving, still = torch.zeros(2, 3, requires_grad=True), torch.ones(2, 4, requires_grad=True)
    adam = BatchedAdam([moving, still])
    moving.grad = torch.ones(2, 3)
    adam.step(0.1)
    adam.step(0.1)
    assert torch.allclose(moving, torch.full((2, 3), -0.2)) and torch.equal(still, torch.ones(2, 4))
    still.grad = torch.ones(2, 4)
    adam.step(0.1)  # its first step: bias corrections from its own count, as torch's Adam
    assert torch.allclose(still, torch.full((2, 4), 0.9))


def test_an_outcome_part_is_its_problems_alone():
    variables = [torch.arange(12.0).reshape(6, 2), torch.arange(6.0).reshape(6, 1)]
    outcome = Outcome(
        variables=variables,
        matching=torch.arange(6.0),
        diverged=torch.tensor([False, True, False, False, False, False]),
        iterations=7,
        seconds=3.0,
        stopped_by="iterations",
        initial=torch.arange(6.0) + 10,
    )
    part = outcome.part(1, 3)
    assert torch.equal(part.variables[0], variables[0][1:3])
    assert torch.equal(part.variables[1], variables[1][1:3])
    assert part.matching.tolist() == [1.0, 2.0] and part.diverged.tolist() == [True, False]
    assert part.initial.tolist() == [11.0, 12.0]
    assert (part.iterations, part.seconds, part.stopped_by) == (7, 3.0, "iterations")


def test_keep_best_returns_the_iterate_of_lowest_matching_loss():
    """A problem that first improves and then gets worse (a rate far too large for its
    minimum at 0) is returned at its best iterate; the last one is kept without the option."""

    def objective(variables, iteration):
        loss = variables[0].square().sum(dim=1)
        return loss, loss

    start = [torch.tensor([[3.0], [0.05]])]
    settings = Settings(optimizer="adam", schedule=StepDecay(1.0, ()), signed=True)
    best = optimise(
        objective, start, dataclasses.replace(settings, keep_best=True), Budget(6, 60.0)
    )
    last = optimise(objective, start, settings, Budget(6, 60.0))
    assert float(best.matching[1]) < float(last.matching[1])
    assert float(best.matching[1]) == pytest.approx(0.05**2)
    assert torch.equal(best.variables[0][1], torch.tensor([0.05]))  # the start was its best


def test_a_problem_that_goes_non_finite_is_diverged_in_a_batch_as_alone():
    """The kept snapshot of a problem that went NaN is an old iterate (perhaps its start):
    in a batch whose others ran on, it read as stopped by iterations, 0 diverged targets,
    its final loss its starting one."""

    def objective(variables, iteration):
        loss = variables[0].square().sum(dim=1)
        if iteration is not None and iteration >= 3:
            loss = loss * torch.tensor([1.0, float("nan")])
        return loss, loss

    start = [torch.tensor([[3.0], [2.0]])]
    settings = Settings(optimizer="adam", schedule=StepDecay(0.1, ()), check_every=2)
    outcome = optimise(objective, start, settings, Budget(6, 60.0))
    assert outcome.diverged.tolist() == [False, True]
    assert torch.isfinite(outcome.matching[0]) and torch.isinf(outcome.matching[1])
    assert outcome.stopped_by == "iterations"  # the batch ran on for the first problem
    assert (outcome.part(0, 1).stopped_by, outcome.part(1, 2).stopped_by) == ("iterations", "nan")
    # With keep-best the best iterate seen is the result, however the run ended.
    best = optimise(
        objective, start, dataclasses.replace(settings, keep_best=True), Budget(6, 60.0)
    )
    assert best.diverged.tolist() == [False, False]


def test_a_part_whose_problems_were_all_lost_stops_where_it_would_alone():
    outcome = Outcome(
        variables=[torch.zeros(3, 2)],
        matching=torch.tensor([math.inf, math.inf, 1.0]),
        diverged=torch.tensor([True, True, False]),
        iterations=20,
        seconds=1.0,
        stopped_by="iterations",
        initial=torch.ones(3),
        lost_at=torch.tensor([5, 10, -1]),
    )
    assert (outcome.part(0, 2).iterations, outcome.part(0, 2).stopped_by) == (10, "nan")
    assert (outcome.part(0, 1).iterations, outcome.part(2, 3).iterations) == (5, 20)
    assert outcome.part(2, 3).stopped_by == "iterations"
