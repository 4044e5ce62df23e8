"""Our influence engine next to the public influence libraries, on bench/influence.py's cases a and b.

    .venv/bin/pip install -e '.[peers]' -c <(printf 'torch==2.14.1\\ntorchvision==0.29.1\\n')
    OMP_NUM_THREADS=1 .venv/bin/python bench/influence_peers.py              # both parts, 3 rounds, ~15 min
    OMP_NUM_THREADS=1 .venv/bin/python bench/influence_peers.py --parts a    # one part

Peers (each optional: a peer that is not installed or fails gets a row saying why):
kronfluence (EK-FAC, K-FAC), captum.influence (NaiveInfluenceFunction, ArnoldiInfluenceFunction,
TracInCP), dattri (IF attributors explicit / CG / LiSSA / Arnoldi / EK-FAC, TRAK), pyDVL
(pydvl.influence.torch: DirectInfluence, CgInfluence, ArnoldiInfluence, EkfacInfluence) and TRAK
(PyPI `traker`). Every method runs on the same model and data in one process.

  a  L2 logistic regression on digits (float64 where the library allows, damping = L2 = 0.01 on
     the curvature of the *mean* training loss, i.e. the exact Hessian of the training objective):
     Pearson per query vs true leave-one-out retraining, Pearson vs our `exact`, LDS, seconds.
  b  the digits MLP with 10% flipped labels: self-influence ROC AUC for the flipped examples, LDS
     over 20 retrained halves, seconds. Damping: ours picks 0.1 x trace(GN)/P (damping=None); every
     peer gets that same absolute value on the mean-loss curvature, rescaled where the library
     works on the summed loss (captum: x N; TRAK: x N on its summed X^T X).

Sign: every score is converted to ours (DESIGN.md): S[q, i] > 0 = up-weighting training example i
lowers query q's loss (helpful). Each adapter says how in a comment. Scales differ (per unit
weight in the mean vs the summed loss); the metrics (Pearson, Spearman, AUC) do not depend on it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import io
import logging
import os
import tempfile
import time
import warnings

import numpy as np
import torch
from influence import (
    L2,
    _table,
    logreg_case,
    logreg_metrics,
    mlp_case,
    mlp_lds,
    warm_up,
)
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from audit.influence import InfluenceConfig, compute_influence

PEERS = ("kronfluence", "captum", "dattri", "pydvl", "traker")


def _tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), torch.stack([torch.as_tensor(y) for y in ys])


class _Timer:
    """Wall-clock seconds of the `with` blocks, added up (fit once, shared by both score kinds)."""

    def __init__(self):
        self.secs = 0.0

    @contextlib.contextmanager
    def __call__(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.secs += time.perf_counter() - start


@contextlib.contextmanager
def _quiet():
    """Peers print progress bars and info logs; keep the tables readable."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# Every adapter: (model, train, queries, damping, want_self, **options) ->
#   dict(queries=[Q, N] ndarray, q_secs=..., self=[N] ndarray or None, self_secs=...)
# with the curvature fit counted in both timings (as ours, which fits in each call).


# ----------------------------------------------------------------------------- ours
def ours(model, train, queries, damping, want_self, **cfg):
    out = {}
    start = time.perf_counter()
    res = compute_influence(model, train, queries, InfluenceConfig(damping=damping, **cfg), progress=False)
    out["q_secs"], out["queries"], out["damping"] = time.perf_counter() - start, res.scores.numpy(), res.damping
    if want_self:
        start = time.perf_counter()
        res = compute_influence(model, train, None, InfluenceConfig(damping=damping, **cfg), progress=False)
        out["self_secs"], out["self"] = time.perf_counter() - start, res.scores.numpy()
    return out


