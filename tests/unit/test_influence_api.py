"""Public API behaviour: top-k helper, parameter subsets, cache, Kronecker layer layout, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from audit.errors import InvalidInput, NumericalError, UnsupportedModel
from audit.influence import (
    InfluenceConfig,
    compute_influence,
    fit_influence_curvature,
    influence_scores,
    self_influence,
    top_influences,
)


def _data(n=12, d=4, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_top_influences_orders_proponents_and_opponents():
    scores = torch.tensor([[0.5, -2.0, 3.0, 0.0, -1.0], [1.0, 1.0, -3.0, 2.0, 0.0]])
    top = top_influences(scores, k=2)
    assert top.proponents.tolist() == [[2, 0], [3, 0]]
    assert top.proponent_scores.tolist() == [[3.0, 0.5], [2.0, 1.0]]
    assert top.opponents.tolist() == [[1, 4], [2, 4]]
    assert top.opponent_scores.tolist() == [[-2.0, -1.0], [-3.0, 0.0]]
    assert top.ranks.tolist() == [[1, 2], [1, 2]]
    rows = top.records(query_ids=["qa", "qb"], train_ids=list("abcde"))
    assert rows[0] == {"query_id": "qa", "train_id": "c", "rank": 1, "score": 3.0, "role": "helpful"}
    assert {r["role"] for r in rows} == {"helpful", "harmful"} and len(rows) == 8
    assert top_influences(scores, k=10).proponents.shape == (2, 5)  # k capped at N
    with pytest.raises(InvalidInput):
        top_influences(scores, k=0)
    with pytest.raises(InvalidInput):
        top_influences(torch.tensor([[float("nan")]]), k=1)


def test_param_filter_restricts_gradients_to_the_selected_layers():
    model, data = _mlp(), _data()
    last = influence_scores(model, data, data, method="graddot", param_filter=["2."], progress=False)
    x, y = data.tensors
    logits = model(x)
    rows = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(logits[i : i + 1], y[i : i + 1])
        grads = torch.autograd.grad(loss, list(model[2].parameters()), retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    g = torch.stack(rows)
    torch.testing.assert_close(last, g @ g.T)
    by_callable = influence_scores(
        model, data, data, method="graddot", param_filter=lambda name, p: name.startswith("2."), progress=False
    )
    torch.testing.assert_close(by_callable, last)


@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_kronecker_methods_are_exact_for_one_example_and_one_position(layer, method):
    # With one example and one output position, G = S (x) A exactly, so K-FAC and EK-FAC equal
    # `exact`; a mismatch between the activation layout and the weight layout would break this.
    torch.manual_seed(0)
    if layer == "conv":
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()).double()
        x = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    else:
        model = nn.Linear(4, 3).double()
        x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    train, queries = TensorDataset(x[:1], y[:1]), TensorDataset(x[1:], y[1:])
    exact = influence_scores(model, train, queries, method="exact", damping=1e-3, progress=False)
    approx = influence_scores(model, train, queries, method=method, damping=1e-3, progress=False)
    torch.testing.assert_close(approx, exact, rtol=1e-8, atol=1e-8 * exact.abs().max().item())


def test_cache_dir_reuses_the_fitted_curvature(tmp_path):
    model, data = _mlp(), _data()
    first = compute_influence(model, data, data, InfluenceConfig(method="ekfac"), cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob("curvature-ekfac-*.pt"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = compute_influence(model, data, data, InfluenceConfig(method="ekfac"), cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(again.scores, first.scores, rtol=0, atol=0)
    assert files[0].stat().st_mtime_ns == stamp  # read, not rewritten
    assert again.damping == first.damping
    # other data -> another entry, never the cached curvature
    other = _data(seed=5)
    fresh = influence_scores(model, other, other, method="ekfac", cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(fresh, influence_scores(model, other, other, method="ekfac", progress=False))
    assert len(list(tmp_path.glob("curvature-ekfac-*.pt"))) == 2
    arnoldi = influence_scores(model, data, data, method="arnoldi", rank=4, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(
        influence_scores(model, data, data, method="arnoldi", rank=4, cache_dir=tmp_path, progress=False), arnoldi
    )


def test_a_damaged_cache_entry_is_recomputed_not_unpickled(tmp_path):
    model, data = _mlp(), _data()
    first = influence_scores(model, data, data, method="ekfac", cache_dir=tmp_path, progress=False)
    (entry,) = tmp_path.glob("curvature-ekfac-*.pt")
    assert entry.with_name(entry.name + ".sha256").read_text().strip()
    for damage in (b"\x80\x02garbage", entry.read_bytes()[: entry.stat().st_size // 2]):
        entry.write_bytes(damage)  # random bytes, then a torn write
        again = influence_scores(model, data, data, method="ekfac", cache_dir=tmp_path, progress=False)
        torch.testing.assert_close(again, first)
        assert entry.read_bytes() != damage  # rewritten whole
    entry.with_name(entry.name + ".sha256").unlink()  # an entry without its checksum is not trusted either
    torch.testing.assert_close(influence_scores(model, data, data, method="ekfac", cache_dir=tmp_path,
                                                progress=False), first)


def test_seeded_methods_are_deterministic():
    model, data = _mlp(), _data()
    for method, options in (("arnoldi", {"rank": 3, "seed": 7}), ("ekfac", {"fisher_samples": 2, "seed": 7})):
        a = influence_scores(model, data, data, method=method, progress=False, **options)
        b = influence_scores(model, data, data, method=method, progress=False, **options)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_errors_are_typed_and_say_what_to_do():
    model, data = _mlp(), _data()
    with pytest.raises(InvalidInput, match="empty"):
        influence_scores(model, data, TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)))
    with pytest.raises(InvalidInput, match="method must be one of"):
        influence_scores(model, data, data, method="magic")
    with pytest.raises(InvalidInput, match="damping must be > 0"):
        self_influence(model, data, damping=-1.0)
    with pytest.raises(InvalidInput, match="shape"):
        influence_scores(model, data, _data(d=5), method="graddot", progress=False)
    with pytest.raises(InvalidInput, match="Labels must lie in"):
        influence_scores(model, data, _data(classes=7), method="graddot", progress=False)
    with pytest.raises(InvalidInput, match="param_filter"):
        influence_scores(model, data, data, method="graddot", param_filter=["nothing."], progress=False)
    with pytest.raises(InvalidInput, match="gradcos"):
        self_influence(model, data, method="gradcos", progress=False)
    with pytest.raises(InvalidInput, match="curvature='hessian'"):
        self_influence(model, data, method="ekfac", curvature="hessian")
    with pytest.raises(UnsupportedModel, match="max_exact_params|P <="):
        self_influence(model, data, method="exact", max_exact_params=10, progress=False)
    with pytest.raises(UnsupportedModel, match="logits"):
        not_logits = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3))).double()  # [B, 2, 3]
        self_influence(not_logits, data, method="graddot", progress=False)
    broken = _mlp()
    with torch.no_grad():
        broken[0].weight[0, 0] = float("nan")
    with pytest.raises(NumericalError):
        self_influence(broken, data, method="ekfac", progress=False)
    with pytest.raises(NumericalError):
        influence_scores(broken, data, data, method="graddot", progress=False)


def test_unknown_options_are_named():
    model, data = _mlp(), _data()
    with pytest.raises(InvalidInput, match="ranks"):
        influence_scores(model, data, data, method="arnoldi", ranks=3)


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.GroupNorm(2, 4),  # no Kronecker factors: diagonal fallback
        nn.ReLU(),
        nn.Conv2d(4, 3, 2, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(3, 3),
    ).double()


def test_kronecker_curvature_round_trip_and_trace_on_a_conv_net():
    model = _conv_net()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 6, 6, generator=g, dtype=torch.float64)
    data = TensorDataset(x, torch.randint(0, 3, (16,), generator=g))
    graddot = influence_scores(model, data, data, method="graddot", progress=False)
    for method in ("kfac", "ekfac"):
        # huge damping: (C + d I)^-1 -> I / d, so every rotation must come back exactly
        huge = influence_scores(model, data, data, method=method, damping=1e9, progress=False)
        torch.testing.assert_close(huge * 1e9, graddot, rtol=1e-6, atol=1e-6 * graddot.abs().max().item())
    # EK-FAC's corrected eigenvalues are the exact GN diagonal in its basis: same trace as exact
    exact = compute_influence(model, data, None, InfluenceConfig(method="exact"), progress=False)
    ekfac = compute_influence(model, data, None, InfluenceConfig(method="ekfac"), progress=False)
    assert ekfac.damping == pytest.approx(exact.damping, rel=1e-9)


@pytest.mark.parametrize("case", ["conv", "text"])
def test_factored_eigenvalue_correction_is_the_per_example_one(case):
    # EK-FAC's correction is summed from rotated layer inputs and output gradients when every
    # selected parameter is in a Kronecker layer, from rotated per-example gradients otherwise
    # (a GroupNorm or LayerNorm selected joins the diagonal): same eigenvalues.
    from tests.unit.test_influence_index import text_case

    if case == "conv":
        model = _conv_net()
        g = torch.Generator().manual_seed(3)
        data = TensorDataset(torch.randn(12, 2, 6, 6, generator=g, dtype=torch.float64),
                             torch.randint(0, 3, (12,), generator=g))
        extra = "1.weight"  # the GroupNorm's
    else:  # tokens, padding, attention: several positions per example
        model, data = text_case(n=10)
        model.requires_grad_(False)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("model.bert.encoder.layer.1.", "model.classifier")))
        extra = next(n for n, p in model.named_parameters() if p.requires_grad and "LayerNorm" in n)
    in_layers = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                 for p in ("weight", "bias") if getattr(m, p) is not None and getattr(m, p).requires_grad}
    config = InfluenceConfig(method="ekfac")
    factored = fit_influence_curvature(model, data, config, progress=False,
                                       param_filter=lambda n, p: n in in_layers).curvature
    dense = fit_influence_curvature(model, data, config, progress=False,
                                    param_filter=lambda n, p: n in in_layers | {extra}).curvature
    assert len(factored.diag_index) == 0 and len(dense.diag_index) > 0  # the two paths ran
    by_module = {layer.module: v for layer, v in zip(dense.layers, dense.values, strict=True)}
    compared = 0  # rtol 1e-4: the text model is float32
    for layer, values in zip(factored.layers, factored.values, strict=True):
        if layer.module in by_module and by_module[layer.module].shape == values.shape:
            torch.testing.assert_close(values, by_module[layer.module], rtol=1e-4, atol=1e-7 * values.max().item())
            compared += 1
    assert compared >= 2
