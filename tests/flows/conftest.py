"""A small registered champion for tests of what the CLI and the audit flow refuse or accept."""

import pytest


@pytest.fixture
def small_champion(mlflow_store, digits_splits):
    """A seeded, untrained digits CNN registered as m@champion with its data lineage (120 training
    digits) and its training input range, and a flagged batch of 4 production digits labelled
    as mispredictions. Returns (workdir, batch frame). Untrained is enough: refusals happen before
    the model is used, and an audit scores whatever model it is given."""
    import mlflow
    import torch

    from audit.demo.digits import NUM_CLASSES
    from audit.demo.models import SmallResNet
    from audit.flagged import flagged_frame
    from registry_hooks.lineage import log_training_data
    from registry_hooks.model_io import ModelSpec, log_classifier
    from registry_hooks.registry import register_version

    torch.manual_seed(0)
    train = digits_splits.train.subset(list(range(120)))
    with mlflow.start_run():
        log_training_data(train, digits_splits.validation)
        uri = log_classifier(SmallResNet(), ModelSpec.for_training(train.inputs, NUM_CLASSES))
    register_version(uri, "m", "champion")
    production = digits_splits.production.subset(list(range(4)))
    return mlflow_store, flagged_frame(production, (production.labels + 1) % NUM_CLASSES)