def ours_tracin(model, train, queries, damping, want_self, checkpoints, batch_size=64):
    out = {}
    for key, q in (("queries", queries), ("self", None)):
        if key == "self" and not want_self:
            break
        start = time.perf_counter()
        res = compute_influence(model, train, q, InfluenceConfig(method="tracin", batch_size=batch_size),
                                progress=False, checkpoints=checkpoints)
        out[key], out["q_secs" if q is not None else "self_secs"] = res.scores.numpy(), time.perf_counter() - start
    return out


# ----------------------------------------------------------------------------- kronfluence
def kronfluence(model, train, queries, damping, want_self, strategy="ekfac"):
    """Kronfluence fits the factors of the mean-loss Fisher (covariances / N, lambda / N), so its
    `damping_factor` is on our scale. Its Fisher is the true Fisher with one sampled label per example
    (`sample=True` below); ours takes the exact expectation over the 10 classes.
    Sign: kronfluence's pairwise score is (preconditioned measurement gradient) . (train loss
    gradient) = g_q^T (F + damping)^-1 g_i with the measurement = the query loss, i.e. -dL_q/d eps:
    positive = helpful, the same as ours; used as is."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    class CrossEntropyTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # true Fisher: labels drawn from the model's predictive distribution
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen).squeeze(1)
            return F.cross_entropy(logits, y, reduction="sum")  # kronfluence expects summed losses

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    gen = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    dtypes = {"per_sample_gradient_dtype": dtype}
    factor_args = FactorArguments(strategy=strategy, covariance_max_examples=None, lambda_max_examples=None,
                                  activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype,
                                  lambda_dtype=dtype, **dtypes)
    score_args = ScoreArguments(damping_factor=damping, precondition_dtype=dtype, score_dtype=dtype, **dtypes)
    task = CrossEntropyTask()
    fit, q_time, s_time, out = _Timer(), _Timer(), _Timer(), {}
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        with fit():
            wrapped = prepare_model(copy.deepcopy(model).eval(), task)  # wraps modules in place: a copy
            analyzer = Analyzer("peers", wrapped, task, cpu=True, output_dir=tmp, disable_tqdm=True,
                                disable_model_save=True)
            analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
            analyzer.fit_all_factors("f", dataset=train, per_device_batch_size=256, factor_args=factor_args,
                                     overwrite_output_dir=True)
        with q_time():
            analyzer.compute_pairwise_scores("q", "f", query_dataset=queries, train_dataset=train,
                                             per_device_query_batch_size=len(queries),
                                             per_device_train_batch_size=256, score_args=score_args,
                                             overwrite_output_dir=True)
            out["queries"] = analyzer.load_pairwise_scores("q")["all_modules"].double().numpy()
        if want_self:
            with s_time():
                analyzer.compute_self_scores("s", "f", train_dataset=train, per_device_train_batch_size=256,
                                             score_args=score_args, overwrite_output_dir=True)
                out["self"] = analyzer.load_self_scores("s")["all_modules"].double().numpy()
    out["q_secs"], out["self_secs"] = fit.secs + q_time.secs, fit.secs + s_time.secs
    return out


# ----------------------------------------------------------------------------- captum
def captum(model, train, queries, damping, want_self, kind="naive", rank=None, arnoldi_dim=None, checkpoints=None):
    """captum.influence builds the Hessian of the *summed* training loss (true Hessian: no
    Gauss-Newton option), so hessian_reg = N x damping gives (H_mean + damping) x N and scores =
    ours / N. It keeps only eigenvalues of the regularised Hessian above `hessian_inverse_tol`
    (negative-curvature directions are dropped, where our damped Hessian inverts them).
    Sign: captum's influence is g_test^T H^-1 g_train = the increase of the test loss when the
    training example is *down*-weighted: positive = helpful, the same as ours; used as is.
    TracInCP: sum_k lr_k g_test(theta_k) . g_train(theta_k), positive = proponent = helpful."""
    from captum.influence import NaiveInfluenceFunction, TracInCP

    n = len(train)
    xq, yq = _tensors(queries)
    fit, q_time, s_time, out = _Timer(), _Timer(), _Timer(), {}
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        with fit():
            if kind == "tracin":
                paths = []
                for k, (state, lr) in enumerate(checkpoints):
                    paths.append(os.path.join(tmp, f"ckpt{k}.pt"))
                    torch.save({"state": state, "lr": lr}, paths[-1])

                def load(module, path):
                    saved = torch.load(path, weights_only=True)
                    module.load_state_dict(saved["state"])
                    return saved["lr"]  # captum multiplies each checkpoint's dot products by it

                inf = TracInCP(copy.deepcopy(model), train, paths, checkpoints_load_func=load,
                               loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=256,
                               sample_wise_grads_per_batch=True)
            else:
                path = os.path.join(tmp, "ckpt.pt")
                torch.save(model.state_dict(), path)
                options = {"loss_fn": nn.CrossEntropyLoss(reduction="none"), "batch_size": n,
                           "hessian_reg": n * damping, "projection_dim": rank}
                if kind == "naive":
                    inf = NaiveInfluenceFunction(copy.deepcopy(model), train, path, **options)
                else:  # not exported from captum.influence in 0.9, but shipped and documented
                    from captum.influence._core.arnoldi_influence_function import (
                        ArnoldiInfluenceFunction,
                    )

                    inf = ArnoldiInfluenceFunction(copy.deepcopy(model), train, path, arnoldi_dim=arnoldi_dim,
                                                   **options)
        with q_time():
            out["queries"] = inf.influence((xq, yq)).double().numpy()
        if want_self:
            with s_time():
                out["self"] = inf.self_influence().double().numpy()
    out["q_secs"], out["self_secs"] = fit.secs + q_time.secs, fit.secs + s_time.secs
    return out


# ----------------------------------------------------------------------------- dattri
def dattri(model, train, queries, damping, want_self, kind="explicit", **options):
    """dattri's IF attributors invert the Hessian of the given loss function (here the *mean* cross
    entropy over the whole training set in one batch, so `regularization` = our damping) and return
    attribute(train, test)[i, q] = g_i^T (H + damping)^-1 g_q: positive = helpful, the same as ours;
    transposed to [Q, N]. dattri's EK-FAC estimates its factors from the same true-label loss: an
    empirical Fisher, not the true Fisher that ours and kronfluence use (on case a it stays at
    Pearson 0.53-0.59 against exact for any damping from 1e-6 to 1e2, where an explicit empirical-
    Fisher inverse reaches 0.93 at damping 0.01: see bench/RESULTS.md). TRAK: see `dattri_trak`."""
    from dattri.algorithm import influence_function as dif
    from dattri.task import AttributionTask

    net = copy.deepcopy(model).eval()

    def loss_func(params, data):
        x, y = data  # .long(): dattri's LiSSA collate casts every tensor, labels too, to float
        return F.cross_entropy(torch.func.functional_call(net, params, (x,)), y.long())

    task = AttributionTask(loss_func=loss_func, model=net, checkpoints=net.state_dict())
    n = len(train)
    train_loader, query_loader = DataLoader(train, batch_size=n), DataLoader(queries, batch_size=len(queries))

    def make():
        if kind == "explicit":
            return dif.IFAttributorExplicit(task, regularization=damping)
        if kind == "cg":
            return dif.IFAttributorCG(task, regularization=damping, **options)
        if kind == "lissa":
            return dif.IFAttributorLiSSA(task, damping=damping, **options)
        if kind == "arnoldi":
            return dif.IFAttributorArnoldi(task, regularization=damping, **options)
        if kind == "ekfac":
            return dif.IFAttributorEKFAC(task, damping=damping)
        raise ValueError(kind)

    # a fresh attributor per score kind: some build their projector lazily on the first attribute
    q_time, s_time, out = _Timer(), _Timer(), {}
    with _quiet():
        with q_time():
            attr = make()
            attr.cache(train_loader)
            out["queries"] = attr.attribute(train_loader, query_loader).detach().T.double().numpy()
        if want_self:
            with s_time():
                attr = make()
                attr.cache(train_loader)
                out["self"] = attr.self_attribute(train_loader).detach().double().numpy()
    out["q_secs"], out["self_secs"] = q_time.secs, s_time.secs
    return out


def dattri_trak(model, train, queries, damping, want_self, proj_dim=512):
    """dattri's TRAK (one model, no ensemble): features = projected gradients of the margin
    log p/(1-p), scores weighted by 1 - p of the training example. Positive = training on i raises
    the query's correct-class margin = helpful, the same as ours; transposed to [Q, N]."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    net = copy.deepcopy(model).eval()

    def margin(params, data):
        x, y = data
        logp = -F.cross_entropy(torch.func.functional_call(net, params, (x.unsqueeze(0),)), y.unsqueeze(0))
        return logp - torch.log(1 - torch.exp(logp))

    def correct_probability(params, data):
        x, y = data
        return torch.exp(-F.cross_entropy(torch.func.functional_call(net, params, (x.unsqueeze(0),)), y.unsqueeze(0)))

    task = AttributionTask(loss_func=margin, model=net, checkpoints=net.state_dict())
    attr = TRAKAttributor(task, correct_probability, device="cpu", regularization=len(train) * damping,
                          projector_kwargs={"proj_dim": proj_dim, "device": "cpu", "proj_max_batch_size": 32})
    train_loader = DataLoader(train, batch_size=256)
    fit, q_time, s_time, out = _Timer(), _Timer(), _Timer(), {}
    with _quiet():
        with fit():
            attr.cache(train_loader)
        with q_time():
            out["queries"] = attr.attribute(DataLoader(queries, batch_size=len(queries))).detach().T.double().numpy()
        if want_self:
            with s_time():
                out["self"] = np.diag(attr.attribute(train_loader).detach().double().numpy()).copy()
    out["q_secs"], out["self_secs"] = fit.secs + q_time.secs, fit.secs + s_time.secs
    return out


