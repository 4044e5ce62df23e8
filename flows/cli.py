"""The `model-audit` command line. Errors in the user's input print one sentence and exit 2.

Every option maps onto a field of the typed settings (flows/settings.py), which validate it. The
choices and defaults in the help texts are spelled out here, so that `--help` does not import
torch; tests/flows/test_cli.py keeps them equal to the settings'.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer
from pydantic import ValidationError

from audit.errors import AlreadyCorrected, AuditError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Audit and repair classifiers registered in MLflow.")

# flows.settings: AUDIT_METHODS, CORRECTION_METHODS; audit.correction: STRATEGIES, CANDIDATES_BY_NAME.
AUDIT_METHODS = ("ekfac", "kfac", "arnoldi", "exact", "graddot", "index", "index-reranked", "auto")
CORRECTION_METHODS = ("ekfac", "kfac", "arnoldi", "exact", "graddot", "gradcos")
STRATEGIES = ("reinforce", "relabel", "unlearn")
CANDIDATES = ("relabel", "unlearn-gentle", "relabel-wide", "relabel-wide-gentle", "relabel-reinforce")
# registry_hooks.model_io.ALLOW_PICKLE_ENV (the refusal names it).
ALLOW_PICKLE_ENV = "MODEL_AUDIT_ALLOW_PICKLE"

WORKDIR = typer.Option(Path("audit-workdir"), "--workdir", help="Holds mlflow.db, mlruns and the inbox.")
# Commands that read a store refuse a workdir that does not exist, instead of creating an empty
# one and then reporting that nothing is in it; only `demo` creates one.
EXISTING_WORKDIR = typer.Option(Path("audit-workdir"), "--workdir", exists=True, file_okay=False,
                                help="Holds mlflow.db, mlruns and the inbox (must exist; `demo` creates one).")
TRACKING_URI = typer.Option(None, "--tracking-uri",
                            help="MLflow tracking and registry URI, e.g. an `mlflow server` URL "
                                 "(default: sqlite:///<workdir>/mlflow.db).")
# Read from the environment too, so that `serve` under a process manager can set it.
ALLOW_PICKLE = typer.Option(False, "--allow-pickle", envvar=ALLOW_PICKLE_ENV,
                            help="Load the registry's pickled models: unpickling runs code from the MLflow artifact "
                                 "store, so only for a registry you trust (docs/security.md).")
MODEL = typer.Option("digits-classifier", "--model", help="Registered model name.")
AUDIT_METHOD = typer.Option("auto", "--method", help=f"Influence method ({', '.join(AUDIT_METHODS)}). auto: EK-FAC "
                                                     "for small models, the gradient index for large ones; "
                                                     "index-reranked: the index's shortlists re-scored by EK-FAC.")
TOP_K = typer.Option(10, "--top-k", help="Helpful and harmful examples kept per flagged example (1-1000).")
WORKERS = typer.Option(None, "--workers", min=1,
                       help="Build and query the gradient index on a local Dask cluster of N worker processes.")
DASK_ADDRESS = typer.Option(None, "--dask-address",
                            help="Build and query the gradient index on an existing Dask scheduler (tcp://HOST:PORT).")
MAX_FLAGGED = typer.Option(10_000, "--max-flagged",
                           help="A flagged batch with more rows is refused and quarantined.")
# The correction: what `correct` and `serve` set (CorrectionSettings and its GateSettings).
CANDIDATE_NAMES = typer.Option(None, "--candidates",
                               help=f"Repair candidates tried in order, comma-separated, from: {', '.join(CANDIDATES)} "
                                    "(default: all, in that order).")
STRATEGY = typer.Option(None, "--strategy",
                        help=f"Repair strategy of every candidate ({', '.join(STRATEGIES)}; "
                             "default: each candidate's own).")
SELECTION_FRACTION = typer.Option(1 / 3, "--selection-fraction",
                                  help="Share of the validation split that selects a candidate (0-1, exclusive).")
MIN_HORIZON_CORRELATION = typer.Option(
    0.5, "--min-horizon-correlation",
    help="Fine-tuning steps per repair round are capped at the longest influence horizon with at least this "
         "Pearson correlation (0-1).")
MIN_FIX_RATE = typer.Option(0.5, "--min-fix-rate",
                            help="Gate: fraction of flagged examples the repair must predict as the reviewer's "
                                 "label (0-1).")
MAX_ACCURACY_DROP = typer.Option(0.5, "--max-accuracy-drop-points",
                                 help="Gate: largest held-out accuracy drop vs the champion, in points (0-100).")
MAX_CLASS_RECALL_DROP = typer.Option(2.0, "--max-class-recall-drop-points",
                                     help="Gate: largest recall drop of any class, in points (0-100).")
MAX_CANARY_FLIP_RATE = typer.Option(0.02, "--max-canary-flip-rate",
                                    help="Gate: largest fraction of the champion's correct canary predictions that "
                                         "may change (0-1).")
ONNX_RTOL = typer.Option(1e-3, "--onnx-rtol", help="Gate: relative tolerance of ONNX vs PyTorch logits (>= 0).")
ONNX_ATOL = typer.Option(1e-4, "--onnx-atol", help="Gate: absolute tolerance of ONNX vs PyTorch logits (>= 0).")
HARM_RESOLUTION = typer.Option(1, "--harm-resolution-examples",
                               help="Gate: an accuracy or recall drop beyond its threshold fails only when more than "
                                    "this many examples were lost net (>= 0; 0: the plain threshold).")
CORRECTION_METHOD_HELP = (f"Influence method every repair candidate re-scores with ({', '.join(CORRECTION_METHODS)}; "
                          "default: each candidate's own, graddot).")
HARM_SIGNIFICANCE = typer.Option(None, "--harm-significance",
                                 help="Gate: if set, such a drop fails only when an exact McNemar test on the changed "
                                      "examples gives p below it (0-1, exclusive).")


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs every failed flow/task with a traceback; for the user's own mistakes
    (AuditError) the CLI's one sentence says it all, so keep the log line, drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], AuditError):
            record.exc_info = None
            record.exc_text = None
        return True


def _run(action):
    """Run a command body; AuditError, invalid settings or an MLflow server that failed (after the
    client's own retries) -> one sentence on stderr and exit code 2."""
    from mlflow.exceptions import MlflowException

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_NoTracebackForUserErrors())
    try:
        return action()
    except AuditError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except MlflowException as exc:
        first = (exc.message or str(exc)).strip().splitlines()[0][:400]
        typer.echo(f"error: MLflow failed: {first}", err=True)
        raise typer.Exit(code=2) from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        typer.echo(f"error: invalid settings ({problems}).", err=True)
        raise typer.Exit(code=2) from None


