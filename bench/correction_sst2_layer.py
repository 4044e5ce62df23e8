"""bench/correction_sst2.py with the LAST MiniLM encoder layer trainable (plus the linear head).

    OMP_NUM_THREADS=1 .venv/bin/python bench/correction_sst2_layer.py --seeds 0 --timing-only
    OMP_NUM_THREADS=1 .venv/bin/python bench/correction_sst2_layer.py --seeds 0 --write /tmp/layer.md

Same data, noise, seeds, flagged sampling, rows and reporting as bench/correction_sst2.py; only the
model differs. The output of encoder layer 5 of 6 (= the input of the last BertLayer) is cached
once per token (`--cache`, /tmp/model-audit-bench/sst2-minilm-layer5-<hash>-<T>.pt), truncated and
right-padded to `--max-len` tokens. The correction library only holds tensor inputs, so each
example is one tensor x [T, 385]: the 384-d hidden states with the attention mask as channel 385.
`LastLayerClassifier` = a copy of the pretrained encoder.layer[5] (re-implemented over the same
Linear / LayerNorm modules, with an explicit additive attention bias so torch.func.vmap runs it;
no dropout), mean pooling over the mask, L2 normalisation, Linear(384, 2). Outside vmap the
forward drops padding it does not need (length-sorted chunks, trailing padding trimmed): the
results are the same, it only saves CPU time. Every parameter (1.78M) is trained and repaired.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch
from baselines import repair_random
from correction import (  # bench/correction.py
    candidate_precision,
    describe,
    emit,
    horizon_sections,
    markdown,
    run_per_query,
    strategy_rows,
)
from correction_sst2 import (  # bench/correction_sst2.py
    aggregate,
    build_case,
    encoder_path,
    finish,
    sentence_embedding,
    spec,
    split_frames,
)
from torch import nn

from audit.correction import PER_QUERY_CONFIG, CorrectionConfig, repair_per_query
from audit.correction.batch import repair_rounds
from audit.influence import influence_scores
from audit.influence.gradients import additive_mask

HIDDEN = 384


@torch.no_grad()
def encode_layer_input(sentences: list[str], max_len: int, batch_size: int = 64):
    """(hidden [N, T, 384] at the input of the last BertLayer, mask [N, T], pooled [N, 384] of the
    full pretrained model, for checks), T = max_len, right-padded with zeros."""
    from transformers import AutoModel, AutoTokenizer

    path = encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    order = np.argsort([len(s) for s in sentences])
    hidden = torch.zeros(len(sentences), max_len, HIDDEN)
    mask = torch.zeros(len(sentences), max_len)
    pooled = torch.empty(len(sentences), HIDDEN)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=max_len,
                          return_tensors="pt")
        out = model(**batch, output_hidden_states=True)
        t = batch["input_ids"].shape[1]
        rows = torch.as_tensor(idx)
        hidden[rows, :t] = out.hidden_states[-2]  # input of encoder.layer[5]
        m = batch["attention_mask"].to(hidden.dtype)
        mask[rows, :t] = m
        pooled[rows] = sentence_embedding(out.last_hidden_state, m)
    return hidden, mask, pooled


def token_inputs(cache: str, max_len: int) -> dict[str, tuple[tuple[str, ...], torch.Tensor, torch.Tensor]]:
    """{'train' | 'dev' | 'test': (ids, x [N, T, 385], labels [N])}, cached by content; also
    'pooled': {split: the full model's sentence embeddings} for the equivalence check."""
    frames, digest = split_frames()
    path = os.path.join(cache, f"sst2-minilm-layer5-{digest}-{max_len}.pt")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        stored = {}
        for name, frame in frames.items():
            start = time.perf_counter()
            hidden, mask, pooled = encode_layer_input(frame["sentence"].tolist(), max_len)
            stored[name] = {"ids": tuple(f"sst2-{name}-{i:05d}" for i in frame.index), "hidden": hidden.half(),
                            "mask": mask.bool(), "pooled": pooled,
                            "labels": torch.tensor(frame["label"].to_numpy(np.int64))}
            print(f"# encoded {name}: {len(frame)} sentences in {time.perf_counter() - start:.0f}s", flush=True)
        torch.save(stored, path)
    stored = torch.load(path)
    out = {"pooled": {}}
    for name, s in stored.items():
        x = torch.cat([s["hidden"].float(), s["mask"].float()[..., None]], dim=-1)  # [N, T, 385]
        out[name] = (s["ids"], x, s["labels"])
        out["pooled"][name] = s["pooled"]
    return out


def _is_batched(x: torch.Tensor) -> bool:
    """True under torch.func transforms (vmap): no data-dependent shapes allowed there."""
    return torch._C._functorch.is_batchedtensor(x) or torch._C._functorch.is_functorch_wrapped_tensor(x)


class LastLayerClassifier(nn.Module):
    """encoder.layer[5] of all-MiniLM-L6-v2 + mean pooling + L2 normalisation + Linear(384, 2),
    on x [B, T, 385] (hidden states of layer 5's input, last channel = attention mask)."""

    def __init__(self, layer: nn.Module | None = None, heads: int = 12, chunk: int = 64):
        super().__init__()
        if layer is None:
            from transformers import AutoModel

            layer = AutoModel.from_pretrained(encoder_path(), local_files_only=True).encoder.layer[5]
        layer = copy.deepcopy(layer)
        self.heads, self.chunk = heads, chunk
        self.query, self.key, self.value = (layer.attention.self.query, layer.attention.self.key,
                                            layer.attention.self.value)
        self.attn_out, self.attn_norm = layer.attention.output.dense, layer.attention.output.LayerNorm
        self.ffn_in, self.ffn_out, self.ffn_norm = layer.intermediate.dense, layer.output.dense, layer.output.LayerNorm
        self.head = nn.Linear(HIDDEN, 2)

    def encode(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised sentence embeddings [B, 384] from h [B, T, 384], m [B, T]."""
        b, t, _ = h.shape
        d = HIDDEN // self.heads
        def split(z: torch.Tensor) -> torch.Tensor:  # [B, T, 384] -> [B, H, T, d]
            return z.reshape(b, t, self.heads, d).transpose(1, 2)

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + additive_mask(m, h.dtype), dim=-1)
        ctx = (attn @ v).transpose(1, 2).reshape(b, t, HIDDEN)
        a = self.attn_norm(self.attn_out(ctx) + h)
        y = self.ffn_norm(self.ffn_out(nn.functional.gelu(self.ffn_in(a))) + a)  # [B, T, 384]
        return sentence_embedding(y, m)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h, m = x[..., :HIDDEN], x[..., HIDDEN]
        if _is_batched(x) or len(x) == 0:
            return self.encode(h, m)
        # same numbers, less padding: length-sorted chunks, each trimmed to its longest sentence
        lengths = m.sum(1)
        order = torch.argsort(lengths)
        parts = []
        for start in range(0, len(x), self.chunk):
            idx = order[start : start + self.chunk]
            t = max(int(lengths[idx].max()), 1)
            parts.append(self.encode(h[idx, :t], m[idx, :t]))
        out = torch.cat(parts)
        return out[torch.argsort(order)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def check_equivalence(data: dict, n: int = 24) -> tuple[float, float]:
    """Max |pooled embedding of LastLayerClassifier - the full pretrained model's| over the first
    n sentences of every split, in and out of vmap: (on float32 layer-5 states computed afresh,
    on the float16 cache the benchmark uses)."""
    frames, _ = split_frames()
    model = LastLayerClassifier().eval()
    fresh = cached = 0.0
    with torch.no_grad():
        for name in ("train", "dev", "test"):
            hidden, mask, want = encode_layer_input(frames[name]["sentence"].tolist()[:n], data[name][1].shape[1])
            for x, which in ((torch.cat([hidden, mask[..., None]], -1), "fresh"), (data[name][1][:n], "cached")):
                got = max(float((model.embed(x) - want).abs().max()),
                          float((torch.func.vmap(lambda e: model.embed(e[None])[0])(x) - want).abs().max()))
                if which == "fresh":
                    fresh = max(fresh, got)
                else:
                    cached = max(cached, got)
    return fresh, cached


def time_influence(case, methods: list[str], param_filter=None) -> list[str]:
    lines = []
    for method in methods:
        start = time.perf_counter()
        try:
            influence_scores(case.model, case.splits.train.dataset(), case.flagged.dataset(), method=method,
                             progress=False, param_filter=param_filter)
            lines.append(f"influence_scores {method} (params {param_filter or 'all'}), {len(case.splits.train)} "
                         f"train x {len(case.flagged)} queries: {time.perf_counter() - start:.0f}s")
        except Exception as exc:  # noqa: BLE001 - report, do not stop the benchmark
            lines.append(f"influence_scores {method}: failed after {time.perf_counter() - start:.0f}s: {exc}")
        print("# " + lines[-1], flush=True)
    return lines


def fixed_scorer(scores: torch.Tensor):
    """A scorer that returns the input model's scores [1, N] again (no re-scoring between rounds)."""
    return lambda model, train, queries: scores


def per_query_rows(case, method: str, config: CorrectionConfig, strategies, no_baselines: bool,
                   rescore: bool) -> list[dict]:
    """Per-query rows like bench/correction.py's; with rescore=False every round reuses the input
    model's scores (`repair_rounds` with `fixed_scorer`), since re-scoring one query costs a full
    pass of per-example gradients over the 5,000 training examples here."""
    rows = []
    for strategy in strategies:
        cfg = dataclasses.replace(config, strategy=strategy)
        label = describe(cfg, method, per_query=True) + ("" if rescore else " scores fixed")
        def fn(c, cfg=cfg):
            if rescore:
                return repair_per_query(c.model, c.splits.train, c.flagged, cfg, c.scores[method])
            return [repair_rounds(c.model, c.splits.train, c.flagged.subset([q]), cfg, c.scores[method][q : q + 1],
                                  fixed_scorer(c.scores[method][q : q + 1]), frozenset(c.flagged.ids))
                    for q in range(len(c.flagged))]
        rows.append(run_per_query([case], label, fn))
        print(rows[-1], flush=True)
        if not no_baselines:
            rows.append(run_per_query([case], f"random baseline ({strategy})", lambda c, cfg=cfg: repair_random(
                c.model, c.splits.train, c.flagged, cfg, per_query=True)))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=["graddot"])
    parser.add_argument("--flagged", type=int, default=30)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--batch", nargs="*", default=None,
                        help="batch configs (dicts over CorrectionConfig()); default: the library default and "
                             "the SST-2 tuned one; each gets random baselines")
    parser.add_argument("--per-query", nargs="*", default=[],
                        help="per-query configs (dicts over PER_QUERY_CONFIG), run on the first --pq-flagged")
    parser.add_argument("--pq-flagged", type=int, default=10, help="flagged per seed for the per-query rows")
    parser.add_argument("--pq-strategies", nargs="+", default=["reinforce"])
    parser.add_argument("--pq-rescore", action="store_true",
                        help="re-score every round as repair_per_query does (slow); default: scores fixed")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--no-upper-bound", action="store_true")
    parser.add_argument("--timing", nargs="*", default=[], help="influence methods to time once on the first seed")
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--horizon", action="store_true")
    parser.add_argument("--horizon-lrs", default="(('sgd', 0.1), ('adam', 0.0001))")
    parser.add_argument("--cache", default="/tmp/model-audit-bench")
    parser.add_argument("--write", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    data = token_inputs(args.cache, args.max_len)
    fresh, cached = check_equivalence(data)
    sections = [(f"Equivalence (72 sentences, eager and vmap): max |pooled embedding - pretrained model's| = "
                 f"{fresh:.1e} on float32 layer-5 states, {cached:.1e} on the float16 cache.")]
    print("# " + sections[-1], flush=True)

    cases = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        name = f"sst2-layer-{seed}-e{args.epochs}-lr{args.train_lr}-wd{args.weight_decay}-T{args.max_len}.pt"
        cases.append(build_case(seed, data, args, LastLayerClassifier, os.path.join(args.cache, name)))
        print(f"# seed {seed}: trained + scored in {time.perf_counter() - t0:.0f}s", flush=True)
        if seed == args.seeds[0] and args.timing:
            sections += time_influence(cases[0], args.timing)
    if args.timing_only:
        emit(sections, args.write)
        return
    counts = ", ".join(f"{c.seed}:{len(c.flagged)}" for c in cases)
    total = sum(len(c.flagged) for c in cases)
    sections.append(f"Seeds {args.seeds}; flagged per seed {counts} (total {total}); last layer + linear head, "
                    f"{args.epochs} epochs AdamW lr {args.train_lr} wd {args.weight_decay}; max {args.max_len} tokens.")

    batch_specs = args.batch if args.batch is not None else ["{}", "{'lr': 0.003, 'replay_size': 5000}"]
    for method in args.methods:
        rows = []
        for b, text in enumerate(batch_specs):
            base = dataclasses.replace(CorrectionConfig(), **spec(text))
            configs = [base] + [dataclasses.replace(base, strategy=s) for s in ("reinforce", "unlearn")]
            for case in cases:
                results = strategy_rows([case], method, base, PER_QUERY_CONFIG,
                                        extra_batch=configs if args.no_baselines else (),
                                        only_extra=args.no_baselines, upper_bound=not args.no_upper_bound,
                                        modes=("batch",), suffix=f" {{{text.strip('{}')}}}" if b else "")
                rows += [{**r, "seed": case.seed, "order": (b, i)} for i, r in enumerate(results)]
        for p, text in enumerate(args.per_query):
            base = dataclasses.replace(PER_QUERY_CONFIG, method=method, **spec(text))
            for case in cases:
                n = min(args.pq_flagged, len(case.flagged))
                sub = dataclasses.replace(case, flagged=case.flagged.subset(list(range(n))),
                                          scores={m: s[:n] for m, s in case.scores.items()})
                results = per_query_rows(sub, method, base, args.pq_strategies, args.no_baselines, args.pq_rescore)
                rows += [{**r, "seed": case.seed, "order": ("pq", p, i)} for i, r in enumerate(results)]
        if rows:
            sections += [f"Influence method {method}:", markdown(aggregate(rows))]
        cands = pd.DataFrame([candidate_precision(cases, method, k) for k in (1, 3, 10)])
        sections += ["Correction candidates (propose_corrections relabel rows):", markdown(cands)]
        if args.horizon:
            sections += horizon_sections(cases, method, ast.literal_eval(args.horizon_lrs))
    finish(sections, start, args.write)


if __name__ == "__main__":
    main()
