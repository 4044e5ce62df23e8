"""A briefly trained digits CNN logged with its data lineage, and its flagged mispredictions,
shared by the tests that need a registered model to audit."""

import mlflow
import pandas as pd

from audit.demo.digits import INPUT_SHAPE, NUM_CLASSES, DigitsSplits
from audit.demo.models import SmallResNet
from audit.flagged import flagged_frame
from audit.training import TrainConfig, predict_logits, train
from registry_hooks.lineage import log_training_data
from registry_hooks.model_io import ModelSpec, log_classifier


def log_small_cnn(splits: DigitsSplits, n_flagged: int) -> tuple[str, pd.DataFrame]:
    """A SmallResNet trained 8 epochs on the first 300 training digits, logged in a new run of the
    current MLflow store with its training data; returns (model URI, the flagged batch of its first
    `n_flagged` mispredictions on the production split, reviewer labels = true labels)."""
    train_part = splits.train.subset(list(range(300)))
    model = SmallResNet()
    train(model, train_part.dataset(), TrainConfig(epochs=8))
    with mlflow.start_run():
        log_training_data(train_part, splits.validation)
        uri = log_classifier(model, ModelSpec(INPUT_SHAPE, NUM_CLASSES))
    production = splits.production
    predicted = predict_logits(model, production.inputs).argmax(1)
    wrong = (predicted != production.labels).nonzero().flatten()[:n_flagged].tolist()
    return uri, flagged_frame(production.subset(wrong), predicted[wrong])
