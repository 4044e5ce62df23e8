"""Compute a model's frozen part once: when every trainable parameter sits in the model's head,
influence passes and repair steps only need the head's input, the frozen part's features.

    frozen = split_frozen(model, train.inputs)
    head_train = frozen.table(train)             # same ids and labels, inputs = features [N, *F]
    repaired_head = repair(frozen.head, head_train, ...)
    repaired = frozen.full_model(repaired_head)  # a copy of `model` with the head's new weights

A registered MiniLM whose audits score only the pooler and the classifier (ModelSpec.tuned_params)
otherwise runs its six frozen encoder layers again in every influence pass, every fine-tuning
step, every horizon step and every selection check; with the features computed once, all of
those are a small MLP's work. Two splits are recognised, and each is checked on a sample: the
head applied to the sample's features must give the model's own logits, else there is no split.
- the smallest submodule holding every trainable parameter, when it is called once with one
  tensor and its output is the model's logits (a torchvision `fc` or `classifier`, the last
  layers of a Sequential, a transformers model's `classifier` alone): its input is the feature;
- a BERT-style `TextClassifier` whose trainable parameters are in the pooler and the classifier:
  the first token's last hidden state [B, H] is the feature (the pooler reads only that token).

The frozen part runs in eval mode, as the repair's steps do (audit.correction.finetune), so the
head sees exactly what it would inside the model. Any other model gets the identity split (the
head is the model, tables are unchanged): callers never branch.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from audit.examples import ExampleTable
from audit.influence.batches import ordered_batches
from audit.text_classifier import TextClassifier, padding_token
from audit.training import eval_mode

BATCH_SIZE = 256
SAMPLE = 8  # rows of the inputs a split is checked on
# the head's logits on the sample must match the model's this closely (the same operations on
# the same numbers; the slack only allows another kernel for another batch shape)
RTOL, ATOL = 1e-4, 1e-5


class _PoolerHead(nn.Module):
    """A BERT-style classifier's head on the first token's hidden state [B, H]: pooler, dropout,
    classifier (the transformers model's own modules, shared)."""

    def __init__(self, pooler: nn.Module, dropout: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pooler, self.dropout, self.classifier = pooler, dropout, classifier

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pooler(first_token[:, None, :])))


@dataclass(frozen=True)
class FrozenFeatures:
    """`model` split into a frozen part, run once per table (`table`), and a `head` from its
    features [B, *F] to logits [B, C] whose parameters are the model's own (shared, so the head
    holds every trainable parameter). `hooked`: the module whose input is captured, None for the
    identity split. `description`: what the split is, for logs and reports."""

    model: nn.Module
    head: nn.Module
    hooked: nn.Module | None
    select: Callable[[torch.Tensor], torch.Tensor]
    description: str

    @property
    def is_split(self) -> bool:
        return self.hooked is not None

    @torch.no_grad()
    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """The head's inputs [N, *F] for the model's inputs [N, ...] (the inputs themselves for the
        identity split). Computed in eval mode, in batches (text shortest first, padding trimmed)."""
        if self.hooked is None:
            return inputs
        captured: list[torch.Tensor] = []
        handle = self.hooked.register_forward_pre_hook(lambda _, args: captured.append(self.select(args[0])))
        out = None
        try:
            labels = torch.zeros(len(inputs), dtype=torch.int64)
            with eval_mode(self.model):
                for pos, x, _ in ordered_batches(inputs, labels, BATCH_SIZE, padding_token(self.model)):
                    self.model(x)
                    batch = captured.pop()
                    if out is None:
                        out = batch.new_empty((len(inputs), *batch.shape[1:]))
                    out[pos] = batch
        finally:
            handle.remove()
        return out if out is not None else inputs.new_empty((0,))

    def table(self, table: ExampleTable) -> ExampleTable:
        """`table` with its inputs replaced by their features (ids, labels and display kept)."""
        if self.hooked is None:
            return table
        return ExampleTable(table.ids, self.features(table.inputs), table.labels, table.display)

    def full_model(self, head: nn.Module) -> nn.Module:
        """A copy of `model` whose head has `head`'s parameters and buffers (a copy of `self.head`,
        changed, e.g. repaired); `head` itself when this is the identity split. `model` is never
        modified."""
        if self.hooked is None:
            return head
        names = _state_names(self.model)
        full = copy.deepcopy(self.model)
        state = full.state_dict()
        own = dict(self.head.named_parameters()) | dict(self.head.named_buffers())
        with torch.no_grad():
            for key, value in head.state_dict().items():
                state[names[id(own[key])]].copy_(value)
        return full


def split_frozen(model: nn.Module, inputs: torch.Tensor) -> FrozenFeatures:
    """The frozen/head split of `model` (see the module docstring), checked on the first SAMPLE
    rows of `inputs` [N, ...] (the training inputs): the head on their features must give the
    model's logits to within RTOL/ATOL. The identity split when no split applies or the check fails."""
    sample = inputs[:SAMPLE]
    trainable = [p for p in model.parameters() if p.requires_grad]
    everything = sum(1 for _ in model.parameters())
    if trainable and len(trainable) < everything:
        for candidate in (_last_module(model), _pooler_head(model)):
            if candidate is not None and _holds(model, trainable, sample, *candidate):
                head, hooked, select, what = candidate
                return FrozenFeatures(model, head, hooked, select, what)
    return FrozenFeatures(model, model, None, _same, "whole model (its trainable parameters are not one head)")


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _first_token(hidden: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


def _state_names(model: nn.Module) -> dict[int, str]:
    """id of each parameter and buffer -> its key in model.state_dict()."""
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {id(t): name for name, t in reversed(named)}


def _last_module(model: nn.Module):
    # the module path every trainable parameter shares (commonprefix compares lists item by item)
    common = os.path.commonprefix([n.split(".")[:-1] for n, p in model.named_parameters() if p.requires_grad])
    if not common:
        return None
    path = ".".join(common)
    module = model.get_submodule(path)
    return module, module, _same, f"head {path}, from its input"


def _pooler_head(model: nn.Module):
    if not isinstance(model, TextClassifier):
        return None
    hf = model.model
    base = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    parts = (getattr(base, "pooler", None), getattr(hf, "dropout", None), getattr(hf, "classifier", None))
    if not all(isinstance(m, nn.Module) for m in parts):
        return None
    return _PoolerHead(*parts), parts[0], _first_token, "head pooler + classifier, from the first token's hidden state"


@torch.no_grad()
def _holds(model: nn.Module, trainable: list[nn.Parameter], sample: torch.Tensor, head: nn.Module,
           hooked: nn.Module, select: Callable, _: str) -> bool:
    """Whether `head` holds every trainable parameter, `hooked` is called once with one tensor,
    and the head on that tensor (through `select`) gives the model's logits on `sample`."""
    own = {id(p) for p in head.parameters()}
    if not all(id(p) in own for p in trainable):
        return False
    calls: list[tuple] = []
    handle = hooked.register_forward_pre_hook(lambda _, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    try:
        with eval_mode(model):
            logits = model(sample)
            if len(calls) != 1:
                return False
            args, kwargs = calls[0]
            if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
                return False
            out = head(select(args[0]))
    finally:
        handle.remove()
    if not isinstance(logits, torch.Tensor):
        logits = getattr(logits, "logits", None)
    return (isinstance(logits, torch.Tensor) and isinstance(out, torch.Tensor) and out.shape == logits.shape
            and torch.allclose(out, logits, rtol=RTOL, atol=ATOL))
