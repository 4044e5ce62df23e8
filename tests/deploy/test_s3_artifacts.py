"""Artifacts on S3-compatible storage: an `mlflow server` serving artifacts (`--serve-artifacts`)
into a bucket of a local S3 API server (moto's, on loopback). A model and its training data logged
through the server land in the bucket, and the audit's readers get both back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.deploy.conftest import free_port, wait_until

pytestmark = pytest.mark.slow

BUCKET = "audit-artifacts"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _answers(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


def _started(command, log: Path, env: dict) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})


def test_a_model_and_its_data_logged_through_the_server_land_in_the_bucket_and_read_back(tmp_path, digits_splits,
                                                                                          monkeypatch):
    import boto3
    import mlflow

    from audit.demo.digits import INPUT_SHAPE, NUM_CLASSES
    from audit.demo.models import DigitsMLP
    from audit.training import predict_logits
    from registry_hooks.lineage import log_training_data, recover_training_data
    from registry_hooks.model_io import ModelSpec, load_version, log_classifier, resolve_version
    from registry_hooks.registry import register_version
    from registry_hooks.store import use_store

    bin_dir = Path(sys.executable).parent
    s3_port, mlflow_port = free_port(), free_port()
    s3_url, mlflow_url = f"http://127.0.0.1:{s3_port}", f"http://127.0.0.1:{mlflow_port}"
    processes = [_started([str(bin_dir / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], tmp_path / "s3.log",
                          S3_ENV)]
    try:
        wait_until(lambda: _answers(f"{s3_url}/moto-api/"), 60, "the S3 API server", interval_s=0.5)
        s3 = boto3.client("s3", endpoint_url=s3_url, **{k.lower(): v for k, v in S3_ENV.items()
                                                       if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        processes.append(_started(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
             "--serve-artifacts", "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1",
             "--port", str(mlflow_port), "--workers", "1"],
            tmp_path / "mlflow.log", {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_url}))
        wait_until(lambda: _answers(f"{mlflow_url}/health"), 180, "the MLflow server", interval_s=0.5)

        # the client has no S3 credentials: everything goes through the server
        for name in S3_ENV:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
        workdir = tmp_path / "workdir"
        use_store(workdir, tracking=mlflow_url)
        torch.manual_seed(0)
        model = DigitsMLP()
        with mlflow.start_run() as run:
            log_training_data(digits_splits.train, digits_splits.validation)
            uri = log_classifier(model, ModelSpec(INPUT_SHAPE, NUM_CLASSES))
        register_version(uri, "s3-digits", "champion")

        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="mlflow/")
                for o in page.get("Contents", [])]
        assert any(run.info.run_id in key for key in keys), keys
        assert mlflow.get_run(run.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
        assert not (workdir / "mlruns").exists()
        ref = resolve_version("s3-digits", alias="champion")
        loaded = load_version(ref, allow_pickle=True)
        x = digits_splits.validation.inputs[:8]
        assert torch.equal(predict_logits(loaded.model, x), predict_logits(model, x))
        recovered = recover_training_data(ref.run_id, ref.spec)
        assert recovered.train.ids == digits_splits.train.ids
        assert torch.equal(recovered.train.labels, digits_splits.train.labels)
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
