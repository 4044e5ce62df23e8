"""Accuracy of the influence engine against explicit references, in float64.

L2-regularised multinomial logistic regression on sklearn digits, trained to convergence by
Newton's method: `exact` must predict true leave-one-out retraining; `arnoldi` at full rank must
reproduce `exact`; `ekfac` must approximate it. Run: pytest tests/unit/test_influence_accuracy.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from audit.influence import InfluenceConfig, compute_influence, influence_scores

N_TRAIN, N_LOO, N_QUERIES = 200, 100, 5
L2 = 1e-2  # objective: mean CE + L2/2 |theta|^2, so damping=L2 makes the curvature exact


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.numpy(), b.numpy())[0, 1])


class LogReg:
    """Softmax regression with the bias as a constant feature; theta [C, D+1]; objective
    (1/N) sum_j w_j CE_j + L2/2 |theta|^2 for example weights w."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: int = 10):
        self.x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # [N, D+1]
        self.y, self.c = y, classes

    def grad(self, theta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.x @ theta.T, 1)  # [N, C]
        r = (p - nn.functional.one_hot(self.y, self.c)) * weights[:, None]
        return r.T @ self.x / len(self.y) + L2 * theta  # [C, D+1]

    def hess(self, theta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.x @ theta.T, 1)
        w = weights[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])  # [N, C, C]
        h = torch.einsum("nab,nd,ne->adbe", w, self.x, self.x).reshape(theta.numel(), theta.numel())
        return h / len(self.y) + L2 * torch.eye(theta.numel(), dtype=theta.dtype)

    def newton(self, weights: torch.Tensor) -> torch.Tensor:
        theta = torch.zeros(self.c, self.x.shape[1], dtype=self.x.dtype)
        for _ in range(100):
            step = torch.linalg.solve(self.hess(theta, weights), self.grad(theta, weights).reshape(-1))
            theta = theta - step.reshape(theta.shape)
            if step.abs().max() < 1e-14:
                return theta
        raise AssertionError("Newton did not converge")

    def refit(self, theta: torch.Tensor, weights: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
        """Leave-one-out refit from the full optimum with the full-data Hessian (Cholesky factor
        `chol`) as a fixed preconditioner: converges linearly at rate ~1/N, to machine precision."""
        for _ in range(200):
            step = torch.cholesky_solve(self.grad(theta, weights).reshape(-1, 1), chol).reshape(theta.shape)
            theta = theta - step
            if step.abs().max() < 1e-14:
                return theta
        raise AssertionError("leave-one-out refit did not converge")


@pytest.fixture(scope="module")
def logreg():
    """Trained logistic regression, its datasets, and leave-one-out query-loss changes [Q, N_LOO]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, q = perm[:N_TRAIN], perm[N_TRAIN : N_TRAIN + N_QUERIES]
    problem = LogReg(x[tr], y[tr])
    ones = torch.ones(N_TRAIN, dtype=torch.float64)
    theta = problem.newton(ones)
    chol = torch.linalg.cholesky(problem.hess(theta, ones))

    xq = torch.cat([x[q], torch.ones(N_QUERIES, 1, dtype=torch.float64)], 1)

    def query_loss(t):
        return nn.functional.cross_entropy(xq @ t.T, y[q], reduction="none")

    base = query_loss(theta)
    deltas = []
    for i in range(N_LOO):
        weights = ones.clone()
        weights[i] = 0.0  # objective (1/N) sum_{j != i} CE_j + L2/2 |theta|^2
        deltas.append(query_loss(problem.refit(theta, weights, chol)) - base)
    model = nn.Linear(64, 10).double()
    with torch.no_grad():
        model.weight.copy_(theta[:, :64])
        model.bias.copy_(theta[:, 64])
    return model, TensorDataset(x[tr], y[tr]), TensorDataset(x[q], y[q]), torch.stack(deltas, 1)


@pytest.fixture(scope="module")
def exact_scores(logreg):
    model, train, queries, _ = logreg
    return influence_scores(model, train, queries, method="exact", damping=L2, progress=False)


def test_exact_predicts_leave_one_out_retraining(logreg, exact_scores):
    _, _, _, loo = logreg
    # removing example i changes the query loss by about S[q, i] / N (see the module docstring)
    pearson = [_pearson(exact_scores[q, :N_LOO], loo[q]) for q in range(N_QUERIES)]
    print("exact vs leave-one-out, Pearson per query:", np.round(pearson, 4))
    assert min(pearson) >= 0.95
    ratio = (exact_scores[:, :N_LOO] / N_TRAIN / loo).median().item()
    assert 0.5 < ratio < 1.5, f"scale: median predicted/actual = {ratio}"


def test_arnoldi_full_rank_reproduces_exact(logreg, exact_scores):
    model, train, queries, _ = logreg
    dim = sum(p.numel() for p in model.parameters())
    scores = influence_scores(
        model, train, queries, method="arnoldi", damping=L2, rank=dim, batch_size=N_TRAIN, progress=False
    )
    pearson = [_pearson(scores[q], exact_scores[q]) for q in range(N_QUERIES)]
    print("arnoldi (full rank) vs exact:", np.round(pearson, 6))
    assert min(pearson) >= 0.99
    torch.testing.assert_close(scores, exact_scores, rtol=1e-6, atol=1e-6 * exact_scores.abs().max().item())


def test_ekfac_approximates_exact(logreg, exact_scores):
    model, train, queries, _ = logreg
    pearson = {}
    for method in ("ekfac", "kfac", "graddot"):
        scores = influence_scores(model, train, queries, method=method, damping=L2, progress=False)
        pearson[method] = [_pearson(scores[q], exact_scores[q]) for q in range(N_QUERIES)]
        print(f"{method} vs exact:", np.round(pearson[method], 4))
    assert min(pearson["ekfac"]) >= 0.9
    # the curvature must matter: both Kronecker methods beat the curvature-free baseline
    assert np.mean(pearson["ekfac"]) > np.mean(pearson["graddot"])
    assert np.mean(pearson["kfac"]) > np.mean(pearson["graddot"])


def test_default_damping_is_a_tenth_of_the_mean_eigenvalue(logreg):
    model, train, queries, _ = logreg
    results = {
        m: compute_influence(model, train, queries, InfluenceConfig(method=m, rank=20), progress=False)
        for m in ("exact", "ekfac", "arnoldi")
    }
    # EK-FAC and Gauss-Newton Arnoldi keep the trace exact, so all three pick the same damping
    exact_damping = results["exact"].damping
    assert exact_damping > 0
    for m in ("ekfac", "arnoldi"):
        assert results[m].damping == pytest.approx(exact_damping, rel=1e-9)


def test_hessian_equals_gauss_newton_for_logistic_regression(logreg, exact_scores):
    # logits are linear in the parameters, so the true Hessian is the Gauss-Newton matrix
    model, train, queries, _ = logreg
    scores = influence_scores(model, train, queries, method="exact", curvature="hessian", damping=L2, progress=False)
    torch.testing.assert_close(scores, exact_scores, rtol=1e-7, atol=1e-7 * exact_scores.abs().max().item())


def test_hessian_arnoldi_full_rank_matches_exact_hessian_on_an_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(60, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (60,))
    train, queries = TensorDataset(x[:50], y[:50]), TensorDataset(x[50:], y[50:])
    dim = sum(p.numel() for p in model.parameters())
    kwargs = dict(curvature="hessian", damping=0.05, progress=False, batch_size=50)
    exact = influence_scores(model, train, queries, method="exact", **kwargs)
    gn = influence_scores(model, train, queries, method="exact", damping=0.05, progress=False)
    arnoldi = influence_scores(model, train, queries, method="arnoldi", rank=dim, **kwargs)
    torch.testing.assert_close(arnoldi, exact, rtol=1e-6, atol=1e-6 * exact.abs().max().item())
    # an untrained MLP is far from a minimum: its Hessian is indefinite and differs from GN
    assert (exact - gn).abs().max() > 1e-3 * gn.abs().max()
