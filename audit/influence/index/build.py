"""Building the index: one pass over the training data, shard by shard.

Per batch, one forward pass and one batched backward pass give each example's projected loss
gradient (stored) and its projected Gauss-Newton factors (summed into the shard's curvature,
then dropped). A shard already stored under the same model state, options and examples is reused,
so rebuilding after the training data grew computes only the new shards, and an interrupted build
resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from audit.errors import IntegrityError
from audit.influence.batches import Inputs, collate, dataset_size, ordered_batches, to_device
from audit.influence.cache import hash_model, hash_tensor
from audit.influence.config import InfluenceConfig
from audit.influence.context import Context, evaluation, make_context
from audit.influence.curvature.kfac import position_weights
from audit.influence.gradients import gn_cotangents, loss_cotangents
from audit.influence.index.cluster import ShardMap
from audit.influence.index.config import IndexConfig
from audit.influence.index.projection import Projector, indexed_layers, make_projections
from audit.influence.index.store import IndexFolder, ShardMeta
from audit.influence.index.sums import FactorSums, GramSums, ShardSums
from audit.influence.params import ParamFilter
from audit.text_classifier import padding_token


@dataclass(frozen=True)
class BuildStats:
    """What a build did: shards computed and shards reused from an earlier build."""

    computed: int
    reused: int


def _engine_config(config: IndexConfig) -> InfluenceConfig:
    # the Context's batching and label sampling, with the index's options
    return InfluenceConfig(method="graddot", fisher_samples=config.fisher_samples,
                           max_exact_classes=config.max_exact_classes, seed=config.seed)


@contextlib.contextmanager
def model_context(model: nn.Module, data: Dataset, config: IndexConfig, device, progress: bool,
                  param_filter: ParamFilter) -> Iterator[Context]:
    """The engine's Context for `model` in eval mode, for the duration."""
    with evaluation(model):
        yield make_context(model, data, _engine_config(config), device, progress, param_filter)


def model_key(ctx: Context, config: IndexConfig) -> str:
    """SHA-256 of the options the rows depend on, the selected layout and the model's whole state."""
    h = hashlib.sha256(config.key().encode())
    hash_model(h, ctx)
    return h.hexdigest()


def examples_digest(inputs: Inputs, labels: torch.Tensor) -> str:
    """SHA-256 of a block of collated examples (inputs and labels)."""
    h = hashlib.sha256()
    if isinstance(inputs, dict):
        for k in sorted(inputs):
            h.update(k.encode())
            hash_tensor(h, inputs[k])
    else:
        hash_tensor(h, inputs)
    hash_tensor(h, labels)
    return h.hexdigest()


