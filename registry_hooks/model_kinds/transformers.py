"""Kind `transformers`: a Hugging Face sequence classifier (`audit.text_classifier.TextClassifier`
around a transformers `PreTrainedModel`) with its tokenizer, stored by `mlflow.transformers` as
a text-classification model: `model/` (config.json + model.safetensors, from save_pretrained),
`components/tokenizer/` (the tokenizer's JSON / text files) and `MLmodel`. Nothing is pickled.

Loading reads only those verified files, offline (`local_files_only`, the Hub switched off) and
without running code from the artifact store (`trust_remote_code=False`; MLflow's own loader may
trust remote code, so it is not used): the architecture is the one transformers' own
AutoModelForSequenceClassification mapping gives for the logged config, every logged weight
must fit it (no weight missing, unexpected or of another shape), and the kind comes back holding
the tokenizer, so `spec.table()` can tokenise text and a repaired copy logged with the loaded
spec is stored the same way. transformers is imported only when a model of this kind is
checked, logged or loaded (the `[text]` extra).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from audit.errors import IntegrityError, InvalidInput, LineageError
from audit.modalities import Modality, Text
from audit.text_classifier import TextClassifier, pad_token_id_of
from registry_hooks.model_kinds.registry import MODEL_ARTIFACT, ModelKind, register, tensor_signature

if TYPE_CHECKING:
    from registry_hooks.model_io import ModelSpec

ARCHITECTURE_PARAM = "transformers_architecture"  # informational: the files say which class is rebuilt
MODEL_DIR = "model"  # where mlflow.transformers saves the model (save_pretrained)
TOKENIZER_DIR = "components/tokenizer"  # ... and the tokenizer
TASK = "text-classification"
_INSTALL = "install model-audit's [text] extra (pip install 'model-audit[text]')"


def _transformers():
    try:
        import transformers  # ~3 s to import: only when a model of this kind is handled
    except ImportError:
        raise InvalidInput(f"Models of the transformers kind need the transformers package; {_INSTALL}.") from None
    return transformers


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Within the block, every Hugging Face Hub request (huggingface_hub's and transformers') is
    refused, as with HF_HUB_OFFLINE=1: mlflow.transformers.log_model asks the Hub for the model's
    card and licence. Process-wide while it lasts (both libraries read the same flag at request
    time); restored on exit. Transformers' progress bars ("Loading weights", "Writing model
    shards") are off within the block too: a flow's log is no place for them."""
    from huggingface_hub import constants
    from transformers.utils import logging as hf_logging

    before, bars = constants.HF_HUB_OFFLINE, hf_logging.is_progress_bar_enabled()
    constants.HF_HUB_OFFLINE = True
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
        if bars:
            hf_logging.enable_progress_bar()


