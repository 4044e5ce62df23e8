"""The library stays light: importing audit/ pulls in no Prefect, MLflow or Great Expectations, nor
Dask (imported only when a cluster is asked for)."""

import subprocess
import sys

LIBRARY_MODULES = ["audit", "audit.examples", "audit.demo.digits", "audit.demo.models", "audit.training",
                   "audit.influence", "audit.correction", "audit.gates", "audit.flagged",
                   "audit.validation", "audit.findings", "audit.report_page", "audit.audit_report",
                   "audit.correction.report", "audit.verdict", "audit.scoring", "audit.influence.index",
                   "audit.influence.index.cluster"]

HEAVY = ("prefect", "mlflow", "great_expectations", "onnxruntime", "distributed")


def test_library_imports_no_orchestration_or_tracking_client():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in LIBRARY_MODULES)
        + f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        + "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_webhook_receiver_imports_no_orchestration():
    """registry_hooks/ owns MLflow; what a registry event starts is deploy/'s business."""
    code = "import sys\nimport registry_hooks.webhooks\nprint('prefect' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
