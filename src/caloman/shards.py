"""Sharded generation: which showers part I of N generates, and joining the parts.

Generation samples in chunks of ``batch_size`` showers, chunk ``k`` with its own
seed derived from (seed, k) (:mod:`caloman.generation`). A shard is a contiguous
run of whole chunks, so part I of N draws exactly the noise the unsharded run
would draw for those showers: the parts are independent jobs, and
:func:`merge_shards` joins them into the file one unsharded
``caloman generate`` with the same seed and batch size writes.

Each part carries its place in HDF5 attributes (``shard_index`` counting from 1,
``shard_count``, ``shard_start``/``shard_stop`` rows, ``total_showers``) and what
must agree between parts (seed, batch size, run, binning, the SHA-256 of all
incident energies); :func:`merge_shards` checks them all before it writes.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caloman.errors import ConfigError, ShardError
from caloman.io import ShowerFile, ShowerWriter, default_chunk_size

#: attributes every part of one sharded generation must share
SHARED_ATTRS = ("total_showers", "shard_count", "seed", "batch_size", "energies_sha256", "run_dir", "model_kind",
                "binning")
#: attributes that describe one part only (dropped from the merged file)
PART_ATTRS = ("shard_index", "shard_start", "shard_stop")


@dataclass(frozen=True)
class Shard:
    """Part ``index`` (1..count) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 1 <= self.index <= self.count:
            raise ConfigError(f"shard {self.index}/{self.count}: need 1 <= I <= N (parts count from 1)")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``'2/4'`` -> Shard(2, 4)."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise ConfigError(f"cannot read shard {text!r}: write I/N, e.g. 2/4 for the second of four parts")
        return cls(int(m.group(1)), int(m.group(2)))

    def chunk_range(self, n_showers: int, batch_size: int) -> tuple[int, int, int]:
        """(first chunk index, first row, end row) of this part of ``n_showers`` generated in
        chunks of ``batch_size``: the chunks are split as evenly as whole chunks allow.

        Raises :class:`ConfigError` when there are fewer chunks than parts."""
        n_chunks = math.ceil(n_showers / batch_size)
        if n_chunks < self.count:
            raise ConfigError(f"{n_showers} showers make {n_chunks} chunk(s) of {batch_size}, fewer than {self.count} "
                              f"shards; pass --batch-size {max(1, n_showers // self.count)} or less, or use fewer "
                              "shards")
        first = (self.index - 1) * n_chunks // self.count
        end = self.index * n_chunks // self.count
        return first, first * batch_size, min(end * batch_size, n_showers)


def energies_digest(incident_energies: np.ndarray) -> str:
    """SHA-256 of incident energies (N,) as the float32 values a shower file stores."""
    return hashlib.sha256(np.ascontiguousarray(incident_energies, dtype=np.float32).reshape(-1).tobytes()).hexdigest()


def shard_attrs(shard: Shard, incident_energies: np.ndarray, start: int, stop: int) -> dict[str, str | int]:
    """The HDF5 attributes that place a part among its siblings."""
    return {"shard_index": shard.index, "shard_count": shard.count, "shard_start": start, "shard_stop": stop,
            "total_showers": len(incident_energies), "energies_sha256": energies_digest(incident_energies)}


@dataclass(frozen=True)
class _Part:
    path: Path
    attrs: dict[str, object]
    n_showers: int
    n_voxels: int
    weighted: bool


def _read_part(path: Path) -> _Part:
    with ShowerFile(path, check_values=False) as f:
        part = _Part(path, f.attrs, f.n_showers, f.n_voxels, f.has_weights)
    missing = [k for k in (*SHARED_ATTRS[:5], *PART_ATTRS) if k not in part.attrs]
    if missing:
        raise ShardError(f"{path} is not a part of a sharded generation (no {', '.join(missing)} attribute); "
                         "merge the files written by `caloman generate ... --shard I/N`")
    return part


