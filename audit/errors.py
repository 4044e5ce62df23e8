"""Typed errors whose messages say what was expected, what was found and what to do.

The CLI turns any `AuditError` into its message (one sentence) and a non-zero exit code.
"""


class AuditError(Exception):
    """Base class: a problem with the user's input or environment, explained in one sentence."""


class InvalidFlaggedBatch(AuditError):
    """The flagged batch failed validation; nothing downstream ran."""


class EmptyInbox(InvalidFlaggedBatch):
    """Nothing to audit: the inbox holds no batch, or another run claimed it first."""


class AlreadyCorrected(AuditError):
    """The audit already produced a registered version: one audit registers at most one."""

    def __init__(self, message: str, version: str) -> None:
        super().__init__(message)
        self.version = version


class IntegrityError(AuditError):
    """A registered model's files cannot be trusted: changed since they were logged, or unverifiable."""


class LineageError(AuditError):
    """The training data of a model cannot be recovered, or it does not match its digest."""


class UnsupportedModel(AuditError):
    """The model or one of its layers cannot be handled by the requested method."""


class InvalidInput(AuditError):
    """Arguments or datasets with the wrong shape, size or content."""


class NumericalError(AuditError):
    """A computation produced non-finite values (curvature, scores, losses)."""


class ClusterFailed(AuditError):
    """The Dask cluster failed under the index's jobs (scheduler gone, a job's workers kept dying)."""
