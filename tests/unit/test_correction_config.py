"""CorrectionConfig validation and the finetune_steps helper."""

import pytest
import torch
from torch import nn

from audit.correction import CorrectionConfig, finetune_steps
from audit.errors import InvalidInput, NumericalError


def test_defaults_are_valid_and_batch_strategy_is_relabel():
    config = CorrectionConfig()
    assert config.strategy == "relabel" and config.method == "graddot" and config.seed == 0


def test_invalid_config_lists_every_problem_in_one_error():
    with pytest.raises(InvalidInput) as info:
        CorrectionConfig(strategy="retrain", k=0, lr=-1.0, target_fix_rate=1.5)
    message = str(info.value)
    for name in ("strategy", "k must", "lr must", "target_fix_rate"):
        assert name in message


def test_a_learning_rate_far_too_high_is_accepted_but_one_beyond_float32_is_refused():
    assert CorrectionConfig(lr=1e30).lr == 1e30  # too high is a diverged candidate, not bad input
    for lr in (0.0, 1e31, float("inf"), float("nan"), "0.1"):
        with pytest.raises(InvalidInput, match="lr must be a positive number at most 1e"):
            CorrectionConfig(lr=lr)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def test_finetune_steps_lowers_the_loss_in_place_and_leaves_eval_mode():
    model = _tiny()
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3
    before = nn.functional.cross_entropy(model(x), y).item()
    losses = finetune_steps(model, x, y, steps=20, lr=0.1)
    after = nn.functional.cross_entropy(model(x), y).item()
    assert len(losses) == 20 and losses[0] == pytest.approx(before, rel=1e-5)
    assert after < before - 0.05
    assert not model.training


def test_bounded_ascent_stops_once_every_example_is_past_the_bound():
    model = _tiny()
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(2)), torch.zeros(8, dtype=torch.int64)
    losses = nn.functional.cross_entropy(model(x), y, reduction="none").detach()
    before = [p.detach().clone() for p in model.parameters()]
    # bound below every example's loss: the clipped objective is flat, nothing may move
    finetune_steps(model, x[:0], y[:0], steps=5, lr=0.5, ascent_inputs=x, ascent_labels=y,
                   ascent_bound=float(losses.min()) * 0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # a bound above: ascent raises the loss
    finetune_steps(model, x[:0], y[:0], steps=5, lr=0.5, ascent_inputs=x, ascent_labels=y, ascent_bound=50.0)
    assert nn.functional.cross_entropy(model(x), y).item() > losses.mean().item()


def test_finetune_steps_rejects_empty_and_diverging_runs():
    model = _tiny()
    with pytest.raises(InvalidInput):
        finetune_steps(model, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), steps=1, lr=0.1)
    linear = nn.Linear(4, 3)  # no saturating layer: a huge step overflows float32
    x, y = torch.full((4, 4), 1e20), torch.arange(4) % 3
    with pytest.raises(NumericalError):
        finetune_steps(linear, x, y, steps=5, lr=1e30)


def _horizon(pearsons):
    import pandas as pd

    steps = [1, 2, 4, 8, 16, 32][: len(pearsons)]
    return pd.DataFrame({"steps": steps, "pearson": pearsons, "spearman": pearsons, "n_pairs": 12})


def test_trusted_steps_is_the_longest_horizon_that_stays_above_the_correlation():
    from audit.correction import trusted_steps

    assert trusted_steps(_horizon([0.95, 0.9, 0.8, 0.7, 0.6, 0.55])) == 32
    assert trusted_steps(_horizon([0.95, 0.9, 0.4, 0.7, 0.6, 0.55])) == 2  # the first dip ends the horizon
    assert trusted_steps(_horizon([0.95, 0.9, 0.8, 0.7, 0.6, 0.55]), min_correlation=0.75) == 4
    assert trusted_steps(_horizon([0.2, 0.9])) == 1  # one step is the floor; the gates still verify it
    assert trusted_steps(_horizon([0.9, float("nan"), 0.9])) == 1
    with pytest.raises(InvalidInput, match="min_correlation"):
        trusted_steps(_horizon([0.9]), min_correlation=1.5)