# ----------------------------------------------------------------------------- pyDVL
def pydvl(model, train, queries, damping, want_self, kind="direct", **options):
    """pyDVL (pydvl.influence.torch) inverts the Hessian of the *mean* loss (its `hessian` averages
    over batches; `regularization` = our damping). Its SecondOrderMode.GAUSS_NEWTON is the empirical
    Fisher (outer products of true-label gradients), not the GN of ours, so the Hessian mode is used.
    EkfacInfluence fits a K-FAC of its own pseudo-loss (expected Fisher) with refitted diagonal.
    Sign: influences(x_test, y_test, x, y) = <H^-1 g_test, g_train> (InfluenceMode.Up), checked
    against our exact below to be helpful-positive, the same as ours; used as is. Self-influence is
    the diagonal of influences(x_train, y_train), skipped for CG (one solve per training example)."""
    from pydvl.influence.torch import (
        ArnoldiInfluence,
        CgInfluence,
        DirectInfluence,
        EkfacInfluence,
    )

    net = copy.deepcopy(model).eval()
    if kind == "direct":
        inf = DirectInfluence(net, F.cross_entropy, regularization=damping)
    elif kind == "cg":
        inf = CgInfluence(net, F.cross_entropy, regularization=damping, **options)
    elif kind == "arnoldi":
        inf = ArnoldiInfluence(net, F.cross_entropy, regularization=damping, **options)
    elif kind == "ekfac":
        inf = EkfacInfluence(net, update_diagonal=True, hessian_regularization=damping)
    else:
        raise ValueError(kind)
    xt, yt = _tensors(train)
    xq, yq = _tensors(queries)
    fit, q_time, s_time, out = _Timer(), _Timer(), _Timer(), {}
    with _quiet():
        with fit():
            inf.fit(DataLoader(TensorDataset(xt, yt), batch_size=len(xt)))
        with q_time():
            out["queries"] = inf.influences(xq, yq, xt, yt).double().numpy()
        if want_self and kind != "cg":
            with s_time():
                out["self"] = torch.diagonal(inf.influences(xt, yt, xt, yt)).double().numpy().copy()
    out["q_secs"], out["self_secs"] = fit.secs + q_time.secs, fit.secs + s_time.secs
    return out


