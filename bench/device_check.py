"""Every influence method on an accelerator against the same computation on CPU, in one process.

    .venv/bin/python bench/device_check.py                 # --device cuda
    .venv/bin/python bench/device_check.py --device cpu    # dry run of the script (CPU against CPU)

Cases: the digits MLP (every method, TracIn over 3 checkpoints), the demo's SmallResNet (EK-FAC,
Arnoldi, grad-dot) and a tiny random-init BERT with padded dict batches (EK-FAC, grad-dot). For
each: influence scores [Q, N] and self-influence [N] on CPU and on `--device`, their Pearson
correlation and largest relative difference, and the seconds on each side. float32 throughout, so
agreement is expected to round-off (Pearson >= 0.9999), not bit for bit. Exit status 1 when any row
disagrees or fails; the table says which. Needs no data beyond scikit-learn's digits. The CPU side
uses every core torch is given; seconds compare the two sides of one row only.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from audit.demo.digits import load_digits_splits
from audit.demo.models import DigitsMLP, SmallResNet
from audit.influence import InfluenceConfig, compute_influence
from audit.training import TrainConfig, train

MIN_PEARSON = 0.9999


class Texts(Dataset):
    """Seeded random token sequences, lengths in [lengths[0], lengths[1]) over token ids 1..vocab-1,
    2 classes."""

    def __init__(self, n: int, seed: int, vocab: int = 60, lengths: tuple[int, int] = (3, 13)):
        g = torch.Generator().manual_seed(seed)
        self.ids = [torch.randint(1, vocab, (int(k),), generator=g) for k in torch.randint(*lengths, (n,), generator=g)]
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}, self.labels[i]


def digits_cases():
    splits = load_digits_splits(0.1, seed=0)
    x, y = splits.train.inputs, splits.train.labels
    data = TensorDataset(x, y)
    queries = TensorDataset(splits.validation.inputs[:16], splits.validation.labels[:16])
    torch.manual_seed(0)
    mlp = DigitsMLP()
    checkpoints = []
    for epoch in range(3):
        train(mlp, data, TrainConfig(epochs=2, lr=3e-3, seed=epoch))
        checkpoints.append(({k: v.clone() for k, v in mlp.state_dict().items()}, 3e-3))
    torch.manual_seed(0)
    cnn = SmallResNet()
    train(cnn, data, TrainConfig(epochs=3, seed=0))
    return (mlp, data, queries, checkpoints), (cnn, data, queries)


def bert_case():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config).eval(), Texts(96, seed=0), Texts(8, seed=1)


def compare(name, model, data, queries, config: InfluenceConfig, device: str, checkpoints=None) -> list:
    """[case, side, Pearson, max relative difference, seconds CPU, seconds device, path on device]."""
    rows = []
    sides = (("queries", queries),) if config.method == "gradcos" else (("queries", queries), ("self", None))
    for side, q in sides:  # gradcos self-influence is 1 for every example: nothing to compare
        out = []
        for where in ("cpu", device):
            m = copy.deepcopy(model).to(where)
            ckpts = None if checkpoints is None else [({k: v.to(where) for k, v in s.items()}, lr)
                                                      for s, lr in checkpoints]
            start = time.perf_counter()
            res = compute_influence(m, data, q, config, device=where, progress=False, checkpoints=ckpts)
            if where != "cpu" and torch.cuda.is_available():
                torch.cuda.synchronize()
            out.append((res.scores.double().cpu().numpy().ravel(), time.perf_counter() - start, res.gradient_path))
        (a, cpu_secs, _), (b, device_secs, path) = out
        pearson = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 else float("nan")
        rel = float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
        rows.append([name, side, pearson, rel, cpu_secs, device_secs, path])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"CUDA is not available here (torch {torch.__version__}); run with --device cpu for a dry run.")
        return 2
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}; device {args.device} ({device_name})", flush=True)
    (mlp, data, queries, checkpoints), (cnn, cnn_data, cnn_queries) = digits_cases()
    bert, texts, text_queries = bert_case()
    cases = [(f"MLP {m}", mlp, data, queries, InfluenceConfig(method=m, rank=32), None)
             for m in ("exact", "ekfac", "kfac", "arnoldi", "graddot", "gradcos")]
    cases += [("MLP tracin", mlp, data, queries, InfluenceConfig(method="tracin"), checkpoints)]
    cases += [(f"SmallResNet {m}", cnn, cnn_data, cnn_queries, InfluenceConfig(method=m, rank=16, samples=200), None)
              for m in ("ekfac", "arnoldi", "graddot")]
    cases += [(f"BERT {m}", bert, texts, text_queries, InfluenceConfig(method=m), None) for m in ("ekfac", "graddot")]
    rows, bad = [], []
    for name, model, d, q, config, ckpts in cases:
        print(name, flush=True)
        try:
            for row in compare(name, model, d, q, config, args.device, ckpts):
                rows.append(row)
                if not row[2] >= MIN_PEARSON:
                    bad.append(f"{name} {row[1]}: Pearson {row[2]:.6f}")
        except Exception as exc:  # noqa: BLE001 - one failing method is a row, not the end of the check
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            rows.append([name, "failed", float("nan"), float("nan"), float("nan"), float("nan"), msg])
            bad.append(f"{name}: {msg}")
    print(f"\n| case | scores | Pearson CPU vs {args.device} | max rel. diff | s CPU | s {args.device} | gradients |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.6f} | {r[3]:.2e} | {r[4]:.3f} | {r[5]:.3f} | {r[6]} |")
    print("\nall rows agree" if not bad else "\nDISAGREE: " + "; ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
