"""model-audit library: influence engine, data/model adapters, correction, gates, reports.

Importing this package stays light: no Prefect, MLflow client or Great Expectations at import
time (they are imported inside the functions that need them).
"""

__version__ = "0.1.0"