# ----------------------------------------------------------------------------- TRAK (traker)
def traker(model, train, queries, damping, want_self, proj_dim=512):
    """TRAK (PyPI `traker`), one model (no ensemble of independently trained models), BasicProjector
    on CPU (its CUDA projector needs a GPU), float32. Features = projected gradients of the margin
    log p/(1-p); lambda_reg on its *summed* X^T X = N x damping. Scores [N, Q] estimate how training
    on i raises the query's correct-class margin: positive = helpful, the same as ours; transposed."""
    from trak import TRAKer

    net = copy.deepcopy(model).float().eval()
    xt, yt = _tensors(train)
    xq, yq = _tensors(queries)
    xt, xq = xt.float(), xq.float()
    n = len(xt)
    fit, q_time, s_time, out = _Timer(), _Timer(), _Timer(), {}
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        with fit():
            trak = TRAKer(model=net, task="image_classification", train_set_size=n, save_dir=tmp, device="cpu",
                          proj_dim=proj_dim, use_half_precision=False, lambda_reg=n * damping,
                          logging_level=logging.ERROR)
            state = net.state_dict()
            trak.load_checkpoint(state, model_id=0)
            for start in range(0, n, 256):
                trak.featurize(batch=(xt[start:start + 256], yt[start:start + 256]),
                               num_samples=len(xt[start:start + 256]))
            trak.finalize_features()

        def score(name, x, y):
            trak.start_scoring_checkpoint(exp_name=name, checkpoint=state, model_id=0, num_targets=len(x))
            for start in range(0, len(x), 256):
                trak.score(batch=(x[start:start + 256], y[start:start + 256]), num_samples=len(x[start:start + 256]))
            return np.asarray(trak.finalize_scores(exp_name=name), dtype=np.float64)  # [N, targets]

        with q_time():
            out["queries"] = score("q", xq, yq).T
        if want_self:
            with s_time():
                out["self"] = np.diag(score("s", xt, yt)).copy()
    out["q_secs"], out["self_secs"] = fit.secs + q_time.secs, fit.secs + s_time.secs
    return out


