"""Our gradient index next to the public gradient-index libraries, on the same workload (issue 13).

    .venv/bin/pip install -e '.[peers]' -c <(printf 'torch==2.14.1\\ntorchvision==0.29.1\\n')
    flock /tmp/bench.lock .venv/bin/python bench/index_peers.py --parts mlp           # ~3 min, 3 rounds
    flock /tmp/bench.lock .venv/bin/python bench/index_peers.py --parts minilm        # ~15 min, 1 round
    .venv/bin/python bench/index_peers.py --parts minilm --n-train 40 --n-queries 5 --epochs 0     # quick check

Every method runs in one process on the same model, data and queries, 2 torch threads. Each peer is
optional: one that is not installed or fails gets a row saying why.

Parts:
  mlp     the digits MLP of bench/influence.py (`mlp_case`: 64-32-10, 10% flipped training labels,
          N=1,078, 20 validation queries). Columns: LDS over the 20 retrained halves (`mlp_lds`),
          self-influence ROC AUC for the flipped examples, top-10 overlap and Spearman against our
          unprojected engine EK-FAC, build seconds, query seconds (20 queries, dense [Q, N]), self seconds.
  minilm  all-MiniLM-L6-v2 on SST-2 with the bottom 4 of 6 encoder layers frozen (freeze_bottom(2):
          the top 2 layers, the pooler and the classifier are trainable), fine-tuned for `--epochs` on
          `--n-train` training phrases (>= 4 words) from ../shared/data/sst2, `--n-queries` dev
          sentences as queries at their true labels, max_length 64. Columns: build and query seconds,
          top-10 overlap / Spearman against the engine's unprojected EK-FAC on the same parameters
          (the weights and biases of the Linear layers of the trainable part: every index here, ours
          and the peers', covers Linear layers only, so the engine's LayerNorm diagonal is left out).

Rows: ours (audit.influence.index: per-layer Kronecker projection to rank_out x rank_in, projected
EK-FAC of the Gauss-Newton with 1 sampled label, damping 0.1 x its mean eigenvalue; on MiniLM also
re-ranked: each query's 50 most helpful and harmful by the index, pooled, scored by the engine's
EK-FAC fitted once, `--method index-reranked`; its build includes that fit), the engine's
EK-FAC (the reference; one `compute_influence` call fits and scores),
Bergson (EleutherAI, PyPI `bergson`: a per-module projected gradient store built with its
`GradientCollector`, its dense per-module "autocorrelation" Hessian = empirical Fisher of the
projected gradients, queried with its `Attributor.trace`, one-sided H^-1, damping 0.1 x the mean
eigenvalue per module), dattri's LoGra (`LoGraAttributor`: Kronecker-factored projection per Linear
layer, empirical Fisher per layer, damping 0.1 x trace / dim per layer) and kronfluence EK-FAC (the
adapter of bench/influence_peers.py, unprojected, damping = the engine's).

Agreement: top-10 overlap = |top-10 helpful(method) & top-10 helpful(ref)| + the same for the top-10
harmful, over 20, mean over queries; Spearman = rank correlation over all N training examples, mean
over queries. Seconds are the median over `--repeat` rounds run round-robin (a load change hits every
row alike). Build = everything that does not depend on the queries; query = scoring the queries
against it (dense [Q, N]); the engine and kronfluence fit their curvature inside each timed call,
so their build is shown as NaN (included in the query and self seconds).

Sign: every score is converted to ours (DESIGN.md): S[q, i] > 0 = up-weighting training example i
lowers query q's loss (helpful). Each adapter says how in a comment. Scales differ between libraries
(per unit weight in the mean vs the summed loss, 1/Q factors); no metric here depends on the scale.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from influence import _table, mlp_case, mlp_lds, warm_up
from influence_peers import _quiet, _run, _tensors, _version
from influence_peers import kronfluence as kronfluence_adapter
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from audit.influence import InfluenceConfig, compute_influence
from audit.influence.index import IndexConfig, build_index

PEERS = ("bergson", "dattri", "kronfluence")
THREADS = 2


# ----------------------------------------------------------------------------- metrics
def agreement(scores: np.ndarray, ref: np.ndarray, k: int = 10) -> tuple[float, float]:
    """(top-k overlap, Spearman) of scores [Q, N] with ref [Q, N], each the mean over queries.
    Overlap counts the k most helpful and the k most harmful examples: shared / (2k)."""
    overlaps, rhos = [], []
    for s, r in zip(scores, ref, strict=True):
        helpful = len(set(np.argsort(-s)[:k]) & set(np.argsort(-r)[:k]))
        harmful = len(set(np.argsort(s)[:k]) & set(np.argsort(r)[:k]))
        overlaps.append((helpful + harmful) / (2 * k))
        rhos.append(spearmanr(s, r)[0])
    return float(np.mean(overlaps)), float(np.mean(rhos))


def _seconds(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _linear_modules(model: nn.Module, prefixes=None) -> list[str]:
    """Names of the nn.Linear modules of `model` whose parameter names start with one of the
    `prefixes` (e.g. "model.classifier." covers the module "model.classifier"; None: all)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and (prefixes is None or f"{n}.".startswith(tuple(prefixes)))]


