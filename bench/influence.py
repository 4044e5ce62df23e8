"""Influence methods side by side: accuracy against retraining, label-noise detection, and time.

    OMP_NUM_THREADS=1 .venv/bin/python bench/influence.py            # all parts, ~5-10 min on one core
    OMP_NUM_THREADS=1 .venv/bin/python bench/influence.py --parts a  # one part

Parts (every method runs on the same model and data in one process, so the ratios are fair):
  a  L2-regularised logistic regression on digits (float64, Newton to convergence):
     Pearson vs true leave-one-out retraining (100 train points x 5 queries), Pearson vs `exact`,
     and LDS (Spearman of predicted vs actual query loss over 40 retrainings on random halves).
  b  MLP on digits with 10% flipped labels: self-influence ROC AUC for the flipped examples,
     LDS over 20 retrainings on random halves, TracIn over per-epoch checkpoints.
  c  SmallResNet (the demo model) on digits with 10% flipped labels: self-influence ROC AUC, and
     the share of flipped-label examples among the top-10 harmful training examples of each
     misclassified validation example (base rate 10%).
  d  a small BERT trained from scratch on SST-2 phrases (../shared/data/sst2) with 10% flipped
     labels: self-influence ROC AUC on text with dict batches and padding, and the time of the
     vmap path (4-D attention bias) against the batched fallback.
Prints one markdown table per part.
"""

from __future__ import annotations

import argparse
import copy
import time
from types import SimpleNamespace

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import TensorDataset

from audit.demo.digits import load_digits_splits
from audit.demo.models import DigitsMLP, SmallResNet
from audit.influence import InfluenceConfig, compute_influence, top_influences
from audit.training import TrainConfig, accuracy, predict_logits, train


