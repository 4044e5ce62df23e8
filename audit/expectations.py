"""Running a Great Expectations 1.x suite over a DataFrame in an ephemeral context: the one way
the product validates tables (flagged batches, evaluation tables).

GX is imported inside `run_suite` (~6 s to import here), so `import audit` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pandas as pd


def run_suite(frame: pd.DataFrame, name: str, expectations: Callable[[object], list]):
    """Validate `frame` against the expectations that `expectations(gx.expectations)` returns, in
    a fresh ephemeral context (analytics off, progress bars off, no files written). Returns GX's
    `ExpectationSuiteValidationResult`; never raises because data fail a check."""
    # GX reads this when it is imported; the product never sends analytics.
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas(name).add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("whole")
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for expectation in expectations(gx.expectations):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    return definition.run(batch_parameters={"dataframe": frame})