def shard_gradients(projector: Projector, inputs: Inputs, labels: torch.Tensor, seed: int, desc: str,
                    batch_size: int | None = None) -> tuple[torch.Tensor, ShardSums]:
    """One shard: projected loss gradients [R, D] (model dtype, CPU) and its curvature statistics
    (ShardSums, from the projected Gauss-Newton factors). `seed` draws its sampled labels (from the
    shard's content, so a shard's numbers do not depend on which other shards were built, or where).
    `batch_size`: examples per pass, None: Projector.auto_batch_size."""
    from tqdm.auto import tqdm

    ctx = projector.ctx
    ctx.check_labels(labels)
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(len(labels), projector.dim, dtype=ctx.dtype)
    blocks, factors = GramSums(projector.blocks), FactorSums(projector.factor_dims)
    pad = padding_token(ctx.model)
    batch_size = batch_size or projector.auto_batch_size(inputs)
    steps = ordered_batches(inputs, labels, batch_size, pad)
    total = -(-len(labels) // batch_size)
    for pos, x, y in tqdm(steps, total=total, desc=desc, disable=not ctx.progress, leave=False):
        x, y = to_device(x, ctx.device), y.to(ctx.device)
        noise = ctx.fisher_noise(len(y), generator)

        def cotangents(z: torch.Tensor, y=y, noise=noise) -> torch.Tensor:
            loss = loss_cotangents(z, y).transpose(0, 1)  # [1, B, C]
            return torch.cat([loss, gn_cotangents(z, y, noise).transpose(0, 1)])  # [1 + K, B, C]

        step = projector(x, cotangents, layer_rows=True)
        out[pos] = step.gradients[0].cpu()
        # the loss cotangent (k = 0) is not a Gauss-Newton factor
        blocks.add(step.gradients[1:].reshape(-1, projector.dim))
        for i, act, s in step.layers:
            factors.add_inputs(i, input_rows(x, act, pad))
            factors.add_outputs(i, s[1:].reshape(-1, s.shape[-1]))
    return out, ShardSums(blocks.result(), factors.result())


def input_rows(inputs: Inputs, act: torch.Tensor, pad: int | None) -> torch.Tensor:
    """A layer's projected inputs act [B, T, k_in] at the positions K-FAC's A counts: [P, k_in],
    padding tokens left out (position_weights)."""
    rows = act.reshape(-1, act.shape[-1])
    if pad is None and not isinstance(inputs, dict):
        return rows
    return rows[position_weights(inputs, act, pad).reshape(-1) > 0]


DEFAULT_CONFIG = IndexConfig()


@dataclass(frozen=True)
class ShardJob:
    """One shard of a build: training rows [start, stop), the digest of those examples, and its
    place (`number` of `total`, 0-based) for progress messages."""

    number: int
    total: int
    start: int
    stop: int
    digest: str


def shard_rows(train: Dataset, start: int, stop: int) -> tuple[Inputs, torch.Tensor]:
    """Collated training rows [start, stop): (inputs, labels [stop - start])."""
    return collate([train[i] for i in range(start, stop)])


def _compute_and_write(projector: Projector, folder: IndexFolder, inputs: Inputs, labels: torch.Tensor,
                       job: ShardJob, config: IndexConfig) -> ShardMeta:
    rows, sums = shard_gradients(projector, inputs, labels, config.seed ^ int(job.digest[:8], 16),
                                 f"index: shard {job.number + 1}/{job.total}", config.batch_size)
    storage = np.float16 if config.storage == "float16" else np.float32
    return folder.write_shard(job.digest, rows.numpy().astype(storage, copy=False), sums)


def compute_shard(job: ShardJob, *, model: nn.Module, train: Dataset, folder: str, config: IndexConfig,
                  param_filter: ParamFilter = None) -> ShardMeta:
    """Compute and store one shard, in any process (a Dask worker): reads rows [job.start,
    job.stop) of `train`, checks that they are the examples planned (`job.digest`) and that `model`
    is the one the folder was created for, writes the shard, returns its ShardMeta. A shard that
    is already stored (a re-run job) is returned as it is."""
    index_folder = IndexFolder(Path(folder))
    stored = index_folder.shard_meta(job.digest)
    if stored is not None:
        return stored[0]
    inputs, labels = shard_rows(train, job.start, job.stop)
    if examples_digest(inputs, labels)[:32] != job.digest:
        raise IntegrityError(f"Training rows {job.start}-{job.stop} changed while the index was being built; "
                             "build it again from data that stays put.")
    with model_context(model, train, config, None, False, param_filter) as ctx:
        if model_key(ctx, config) != index_folder.header()["model_key"]:
            raise IntegrityError(f"The model sent to build shard {job.number + 1} is not the one the index in "
                                 f"{index_folder.folder} was created for.")
        projector = Projector(ctx, indexed_layers(model, ctx), index_folder.projections())
        return _compute_and_write(projector, index_folder, inputs, labels, job, config)


def build_index(model: nn.Module, train: Dataset, root: str | os.PathLike, config: IndexConfig = DEFAULT_CONFIG,
                param_filter: ParamFilter = None, device=None, progress: bool = True,
                metadata: dict | None = None, shard_map: ShardMap | None = None):
    """The gradient index of `train` (a map-style dataset of `(inputs, label)`) for `model` at its
    current parameters, under `root`; built where missing, reused where stored. Returns a
    `GradientIndex` (audit.influence.index.query) with `stats` saying what was computed.

    Covers the selected Linear/Conv2d layers (`param_filter` as in the engine); other selected
    parameters (norms, embeddings) are left out. `metadata` (e.g. the registered model's name and
    version) is recorded in the index's header when the folder is created. `shard_map`
    (audit.influence.index.cluster): where the missing shards are computed, one job per shard
    (`compute_shard`, sent the model and `train` once); default: here, one after the other. The
    index is the same either way: a shard's numbers depend only on the model, the options and its
    own examples."""
    from audit.influence.index.query import GradientIndex

    n = dataset_size(train, "train")
    with model_context(model, train, config, device, progress, param_filter) as ctx:
        found = indexed_layers(model, ctx)
        key = model_key(ctx, config)
        folder = IndexFolder(Path(root) / key[:24])
        if not folder.exists():
            projections = make_projections([layer for layer, _ in found], config)
            header = {"model_key": key, "config": config.key(), "params": list(ctx.space.names),
                      "layers": [vars(p.layer) for p in projections], "blocks": [p.dim for p in projections],
                      "dtype": str(ctx.dtype).removeprefix("torch."), "metadata": metadata or {}}
            folder.create(header, projections)
        starts = range(0, n, config.shard_rows)
        jobs, stored, computed, projector = [], {}, 0, None
        for number, start in enumerate(starts):
            stop = min(n, start + config.shard_rows)
            inputs, labels = shard_rows(train, start, stop)
            job = ShardJob(number, len(starts), start, stop, examples_digest(inputs, labels)[:32])
            jobs.append(job)
            found_shard = folder.shard_meta(job.digest)
            if found_shard is not None:
                stored[job.digest] = found_shard[0]
            elif shard_map is None:
                projector = projector or Projector(ctx, found, folder.projections())
                stored[job.digest] = _compute_and_write(projector, folder, inputs, labels, job, config)
                computed += 1
    missing = list({job.digest: job for job in jobs if job.digest not in stored}.values())
    if missing:  # on shard_map: each job reads its rows from `train` itself
        metas = shard_map(compute_shard, missing, model=model, train=train, folder=str(folder.folder),
                          config=config, param_filter=param_filter)
        stored.update((job.digest, meta) for job, meta in zip(missing, metas, strict=True))
        computed += len(missing)
    shards = [stored[job.digest] for job in jobs]
    data_digest = hashlib.sha256("".join(s.digest for s in shards).encode()).hexdigest()[:32]
    folder.write_data(data_digest, shards)
    index = GradientIndex.open(folder, data_digest, config)
    return replace(index, stats=BuildStats(computed, len(shards) - computed))