def _table(title: str, header: list[str], rows: list[list[object]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _lds(predicted_total: np.ndarray, actual: np.ndarray) -> float:
    """Mean over queries of the Spearman correlation across subsets ([M, Q] each)."""
    return float(np.mean([spearmanr(predicted_total[:, q], actual[:, q])[0] for q in range(actual.shape[1])]))


# ----------------------------------------------------------------------------- part a
L2 = 1e-2


def _newton(x, y, weights, theta=None, classes=10):
    """argmin (1/N) sum w_j CE_j + L2/2 |theta|^2 for softmax regression, x with a ones column."""
    n, d = x.shape
    theta = torch.zeros(classes, d, dtype=x.dtype) if theta is None else theta.clone()
    for _ in range(100):
        p = torch.softmax(x @ theta.T, 1)
        g = ((p - nn.functional.one_hot(y, classes)) * weights[:, None]).T @ x / n + L2 * theta
        w = weights[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
        h = torch.einsum("nabd,ne->adbe", torch.einsum("nab,nd->nabd", w, x), x).reshape(theta.numel(), -1) / n
        step = torch.linalg.solve(h + L2 * torch.eye(theta.numel(), dtype=x.dtype), g.reshape(-1)).reshape(theta.shape)
        theta = theta - step
        if step.abs().max() < 1e-12:
            break
    return theta


def logreg_case() -> SimpleNamespace:
    """Part a's data, model and ground truth: L2 logistic regression on 200 digits (float64),
    true leave-one-out loss changes `loo` [5 queries, 100] and the query losses `actual` [40, 5] of
    retrainings on the random halves `subsets`. bench/influence_peers.py uses it too."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n, tr, q = 200, perm[:200], perm[200:205]
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    ones = torch.ones(n, dtype=torch.float64)
    theta = _newton(xa[tr], y[tr], ones)

    def qloss(t):
        return nn.functional.cross_entropy(xa[q] @ t.T, y[q], reduction="none").numpy()

    base = qloss(theta)
    loo = []
    for i in range(100):
        w = ones.clone()
        w[i] = 0
        loo.append(qloss(_newton(xa[tr], y[tr], w, theta)) - base)
    loo = np.stack(loo, 1)  # [Q, 100]
    rng = np.random.default_rng(0)
    subsets = [rng.permutation(n)[: n // 2] for _ in range(40)]
    actual = []
    for s in subsets:
        w = torch.zeros(n, dtype=torch.float64)
        w[torch.as_tensor(s)] = 2.0  # same objective scale as the full data
        actual.append(qloss(_newton(xa[tr], y[tr], w, theta)))
    actual = np.stack(actual)  # [M, Q]

    model = nn.Linear(64, 10).double()
    with torch.no_grad():
        model.weight.copy_(theta[:, :64])
        model.bias.copy_(theta[:, 64])
    return SimpleNamespace(n=n, model=model, train_set=TensorDataset(x[tr], y[tr]), queries=TensorDataset(x[q], y[q]),
                           loo=loo, subsets=subsets, actual=actual)


def logreg_metrics(case: SimpleNamespace, s: np.ndarray, exact: np.ndarray) -> list[float]:
    """[Pearson vs LOO min, mean, Pearson vs exact min, LDS] of scores s [5, 200]."""
    vs_loo = [np.corrcoef(s[j, :100], case.loo[j])[0, 1] for j in range(5)]
    vs_exact = [np.corrcoef(s[j], exact[j])[0, 1] for j in range(5)]
    # removing half the data: predicted loss change = sum over removed of S / N
    removed = [np.setdiff1d(np.arange(case.n), sub) for sub in case.subsets]
    predicted = np.stack([s[:, r].sum(1) for r in removed])  # [M, Q]
    return [min(vs_loo), float(np.mean(vs_loo)), min(vs_exact), _lds(predicted, case.actual)]


def part_a() -> None:
    case = logreg_case()
    model, train_set, queries = case.model, case.train_set, case.queries
    configs = [
        ("exact", dict(method="exact")),
        ("arnoldi rank 650 (full)", dict(method="arnoldi", rank=650, batch_size=200)),
        ("arnoldi rank 50", dict(method="arnoldi", rank=50, batch_size=200)),
        ("arnoldi rank 10", dict(method="arnoldi", rank=10, batch_size=200)),
        ("ekfac", dict(method="ekfac")),
        ("kfac", dict(method="kfac")),
        ("graddot", dict(method="graddot")),
        ("gradcos", dict(method="gradcos")),
    ]
    results = {}
    for name, cfg in configs:
        damping = L2 if cfg["method"] not in ("graddot", "gradcos") else None
        res, secs = _timed(lambda cfg=cfg, d=damping: compute_influence(
            model, train_set, queries, InfluenceConfig(damping=d, **cfg), progress=False))
        results[name] = (res.scores.numpy(), secs)
    exact = results["exact"][0]
    rows = [[name, *logreg_metrics(case, s, exact), secs] for name, (s, secs) in results.items()]
    _table(
        "a. Logistic regression on digits (N=200, P=650, damping = L2 = 0.01)",
        ["method", "Pearson vs LOO (min of 5 queries)", "Pearson vs LOO (mean)", "Pearson vs exact (min)",
         "LDS (40 half subsets)", "seconds"],
        rows,
    )


# ----------------------------------------------------------------------------- part b
def _train_with_checkpoints(model, data, config: TrainConfig, every: int):
    """`audit.training.train` plus a state dict (and the learning rate of the next epoch) every
    `every` epochs, for TracIn."""
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=config.batch_size, shuffle=True, generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * len(loader))
    checkpoints = []
    model.train()
    for epoch in range(config.epochs):
        if epoch % every == 0:
            checkpoints.append((copy.deepcopy(model.state_dict()), opt.param_groups[0]["lr"] * every))
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            sched.step()
    model.eval()
    return checkpoints


def mlp_case() -> SimpleNamespace:
    """Part b's model and ground truth: the digits MLP trained on 10% flipped labels (checkpoints
    every 4 epochs for TracIn), 20 validation queries, and their losses `actual` [20, 20] after
    retraining from scratch on the random halves `subsets`. bench/influence_peers.py uses it too."""
    splits = load_digits_splits(noise_rate=0.1, seed=0)
    config = TrainConfig(epochs=20, batch_size=64, lr=3e-3, weight_decay=1e-4)
    torch.manual_seed(0)  # before construction: the initial weights must not depend on earlier parts
    model = DigitsMLP()
    checkpoints = _train_with_checkpoints(model, splits.train.dataset(), config, every=4)
    n = len(splits.train)
    queries = splits.validation.subset(list(range(20)))

    # LDS: retrain from scratch on 20 random halves, query loss per subset
    rng = np.random.default_rng(0)
    subsets = [np.sort(rng.permutation(n)[: n // 2]) for _ in range(20)]
    actual = []
    for s in subsets:
        torch.manual_seed(0)
        m = DigitsMLP()
        train(m, splits.train.subset(s).dataset(), config)
        logits = predict_logits(m, queries.inputs)
        actual.append(nn.functional.cross_entropy(logits, queries.labels, reduction="none").numpy())
    return SimpleNamespace(splits=splits, model=model, checkpoints=checkpoints, n=n, flipped=splits.flipped.numpy(),
                           train_set=splits.train.dataset(), q_set=queries.dataset(), subsets=subsets,
                           actual=np.stack(actual))


def mlp_lds(case: SimpleNamespace, s: np.ndarray) -> float:
    """LDS of scores s [20 queries, N] over the retrained halves."""
    predicted = np.stack([s[:, np.setdiff1d(np.arange(case.n), sub)].sum(1) for sub in case.subsets])
    return _lds(predicted, case.actual)


def _self_and_queries(model, train, queries, cfg: dict, extra: dict, flipped: np.ndarray):
    """Timed self-influence (its ROC AUC for the `flipped` examples; NaN for gradcos, whose
    self-score is constant) and timed query scores: (auc, seconds self, query result, seconds)."""
    if cfg["method"] != "gradcos":
        own, secs_self = _timed(lambda: compute_influence(model, train, None, InfluenceConfig(**cfg), progress=False,
                                                          **extra))
        auc = roc_auc_score(flipped, own.scores.numpy())
    else:
        auc, secs_self = float("nan"), float("nan")
    res, secs = _timed(lambda: compute_influence(model, train, queries, InfluenceConfig(**cfg), progress=False,
                                                 **extra))
    return auc, secs_self, res, secs


def part_b() -> None:
    case = mlp_case()
    splits, model, checkpoints, flipped, q_set = case.splits, case.model, case.checkpoints, case.flipped, case.q_set
    n = case.n

    configs = [
        ("exact (GN)", dict(method="exact")),
        ("exact (Hessian)", dict(method="exact", curvature="hessian")),
        ("arnoldi rank 64", dict(method="arnoldi", rank=64, batch_size=540)),
        ("arnoldi rank 64 (Hessian)", dict(method="arnoldi", rank=64, curvature="hessian", batch_size=540)),
        ("ekfac", dict(method="ekfac")),
        ("kfac", dict(method="kfac")),
        ("tracin (5 checkpoints)", dict(method="tracin")),
        ("graddot", dict(method="graddot")),
        ("gradcos", dict(method="gradcos")),
    ]
    rows = []
    for name, cfg in configs:
        extra = {"checkpoints": checkpoints} if cfg["method"] == "tracin" else {}
        auc, secs_self, res, secs = _self_and_queries(model, splits.train.dataset(), q_set, cfg, extra, flipped)
        rows.append([name, auc, mlp_lds(case, res.scores.numpy()), secs_self, secs])
    _table(
        f"b. MLP on digits, 10% flipped labels (N={n}, P=2410, val acc "
        f"{accuracy(model, splits.validation.inputs, splits.validation.labels):.3f}, damping=None)",
        ["method", "self-influence AUC (flipped)", "LDS (20 retrained halves, 20 queries)", "seconds (self)",
         "seconds (20 queries)"],
        rows,
    )


# ----------------------------------------------------------------------------- part c
def part_c() -> None:
    splits = load_digits_splits(noise_rate=0.1, seed=0)
    torch.manual_seed(0)
    model = SmallResNet()
    checkpoints = _train_with_checkpoints(model, splits.train.dataset(), TrainConfig(), every=10)
    flipped = splits.flipped.numpy()
    pred = predict_logits(model, splits.validation.inputs).argmax(1)
    wrong = (pred != splits.validation.labels).nonzero().squeeze(1).tolist()
    flagged = splits.validation.subset(wrong)  # reviewer's label = the true label
    configs = [
        ("ekfac", dict(method="ekfac")),
        ("kfac", dict(method="kfac")),
        ("arnoldi rank 32, 300 samples", dict(method="arnoldi", rank=32, samples=300, batch_size=300)),
        ("arnoldi rank 32, head only", dict(method="arnoldi", rank=32, batch_size=540)),
        ("tracin (4 checkpoints)", dict(method="tracin")),
        ("graddot", dict(method="graddot")),
        ("gradcos", dict(method="gradcos")),
    ]
    rows = []
    for name, cfg in configs:
        extra = {"checkpoints": checkpoints} if cfg["method"] == "tracin" else {}
        if "head only" in name:
            extra["param_filter"] = ["head."]
        auc, secs_self, res, secs = _self_and_queries(model, splits.train.dataset(), flagged.dataset(), cfg, extra,
                                                      flipped)
        top = top_influences(res.scores, k=10)
        harmful_flipped = float(flipped[top.opponents.numpy()].mean())
        helpful_flipped = float(flipped[top.proponents.numpy()].mean())
        rows.append([name, auc, harmful_flipped, helpful_flipped, secs_self, secs])
    _table(
        f"c. SmallResNet on digits, 10% flipped labels (N={len(splits.train)}, P=9.7k, "
        f"{len(wrong)} misclassified validation examples as queries, damping=None)",
        ["method", "self-influence AUC (flipped)", "flipped share in top-10 harmful", "flipped share in top-10 helpful",
         "seconds (self)", "seconds (queries)"],
        rows,
    )


# ----------------------------------------------------------------------------- part d
SST2 = "../shared/data/sst2/train.tsv"  # relative to the repository root; benchmarks only


class _Sentences(torch.utils.data.Dataset):
    def __init__(self, ids: list[torch.Tensor], labels: torch.Tensor):
        self.ids, self.labels = ids, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}, self.labels[i]


def part_d(n_train: int = 1200) -> None:
    """A small BERT trained from scratch on SST-2 phrases with 10% flipped labels (dict batches,
    padding; per-example gradients on the vmap path and, for comparison, the batched one)."""
    from transformers import BertConfig, BertForSequenceClassification

    from audit.influence.batches import collate

    rows = [line.rstrip("\n").split("\t") for line in open(SST2, encoding="utf-8").readlines()[1:]]
    rng = np.random.default_rng(0)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    rows = [(int(lab), text.split()) for lab, text in rows if 4 <= len(text.split()) <= 20][:n_train]
    counts: dict[str, int] = {}
    for _, words in rows:
        for w in words:
            counts[w] = counts.get(w, 0) + 1
    vocab = {w: i + 3 for i, w in enumerate(sorted(w for w, c in counts.items() if c >= 2))}  # 0 pad, 1 cls, 2 unk
    ids = [torch.tensor([1] + [vocab.get(w, 2) for w in words]) for _, words in rows]
    labels = torch.tensor([lab for lab, _ in rows])
    flip = torch.zeros(len(labels), dtype=torch.bool)
    flip[torch.as_tensor(rng.choice(len(labels), size=len(labels) // 10, replace=False))] = True
    noisy = torch.where(flip, 1 - labels, labels)
    data = _Sentences(ids, noisy)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab) + 3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    start = time.perf_counter()
    model.train()
    for _ in range(6):
        for inputs, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(**inputs).logits, y).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        acc = np.mean([(model(**x).logits.argmax(1) == y).float().mean().item()
                       for x, y in torch.utils.data.DataLoader(_Sentences(ids, labels), batch_size=256,
                                                                collate_fn=collate)])
    train_secs = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    configs = [
        ("ekfac", dict(method="ekfac"), None),
        ("ekfac, batched gradients (no vmap)", dict(method="ekfac", grad_mode="batched"), None),
        ("kfac", dict(method="kfac"), None),
        ("arnoldi rank 32, 300 samples", dict(method="arnoldi", rank=32, samples=300), None),
        ("ekfac, classifier + pooler only", dict(method="ekfac"), ["classifier.", "bert.pooler."]),
        ("graddot", dict(method="graddot"), None),
    ]
    table = []
    for name, cfg, subset in configs:
        res, secs = _timed(lambda cfg=cfg, subset=subset: compute_influence(
            model, data, None, InfluenceConfig(**cfg), progress=False, param_filter=subset))
        table.append([name, res.gradient_path, roc_auc_score(flip.numpy(), res.scores.numpy()), secs])
    _table(
        f"d. BERT (2 layers, hidden 32, {params} parameters) trained from scratch on {len(data)} SST-2 phrases, "
        f"10% flipped labels (train accuracy vs clean labels {acc:.3f}, trained in {train_secs:.0f} s), damping=None",
        ["method", "per-example gradients", "self-influence AUC (flipped)", "seconds (self)"],
        table,
    )


def warm_up() -> None:
    """torch.func loads its compiler stack on first use (seconds); keep it out of the timings."""
    warm = TensorDataset(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    for method, curvature in (("graddot", "gn"), ("arnoldi", "gn"), ("exact", "hessian")):
        config = InfluenceConfig(method=method, rank=2, curvature=curvature)
        compute_influence(nn.Linear(3, 2), warm, warm, config, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="abcd")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    warm_up()
    for part in args.parts:
        {"a": part_a, "b": part_b, "c": part_c, "d": part_d}[part]()


if __name__ == "__main__":
    main()