def check_parts(paths: list[str | Path]) -> list[_Part]:
    """Read and check the parts; returns them in shard order.

    Raises :class:`ShardError` when a file is given twice, parts come from different
    generations (seed, batch size, run, binning, incident energies, voxel count,
    weights), an index appears twice or is missing, or a part's rows do not match
    its place."""
    resolved = [Path(p).resolve() for p in paths]
    twice = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if twice:
        raise ShardError(f"{', '.join(twice)} given more than once; name each part once")
    if not paths:
        raise ShardError("no parts given: name the files of every shard")
    parts = [_read_part(Path(p)) for p in paths]
    first = parts[0]
    for part in parts[1:]:
        for key in (*SHARED_ATTRS, "n_voxels", "weighted"):
            mine = part.attrs.get(key) if key in SHARED_ATTRS else getattr(part, key)
            theirs = first.attrs.get(key) if key in SHARED_ATTRS else getattr(first, key)
            if mine != theirs:
                raise ShardError(f"{part.path} and {first.path} come from different generations ({key} {mine!r} vs "
                                 f"{theirs!r}); merge parts of one `caloman generate --shard` command only")
    by_index: dict[int, _Part] = {}
    for part in parts:
        index = int(part.attrs["shard_index"])
        if index in by_index:
            raise ShardError(f"{part.path} and {by_index[index].path} are both shard "
                             f"{index}/{part.attrs['shard_count']}; keep one of them")
        by_index[index] = part
    count = int(first.attrs["shard_count"])
    missing = sorted(set(range(1, count + 1)) - set(by_index))
    if missing:
        raise ShardError(f"shard(s) {', '.join(map(str, missing))} of {count} missing; generate them with --shard "
                         f"I/{count} and merge all {count} parts")
    ordered = [by_index[i] for i in range(1, count + 1)]
    row = 0
    for part in ordered:
        start, stop = int(part.attrs["shard_start"]), int(part.attrs["shard_stop"])
        if start != row or stop - start != part.n_showers:
            raise ShardError(f"{part.path}: shard {part.attrs['shard_index']} should hold rows {row}.. and holds "
                             f"{part.n_showers} showers labelled {start}..{stop}; the file is damaged, generate it "
                             "again")
        row = stop
    if row != int(first.attrs["total_showers"]):
        raise ShardError(f"the parts hold {row} showers, the generation had {first.attrs['total_showers']}; "
                         "generate the parts again")
    return ordered


def merge_shards(paths: list[str | Path], out_path: str | Path) -> Path:
    """Join the parts of a sharded generation into one CaloChallenge file at
    ``out_path`` (written atomically), in shard order, streaming chunk by chunk;
    a ``weights`` dataset is carried when the parts have one. The merged incident
    energies are checked against the digest the parts recorded."""
    out = Path(out_path).resolve()
    if any(Path(p).resolve() == out for p in paths):
        raise ShardError(f"{out_path} is one of the parts; write the merged file elsewhere")
    parts = check_parts(paths)
    first = parts[0]
    attrs = {k: v for k, v in first.attrs.items() if k not in PART_ATTRS and k != "shard_count"}
    attrs["merged_shards"] = len(parts)
    digest = hashlib.sha256()
    with ShowerWriter(out_path, first.n_voxels, attrs=attrs, weights=first.weighted) as writer:
        for part in parts:
            with ShowerFile(part.path, check_values=False) as f:
                weights = f.read_weights()
                size = default_chunk_size(f.n_voxels)
                for start in range(0, f.n_showers, size):
                    energies, showers = f.read(start, start + size)
                    digest.update(np.ascontiguousarray(energies, dtype=np.float32).tobytes())
                    writer.append(energies, showers, None if weights is None else weights[start:start + size])
        if digest.hexdigest() != first.attrs["energies_sha256"]:
            raise ShardError("the parts' incident energies differ from those the generation recorded "
                             f"({first.attrs['energies_sha256'][:12]}...): a part is damaged; generate it again")
    return Path(out_path)
