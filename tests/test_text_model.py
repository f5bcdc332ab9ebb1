"""The language model and its training: the paper's causal transformer, the causal loss, clients'
per-sample gradients and defenses on token sequences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedleak.defenses import parse_defense_spec
from fedleak.models import ModelSpec, build_model, count_parameters, model_modality
from fedleak.training.gradients import batch_gradient, per_sample_gradients
from fedleak.training.loss import task_loss, task_scores
from fedleak.training.update import LocalTraining, LocalTrainingError, compute_update

VOCAB, LENGTH = 300, 6
SPEC = ModelSpec("transformer3", (LENGTH,), VOCAB, seed=1)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(SPEC)


def _tokens(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, LENGTH), generator=torch.Generator().manual_seed(seed))


def test_paper_size_with_a_frozen_embedding(model: torch.nn.Module) -> None:
    # Three blocks of width 96 and feed-forward 1,536, 1,024 learned positions, one output
    # bias per token: the LTI paper's "about 1.1M trainable parameters".
    assert count_parameters(model) == 1_002_528 + 98_304 + VOCAB
    names = [name for name, _ in model.named_parameters()]
    assert names[0] == "positions.weight" and names[-1] == "output.bias"
    assert "token_embedding" not in names and "token_embedding" in model.state_dict()
    assert model_modality("transformer3") == "tokens" and model_modality("lenet") == "image"


def test_ids_and_their_embeddings_give_the_same_logits(model: torch.nn.Module) -> None:
    x = _tokens(3)
    with torch.no_grad():
        by_id = model(x)
        by_embedding = model(model.token_embedding[x])
    assert by_id.shape == (3, LENGTH, VOCAB)
    torch.testing.assert_close(by_id, by_embedding)
    # breaching's scales: smooth logits at initialisation, a loss near log(V).
    assert 0.3 < float(by_id.std()) < 1.0
    assert abs(float(task_loss(by_id, x)) - torch.log(torch.tensor(VOCAB)).item()) < 1.0


def test_positions_only_see_the_past(model: torch.nn.Module) -> None:
    x = _tokens(1)
    changed = x.clone()
    changed[0, 3] = (changed[0, 3] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_causal_loss_shifts_the_targets() -> None:
    logits = torch.randn(2, 4, 7)
    tokens = torch.randint(0, 7, (2, 4))
    expected = F.cross_entropy(logits[:, :3].reshape(6, 7), tokens[:, 1:].reshape(6))
    torch.testing.assert_close(task_loss(logits, tokens), expected)
    soft = F.one_hot(tokens, 7).float()
    torch.testing.assert_close(task_loss(logits, soft), expected)
    loss, correct, count = task_scores(logits, tokens)
    assert count == 6 and abs(loss / count - float(expected)) < 1e-5
    assert correct == int((logits[:, :3].argmax(-1) == tokens[:, 1:]).sum())


def test_per_sample_gradients_are_each_sequences_own(model: torch.nn.Module) -> None:
    x = _tokens(4, seed=2)
    each = per_sample_gradients(model, x, x)
    alone = batch_gradient(model, x[2:3], x[2:3])
    mean = batch_gradient(model, x, x)
    for name, g in each.items():
        torch.testing.assert_close(g[2], alone[name], atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(g.mean(0), mean[name], atol=1e-5, rtol=1e-4, msg=name)
    # Only the first L rows of the positions receive gradient.
    assert each["positions.weight"][:, LENGTH:].abs().sum() == 0
    assert each["positions.weight"][:, :LENGTH].abs().sum() > 0


@pytest.mark.parametrize("spec", ["none", "prune:0.9", "sign", "gauss:0.01", "dpsgd:1.0:0.5"])
def test_clients_defend_token_updates(model: torch.nn.Module, spec: str) -> None:
    x = _tokens(4, seed=3)
    generator = torch.Generator().manual_seed(0)
    update = compute_update(
        model, x, x, VOCAB, parse_defense_spec(spec), LocalTraining("fedsgd", 4), generator
    )
    names = [name for name, _ in model.named_parameters()]
    assert list(update.update) == names
    if spec == "sign":
        assert set(torch.cat([u.flatten() for u in update.update.values()]).unique().tolist()) <= {
            -1.0,
            0.0,
            1.0,
        }
    fedavg = compute_update(
        model,
        x,
        x,
        VOCAB,
        parse_defense_spec(spec),
        LocalTraining("fedavg", 2, local_steps=2, learning_rate=0.1),
        generator,
    )
    assert list(fedavg.update) == names and fedavg.num_examples == 4


@pytest.mark.parametrize("spec", ["mixup:2", "instahide:2"])
def test_encodings_are_refused_for_tokens(model: torch.nn.Module, spec: str) -> None:
    x = _tokens(4)
    with pytest.raises(LocalTrainingError, match="token sequences cannot be mixed") as caught:
        compute_update(
            model,
            x,
            x,
            VOCAB,
            parse_defense_spec(spec),
            LocalTraining("fedsgd", 4),
            torch.Generator(),
        )
    assert "\n" not in str(caught.value)


def test_bad_shapes_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"input_shape \(L,\)") as caught:
        build_model(ModelSpec("transformer3", (3, 32, 32), 10))
    assert "\n" not in str(caught.value)
    x = _tokens(2)
    with pytest.raises(LocalTrainingError, match=r"int64 \[N, L\] token ids"):
        compute_update(
            build_model(SPEC),
            x,
            x[:, 0],
            VOCAB,
            parse_defense_spec("none"),
            LocalTraining("fedsgd", 2),
            torch.Generator(),
        )