def _progress() -> bool:
    """Progress bars only for a person watching: stderr is a terminal (not a log file or a test)."""
    return sys.stderr.isatty()


def _correction_settings(candidates: str | None, strategy: str | None, method: str | None, selection_fraction: float,
                         min_horizon_correlation: float, progress: bool = False, **gates):
    """CorrectionSettings from command-line values (`candidates` comma-separated; `gates` the
    GateSettings fields); raises ValidationError naming every bad value."""
    from flows.settings import CorrectionSettings

    named = {"candidates": tuple(c.strip() for c in candidates.split(","))} if candidates else {}
    return CorrectionSettings(gates=gates, strategy=strategy, method=method, selection_fraction=selection_fraction,
                              min_horizon_correlation=min_horizon_correlation, progress=progress, **named)


DEMO_TASKS = ("digits", "sst2", "images")
# flows.demo_sst2: N_TRAIN, N_VALIDATION, N_PRODUCTION, MAX_LENGTH, TRAINABLE_LAYERS, EPOCHS.
SST2_SIZES = (1500, 400, 400)
SST2_MAX_LENGTH = 56
SST2_TRAINABLE_LAYERS = 2
EPOCHS_BY_TASK = {"digits": 40, "sst2": 2}  # images: flows.demo_images' own


@app.command()
def demo(
    workdir: Path = WORKDIR,
    task: str = typer.Option("digits", "--task", help=f"Which demo ({', '.join(DEMO_TASKS)}): digits trains a "
                                                     "small CNN; sst2 fine-tunes all-MiniLM-L6-v2 on SST-2 "
                                                     "sentences (needs --data); images a torchvision model."),
    data: Path = typer.Option(None, "--data", help="sst2: the SST-2 folder (train.tsv, dev.tsv, test.tsv, "
                                                   "tab-separated, header label<TAB>sentence)."),
    noise_rate: float = typer.Option(0.1, min=0.0, max=0.9, help="Fraction of training labels flipped."),
    seed: int = typer.Option(0, help="Seeds the split, the label noise and training."),
    epochs: int = typer.Option(None, min=1, help="Training epochs (default: digits 40, sst2 2, images its "
                                                 "own)."),
    method: str = AUDIT_METHOD,
    min_fix_rate: float = MIN_FIX_RATE,
    n_train: int = typer.Option(SST2_SIZES[0], min=1, help="sst2: training sentences sampled."),
    n_validation: int = typer.Option(SST2_SIZES[1], min=1, help="sst2: validation sentences sampled."),
    n_production: int = typer.Option(SST2_SIZES[2], min=1, help="sst2: production sentences sampled."),
    max_length: int = typer.Option(SST2_MAX_LENGTH, min=2, help="sst2: tokens per sentence (longer ones are "
                                                                "cut)."),
    trainable_layers: int = typer.Option(SST2_TRAINABLE_LAYERS, min=0, max=6,
                                         help="sst2: top encoder layers fine-tuned with the pooler and "
                                              "classifier (the audit scores the pooler and classifier only)."),
) -> None:
    """Train, register, flag, audit and repair a model end to end on embedded defaults: a digits CNN
    (the default), or with --task sst2 --data DIR a MiniLM text classifier (it loads only the model it
    trains, so no --allow-pickle is needed)."""
    if task not in DEMO_TASKS:
        typer.echo(f"error: --task must be one of {', '.join(DEMO_TASKS)}; got {task!r}.", err=True)
        raise typer.Exit(code=2)
    if task == "sst2" and data is None:
        typer.echo("error: --task sst2 needs --data DIR, an SST-2 folder holding train.tsv, dev.tsv and test.tsv.",
                   err=True)
        raise typer.Exit(code=2)
    if task == "sst2":
        from flows.demo_sst2 import run_sst2_demo, summary

        result = _run(lambda: run_sst2_demo(
            workdir, data, n_train=n_train, n_validation=n_validation, n_production=n_production,
            noise_rate=noise_rate, seed=seed, epochs=epochs or EPOCHS_BY_TASK["sst2"], max_length=max_length,
            trainable_layers=trainable_layers, method=method, min_fix_rate=min_fix_rate, progress=_progress()))
    elif task == "images":
        from flows.demo_images import run_image_demo, summary

        options = {} if epochs is None else {"epochs": epochs}
        result = _run(lambda: run_image_demo(workdir, seed=seed, noise_rate=noise_rate, method=method,
                                             min_fix_rate=min_fix_rate, progress=_progress(), **options))
    else:
        from flows.demo import run_demo, summary

        result = _run(lambda: run_demo(workdir, noise_rate, seed, epochs or EPOCHS_BY_TASK["digits"], method,
                                       min_fix_rate, progress=_progress()))
    typer.echo(summary(result))