def linear_filter(model: nn.Module, prefixes):
    """A param_filter keeping the weights and biases of the Linear modules under `prefixes`: what
    every index here covers, and what the reference scores on MiniLM."""
    names = {f"{n}.{p}" for n in _linear_modules(model, prefixes) for p in ("weight", "bias")}
    return lambda name, param: name in names


# Every adapter: (model, train, queries, damping, want_self, **options) -> dict(queries=[Q, N] ndarray,
# build_secs, q_secs, and with want_self: self=[N] ndarray, self_secs), the signature of
# bench/influence_peers.py so its `_run` (failures become rows) drives them.


# ----------------------------------------------------------------------------- ours
def ours_index(model, train, queries, damping, want_self, param_filter=None, **cfg):
    """audit.influence.index, built into a fresh temporary folder (nothing reused). Native sign."""
    out = {}
    config = IndexConfig(damping=damping, **cfg)
    with tempfile.TemporaryDirectory() as root:
        index, out["build_secs"] = _seconds(lambda: build_index(model, train, root, config, param_filter=param_filter,
                                                                progress=False))
        scores, out["q_secs"] = _seconds(lambda: index.scores(model, queries))
        out["queries"], out["dim"], out["layers"] = scores.double().numpy(), index.dim, len(index.header["layers"])
        if want_self:
            own, out["self_secs"] = _seconds(index.self_influence)
            out["self"] = own.double().numpy()
    return out


def ours_reranked(model, train, queries, damping, want_self, param_filter=None, shortlist=50):
    """The rank-16 index with its pooled shortlists re-scored by the engine's EK-FAC
    (audit.influence.index.rerank, `--method index-reranked`). Build = the index and the EK-FAC fit
    (both query-independent, once per model version); query = the re-ranking. Scores: the engine's
    on the shortlisted examples, 0 elsewhere, so only the top-k overlap means something (Spearman
    is shown as NaN). Native sign."""
    from audit.influence.index.rerank import fit_reranker, rerank

    out = {}
    with tempfile.TemporaryDirectory() as root:
        def build():
            index = build_index(model, train, root, IndexConfig(damping=damping), param_filter=param_filter,
                                progress=False)
            return index, fit_reranker(index, model, train)

        (index, reranker), out["build_secs"] = _seconds(build)
        short, out["q_secs"] = _seconds(lambda: rerank(index, reranker, model, queries, shortlist))
        out["queries"] = short.dense(0, len(queries), index.n).double().numpy()
        out["dim"], out["layers"], out["top_only"] = index.dim, len(index.header["layers"]), True
    return out


def engine_ekfac(model, train, queries, damping, want_self, param_filter=None):
    """The engine's unprojected EK-FAC (`method="ekfac"`, exact class expectation). Each call fits
    its curvature, so the build is included in the query (and self) seconds. Native sign."""
    chosen = {n: p for n, p in model.named_parameters()
              if p.requires_grad and (param_filter is None or param_filter(n, p))}
    out = {"build_secs": float("nan"), "dim": sum(p.numel() for p in chosen.values()),
           "layers": sum(f"{n}.weight" in chosen for n in _linear_modules(model))}
    config = InfluenceConfig(method="ekfac", damping=damping)
    res, out["q_secs"] = _seconds(lambda: compute_influence(model, train, queries, config, progress=False,
                                                            param_filter=param_filter))
    out["queries"], out["damping"] = res.scores.double().numpy(), res.damping
    if want_self:
        res, out["self_secs"] = _seconds(lambda: compute_influence(model, train, None, config, progress=False,
                                                                   param_filter=param_filter))
        out["self"] = res.scores.double().numpy()
    return out


