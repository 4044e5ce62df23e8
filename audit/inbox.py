"""The flagged inbox on disk: a run claims a batch before reading it, then archives or
quarantines it; claims left behind by a run that died are handed back.

    files = claim_batch(inbox, workdir / "claims", claim_id)   # [] when another run took them
    move_files(files, workdir / "processed" / run_id)

A claim is `os.rename` of each file into `claims/<claim id>/`: atomic on one filesystem, so two
runs (a cron tick and a webhook, two deliveries) never both get the same file.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from audit.errors import InvalidFlaggedBatch
from audit.flagged import BATCH_SUFFIXES, batch_digest, batch_files, read_batch_file
from audit.modalities import Modality


def claim_batch(inbox: Path, claims: Path, claim_id: str) -> list[Path]:
    """Move the batch files at `inbox` (a file, or a folder's Parquet/CSV files) into
    `claims/<claim_id>/`, one atomic rename each; a file another run renamed first is skipped.
    Returns the claimed paths, empty when there was nothing left to claim. `claims` must be on
    the same filesystem as `inbox`, or the claim falls back to copy-and-delete."""
    folder = Path(claims) / claim_id
    claimed = []
    for source in batch_files(inbox):
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / source.name
        try:
            os.rename(source, target)
        except FileNotFoundError:  # another run claimed it between the listing and the rename
            continue
        except OSError:  # another filesystem: not atomic, but still moved once
            try:
                shutil.move(str(source), target)
            except FileNotFoundError:
                continue
        claimed.append(target)
    if folder.exists() and not any(folder.iterdir()):
        folder.rmdir()
    return claimed


def move_files(files: list[Path], folder: Path) -> Path:
    """Move `files` into `folder` (created); removes the claim folder they came from once empty."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.move(str(f), folder / f.name)
    for parent in {f.parent for f in files}:
        if parent.exists() and not any(parent.iterdir()):
            parent.rmdir()
    return folder


def stale_claims(claims: Path, older_than_s: float, now: float | None = None) -> list[Path]:
    """Claim folders not touched for `older_than_s` seconds (their run most likely died), oldest first."""
    if not Path(claims).is_dir():
        return []
    now = time.time() if now is None else now
    folders = [p for p in Path(claims).iterdir() if p.is_dir() and now - p.stat().st_mtime > older_than_s]
    return sorted(folders, key=lambda p: p.stat().st_mtime)


def claimed_files(claim: Path) -> list[Path]:
    """The batch files in a claim folder, by name."""
    return sorted(p for p in claim.iterdir() if p.is_file())


def requeue(claim: Path, inbox: Path) -> list[Path]:
    """Hand a claim's files back to `inbox` for the next run: into the folder, or, for an inbox
    that is one batch file, back to that file's place. Returns their new paths."""
    folder = inbox.parent if inbox.suffix in BATCH_SUFFIXES and not inbox.is_dir() else inbox
    files = claimed_files(claim)
    move_files(files, folder)
    return [folder / f.name for f in files]


def claim_digest(claim: Path, modality: Modality) -> str | None:
    """The content digest of a claimed batch for a model of `modality` (as audits record it); None
    when a file cannot be read or lacks a required column (no audit can have logged such a batch)."""
    try:
        frame = pd.concat([read_batch_file(f) for f in claimed_files(claim)], ignore_index=True)
        return batch_digest(frame, modality)
    except (InvalidFlaggedBatch, KeyError):
        return None


@dataclass(frozen=True)
class Recovery:
    """What becomes of a stale claim: archived under the FINISHED audit of the same batch
    (`archive_under`), else handed back to the inbox; audits it left RUNNING are `mark_failed`."""

    archive_under: str | None
    mark_failed: tuple[str, ...]


def recovery_for(runs: dict[str, str]) -> Recovery:
    """The recovery of a stale claim from the audits of its batch ({run id: MLflow status})."""
    finished = sorted(r for r, status in runs.items() if status == "FINISHED")
    running = tuple(sorted(r for r, status in runs.items() if status == "RUNNING"))
    return Recovery(finished[0] if finished else None, () if finished else running)