@app.command("audit")
def audit_command(
    workdir: Path = EXISTING_WORKDIR,
    tracking_uri: str = TRACKING_URI,
    allow_pickle: bool = ALLOW_PICKLE,
    model: str = MODEL,
    alias: str = typer.Option("champion", help="Alias of the version to audit."),
    inbox: Path = typer.Option(None, help="Flagged batch file or folder (default <workdir>/inbox)."),
    image_root: Path = typer.Option(None, "--image-root", exists=True, file_okay=False,
                                    help="Folder the `image_path` cells of a flagged batch are relative to."),
    method: str = AUDIT_METHOD,
    top_k: int = TOP_K,
    max_flagged: int = MAX_FLAGGED,
    workers: int = WORKERS,
    dask_address: str = DASK_ADDRESS,
) -> None:
    """Audit a registered model against a flagged batch; prints the audit run id."""

    def run():
        from flows.audit_flow import audit
        from flows.settings import AuditSettings, StoreSettings

        store = StoreSettings(workdir=workdir, tracking_uri=tracking_uri, allow_pickle=allow_pickle)
        settings = AuditSettings(model_name=model, alias=alias, inbox=inbox, image_root=image_root, method=method,
                                 top_k=top_k, max_flagged=max_flagged, progress=_progress(), workers=workers,
                                 dask_address=dask_address)
        return audit(store, settings)

    result = _run(run)
    typer.echo(f"audit run {result.run_id}: {result.n_flagged} flagged, {result.n_candidates} correction candidates")


