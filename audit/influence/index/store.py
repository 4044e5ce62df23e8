"""The index on disk: one folder per model state and configuration, shards shared by every
training set that contains them.

    <root>/<key>/index.json                 model key, config, layers, columns per layer
    <root>/<key>/projections.safetensors    the random projections
    <root>/<key>/shards/<digest>.npy        projected loss gradients [rows, D] of one shard
    <root>/<key>/shards/<digest>.safetensors  its curvature sums per layer, row count, file SHA-256
    <root>/<key>/data-<digest>.json         one training set: its shards in order, rows in total

A shard is named by the digest of its examples (inputs and labels), so a training set that grows
by appending rows reuses every full shard it shares with the old one. Every file is written to a
temporary name and renamed into place, data before the file that points to it: a crash leaves
no half-written file that a reader would trust, only an unreferenced one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from audit.errors import IntegrityError
from audit.influence.curvature.kfac import Layer
from audit.influence.index.projection import LayerProjection
from audit.influence.index.sums import KroneckerSums, ShardSums


def _replace(tmp: Path, path: Path) -> Path:
    os.replace(tmp, path)
    return path


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_json(path: Path, payload: dict) -> Path:
    tmp = _tmp(path)
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    return _replace(tmp, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ShardMeta:
    """A stored shard: content digest, row count, SHA-256 of its gradient file."""

    digest: str
    rows: int
    sha256: str


class IndexFolder:
    """One index folder (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.shards = self.folder / "shards"

    def exists(self) -> bool:
        return (self.folder / "index.json").exists()

    def create(self, header: dict, projections: list[LayerProjection]) -> None:
        """Write the header and projections once (a concurrent builder writes the same bytes)."""
        self.shards.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, p in enumerate(projections):
            if p.p_out is not None:
                tensors[f"{i}.p_out"] = p.p_out.contiguous()
            if p.p_in is not None:
                tensors[f"{i}.p_in"] = p.p_in.contiguous()
        path = self.folder / "projections.safetensors"
        tmp = _tmp(path)
        save_file(tensors, str(tmp))
        _replace(tmp, path)
        write_json(self.folder / "index.json", header)  # last: its presence means the rest is there

    def header(self) -> dict:
        return json.loads((self.folder / "index.json").read_text())

    def projections(self) -> list[LayerProjection]:
        tensors = load_file(str(self.folder / "projections.safetensors"))
        layers = [Layer(**d) for d in self.header()["layers"]]
        return [LayerProjection(layer, tensors.get(f"{i}.p_out"), tensors.get(f"{i}.p_in")) for i, layer in
                enumerate(layers)]

    def shard_path(self, digest: str) -> Path:
        return self.shards / f"{digest}.npy"

    def shard_meta(self, digest: str) -> tuple[ShardMeta, ShardSums] | None:
        """The stored shard `digest` with its curvature sums, or None when it is not (fully) there."""
        meta_path = self.shards / f"{digest}.safetensors"
        if not meta_path.exists() or not self.shard_path(digest).exists():
            return None
        tensors = load_file(str(meta_path))
        info = json.loads(bytes(tensors.pop("info").tolist()).decode())
        layers = len(info["positions"])
        sums = ShardSums([tensors[f"sum.{i}"] for i in range(layers)],
                         [KroneckerSums(tensors[f"a.{i}"], float(info["positions"][i]), tensors[f"s.{i}"])
                          for i in range(layers)])
        return ShardMeta(digest, int(info["rows"]), info["sha256"]), sums

    def write_shard(self, digest: str, rows: np.ndarray, sums: ShardSums) -> ShardMeta:
        """Store one shard's gradients [rows, D] and curvature sums; the gradients first, then the
        metadata that vouches for them (with their SHA-256)."""
        path = self.shard_path(digest)
        tmp = _tmp(path)
        with tmp.open("wb") as f:
            np.save(f, rows)
        sha = file_sha256(tmp)
        _replace(tmp, path)
        info = json.dumps({"rows": int(rows.shape[0]), "sha256": sha,
                           "positions": [f.positions for f in sums.factors]}).encode()
        tensors = {f"sum.{i}": s.contiguous() for i, s in enumerate(sums.blocks)}
        tensors.update({f"a.{i}": f.inputs.contiguous() for i, f in enumerate(sums.factors)})
        tensors.update({f"s.{i}": f.outputs.contiguous() for i, f in enumerate(sums.factors)})
        tensors["info"] = torch.tensor(list(info), dtype=torch.uint8)
        meta_path = self.shards / f"{digest}.safetensors"
        meta_tmp = _tmp(meta_path)
        save_file(tensors, str(meta_tmp))
        _replace(meta_tmp, meta_path)
        return ShardMeta(digest, int(rows.shape[0]), sha)

    def data_path(self, data_digest: str) -> Path:
        return self.folder / f"data-{data_digest}.json"

    def write_data(self, data_digest: str, shards: list[ShardMeta]) -> None:
        write_json(self.data_path(data_digest), {
            "n": sum(s.rows for s in shards),
            "shards": [{"digest": s.digest, "rows": s.rows, "sha256": s.sha256} for s in shards],
        })

    def read_data(self, data_digest: str) -> list[ShardMeta] | None:
        path = self.data_path(data_digest)
        if not path.exists():
            return None
        return [ShardMeta(s["digest"], int(s["rows"]), s["sha256"]) for s in json.loads(path.read_text())["shards"]]

    def open_rows(self, shard: ShardMeta, verify: bool) -> np.ndarray:
        """The shard's gradients, memory-mapped [rows, D]; IntegrityError when the file is not the
        one recorded (`verify`: by SHA-256, else by row count)."""
        path = self.shard_path(shard.digest)
        if verify and file_sha256(path) != shard.sha256:
            raise IntegrityError(f"Gradient index shard {path} does not match its recorded checksum; delete "
                                 f"{self.folder} to rebuild the index.")
        rows = np.load(path, mmap_mode="r")
        if rows.shape[0] != shard.rows:
            raise IntegrityError(f"Gradient index shard {path} holds {rows.shape[0]} rows, not the {shard.rows} "
                                 f"recorded; delete {self.folder} to rebuild the index.")
        return rows