# ----------------------------------------------------------------------------- Bergson
class _SequenceLinear(nn.Module):
    """A Linear fed [B, I] run as [B, 1, I]: Bergson's hooks assume [batch, sequence, features]
    activations. Same parameters, same outputs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.unsqueeze(1)).squeeze(1)


class _BergsonView(nn.Module):
    """The smallest wrapper Bergson's collectors accept for a plain classifier: a `.device`, and
    every Linear that sees 2-D inputs (MLP layers, BERT's pooler and classifier) given a length-1
    sequence axis. `original[name]` maps its Linear module names back to the model's."""

    def __init__(self, model: nn.Module, sample: torch.Tensor):
        super().__init__()
        self.net = copy.deepcopy(model).eval()
        seen: dict[str, int] = {}
        hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].dim()))
                 for n, m in self.net.named_modules() if isinstance(m, nn.Linear)]
        with torch.no_grad():
            self.net(sample)
        for h in hooks:
            h.remove()
        for name, dims in seen.items():
            if dims == 2:
                parent, _, child = name.rpartition(".")
                owner = self.net.get_submodule(parent) if parent else self.net
                setattr(owner, child, _SequenceLinear(getattr(owner, child)))
        self.original = {n: n.removeprefix("net.").removesuffix(".linear")
                         for n, m in self.named_modules() if isinstance(m, nn.Linear)}

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def bergson(model, train, queries, damping, want_self, projection_dim=16, modules=None, batch_size=64):
    """Bergson's gradient store and query path, driven through its documented low-level API (its
    CLI and `collect_gradients` run a causal LM on token ids only): `GradientCollector` writes the
    per-example gradients of the Linear layers (`modules`: name prefixes, None = all), bias
    included, each projected to projection_dim x projection_dim (0 = unprojected); an
    `AutocorrelationCollector` fits the per-module Hessian (the mean outer product of the projected
    gradients at the dataset labels, as `bergson hessian --method autocorrelation` does); the
    `Attributor` loads both (one-sided preconditioning H^-1, `damped_inverse`: 1 / (lambda + 0.1 x
    mean lambda) per module) and `trace` scores a backward pass of the queries against the store.
    Sign: the traced backward is the summed query loss, so a score is grad L_q^T H^-1 grad L_i:
    > 0 helpful, the same as ours; used as is (k=None: all N, sorted, scattered back to [Q, N])."""
    import datasets
    from bergson import Attributor, GradientCollector, GradientProcessor
    from bergson.config import IndexConfig as BergsonIndexConfig
    from bergson.hessians.autocorrelation import AutocorrelationCollector

    x, y = _tensors(train)
    xq, yq = _tensors(queries)
    view = _BergsonView(model, x[:2])
    targets = {n for n, o in view.original.items() if o in _linear_modules(model, modules)}
    rows = datasets.Dataset.from_dict({"row": list(range(len(x)))})
    settings = {"projection_dim": projection_dim or None, "include_bias": True, "projection_seed": 0}

    def collect(collector) -> None:
        # Bergson's CollectorComputer loop: hooks on for one forward/backward, then process_batch
        for start in range(0, len(x), batch_size):
            idx = list(range(start, min(len(x), start + batch_size)))
            with collector.with_batch(None):
                losses = F.cross_entropy(view(x[idx]), y[idx], reduction="none")
                losses.sum().backward()  # summed: each example's hooked gradient is its own loss gradient
            view.zero_grad(set_to_none=True)
            collector.process_batch(idx, losses=losses.detach())
        collector.teardown()

    out = {"layers": len(targets)}
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        index_cfg = BergsonIndexConfig(run_path=os.path.join(tmp, "index"), projection_dim=projection_dim,
                                       include_bias=True, drop_columns=False)
        hessian_path = os.path.join(tmp, "hessian")
        start = time.perf_counter()
        collect(GradientCollector(model=view, cfg=index_cfg, processor=GradientProcessor(**settings), data=rows,
                                  target_modules=targets))
        os.replace(index_cfg.partial_run_path, index_cfg.run_path)  # what `bergson build` does on success
        with open(os.path.join(index_cfg.run_path, "info.json")) as f:
            out["dim"] = sum(json.load(f)["grad_sizes"].values())
        collect(AutocorrelationCollector(model=view, processor=GradientProcessor(**settings), data=rows,
                                         path=hessian_path, target_modules=targets))
        out["build_secs"] = time.perf_counter() - start

        def score(xs, ys) -> np.ndarray:
            attributor = Attributor(index_cfg.run_path, hessian_path=hessian_path)
            with attributor.trace(view, None, modules=targets) as result:
                F.cross_entropy(view(xs), ys, reduction="sum").backward()
                view.zero_grad(set_to_none=True)
            dense = torch.zeros(result.scores.shape, dtype=torch.float64)
            return dense.scatter_(1, result.indices, result.scores.double()).numpy()  # [Q, N]

        out["queries"], out["q_secs"] = _seconds(lambda: score(xq, yq))
        if want_self:  # the training set traced as queries; its diagonal
            own, out["self_secs"] = _seconds(lambda: score(x, y))
            out["self"] = np.diag(own).copy()
    return out


