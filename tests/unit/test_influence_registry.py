"""Influence methods register themselves: a method defined in this file (a diagonal empirical-Fisher
preconditioner) runs through the public API, with its cache, checkpoint and flag behaviour, and
matches its formula; unknown methods are refused with the registered ones named."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from audit.errors import InvalidInput
from audit.influence import (
    METHODS,
    InfluenceConfig,
    InfluenceMethod,
    compute_influence,
    influence_scores,
    register_method,
    registry,
    self_influence,
)
from audit.influence.registry import damped
from tests.unit.influence_helpers import tiny_data, tiny_mlp

DAMPING = 0.05


@dataclass(frozen=True)
class DiagonalCurvature:
    """C = diag(values), values [P] >= 0: C + damping I is invertible for every damping > 0."""

    values: torch.Tensor

    @property
    def mean_eigenvalue(self) -> float:
        return float(self.values.mean())

    def apply(self, grads: torch.Tensor, damping: float) -> torch.Tensor:
        return grads / (self.values.to(grads) + damping)

    def check(self, damping: float) -> None:
        pass

    def state(self) -> dict[str, torch.Tensor]:
        return {"values": self.values}


FITS: list[int] = []  # one entry per fit, to tell a fit from a cache restore


def _fit(ctx, train, n) -> DiagonalCurvature:
    """Diagonal of the empirical Fisher of the mean training loss: mean_i g_i^2."""
    total = None
    for x, y in ctx.batches(train, "train: diagonal Fisher"):
        squares = ctx.grads.loss_grads(x, y).pow(2).sum(0)
        total = squares if total is None else total + squares
    FITS.append(n)
    return DiagonalCurvature(total / n)


DIAG_FISHER = InfluenceMethod(
    name="diag_fisher",
    precondition=damped,
    fit=_fit,
    restore=lambda state, ctx: DiagonalCurvature(state["values"]),
)


@pytest.fixture
def diag_fisher():
    FITS.clear()
    with register_method(DIAG_FISHER) as method:
        yield method
    assert method.name not in registry.names()


def _grads(model: nn.Module, data: TensorDataset) -> torch.Tensor:
    """Per-example loss gradients [n, P] by a plain autograd loop: the reference."""
    x, y = data.tensors
    rows = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def _reference(model, train, queries, damping, unit=False):
    """(scores [Q, N], self-influence [N], damping) of the diagonal-Fisher method, from its formula."""
    g_train, g_query = _grads(model, train), _grads(model, queries)
    fisher = g_train.pow(2).mean(0)
    damping = 0.1 * fisher.mean().item() if damping is None else damping
    right = g_train / g_train.norm(dim=1, keepdim=True) if unit else g_train
    return (g_query / (fisher + damping)) @ right.T, (g_train.pow(2) / (fisher + damping)).sum(1), damping


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12 * expected.abs().max().item())


def test_a_method_registered_outside_audit_runs_through_the_public_api(diag_fisher):
    model, train, queries = tiny_mlp(), tiny_data(12, seed=1), tiny_data(5, seed=2)
    for damping in (DAMPING, None):
        scores, own, used = _reference(model, train, queries, damping)
        result = compute_influence(model, train, queries, InfluenceConfig(method="diag_fisher", damping=damping),
                                   progress=False)
        _close(result.scores, scores)
        assert result.damping == pytest.approx(used, rel=1e-12)
        _close(influence_scores(model, train, queries, method="diag_fisher", damping=damping, progress=False), scores)
        _close(self_influence(model, train, method="diag_fisher", damping=damping, progress=False), own)


def test_a_registered_method_is_cached_and_restored_by_its_restore(diag_fisher, tmp_path):
    model, train, queries = tiny_mlp(), tiny_data(12, seed=1), tiny_data(5, seed=2)
    first = influence_scores(model, train, queries, method="diag_fisher", cache_dir=tmp_path, progress=False)
    again = influence_scores(model, train, queries, method="diag_fisher", cache_dir=tmp_path, progress=False)
    assert FITS == [12]  # the second call restored the curvature instead of fitting it
    assert len(list(tmp_path.glob("curvature-diag_fisher-*.pt"))) == 1
    _close(again, first)
    _close(first, _reference(model, train, queries, None)[0])


def test_a_registered_method_can_be_summed_over_checkpoints():
    model, train, queries = tiny_mlp(), tiny_data(12, seed=1), tiny_data(5, seed=2)
    states = [tiny_mlp(seed).state_dict() for seed in (3, 4)]
    method = replace(DIAG_FISHER, name="diag_fisher_ckpt", needs_checkpoints=True)
    with register_method(method):
        scores = influence_scores(model, train, queries, method=method.name, damping=DAMPING,
                                  checkpoints=[(states[0], 0.5), (states[1], 0.25)], progress=False)
        own = self_influence(model, train, method=method.name, damping=DAMPING,
                             checkpoints=[(states[0], 0.5), (states[1], 0.25)], progress=False)
        with pytest.raises(InvalidInput, match="method='diag_fisher_ckpt' needs checkpoints"):
            self_influence(model, train, method=method.name, progress=False)
    at = [_reference(tiny_mlp(seed), train, queries, DAMPING) for seed in (3, 4)]
    _close(scores, 0.5 * at[0][0] + 0.25 * at[1][0])
    _close(own, 0.5 * at[0][1] + 0.25 * at[1][1])
    assert (at[0][0] - at[1][0]).abs().max() > 1e-3  # the checkpoints really differ


def test_a_registered_method_flags_normalisation_and_self_influence():
    model, train, queries = tiny_mlp(), tiny_data(12, seed=1), tiny_data(5, seed=2)
    method = replace(DIAG_FISHER, name="diag_fisher_cos", unit_train_gradients=True, self_influence=False)
    with register_method(method):
        scores = influence_scores(model, train, queries, method=method.name, damping=DAMPING, progress=False)
        with pytest.raises(InvalidInput, match="method='diag_fisher_cos' has no self-influence"):
            self_influence(model, train, method=method.name, damping=DAMPING, progress=False)
    _close(scores, _reference(model, train, queries, DAMPING, unit=True)[0])


def test_unregistering_leaves_the_built_ins_as_they_were():
    before = registry.names()
    handle = register_method(replace(DIAG_FISHER, name="diag_fisher_tmp"))
    assert registry.names() == (*before, "diag_fisher_tmp")
    assert InfluenceConfig(method="diag_fisher_tmp").method == "diag_fisher_tmp"
    handle.remove()
    handle.remove()  # a second remove is harmless
    assert registry.names() == before
    assert METHODS == ("ekfac", "kfac", "arnoldi", "exact", "tracin", "graddot", "gradcos")
    with pytest.raises(InvalidInput, match="diag_fisher_tmp"):
        InfluenceConfig(method="diag_fisher_tmp")
    with pytest.raises(InvalidInput, match="'ekfac' is already registered"):
        register_method(replace(DIAG_FISHER, name="ekfac"))
    assert registry.lookup("ekfac").name == "ekfac"  # the built-in was not replaced
    with pytest.raises(InvalidInput, match="name must be"):
        replace(DIAG_FISHER, name="Diag Fisher")


def test_an_unknown_method_is_refused_naming_every_registered_one(diag_fisher):
    model, data = tiny_mlp(), tiny_data(6, seed=1)
    for attempt in (lambda: InfluenceConfig(method="magic"),
                    lambda: influence_scores(model, data, data, method="magic", progress=False)):
        with pytest.raises(InvalidInput) as refused:
            attempt()
        message = str(refused.value)
        assert "'magic'" in message
        assert all(repr(name) in message for name in (*METHODS, "diag_fisher"))
        assert message.endswith(".") and message.count(". ") == 0 and "\n" not in message  # one sentence
