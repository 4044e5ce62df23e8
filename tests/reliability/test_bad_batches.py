"""Flagged batches that are broken in ways the other tests do not try, each refused cleanly: by
the reader with one sentence (InvalidFlaggedBatch), by validation with its failed checks named,
and through `model-audit audit` with exit code 2, one `error:` line, the batch quarantined, no
MLflow run and no traceback anywhere in the output. docs/reliability.md lists them."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from audit.errors import InvalidFlaggedBatch
from audit.flagged import read_batch_file
from audit.modalities import Pixels
from audit.validation import validate_flagged_frame

HEADER = b"example_id,pixels,predicted_label,true_label\n"
PIXELS = json.dumps([1.0] * 64).encode()

UNREADABLE = {
    "zero-bytes.parquet": b"",
    "zero-bytes.csv": b"",
    "random-bytes.parquet": os.urandom(512),
    "random-bytes.csv": bytes(range(128, 256)) * 4,  # never valid UTF-8
    "latin-1.csv": HEADER + 'caf\xe9,"[1.0]",1,3\n'.encode("latin-1"),
    "pixels-not-json.csv": HEADER + b'a,"{not json}",1,3\n',
}


@pytest.mark.parametrize("name", UNREADABLE)
def test_an_unreadable_file_is_one_sentence(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(UNREADABLE[name])
    with pytest.raises(InvalidFlaggedBatch, match=f"^Cannot read flagged batch {name}: ") as refused:
        read_batch_file(path)
    assert "\n" not in str(refused.value)


def _row(**changes) -> dict:
    return {"example_id": "a", "pixels": [1.0] * 64, "predicted_label": 1, "true_label": 2, **changes}


INVALID = {
    "no rows": (pd.DataFrame(columns=["example_id", "pixels", "predicted_label", "true_label"]), "at least one row"),
    "pixels a mapping": (pd.DataFrame([_row(pixels={"a": 1.0})]), "`pixels`"),
    "pixels a scalar": (pd.DataFrame([_row(pixels=5.0)]), "`pixels`"),
    "pixels missing": (pd.DataFrame([_row(pixels=None)]), "`pixels`"),
    "pixels booleans": (pd.DataFrame([_row(pixels=[True] * 64)]), "pixel value"),
    "labels as words": (pd.DataFrame([_row(predicted_label="one", true_label="two")]), "label set"),
    "label a fraction": (pd.DataFrame([_row(predicted_label=1.5)]), "`predicted_label` in the label set"),
    "label negative": (pd.DataFrame([_row(predicted_label=-1)]), "`predicted_label` in the label set"),
    "example_id empty": (pd.DataFrame([_row(example_id=None)]), "`example_id`"),
    "no expected column": (pd.DataFrame({"hello": ["world"]}), "column `example_id` present"),
}


@pytest.mark.parametrize("case", INVALID)
def test_an_invalid_batch_fails_validation_naming_the_check(case):
    frame, named = INVALID[case]
    result = validate_flagged_frame(frame, num_classes=10, modality=Pixels((1, 8, 8)), input_range=(0.0, 16.0))
    assert not result.success
    assert named in " ".join(result.failed_checks), result.failed_checks


# One file that cannot be read and one that fails validation, each through a real `model-audit`
# process (about 15 s each here); the other kinds reach the same two code paths, and are tested
# in-process above.
CLI_CASES = {
    "random-bytes.csv": bytes(range(128, 256)) * 4,
    "labels-as-words.csv": HEADER + b'a,"' + PIXELS + b'",one,two\n',
}


@pytest.mark.slow  # one `model-audit audit` process per case
@pytest.mark.parametrize("name", CLI_CASES)
def test_the_cli_refuses_a_broken_batch_in_one_line_without_a_traceback(prefect_harness, small_champion, name):
    """The real command in its own process (what a user sees on the terminal), against the test
    Prefect API: exit 2, one `error:` line naming the quarantine, no traceback, no MLflow run."""
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL

    from registry_hooks.store import tracking_uri

    workdir, _ = small_champion
    (workdir / "inbox").mkdir()
    (workdir / "inbox" / name).write_bytes(CLI_CASES[name])
    client = MlflowClient(tracking_uri(workdir))
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs_before = len(client.search_runs(experiments))

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    result = subprocess.run([str(Path(sys.executable).parent / "model-audit"), "audit", "--workdir", str(workdir),
                             "--model", "m", "--allow-pickle", "--method", "graddot"],
                            env=env, capture_output=True, text=True, timeout=300)
    everything = result.stdout + result.stderr
    assert result.returncode == 2, everything
    errors = [line for line in everything.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "The batch was moved to" in errors[0], everything
    assert "Traceback" not in everything, everything
    assert len(client.search_runs(experiments)) == runs_before
    (quarantined,) = (workdir / "quarantine").iterdir()
    assert (quarantined / name).exists() and not any((workdir / "inbox").iterdir())