# ----------------------------------------------------------------------------- runner
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _float32(ds):
    x, y = _tensors(ds)
    return TensorDataset(x.float(), y)


def _run(name, fn, model, train, queries, damping, want_self, float32=False, no_self=False, **kwargs):
    """(result, None) or (None, one-line reason): a failing peer gets a row, not a crash.
    float32: run on float32 copies of the model and data (for peers that hard-code float32);
    no_self: skip self-influence (iterative solvers need one solve per training example)."""
    want_self = want_self and not no_self
    if float32:
        model, train, queries = copy.deepcopy(model).float(), _float32(train), _float32(queries)
    try:
        return fn(model, train, queries, damping, want_self, **kwargs), None
    except Exception as exc:  # noqa: BLE001 - report any peer failure as a table row
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        print(f"  [{name}] failed: {msg}", flush=True)
        return None, msg


def _run_all(part, methods, model, train, queries, damping, want_self, repeat):
    """Every method `repeat` times, round-robin (so a change of machine load hits every row alike):
    ({name: result with the median seconds}, failures). Scores come from the first round."""
    results, failures, seconds = {}, [], {}
    for round_ in range(repeat):
        for name, fn, opts in methods:
            if any(name == f[0] for f in failures):
                continue
            print(f"{part}: {name} (round {round_ + 1}/{repeat})", flush=True)
            res, err = _run(name, fn, model, train, queries, damping, want_self, **opts)
            if res is None:
                failures.append([name, err])
                results.pop(name, None)
                continue
            results.setdefault(name, res)
            for key in ("q_secs", "self_secs"):
                if key in res:
                    seconds.setdefault((name, key), []).append(res[key])
    for name, res in results.items():
        for key in ("q_secs", "self_secs"):
            if (name, key) in seconds:
                res[key] = float(np.median(seconds[(name, key)]))
    return results, failures