@app.command("correct")
def correct_command(
    audit_run_id: str = typer.Argument(..., help="Run id of an audit."),
    workdir: Path = EXISTING_WORKDIR,
    tracking_uri: str = TRACKING_URI,
    allow_pickle: bool = ALLOW_PICKLE,
    candidates: str = CANDIDATE_NAMES,
    strategy: str = STRATEGY,
    method: str = typer.Option(None, "--method", help=CORRECTION_METHOD_HELP),
    selection_fraction: float = SELECTION_FRACTION,
    min_horizon_correlation: float = MIN_HORIZON_CORRELATION,
    min_fix_rate: float = MIN_FIX_RATE,
    max_accuracy_drop_points: float = MAX_ACCURACY_DROP,
    max_class_recall_drop_points: float = MAX_CLASS_RECALL_DROP,
    max_canary_flip_rate: float = MAX_CANARY_FLIP_RATE,
    onnx_rtol: float = ONNX_RTOL,
    onnx_atol: float = ONNX_ATOL,
    harm_resolution_examples: int = HARM_RESOLUTION,
    harm_significance: float = HARM_SIGNIFICANCE,
) -> None:
    """Search for a repair of the audited model; registers @challenger only if every gate passes."""

    def run():
        from flows.correct_flow import correct
        from flows.settings import StoreSettings

        store = StoreSettings(workdir=workdir, tracking_uri=tracking_uri, allow_pickle=allow_pickle)
        settings = _correction_settings(
            candidates, strategy, method, selection_fraction, min_horizon_correlation, _progress(),
            min_fix_rate=min_fix_rate, max_accuracy_drop_points=max_accuracy_drop_points,
            max_class_recall_drop_points=max_class_recall_drop_points, max_canary_flip_rate=max_canary_flip_rate,
            onnx_rtol=onnx_rtol, onnx_atol=onnx_atol, harm_resolution_examples=harm_resolution_examples,
            harm_significance=harm_significance)
        try:
            return correct(store, settings, audit_run_id)
        except AlreadyCorrected as done:  # not an error: the work was done before
            return done

    result = _run(run)
    if isinstance(result, AlreadyCorrected):
        typer.echo(f"correction: {result}")
        return
    if result.registered_version:
        typer.echo(f"correction run {result.run_id}: registered version {result.registered_version} as @challenger")
    else:
        typer.echo(f"correction run {result.run_id}: not registered: " + "; ".join(result.failure_reasons()) + ".")
        sys.exit(1)


@app.command()
def promote(
    workdir: Path = EXISTING_WORKDIR,
    tracking_uri: str = TRACKING_URI,
    model: str = MODEL,
    version: str = typer.Option(None, help="Version to promote (default: @challenger)."),
    force: bool = typer.Option(False, help="Allow a rollback to a version older than the champion."),
    reason: str = typer.Option(None, help="Why the rollback (required with --force; kept as a version tag)."),
) -> None:
    """Move @champion to a gated version after re-checking its gates tag (never backwards without --force)."""
    if force and not (reason and reason.strip()):
        typer.echo("error: --force needs --reason saying why the rollback.", err=True)
        raise typer.Exit(code=2)

    def run() -> str:
        from flows.settings import StoreSettings
        from registry_hooks.registry import promote as promote_version
        from registry_hooks.store import use_store

        store = StoreSettings(workdir=workdir, tracking_uri=tracking_uri)
        use_store(store.workdir, tracking=store.tracking_uri)
        return promote_version(model, version, force_reason=reason if force else None)

    promoted = _run(run)
    typer.echo(f"{model} version {promoted} is now @champion")


SECRET_ENV = "MODEL_AUDIT_WEBHOOK_SECRET"


def _webhook_secret() -> str:
    import os

    from registry_hooks.webhooks import InvalidDelivery

    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        raise InvalidDelivery(f"Set {SECRET_ENV} to the secret shared by the MLflow webhook and the receiver.")
    return secret


