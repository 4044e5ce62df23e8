"""Per-example gradients (torch.func) against a plain autograd loop, for tensor and dict inputs,
on both vectorisation paths; graddot / gradcos against their formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from audit.influence import InfluenceConfig, compute_influence, context, influence_scores, self_influence
from audit.influence.gradients import GradientFunction, gn_cotangents
from audit.influence.params import model_state, select_params


class DictModel(nn.Module):
    """A classifier called as model(**batch) that returns its logits tensor directly."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(3, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x, side):
        return self.head(torch.tanh(self.a(x) + self.b(side)))


class DictDataset(Dataset):
    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        self.side = torch.randn(n, 3, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "side": self.side[i]}, self.y[i]


def _loop_grads(model, call, n) -> torch.Tensor:
    rows = []
    for i in range(n):
        logits, label = call(i)
        loss = nn.functional.cross_entropy(logits, label)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def _grad_fn(model, mode):
    space = select_params(model)
    selected, frozen = model_state(model, space, torch.device("cpu"))
    return GradientFunction(model, space, selected, frozen, mode=mode)


@pytest.mark.parametrize("mode", ["vmap", "batched"])
def test_tensor_per_example_grads_match_autograd_loop(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5))
    model = model.double().eval()
    x = torch.randn(7, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (7,))
    got = _grad_fn(model, mode).loss_grads(x, y)
    want = _loop_grads(model, lambda i: (model(x[i : i + 1]), y[i : i + 1]), 7)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["vmap", "batched"])
def test_dict_per_example_grads_match_autograd_loop(mode):
    torch.manual_seed(0)
    model = DictModel().double().eval()
    data = DictDataset(6)
    inputs = {"x": data.x, "side": data.side}
    got = _grad_fn(model, mode).loss_grads(inputs, data.y)
    want = _loop_grads(model, lambda i: (model(data.x[i : i + 1], data.side[i : i + 1]), data.y[i : i + 1]), 6)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gauss_newton_factors_reproduce_the_output_hessian():
    # sum_k J^T v_k v_k^T J must equal J^T (diag(p) - p p^T) J, with J the logit Jacobian
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x = torch.randn(1, 4, dtype=torch.float64)
    factors = _grad_fn(model, "vmap").output_grads(x, torch.zeros(1, dtype=torch.int64), gn_cotangents)[0]  # [C, P]
    params = dict(model.named_parameters())
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,))[0])(params)
    j = torch.cat([jac[n].reshape(3, -1) for n in params], dim=1)  # [C, P]
    p = torch.softmax(model(x)[0], 0)
    want = j.T @ (torch.diag(p) - torch.outer(p, p)) @ j
    torch.testing.assert_close(factors.T @ factors, want.detach(), rtol=1e-10, atol=1e-12)


def test_sampled_gauss_newton_factors_are_unbiased():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double().eval()
    x = torch.randn(1, 3, dtype=torch.float64)
    fn = _grad_fn(model, "vmap")
    exact = fn.output_grads(x, torch.zeros(1, dtype=torch.int64), gn_cotangents)[0]
    noise = torch.rand(1, 20000, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sampled = fn.output_grads(x, torch.zeros(1, dtype=torch.int64), gn_cotangents, noise)[0]
    want, got = exact.T @ exact, sampled.T @ sampled
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_graddot_and_gradcos_match_their_formulas_on_dict_data():
    torch.manual_seed(0)
    model = DictModel().double()
    train, queries = DictDataset(9, seed=1), DictDataset(3, seed=2)
    def call(data):
        return lambda i: (model(data.x[i : i + 1], data.side[i : i + 1]), data.y[i : i + 1])

    g_train, g_query = _loop_grads(model, call(train), 9), _loop_grads(model, call(queries), 3)
    dot = influence_scores(model, train, queries, method="graddot", batch_size=4, progress=False)
    torch.testing.assert_close(dot, g_query @ g_train.T)
    torch.testing.assert_close(
        influence_scores(model, train, queries, method="graddot", damping=4.0, progress=False), dot / 4.0
    )
    cos = influence_scores(model, train, queries, method="gradcos", progress=False)
    unit = lambda g: g / g.norm(dim=1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(cos, unit(g_query) @ unit(g_train).T)
    torch.testing.assert_close(self_influence(model, train, method="graddot", progress=False), g_train.pow(2).sum(1))


def test_model_is_left_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3))
    model.train()
    model[1].eval()  # a mixed mode that must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    for method in ("graddot", "exact", "ekfac", "arnoldi"):
        scores = influence_scores(model, data, data, method=method, rank=4, progress=False)
        assert torch.isfinite(scores).all()
    assert model.training and not model[1].training and model[0].training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_dropout_is_off_so_scores_are_deterministic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    data = TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,)))
    a = influence_scores(model, data, data, method="ekfac", progress=False)
    b = influence_scores(model, data, data, method="ekfac", progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["graddot", "exact", "ekfac", "arnoldi"])
def test_memory_bound_splits_batches_without_changing_scores(method, monkeypatch):
    """A model too large for `batch_size` examples of per-example gradients runs in smaller
    batches (and Gauss-Newton chunks of one example), with the same scores."""
    torch.manual_seed(0)
    model = DictModel().double()
    train, queries = DictDataset(13, seed=1), DictDataset(3, seed=2)
    config = InfluenceConfig(method=method, batch_size=8, rank=8)
    unbounded = compute_influence(model, train, queries, config, progress=False).scores
    dim = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(context, "CPU_GRADIENT_ELEMENTS", 3 * dim)
    with context.evaluation(model):
        assert context.make_context(model, train, config, "cpu", False).gradient_rows == 3
    bounded = compute_influence(model, train, queries, config, progress=False).scores
    torch.testing.assert_close(bounded, unbounded, rtol=1e-9, atol=1e-12)