def _sequence_classifier_class(config: Any) -> type | None:
    """The class transformers' AutoModelForSequenceClassification builds for `config`, None when none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    try:
        return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    except KeyError:
        return None


@dataclass(frozen=True)
class TransformersModel(ModelKind):
    """A transformers sequence classifier wrapped in `TextClassifier`, logged with `tokenizer`
    (a transformers tokenizer with a pad token): `ModelSpec((max_length,), num_classes,
    kind=TransformersModel(tokenizer=tok))`. The tokenizer is not part of the kind's identity (not
    compared, hashed or shown; a kind read from run params has None): the files hold it, and
    `load` returns the kind holding the tokenizer it read."""

    tokenizer: Any = field(default=None, compare=False, hash=False, repr=False)

    name = "transformers"
    needs_pickle = False
    files = ("MLmodel", f"{MODEL_DIR}/", f"{TOKENIZER_DIR}/")

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> TransformersModel:
        if importlib.util.find_spec("transformers") is None:
            raise LineageError(f"The model's run records a transformers model, which this installation cannot load "
                               f"without the transformers package; {_INSTALL}.")
        return cls()

    def default_modality(self, input_shape: tuple[int, ...]) -> Modality:
        """Text of `input_shape[0]` tokens: a sequence classifier reads sentences (column `text`)."""
        if len(input_shape) != 1:
            raise InvalidInput(f"A text classifier's ModelSpec.input_shape is (max_length,); got {input_shape}.")
        return Text(input_shape[0])

    def check(self, model: torch.nn.Module, spec: ModelSpec) -> None:
        if not isinstance(spec.modality, Text):
            raise InvalidInput(f"The transformers kind reads text (audit.modalities.Text); the ModelSpec names the "
                               f"{spec.modality.name} modality.")
        transformers = _transformers()
        if not isinstance(model, TextClassifier) or not isinstance(model.model, transformers.PreTrainedModel):
            inner = type(getattr(model, "model", None)).__name__
            what = f"a TextClassifier around a {inner}" if isinstance(model, TextClassifier) else type(model).__name__
            raise InvalidInput(f"The transformers kind stores a TextClassifier around a transformers PreTrainedModel "
                               f"(audit.text_classifier); the model is {what}.")
        hf = model.model
        if type(hf) is not _sequence_classifier_class(hf.config):
            raise InvalidInput(f"The transformers kind stores sequence classifiers that "
                               f"AutoModelForSequenceClassification rebuilds from their config; a {type(hf).__name__} "
                               "is not one.")
        if self.tokenizer is None:
            raise InvalidInput("The transformers kind logs the model with its tokenizer; pass it as "
                               "TransformersModel(tokenizer=...) in the ModelSpec.")
        if not isinstance(self.tokenizer, transformers.PreTrainedTokenizerBase):
            raise InvalidInput(f"The transformers kind's tokenizer must be a transformers tokenizer; got "
                               f"{type(self.tokenizer).__name__}.")
        pad = pad_token_id_of(self.tokenizer)
        if pad != model.pad_token_id:
            raise InvalidInput(f"The TextClassifier masks token id {model.pad_token_id} as padding but the tokenizer "
                               f"pads with {pad}; wrap the model with the tokenizer's pad_token_id.")
        if hf.config.num_labels != spec.num_classes:
            raise InvalidInput(f"The {type(hf).__name__} has {hf.config.num_labels} labels but the ModelSpec says "
                               f"{spec.num_classes} classes.")
        positions = getattr(hf.config, "max_position_embeddings", None)
        if len(spec.input_shape) != 1 or (positions is not None and spec.input_shape[0] > positions):
            limit = f" of at most {positions} tokens" if positions is not None else ""
            raise InvalidInput(f"A text classifier's ModelSpec.input_shape is (max_length,){limit}; got "
                               f"{spec.input_shape}.")

    def log(self, model: torch.nn.Module, spec: ModelSpec) -> str:
        import mlflow
        from huggingface_hub import ModelCard

        transformers = _transformers()
        hf = model.model
        requirements = [f"{package}=={importlib.metadata.version(package).split('+')[0]}"
                        for package in ("torch", "transformers", "safetensors")] + ["model-audit"]
        # Given, so MLflow does not ask the Hub for one (it would still try for the licence: hub_offline).
        card = ModelCard(f"---\nlibrary_name: transformers\npipeline_tag: {TASK}\n---\n"
                         f"A {type(hf).__name__} text classifier logged by model-audit.\n")
        with hub_offline():
            # A pipeline built here, on the model's own device: built by MLflow from a dict, it
            # would move the model to the first GPU, if there is one.
            pipeline = transformers.pipeline(TASK, model=hf, tokenizer=self.tokenizer, device=hf.device)
            info = mlflow.transformers.log_model(
                pipeline, name=MODEL_ARTIFACT, task=TASK, model_card=card, pip_requirements=requirements,
                # What TextClassifier takes and gives: int64 token ids [B, max_length] -> logits [B, C].
                signature=tensor_signature(model, spec, np.int64),
            )
        mlflow.log_param(ARCHITECTURE_PARAM, type(hf).__name__)
        return info.model_uri

    def load(self, folder: Path, spec: ModelSpec) -> tuple[torch.nn.Module, ModelKind]:
        transformers = _transformers()
        folder = Path(folder)
        try:
            flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["transformers"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            flavor = None
        if not isinstance(flavor, dict) or flavor.get("model_binary") != MODEL_DIR or "tokenizer" not in (
                flavor.get("components") or []):
            raise IntegrityError(f"The logged MLmodel does not describe a transformers model saved in {MODEL_DIR}/ "
                                 f"with its tokenizer in {TOKENIZER_DIR}/, as log_classifier writes it.")
        offline = {"local_files_only": True, "trust_remote_code": False}
        try:
            with hub_offline():
                config = transformers.AutoConfig.from_pretrained(folder / MODEL_DIR, **offline)
                cls = _sequence_classifier_class(config)
                if cls is None:
                    raise IntegrityError(f"transformers {transformers.__version__} has no sequence classifier for "
                                         f"the logged {type(config).__name__}.")
                model, info = cls.from_pretrained(folder / MODEL_DIR, config=config, use_safetensors=True, dtype="auto",
                                                  output_loading_info=True, **offline)
                tokenizer = transformers.AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR, **offline)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # files missing, malformed or unknown
            detail = " ".join(str(exc).split()).rstrip(".")
            raise IntegrityError(f"The logged files do not rebuild a transformers model and tokenizer ({detail}).") \
                from None
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            first = ", ".join(f"{k.replace('_', ' ')}: {sorted(map(str, v))[0]}" for k, v in problems.items())
            raise IntegrityError(f"The logged weights do not fit a {cls.__name__} ({first}).")
        try:
            pad = pad_token_id_of(tokenizer)
        except InvalidInput:
            raise IntegrityError("The logged tokenizer has no pad token, so the model's inputs cannot be masked.") \
                from None
        return TextClassifier(model.eval(), pad), TransformersModel(tokenizer=tokenizer)


register(TransformersModel)
