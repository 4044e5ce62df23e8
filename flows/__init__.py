"""Prefect flows that compose the `audit` library and `registry_hooks`.

Embedded defaults for Prefect (DESIGN.md): its ephemeral local server, analytics off, and a
start-up timeout long enough for a 2-core machine. Set before Prefect is first imported;
explicit environment values win.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
