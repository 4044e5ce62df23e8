"""On-disk cache of fitted curvatures, content-addressed by model parameters, training data and
the options the curvature depends on (damping is applied later, so one entry serves all dampings).

A file `curvature-<method>-<digest>.pt` holds the full key next to the tensors; an entry whose
stored key differs is ignored and rewritten, never mixed with other results. Beside it,
`<file>.sha256` holds the SHA-256 of its bytes: an entry whose bytes do not match (a torn copy, a
corrupted disk, an edited file) is deleted and recomputed, never unpickled.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.utils.data import Dataset

from audit.influence.context import Context


def hash_tensor(h: hashlib._Hash, t: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes into the hash `h`."""
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def data_digest(data: Dataset, progress: bool = False) -> str:
    """SHA-256 of every item's inputs (tensor or dict of tensors) and label, in order."""
    from tqdm.auto import tqdm

    h = hashlib.sha256()
    size = len(data)  # type: ignore[arg-type]
    for i in tqdm(range(size), desc="cache: data digest", disable=not progress, leave=False):
        x, y = data[i]
        if isinstance(x, Mapping):
            for k in sorted(x):
                h.update(k.encode())
                hash_tensor(h, torch.as_tensor(x[k]))
        else:
            hash_tensor(h, torch.as_tensor(x))
        h.update(str(int(y)).encode())
    return h.hexdigest()


def hash_model(h: hashlib._Hash, ctx: Context) -> None:
    """Feed the selected parameter layout and every parameter and buffer of `ctx` into `h`."""
    h.update(repr([(n, tuple(s)) for n, s in zip(ctx.space.names, ctx.space.shapes, strict=True)]).encode())
    for name, t in sorted({**ctx.grads.frozen, **ctx.grads.selected}.items()):
        h.update(name.encode())
        hash_tensor(h, t)


def curvature_key(ctx: Context, data: Dataset) -> str:
    """Key of a fitted curvature: options, selected parameter layout, model state, data."""
    h = hashlib.sha256()
    h.update(ctx.config.curvature_key().encode())
    hash_model(h, ctx)
    h.update(data_digest(data, ctx.progress).encode())
    return h.hexdigest()


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def load(cache_dir: str | os.PathLike, method: str, key: str) -> dict | None:
    """The cached curvature state for `key`, or None when there is none, it was made for another
    key, or its bytes fail their checksum (then the entry is deleted so it gets recomputed)."""
    path = Path(cache_dir) / f"curvature-{method}-{key[:24]}.pt"
    if not path.exists():
        return None
    checksum = _checksum_path(path)
    expected = checksum.read_text().strip() if checksum.exists() else None
    if expected != hashlib.sha256(path.read_bytes()).hexdigest():
        logging.getLogger(__name__).warning("influence cache entry %s is damaged; recomputing it", path.name)
        path.unlink(missing_ok=True)
        checksum.unlink(missing_ok=True)
        return None
    entry = torch.load(path, map_location="cpu", weights_only=True)
    return entry["state"] if entry.get("key") == key else None


def save(cache_dir: str | os.PathLike, method: str, key: str, state: dict) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a half-written entry."""
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"curvature-{method}-{key[:24]}.pt"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"key": key, "state": _to_cpu(state)}, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    # the checksum goes last: an entry without a matching one is never trusted
    _checksum_path(path).unlink(missing_ok=True)
    os.replace(tmp, path)
    checksum_tmp = _checksum_path(tmp)
    checksum_tmp.write_text(digest + "\n")
    os.replace(checksum_tmp, _checksum_path(path))
    return path
