"""Logging and loading classifiers in MLflow, one model kind at a time (registry_hooks/model_kinds/).

The kind travels in `ModelSpec.kind` and is recorded as run param `model_kind` (plus the kind's
own params): `pytorch`, the default and the kind of every version logged before kinds were
recorded, pickles the module through `mlflow.pytorch` (MLflow's default pt2 export fixes the
batch size and cannot be fine-tuned); `torchvision` stores a builder name, its keyword arguments
and a safetensors state dict. Loading a pickled model runs code from the artifact store: only load
models from a registry you trust (see docs/security.md). What can be checked, for every kind, is
this: the SHA-256 of the files a load reads (the kind's `files`, `MLmodel` and `data/` for both
built-in kinds) is recorded in the tracking store (run param `model_digest`) when the model is
logged, and a load downloads the files, checks them against it and only then reads that verified
copy, so a file swapped in the artifact store is refused, not run. Unpickling needs an explicit
opt-in (`load_version(..., allow_pickle=True)`, which the CLI sets from `--allow-pickle` or
MODEL_AUDIT_ALLOW_PICKLE=1); without it nothing is downloaded. Kinds that do not unpickle need none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from audit.errors import AuditError, IntegrityError, InvalidInput, LineageError
from audit.examples import ExampleTable
from audit.modalities import MODALITY_PARAM, Modality, modality_from_params
from registry_hooks.model_kinds import KIND_PARAM, ModelKind, PyTorchModule, kind_from_params

DIGEST_PARAM = "model_digest"
TUNED_PARAM = "tuned_params"
# How a user opts in to unpickling (named by the refusal; flows/cli.py reads both).
ALLOW_PICKLE_FLAG = "--allow-pickle"
ALLOW_PICKLE_ENV = "MODEL_AUDIT_ALLOW_PICKLE"
PICKLED = PyTorchModule()  # the default kind: a plain nn.Module, pickled


class PickleNotAllowed(AuditError):
    """Loading a pickled model was not opted in to (unpickling runs code from the artifact store)."""


@dataclass(frozen=True)
class ModelSpec:
    """What the audit needs to know about a classifier besides its weights: the input shape of
    one example, the number of classes, the (min, max) of the training inputs (None for a model
    logged before it was recorded: its flagged inputs are then checked for finiteness only) and
    its kind, how it is stored in MLflow: a pickled module unless told otherwise, e.g.
    `kind=TorchvisionModel("resnet18", {"num_classes": 10})` (registry_hooks.model_kinds), and its
    modality, what one example's input is in a data frame and how it is encoded (audit.modalities;
    None: the kind's `default_modality(input_shape)`, which is `Pixels(input_shape)`, flat float
    lists, except for kinds that take one modality only: `Text(max_length)` for `transformers`),
    whose `input_shape()` must be `input_shape`.
    `tuned_params`: the parameter-name prefixes that audits score and repairs fine-tune (e.g. the
    last encoder layer and the head of a large text model, where scoring all of it is too slow);
    None: every parameter. A loaded model has only those parameters trainable (`requires_grad`),
    which the influence engine and the repair's fine-tuning both follow.
    Logging a repaired model with the spec its source was loaded with keeps the source's kind."""

    input_shape: tuple[int, ...]
    num_classes: int
    input_range: tuple[float, float] | None = None
    kind: ModelKind = PICKLED
    modality: Modality | None = None
    tuned_params: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ModelKind):
            raise InvalidInput(f"ModelSpec.kind must be a model kind (registry_hooks.model_kinds); got {self.kind!r}.")
        if self.modality is None:
            object.__setattr__(self, "modality", self.kind.default_modality(tuple(self.input_shape)))
        if not isinstance(self.modality, Modality):
            raise InvalidInput(f"ModelSpec.modality must be a modality (audit.modalities); got {self.modality!r}.")
        if tuple(self.input_shape) != self.modality.input_shape():
            raise InvalidInput(f"ModelSpec.input_shape {tuple(self.input_shape)} differs from the "
                               f"{self.modality.name} modality's input shape {self.modality.input_shape()}.")
        if self.tuned_params is not None:
            tuned = self.tuned_params
            if isinstance(tuned, str) or not tuned or not all(isinstance(p, str) and p for p in tuned):
                raise InvalidInput(f"ModelSpec.tuned_params must be a non-empty list of parameter-name prefixes, e.g. "
                                   f"('classifier.',); got {tuned!r}.")
            object.__setattr__(self, "tuned_params", tuple(tuned))
        low, high = self.input_range or (0.0, 0.0)
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise InvalidInput(f"input_range must be finite (min, max) with min <= max, got {self.input_range!r}.")

    @classmethod
    def for_training(cls, inputs: torch.Tensor, num_classes: int, kind: ModelKind = PICKLED) -> ModelSpec:
        """The spec of a model of `kind` trained on `inputs` [N, *input_shape]: its shape and value range."""
        return cls(tuple(inputs.shape[1:]), num_classes, (float(inputs.min()), float(inputs.max())), kind)

    def params(self) -> dict[str, str]:
        """Run params: `input_shape` ("1x8x8"), `num_classes`, when known `input_min` / `input_max`
        (repr of the float, so they read back exactly), `model_kind` and the kind's own params,
        `modality` and the modality's own params, `tuned_params` (JSON list) when set."""
        params = {"input_shape": "x".join(map(str, self.input_shape)), "num_classes": str(self.num_classes)}
        if self.input_range is not None:
            params |= {"input_min": repr(self.input_range[0]), "input_max": repr(self.input_range[1])}
        params |= {KIND_PARAM: self.kind.name} | self.kind.params()
        params |= {MODALITY_PARAM: self.modality.name} | self.modality.params()
        return params | ({TUNED_PARAM: json.dumps(list(self.tuned_params))} if self.tuned_params else {})

    def tuned_names(self, model: torch.nn.Module) -> set[str]:
        """Names of the parameters of `model` that `tuned_params` selects (all when None);
        InvalidInput when the prefixes select none."""
        names = [name for name, _ in model.named_parameters()]
        keep = {n for n in names if self.tuned_params is None or n.startswith(self.tuned_params)}
        if not keep:
            raise InvalidInput(f"ModelSpec.tuned_params {list(self.tuned_params)} selects none of the model's "
                               f"parameters (their names start like {names[0]!r}).")
        return keep

    def tune_only_selected(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model`, with `requires_grad` set on exactly the parameters `tuned_names` gives."""
        keep = self.tuned_names(model)
        for name, param in model.named_parameters():
            param.requires_grad_(name in keep)
        return model

    def table(self, frame: pd.DataFrame, label_column: str = "label", *, root: Path | None = None) -> ExampleTable:
        """`frame` (`example_id`, `label_column`, the modality's input columns) encoded as this model
        takes it: inputs [N, *input_shape]. Text is tokenized with the tokenizer the loaded kind
        holds (InvalidInput before the model is loaded); `root`: where `image_path` cells resolve."""
        return self.modality.table(frame, label_column=label_column, tokenizer=getattr(self.kind, "tokenizer", None),
                                   root=root)

    @classmethod
    def from_params(cls, params: dict[str, str]) -> ModelSpec:
        """The spec a run's `params()` recorded (no `modality`: pixels, as runs logged before it was
        recorded); LineageError when they are missing or unusable, or name a model kind or modality
        this installation does not have."""
        kind = kind_from_params(params)
        try:
            shape = tuple(int(v) for v in params["input_shape"].split("x"))
            num_classes = int(params["num_classes"])
        except (KeyError, ValueError) as exc:
            raise LineageError(
                "The model's run does not record `input_shape` and `num_classes` params; "
                "log it with model-audit's training helpers."
            ) from exc
        modality = modality_from_params(params)
        try:
            tuned = tuple(json.loads(params[TUNED_PARAM])) if TUNED_PARAM in params else None
        except (TypeError, ValueError) as exc:
            raise LineageError(f"The model's run records unusable `{TUNED_PARAM}` {params[TUNED_PARAM]!r}; "
                               "expected a JSON list of parameter-name prefixes.") from exc
        if shape != modality.input_shape():
            raise LineageError(f"The model's run records `input_shape` {params['input_shape']} but its {modality.name} "
                               f"modality encodes inputs of shape {modality.input_shape()}.")
        bounds = (params.get("input_min"), params.get("input_max"))
        if bounds == (None, None):  # logged before the range was recorded
            return cls(shape, num_classes, kind=kind, modality=modality, tuned_params=tuned)
        try:
            return cls(shape, num_classes, (float(bounds[0]), float(bounds[1])), kind, modality, tuned)
        except (TypeError, ValueError, InvalidInput) as exc:
            raise LineageError(f"The model's run records an unusable input range (input_min={bounds[0]!r}, "
                               f"input_max={bounds[1]!r}); both must be finite numbers, min <= max.") from exc


@dataclass(frozen=True)
class LoadedModel:
    """A registered model version loaded for auditing. `spec.kind` is the kind as loaded: logging a
    repaired copy with `log_classifier(repaired, loaded.spec)` registers it the same way."""

    model: torch.nn.Module
    name: str
    version: str
    run_id: str
    spec: ModelSpec


def log_classifier(model: torch.nn.Module, spec: ModelSpec) -> str:
    """Log `model` into the active run as `spec.kind` stores it (pickled, for the default kind) with
    spec params (input shape, classes, the training input range when `spec` has it: use
    `ModelSpec.for_training`; the kind), a signature and the digest of the files a load reads;
    returns its URI. InvalidInput, before anything is logged, when the kind cannot store `model`."""
    spec.kind.check(model, spec)
    spec.tuned_names(model)  # refuses prefixes that select nothing, before anything is logged
    mlflow.log_params(spec.params())
    uri = spec.kind.log(model, spec)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_param(DIGEST_PARAM, artifact_digest(_download(uri, Path(tmp)), spec.kind.files))
    return uri


def artifact_digest(folder: Path, files: tuple[str, ...] = ("MLmodel", "data/")) -> str:
    """SHA-256 over the relative path and bytes of what loading reads: each of `files` (relative to
    `folder`; a name ending in "/" stands for every file under that folder, in sorted order). Files
    MLflow writes on download, e.g. registered_model_meta, are left out by naming only these."""
    paths = []
    for name in files:
        if name.endswith("/"):
            paths += sorted(p for p in (folder / name).rglob("*") if p.is_file())
        else:
            paths.append(folder / name)
    h = hashlib.sha256()
    for path in paths:
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest() if path.exists() else b"missing")
    return h.hexdigest()


def _download(model_uri: str, folder: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(folder)))


@dataclass(frozen=True)
class VersionRef:
    """A registered version resolved from an alias or number, with its training run's spec (its kind included)."""

    name: str
    version: str
    run_id: str
    spec: ModelSpec
    model_digest: str | None = None


def resolve_version(name: str, alias: str | None = None, version: str | None = None) -> VersionRef:
    """Resolve `<name>@<alias>` (or a numbered version) without loading weights. LineageError when
    it does not exist, or its run's params do not give a spec (e.g. a model kind not installed here)."""
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as exc:
        ref = f"@{alias}" if alias else f"version {version}"
        raise LineageError(f"No registered model {name} {ref} in this MLflow store.") from exc
    params = client.get_run(mv.run_id).data.params
    return VersionRef(name, str(mv.version), mv.run_id, ModelSpec.from_params(params), params.get(DIGEST_PARAM))


def require_pickle_opt_in(ref: VersionRef, allow_pickle: bool) -> None:
    """PickleNotAllowed unless `allow_pickle` or the version's kind loads without unpickling."""
    if ref.spec.kind.needs_pickle and not allow_pickle:
        raise PickleNotAllowed(
            f"Version {ref.version} of {ref.name} is a pickled model, and unpickling runs code from the MLflow "
            f"artifact store, so loading it needs an explicit opt-in: pass {ALLOW_PICKLE_FLAG} or set "
            f"{ALLOW_PICKLE_ENV}=1 (a deployment: parameter store.allow_pickle) if you trust this registry.")


def load_version(ref: VersionRef, *, allow_pickle: bool) -> LoadedModel:
    """Load a resolved version's weights, as its kind stores them, in eval mode on the CPU.

    PickleNotAllowed, before anything is downloaded, when the kind unpickles and not `allow_pickle`
    (the caller trusts the registry); IntegrityError, before anything is read, when the files differ
    from the digest recorded when the version was logged, or no digest was recorded; IntegrityError
    when the verified files do not rebuild the model."""
    require_pickle_opt_in(ref, allow_pickle)
    if ref.model_digest is None:
        raise IntegrityError(f"Version {ref.version} of {ref.name} has no recorded `{DIGEST_PARAM}`, so its files "
                             "cannot be checked before loading; log it with registry_hooks.model_io.log_classifier.")
    kind = ref.spec.kind
    with tempfile.TemporaryDirectory() as tmp:
        local = _download(f"models:/{ref.name}/{ref.version}", Path(tmp))
        if artifact_digest(local, kind.files) != ref.model_digest:
            raise IntegrityError(f"The files of version {ref.version} of {ref.name} differ from those logged with it "
                                 "(digest mismatch): refusing to load a model that was changed in the artifact store.")
        try:
            model, loaded_kind = kind.load(local, ref.spec)
        except mlflow.exceptions.MlflowException as exc:  # e.g. MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false
            raise IntegrityError(f"MLflow refused to load version {ref.version} of {ref.name}: "
                                 f"{str(exc).splitlines()[0]}") from None
    model = ref.spec.tune_only_selected(model.eval())
    return LoadedModel(model, ref.name, ref.version, ref.run_id, dataclasses.replace(ref.spec, kind=loaded_kind))
