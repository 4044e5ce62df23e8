"""A tiny random-init BERT sequence classifier and its word-level tokenizer, built locally (no hub
download): `tiny_bert(num_labels, words, seed)`. Shared by the text tests and the text demo."""

from __future__ import annotations

import tempfile
from pathlib import Path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4; [PAD] = 0
WORDS = (
    "the", "a", "movie", "film", "plot", "acting", "was", "is", "very", "not", "good", "bad", "great", "awful",
    "boring", "fun", "loved", "hated", "it", "and", "but", "story", "music", "ending", "slow", "fast", "funny",
    "sad", "best", "worst",
)
MAX_POSITIONS = 64  # longest sequence the model takes (max_position_embeddings)


def tiny_tokenizer(words: tuple[str, ...] = WORDS):
    """A `BertTokenizerFast` over a vocab file of SPECIAL_TOKENS then `words` (lower-cased, one id
    each, in order): [PAD] = 0, [UNK] = 1, [CLS] = 2, [SEP] = 3, [MASK] = 4, words from 5."""
    from transformers import BertTokenizerFast

    vocab = list(SPECIAL_TOKENS) + [w for w in dict.fromkeys(w.lower() for w in words) if w not in SPECIAL_TOKENS]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_text("".join(f"{token}\n" for token in vocab), encoding="utf-8")
        # model_max_length: truncation=True then stops at what the position embeddings cover.
        return BertTokenizerFast(vocab=str(path), do_lower_case=True, model_max_length=MAX_POSITIONS)


def tiny_bert(num_labels: int = 2, words: tuple[str, ...] = WORDS, seed: int = 0):
    """(model, tokenizer): a random-init `BertForSequenceClassification` (hidden 32, 2 layers, 2 heads,
    intermediate 64, `num_labels` classes, vocabulary = the tokenizer's, weights drawn with std 0.2 so
    that logits differ visibly between inputs), float32, in eval mode,
    identical for the same arguments and seed; and `tiny_tokenizer(words)`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = tiny_tokenizer(words)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,  # BERT's 0.02 gives near-equal logits for every input: too weak a test
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval(), tokenizer


def encode(tokenizer, texts: list[str], max_length: int):
    """int64 token ids [len(texts), max_length]: each text tokenised with [CLS]/[SEP], truncated and
    right-padded with the tokenizer's pad id to `max_length`."""
    return tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                     return_tensors="pt")["input_ids"]