def part_a(repeat: int = 1) -> None:
    case = logreg_case()
    # nn.Sequential: kronfluence and dattri's EK-FAC need the Linear to be a named submodule
    model, train, queries, n = nn.Sequential(case.model), case.train_set, case.queries, case.n
    lam = L2
    # like with like: same damping everywhere; ranks match ours (arnoldi rank 50, 100 iterations)
    methods = [
        ("ours exact", ours, {"method": "exact"}),
        ("ours ekfac", ours, {"method": "ekfac"}),
        ("ours ekfac, 1 sampled label (as kronfluence, pyDVL)", ours, {"method": "ekfac", "fisher_samples": 1}),
        ("ours kfac", ours, {"method": "kfac"}),
        ("ours arnoldi rank 50", ours, {"method": "arnoldi", "rank": 50, "batch_size": 200}),
        ("kronfluence ekfac", kronfluence, {"strategy": "ekfac"}),
        ("kronfluence kfac", kronfluence, {"strategy": "kfac"}),
        ("captum NaiveInfluenceFunction (rank 650 = full)", captum, {"kind": "naive", "rank": 650}),
        ("captum ArnoldiInfluenceFunction rank 50", captum, {"kind": "arnoldi", "rank": 50, "arnoldi_dim": 100}),
        ("dattri explicit", dattri, {"kind": "explicit"}),
        ("dattri CG (20 iterations)", dattri, {"kind": "cg", "max_iter": 20}),
        ("dattri LiSSA (depth 1000, batch 50; float32)", dattri,
         {"kind": "lissa", "recursion_depth": 1000, "batch_size": 50, "scaling": 10.0, "float32": True}),
        ("dattri arnoldi rank 50 (float32)", dattri,
         {"kind": "arnoldi", "proj_dim": 50, "max_iter": 100, "float32": True}),
        ("dattri ekfac (empirical Fisher)", dattri, {"kind": "ekfac"}),
        ("dattri TRAK (proj 512, 1 model)", dattri_trak, {"proj_dim": 512}),
        ("pyDVL DirectInfluence", pydvl, {"kind": "direct"}),
        ("pyDVL CgInfluence", pydvl, {"kind": "cg", "maxiter": 100}),
        ("pyDVL ArnoldiInfluence rank 50", pydvl, {"kind": "arnoldi", "rank": 50, "krylov_dimension": 100}),
        ("pyDVL EkfacInfluence (float32)", pydvl, {"kind": "ekfac", "float32": True}),
        ("TRAK / traker (proj 512, 1 model; float32)", traker, {"proj_dim": 512}),
    ]
    results, failures = _run_all("a", methods, model, train, queries, lam, False, repeat)
    exact = results["ours exact"]["queries"]
    rows = [[name, *logreg_metrics(case, r["queries"], exact), r["q_secs"]] for name, r in results.items()]
    _table(
        f"a (peers). Logistic regression on digits (N={n}, P=650, float64, damping = L2 = {lam} on the mean-loss "
        "curvature; 5 queries)",
        ["method", "Pearson vs LOO (min of 5)", "Pearson vs LOO (mean)", "Pearson vs our exact (min)",
         "LDS (40 half subsets)", "seconds"],
        rows,
    )
    if failures:
        _table("a (peers). Not measured", ["method", "reason"], failures)


