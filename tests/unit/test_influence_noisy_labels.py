"""Self-influence finds flipped labels: an MLP trained on digits with 10% flipped labels; the
flipped examples must rank highest (ROC AUC >= 0.95) under ekfac and arnoldi."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from audit.demo.digits import load_digits_splits
from audit.demo.models import DigitsMLP
from audit.influence import self_influence
from audit.training import TrainConfig, train


@pytest.fixture(scope="module")
def noisy_mlp():
    splits = load_digits_splits(noise_rate=0.1, seed=0)
    torch.manual_seed(0)
    model = DigitsMLP()
    train(model, splits.train.dataset(), TrainConfig(epochs=20, batch_size=64, lr=3e-3, weight_decay=1e-4))
    return model, splits


@pytest.mark.parametrize(("method", "options"), [("ekfac", {}), ("arnoldi", {"rank": 32, "batch_size": 540})])
def test_self_influence_ranks_flipped_labels_first(noisy_mlp, method, options):
    model, splits = noisy_mlp
    scores = self_influence(model, splits.train.dataset(), method=method, progress=False, **options)
    auc = roc_auc_score(splits.flipped.numpy(), scores.numpy())
    print(f"{method}: self-influence ROC AUC for flipped labels = {auc:.4f}")
    assert auc >= 0.95