# ----------------------------------------------------------------------------- dattri LoGra
class _OneExample(nn.Module):
    """dattri sets up LoGra's projections by running the model on `inputs[0]`, one example without
    its batch axis; a TextClassifier takes [B, L] only, so a 1-D input gets a batch axis of 1."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[None]) if x.dim() == 1 else self.net(x)


def dattri_logra(model, train, queries, damping, want_self, proj_dim=256, modules=None, batch_size=64):
    """dattri's LoGraAttributor: per Linear layer (`modules`: name prefixes, None = all), the
    per-example gradient projected by a Kronecker product of two sqrt(proj_dim) Gaussian projections
    (bias column included), empirical-Fisher block per layer, inverted with damping 0.1 x its
    trace / dim (dattri's `damping` is relative). `cache` = build (gradients, inverses and the
    preconditioned training rows), `attribute` = query, `compute_self_attribution` = self.
    The training loss is summed, so each hooked row is that example's own loss gradient.
    Sign: attribute(train, test)[i, q] = (H^-1 g_i) . g_q with g_q the gradient of the mean query
    loss (dattri's test loss is the batch mean: one batch holds all queries, so a common 1/Q):
    > 0 helpful, the same as ours; transposed to [Q, N]."""
    from dattri.algorithm.logra import LoGraAttributor
    from dattri.task import AttributionTask

    net = _OneExample(copy.deepcopy(model).eval())
    layers = ["net." + n for n in _linear_modules(model, modules)]

    def loss_func(module, batch, device):
        xb, yb = batch
        return F.cross_entropy(module(xb.to(device)), yb.to(device), reduction="sum")

    out = {"layers": len(layers)}
    # cache_dir: dattri writes its batch metadata there (the working directory by default) and reads
    # it back in later runs, so each run gets a fresh one
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        task = AttributionTask(loss_func=loss_func, model=net, checkpoints=net.state_dict())
        train_loader = DataLoader(train, batch_size=batch_size)
        start = time.perf_counter()
        attributor = LoGraAttributor(task, layer_names=layers, hessian="eFIM", damping=0.1, device="cpu",
                                     proj_dim=proj_dim, offload="cpu", cache_dir=tmp)
        attributor.cache(train_loader)
        out["build_secs"] = time.perf_counter() - start
        scores, out["q_secs"] = _seconds(lambda: attributor.attribute(
            train_loader, DataLoader(queries, batch_size=len(queries))))
        out["queries"], out["dim"] = scores.detach().T.double().numpy(), attributor.total_proj_dim
        if want_self:
            own, out["self_secs"] = _seconds(attributor.compute_self_attribution)
            out["self"] = own.detach().double().numpy()
    return out


# ----------------------------------------------------------------------------- kronfluence
@contextlib.contextmanager
def _kronfluence_tracks(modules):
    """Restrict kronfluence to the Linear modules under the name prefixes `modules` (None: all) by
    answering its `Task.get_influence_tracked_modules` hook for the duration (the adapter of
    bench/influence_peers.py defines its Task inside; it does not override this method)."""
    from kronfluence.task import Task

    if modules is None:
        yield
        return
    original = Task.get_influence_tracked_modules
    Task.get_influence_tracked_modules = lambda self: list(modules)
    try:
        yield
    finally:
        Task.get_influence_tracked_modules = original


def kronfluence(model, train, queries, damping, want_self, modules=None):
    """bench/influence_peers.py's kronfluence EK-FAC adapter, unchanged (its docstring: true Fisher
    with one sampled label, factors of the mean loss, `damping` absolute = the engine's; sign: its
    pairwise score is g_q^T (F + damping)^-1 g_i, > 0 helpful, used as is). `modules`: names of the
    Linear modules to track (None: all). It times the factor fit inside both of its calls, so the
    build is reported as included in the query seconds."""
    names = _linear_modules(model, modules)
    with _kronfluence_tracks(None if modules is None else names):
        out = kronfluence_adapter(model, train, queries, damping, want_self, strategy="ekfac")
    out["build_secs"], out["layers"] = float("nan"), len(names)
    out["dim"] = sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
    return out


# ----------------------------------------------------------------------------- runner
def _run_rounds(part, methods, train, queries, want_self, repeat, damping_from=None):
    """Every method `repeat` times, round-robin: ({name: result with median seconds}, failures).
    methods: (name, adapter, model, options); scores come from the first round. `damping_from`
    names the row whose `damping` is handed to the rows with options {"damping": "ref"}."""
    results, failures, seconds = {}, [], {}
    for round_ in range(repeat):
        for name, fn, model, opts in methods:
            if any(name == f[0] for f in failures):
                continue
            opts = dict(opts)
            damping = opts.pop("damping", None)
            if damping == "ref":
                damping = results[damping_from]["damping"]
            print(f"{part}: {name} (round {round_ + 1}/{repeat})", flush=True)
            res, err = _run(name, fn, model, train, queries, damping, want_self, **opts)
            if res is None:
                failures.append([name, err])
                results.pop(name, None)
                continue
            results.setdefault(name, res)
            for key in ("build_secs", "q_secs", "self_secs"):
                if key in res:
                    seconds.setdefault((name, key), []).append(res[key])
    for name, res in results.items():
        for key in ("build_secs", "q_secs", "self_secs"):
            if (name, key) in seconds:
                res[key] = float(np.median(seconds[(name, key)]))
    return results, failures


def part_mlp(repeat: int) -> None:
    case = mlp_case()
    model, train, q_set, n = case.model, case.train_set, case.q_set, case.n
    unprojected = {"rank_in": 65, "rank_out": 32}  # >= every layer side of 64-32-10 (inputs + bias)
    methods = [
        ("engine ekfac (reference)", engine_ekfac, model, {}),
        ("ours index, default (rank 16)", ours_index, model, {}),
        ("ours index, rank 32", ours_index, model, {"rank_in": 32, "rank_out": 32}),
        ("ours index, unprojected", ours_index, model, unprojected),
        ("ours index, unprojected, exact class expectation (= engine)", ours_index, model,
         {**unprojected, "fisher_samples": None}),
        ("Bergson, projection 16", bergson, model, {"projection_dim": 16}),
        ("Bergson, projection 32", bergson, model, {"projection_dim": 32}),
        ("Bergson, unprojected", bergson, model, {"projection_dim": 0}),
        ("dattri LoGra, proj 256 (16 x 16)", dattri_logra, model, {"proj_dim": 256}),
        ("dattri LoGra, proj 1024 (32 x 32)", dattri_logra, model, {"proj_dim": 1024}),
        ("kronfluence ekfac (damping = engine's)", kronfluence, model, {"damping": "ref"}),
    ]
    results, failures = _run_rounds("mlp", methods, train, q_set, True, repeat, damping_from=methods[0][0])
    ref = results[methods[0][0]]["queries"]
    rows = []
    for name, res in results.items():
        auc = roc_auc_score(case.flipped, res["self"]) if res.get("self") is not None else float("nan")
        rows.append([name, res.get("layers", float("nan")), res.get("dim", float("nan")), mlp_lds(case, res["queries"]),
                     auc, *agreement(res["queries"], ref), res["build_secs"], res["q_secs"],
                     res.get("self_secs", float("nan"))])
    _table(f"mlp. Digits MLP 64-32-10, 10% flipped labels (N={n}, P=2,410, 20 validation queries, "
           f"{torch.get_num_threads()} threads, median of {repeat} rounds; build NaN = inside query seconds)",
           ["method", "layers", "dims", "LDS (20 halves)", "self AUC (flipped)", "top-10 overlap vs engine ekfac",
            "Spearman vs engine ekfac", "build s", "query s", "self s"], rows)
    if failures:
        _table("mlp. Not measured", ["method", "reason"], failures)


# ----------------------------------------------------------------------------- minilm
def minilm_case(sst2: str, n_train: int, n_queries: int, epochs: int, max_length: int = 64, scored_layers: int = 2):
    """(classifier, train, queries, prefixes, accuracy on the queries): MiniLM with the top 2
    layers + pooler + classifier trainable, fine-tuned `epochs` on n_train SST-2 training phrases of
    >= 4 words (0: the pretrained encoder with its fresh head, as is). Training examples and queries
    are ordered by token count, so every library that batches in order pads little."""
    from audit.demo.sst2 import read_sst2
    from audit.demo.text_models import (
        TextClassifier,
        TextTrainConfig,
        encode_texts,
        fine_tune_text,
        freeze_bottom,
        minilm_classifier,
    )
    from audit.text_classifier import token_counts

    frames = read_sst2(Path(sst2))
    rng = np.random.default_rng(0)
    phrases = frames["train"][frames["train"]["text"].str.split().str.len() >= 4]
    picked = phrases.iloc[rng.permutation(len(phrases))[:n_train]]
    dev = frames["dev"].iloc[rng.permutation(len(frames["dev"]))[:n_queries]]
    hf_model, tokenizer = minilm_classifier(num_labels=2, seed=0)

    def encoded(frame):
        ids = encode_texts(tokenizer, frame["text"].tolist(), max_length)
        labels = torch.as_tensor(frame["label"].to_numpy(), dtype=torch.int64)
        order = torch.argsort(token_counts(ids, tokenizer.pad_token_id), stable=True)
        return ids[order], labels[order]

    ids, labels = encoded(picked)
    q_ids, q_labels = encoded(dev)
    if epochs:
        classifier, _ = fine_tune_text(hf_model, tokenizer, ids, labels, TextTrainConfig(epochs=epochs))
    else:
        classifier = TextClassifier(hf_model, tokenizer.pad_token_id).eval()
        freeze_bottom(classifier, 2)
    prefixes = freeze_bottom(classifier, scored_layers)  # what every method scores (training tuned the top 2)
    with torch.no_grad():
        accuracy = float((classifier(q_ids).argmax(1) == q_labels).float().mean())
    return classifier, TensorDataset(ids, labels), TensorDataset(q_ids, q_labels), prefixes, accuracy


def part_minilm(repeat: int, sst2: str, n_train: int, n_queries: int, epochs: int, only: list[str],
                scored_layers: int = 2) -> None:
    """The MiniLM table; `only`: run the reference and the methods whose name contains one of these
    (all when empty)."""
    from audit.demo.text_models import TrimPadding

    start = time.perf_counter()
    classifier, train, queries, prefixes, acc = minilm_case(sst2, n_train, n_queries, epochs,
                                                            scored_layers=scored_layers)
    setup_secs = time.perf_counter() - start
    same = linear_filter(classifier, prefixes)
    params = sum(p.numel() for n, p in classifier.named_parameters() if same(n, p))
    # peers without a padding-aware path get the training-time wrapper that trims each batch's
    # trailing padding (same logits); the data is length-sorted, so batches in order pad little
    trimmed = TrimPadding(classifier)
    peer_prefixes = tuple("classifier." + p for p in prefixes)
    methods = [
        ("engine ekfac (reference)", engine_ekfac, classifier, {"param_filter": same}),
        ("ours index, default (rank 16)", ours_index, classifier, {"param_filter": same}),
        ("ours index, rank 32", ours_index, classifier, {"param_filter": same, "rank_in": 32, "rank_out": 32}),
        ("ours index rank 16, shortlist of 50 re-ranked by EK-FAC", ours_reranked, classifier, {"param_filter": same}),
        ("Bergson, projection 16", bergson, trimmed, {"projection_dim": 16, "modules": peer_prefixes}),
        ("Bergson, projection 32", bergson, trimmed, {"projection_dim": 32, "modules": peer_prefixes}),
        ("dattri LoGra, proj 256 (16 x 16)", dattri_logra, trimmed, {"proj_dim": 256, "modules": peer_prefixes}),
        ("dattri LoGra, proj 1024 (32 x 32)", dattri_logra, trimmed, {"proj_dim": 1024, "modules": peer_prefixes}),
        ("kronfluence ekfac (damping = engine's)", kronfluence, trimmed, {"damping": "ref", "modules": peer_prefixes}),
    ]
    if scored_layers == 0:  # pooler + classifier only: their input sides (384 + bias) can stay exact
        methods.insert(3, ("ours index, exact input sides (rank_in 385)", ours_index, classifier,
                           {"param_filter": same, "rank_in": 385}))
    methods = [m for i, m in enumerate(methods) if i == 0 or not only or any(o in m[0] for o in only)]
    results, failures = _run_rounds("minilm", methods, train, queries, False, repeat, damping_from=methods[0][0])
    ref = results[methods[0][0]]["queries"]
    rows = []
    for name, res in results.items():
        overlap, rho = agreement(res["queries"], ref)
        rows.append([name, res.get("layers", float("nan")), res.get("dim", float("nan")), overlap,
                     float("nan") if res.get("top_only") else rho, res["build_secs"], res["q_secs"]])
    tuned = f"fine-tuned {epochs} epoch(s)" if epochs else "not fine-tuned (fresh head)"
    _table(f"minilm. all-MiniLM-L6-v2 on SST-2, top {scored_layers} layers + pooler + classifier ({params:,} Linear "
           "parameters), "
           f"{tuned} on N={len(train)} phrases, {len(queries)} dev queries (accuracy {acc:.3f}), max_length 64, "
           f"{torch.get_num_threads()} threads, median of {repeat} round(s); setup {setup_secs:.0f} s; "
           "build NaN = inside query seconds",
           ["method", "layers", "dims", "top-10 overlap vs engine ekfac", "Spearman vs engine ekfac", "build s",
            "query s"], rows)
    if failures:
        _table("minilm. Not measured", ["method", "reason"], failures)


def _warm_up_peers() -> None:
    """Run every peer once on a tiny MLP before any timing: their first call pays one-time costs
    (imports; dattri's first LoGra call took 6 s more than its second on an 8-4-3 MLP)."""
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3))
    data = TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
    for fn, options in ((bergson, {"projection_dim": 4}), (dattri_logra, {"proj_dim": 16}), (kronfluence, {})):
        with contextlib.suppress(Exception), _quiet():
            fn(tiny, data, data, 1e-3, True, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["mlp", "minilm"], choices=["mlp", "minilm"])
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default: 3 for mlp, 1 for minilm)")
    parser.add_argument("--sst2", default="../shared/data/sst2", help="SST-2 folder (minilm)")
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-queries", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs for minilm (0 = as is)")
    parser.add_argument("--scored-layers", type=int, default=2, help="minilm: encoder layers scored with the pooler "
                                                                         "and classifier (fine-tuning always tunes 2)")
    parser.add_argument("--only", nargs="*", default=[], help="minilm: the reference and the methods whose name "
                                                               "contains one of these")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          + ", ".join(f"{p} {_version(p)}" for p in PEERS), flush=True)
    warm_up()
    _warm_up_peers()
    for part in args.parts:
        if part == "mlp":
            part_mlp(args.repeat or 3)
        else:
            part_minilm(args.repeat or 1, args.sst2, args.n_train, args.n_queries, args.epochs, args.only,
                        args.scored_layers)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