def part_b(repeat: int = 1) -> None:
    case = mlp_case()
    model, train, q_set, n = case.model, case.train_set, case.q_set, case.n
    # the damping ours picks for damping=None (0.1 x trace(GN)/P, exact trace) goes to every peer
    lam = float(compute_influence(model, train, q_set, InfluenceConfig(method="exact"), progress=False).damping)
    methods = [
        ("ours exact (GN)", ours, {"method": "exact"}),
        ("ours exact (Hessian)", ours, {"method": "exact", "curvature": "hessian"}),
        ("ours arnoldi rank 64 (GN)", ours, {"method": "arnoldi", "rank": 64, "batch_size": 540}),
        ("ours arnoldi rank 64 (Hessian)", ours,
         {"method": "arnoldi", "rank": 64, "curvature": "hessian", "batch_size": 540}),
        ("ours ekfac", ours, {"method": "ekfac"}),
        ("ours ekfac, 1 sampled label (as kronfluence, pyDVL)", ours, {"method": "ekfac", "fisher_samples": 1}),
        ("ours kfac", ours, {"method": "kfac"}),
        ("ours tracin (5 checkpoints)", ours_tracin, {"checkpoints": case.checkpoints}),
        ("ours tracin (5 checkpoints), batch 256 as captum", ours_tracin,
         {"checkpoints": case.checkpoints, "batch_size": 256}),
        ("kronfluence ekfac", kronfluence, {"strategy": "ekfac"}),
        ("kronfluence kfac", kronfluence, {"strategy": "kfac"}),
        ("captum NaiveInfluenceFunction (Hessian, rank 2410 = full)", captum, {"kind": "naive", "rank": 2410}),
        ("captum ArnoldiInfluenceFunction (Hessian) rank 64", captum,
         {"kind": "arnoldi", "rank": 64, "arnoldi_dim": 128}),
        ("captum TracInCP (5 checkpoints)", captum, {"kind": "tracin", "checkpoints": case.checkpoints}),
        ("dattri explicit (Hessian)", dattri, {"kind": "explicit"}),
        ("dattri CG (Hessian, 100 iterations)", dattri, {"kind": "cg", "max_iter": 100, "no_self": True}),
        ("dattri arnoldi (Hessian) rank 64", dattri, {"kind": "arnoldi", "proj_dim": 64, "max_iter": 128}),
        ("dattri ekfac (empirical Fisher)", dattri, {"kind": "ekfac"}),
        ("dattri TRAK (proj 512, 1 model)", dattri_trak, {"proj_dim": 512}),
        ("pyDVL DirectInfluence (Hessian)", pydvl, {"kind": "direct"}),
        ("pyDVL CgInfluence (Hessian, 100 iterations)", pydvl, {"kind": "cg", "maxiter": 100, "no_self": True}),
        ("pyDVL ArnoldiInfluence (Hessian) rank 64", pydvl, {"kind": "arnoldi", "rank": 64, "krylov_dimension": 128}),
        ("pyDVL EkfacInfluence", pydvl, {"kind": "ekfac"}),
        ("TRAK / traker (proj 512, 1 model)", traker, {"proj_dim": 512}),
    ]
    results, failures = _run_all("b", methods, model, train, q_set, lam, True, repeat)
    rows = []
    for name, res in results.items():
        auc = roc_auc_score(case.flipped, res["self"]) if res.get("self") is not None else float("nan")
        self_secs = res.get("self_secs", float("nan")) if res.get("self") is not None else float("nan")
        rows.append([name, auc, mlp_lds(case, res["queries"]), self_secs, res["q_secs"]])
    _table(
        f"b (peers). MLP on digits, 10% flipped labels (N={n}, P=2410, float32, damping {lam:.4g} for every "
        "curvature method = ours with damping=None)",
        ["method", "self-influence AUC (flipped)", "LDS (20 retrained halves, 20 queries)", "seconds (self)",
         "seconds (20 queries)"],
        rows,
    )
    if failures:
        _table("b (peers). Not measured", ["method", "reason"], failures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="ab")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds over all methods; seconds are the median (robust to load changes)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          + ", ".join(f"{p} {_version(p)}" for p in PEERS), flush=True)
    warm_up()
    for part in args.parts:
        {"a": part_a, "b": part_b}[part](args.repeat)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