@app.command()
def serve(
    workdir: Path = WORKDIR,
    tracking_uri: str = typer.Option(None, help="MLflow server URL (webhooks need `mlflow server`)."),
    allow_pickle: bool = ALLOW_PICKLE,
    model: str = MODEL,
    alias: str = typer.Option("champion", help="Alias audited; moving it to a version starts a run."),
    method: str = AUDIT_METHOD,
    top_k: int = TOP_K,
    max_flagged: int = MAX_FLAGGED,
    workers: int = WORKERS,
    dask_address: str = DASK_ADDRESS,
    candidates: str = CANDIDATE_NAMES,
    strategy: str = STRATEGY,
    correction_method: str = typer.Option(None, "--correction-method", help=CORRECTION_METHOD_HELP),
    selection_fraction: float = SELECTION_FRACTION,
    min_horizon_correlation: float = MIN_HORIZON_CORRELATION,
    min_fix_rate: float = MIN_FIX_RATE,
    max_accuracy_drop_points: float = MAX_ACCURACY_DROP,
    max_class_recall_drop_points: float = MAX_CLASS_RECALL_DROP,
    max_canary_flip_rate: float = MAX_CANARY_FLIP_RATE,
    onnx_rtol: float = ONNX_RTOL,
    onnx_atol: float = ONNX_ATOL,
    harm_resolution_examples: int = HARM_RESOLUTION,
    harm_significance: float = HARM_SIGNIFICANCE,
    cron: str = typer.Option("0 * * * *", help="Audit schedule (cron); '' = registry events only."),
    host: str = typer.Option("127.0.0.1", help="Webhook receiver address."),
    port: int = typer.Option(8765, help="Webhook receiver port."),
    receiver_only: bool = typer.Option(False, help="Only the webhook receiver (deployment on a work pool)."),
    guard: str = typer.Option("restore", help="What the receiver does when champion moves to a version without "
                                              "audit.gates=passed (restore, flag)."),
) -> None:
    """Serve the audit-and-correct deployment (schedule + MLflow webhook receiver) until Ctrl-C."""

    def start() -> None:
        from deploy.service import ServiceSettings
        from deploy.service import serve as serve_service
        from flows.settings import AuditSettings, StoreSettings

        service = ServiceSettings(
            store=StoreSettings(workdir=workdir, tracking_uri=tracking_uri, allow_pickle=allow_pickle),
            audit=AuditSettings(model_name=model, alias=alias, method=method, top_k=top_k, max_flagged=max_flagged,
                                workers=workers, dask_address=dask_address),
            correction=_correction_settings(
                candidates, strategy, correction_method, selection_fraction, min_horizon_correlation,
                min_fix_rate=min_fix_rate, max_accuracy_drop_points=max_accuracy_drop_points,
                max_class_recall_drop_points=max_class_recall_drop_points, max_canary_flip_rate=max_canary_flip_rate,
                onnx_rtol=onnx_rtol, onnx_atol=onnx_atol, harm_resolution_examples=harm_resolution_examples,
                harm_significance=harm_significance),
            cron=cron or None, host=host, port=port, guard=guard)
        serve_service(service, _webhook_secret(), receiver_only)

    _run(start)


@app.command("register-webhook")
def register_webhook_command(
    tracking_uri: str = typer.Option(..., help="MLflow server URL (a SQL-backed `mlflow server`)."),
    url: str = typer.Option("http://127.0.0.1:8765/mlflow/webhook", help="Where `model-audit serve` listens."),
) -> None:
    """Create or update the MLflow webhook that tells `model-audit serve` when an alias moves."""
    from registry_hooks.webhooks import register_webhook_at

    webhook_id = _run(lambda: register_webhook_at(tracking_uri, url, _webhook_secret()))
    typer.echo(f"webhook {webhook_id}: model_version_alias.created -> {url}")


@app.command()
def relocate(workdir: Path = EXISTING_WORKDIR) -> None:
    """Point a copied or moved workdir's MLflow store at its own artifacts (run it once in the copy)."""
    from registry_hooks.store import relocate as relocate_store

    moved = _run(lambda: relocate_store(workdir))
    if moved.moved_from is None:
        typer.echo(f"{moved.workdir}: the store already points at its own artifacts; nothing changed")
    else:
        typer.echo(f"{moved.workdir}: {moved.total} artifact locations moved from {moved.moved_from}")
