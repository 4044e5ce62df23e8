"""Influence at MiniLM size on one device, against one training epoch of the same model there.

    python bench/device_scale.py --device cuda            # the measurement (bench/RESULTS.md)
    .venv/bin/python bench/device_scale.py --device cpu --small   # a quick run of the script here

A random-init BERT of all-MiniLM-L6-v2's shape (6 layers, hidden 384, 12 heads, 30,522-token
vocabulary: 22.7M parameters, every one of them in the influence computation) on `--train`
random token sequences of 16..64 tokens, padded per batch, 2 classes, and `--queries` queries.
Each row is seconds on the device and its ratio to one epoch of AdamW fine-tuning (batch 32) over
the same training set, measured in the same process. Random weights cost the same as trained ones:
the timing depends on shapes only. Needs no data and no download.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from device_check import Texts  # bench/device_check.py
from torch.utils.data import DataLoader

from audit.influence import InfluenceConfig, compute_influence
from audit.influence.batches import collate


def minilm_shaped(small: bool):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if small:
        config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=80, num_labels=2)
    else:
        config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, max_position_embeddings=512, num_labels=2)
    return BertForSequenceClassification(config)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def epoch_seconds(model, data, device: str) -> float:
    """One epoch of AdamW (lr 2e-5, batch 32) over `data` on `device`, in seconds."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    loader = DataLoader(data, batch_size=32, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    sync(device)
    start = time.perf_counter()
    for inputs, labels in loader:
        inputs = {k: v.to(device) for k, v in inputs.items()}
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits, labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    model.eval()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a 2-layer toy model: checks the script, times nothing")
    parser.add_argument("--train", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=64)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"CUDA is not available here (torch {torch.__version__}).")
        return 2
    vocab = 60 if args.small else 30522
    train, queries = Texts(args.train, seed=0, vocab=vocab, lengths=(16, 65)), Texts(args.queries, seed=1, vocab=vocab,
                                                                                  lengths=(16, 65))
    model = minilm_shaped(args.small).to(args.device)
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}; {args.device} ({name}); {params / 1e6:.1f}M parameters; "
          f"{args.train} train, {args.queries} queries", flush=True)
    epoch_seconds(model, train, args.device)  # warm-up (kernels, allocator); its updates are kept, harmlessly
    epoch = epoch_seconds(model, train, args.device)
    print(f"one training epoch: {epoch:.2f} s", flush=True)
    rows = [("graddot", "queries", InfluenceConfig(method="graddot")),
            ("ekfac", "self", InfluenceConfig(method="ekfac", fisher_samples=1)),
            ("ekfac", "queries", InfluenceConfig(method="ekfac", fisher_samples=1)),
            ("arnoldi rank 32, 512 samples", "queries", InfluenceConfig(method="arnoldi", rank=32, samples=512))]
    print("\n| method | scores | seconds | x one epoch | gradients | peak GiB |\n|---|---|---|---|---|---|")
    for method, side, config in rows:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sync(args.device)
        start = time.perf_counter()
        res = compute_influence(model, train, queries if side == "queries" else None, config,
                                device=args.device, progress=False)
        sync(args.device)
        secs = time.perf_counter() - start
        if not torch.isfinite(res.scores).all():
            print(f"{method} {side}: non-finite scores")
            return 1
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
        print(f"| {method} | {side} | {secs:.2f} | {secs / epoch:.2f} | {res.gradient_path} | {peak:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
