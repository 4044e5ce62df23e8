"""A curvature fitted once (fit_influence_curvature) and passed to later computations: no fit runs
again, at the fitted parameters the scores are the ordinary ones, at other parameters they are the
current gradients against the old curvature (checked against an explicit float64 formula), and a
curvature fitted with other options or over other parameters is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from audit.errors import InvalidInput
from audit.influence import (
    InfluenceConfig,
    compute_influence,
    fit_influence_curvature,
    influence_scores,
    self_influence,
)
from tests.unit.influence_helpers import counted_fits, tiny_data, tiny_mlp

TRAIN, QUERIES = tiny_data(24, seed=1), tiny_data(5, seed=2)


@pytest.fixture
def counted():
    """`counted_exact`: the exact method with its registered fit wrapped to count calls."""
    with counted_fits("exact") as fits:
        yield fits


def _gradients(model: nn.Module, data) -> torch.Tensor:
    """Per-example loss gradients [n, P] by plain autograd, one example at a time."""
    rows = []
    for x, y in data:
        loss = nn.functional.cross_entropy(model(x.unsqueeze(0)), y.view(1))
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(rows)


def test_a_fitted_curvature_skips_the_fit_and_gives_the_ordinary_scores_at_its_parameters(counted):
    model = tiny_mlp()
    config = InfluenceConfig(method="counted_exact")
    fitted = fit_influence_curvature(model, TRAIN, config, progress=False)
    assert counted == [len(TRAIN)]
    reused = compute_influence(model, TRAIN, QUERIES, config, progress=False, fitted=fitted)
    own = self_influence(model, TRAIN, method="counted_exact", progress=False, fitted=fitted)
    assert counted == [len(TRAIN)]  # neither computation fitted again
    fresh = compute_influence(model, TRAIN, QUERIES, config, progress=False)
    assert torch.equal(reused.scores, fresh.scores) and reused.damping == fresh.damping
    assert torch.equal(own, self_influence(model, TRAIN, method="counted_exact", progress=False))


def test_at_other_parameters_the_scores_use_the_current_gradients_and_the_old_curvature():
    model = tiny_mlp()
    fitted = fit_influence_curvature(model, TRAIN, InfluenceConfig(method="exact"), progress=False)
    moved = tiny_mlp()
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    result = compute_influence(moved, TRAIN, QUERIES, InfluenceConfig(method="exact"), progress=False,
                               fitted=fitted)
    matrix = fitted.curvature.matrix  # [P, P] at `model`
    damping = 0.1 * torch.diagonal(matrix).mean().item()  # the rule of damping=None, on the fitted curvature
    expected = _gradients(moved, QUERIES) @ torch.linalg.solve(
        matrix + damping * torch.eye(len(matrix), dtype=matrix.dtype), _gradients(moved, TRAIN).T)  # [Q, N]
    assert result.damping == pytest.approx(damping, rel=1e-12)
    torch.testing.assert_close(result.scores, expected, rtol=1e-8, atol=1e-10)
    refit = influence_scores(moved, TRAIN, QUERIES, method="exact", progress=False)
    assert not torch.allclose(result.scores, refit, rtol=1e-3)  # it did not quietly refit at `moved`


def test_a_curvature_from_other_options_or_parameters_is_refused_and_methods_without_a_fit_ignore_it():
    model = tiny_mlp()
    fitted = fit_influence_curvature(model, TRAIN, InfluenceConfig(method="ekfac"), progress=False)
    with pytest.raises(InvalidInput, match="other options"):
        influence_scores(model, TRAIN, QUERIES, method="ekfac", fisher_samples=2, progress=False, fitted=fitted)
    with pytest.raises(InvalidInput, match="other options"):
        influence_scores(model, TRAIN, QUERIES, method="kfac", progress=False, fitted=fitted)
    with pytest.raises(InvalidInput, match="other parameters"):
        influence_scores(model, TRAIN, QUERIES, method="ekfac", progress=False, fitted=fitted, param_filter=["2."])
    with pytest.raises(InvalidInput, match="FittedCurvature"):
        influence_scores(model, TRAIN, QUERIES, method="ekfac", progress=False, fitted=fitted.curvature)
    assert fit_influence_curvature(model, TRAIN, InfluenceConfig(method="graddot"), progress=False) is None
    assert torch.equal(influence_scores(model, TRAIN, QUERIES, method="graddot", progress=False, fitted=fitted),
                       influence_scores(model, TRAIN, QUERIES, method="graddot", progress=False))
