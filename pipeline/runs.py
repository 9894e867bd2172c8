"""The run directory: everything a run keeps so that a rerun resumes instead of starting over.

Layout inside ``OUTPUT`` (any fsspec path)::

    00000.tar  00000.parquet  00000_stats.json      # final shards (stats is written last)
    sizes.json  manifest.json  report.html          # written at the end of the run
    _clipcurate/
        config.json                   # resolved config + hash; a different config is refused
        input/00000.parquet ...       # the input list split into shards (text only)
        input/_plan.json              # shard row counts and key digits (written last)
        input/_fingerprint.json       # size and version of each input file; a changed input is refused
        state/03_balance.json         # fitted state of each global stage (written once)
        spill/03/00000.parquet ...    # rows entering global stage 3 (deleted after success)

Every file is written under a temporary name in the same folder and renamed when complete,
so a reader never sees a partial file and a killed run leaves only ``*.tmp-*`` files, which
the next run removes.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ConfigError, Pipeline
from schemas.manifest import (
    MANIFEST_NAME,
    SIZES_NAME,
    STATE_DIR,
    STATS_SUFFIX,
    shard_complete,
    shard_name,
    shard_of,
)
from stages.io import TMP_MARK, atomic_write_bytes, is_local, url_of


class OutputInUse(ConfigError):
    pass


class InputChanged(ConfigError):
    """The input files differ from those the run in the output split (size, version, list)."""


def _join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts)


@dataclass
class InputPlan:
    counts: list[int]
    shard_digits: int
    index_digits: int
    name_digits: int

    @property
    def n_shards(self) -> int:
        return len(self.counts)

    def name(self, shard: int) -> str:
        return shard_name(shard, self.name_digits)


class RunDir:
    def __init__(self, output: str):
        self.url = output
        # No listings cache: Ray workers write shards, spills and stats behind this process's back,
        # so a cached listing of an object store (s3fs, gcsfs) would hide them.
        self.fs, self.root = fsspec.core.url_to_fs(output, use_listings_cache=False)
        self.root = self.root.rstrip("/") or "/"
        self.state_root = _join(self.root, STATE_DIR)

    # ---- generic atomic I/O -------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return _join(self.root, *parts)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        atomic_write_bytes(self.fs, path, data)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=1, sort_keys=False, default=str).encode())

    def read_json(self, path: str) -> Any:
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    def write_parquet(self, path: str, table: pa.Table) -> int:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        self.write_bytes(path, data)
        return len(data)

    def read_parquet(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)

    def url_of(self, path: str) -> str:
        return url_of(self.fs, path)

    # ---- lifecycle ----------------------------------------------------------------------------
    def check(self, pipe: Pipeline, overwrite: bool = False, fingerprint: list[dict] | None = None) -> bool:
        """The read-only half of ``prepare`` (``clipcurate run`` calls it before Ray starts). Returns
        True when the output holds a run of this config to resume.

        A non-empty output made by a different config (or not by clipcurate) is refused unless
        ``overwrite``; so is a run whose input files changed since it split them (``fingerprint``:
        the input's, from ``source_fingerprint``; computed here when not given and needed)."""
        cfg_path = _join(self.state_root, "config.json")
        h = pipe.config_hash()
        existing = self.fs.ls(self.root, detail=False) if self.fs.exists(self.root) else []
        if not existing or overwrite:
            return False
        if not self.fs.exists(cfg_path):
            raise OutputInUse(
                f"{pipe.source}: output {self.url} is not empty and was not written by clipcurate; "
                f"use another --output, or --overwrite to replace it"
            )
        old = self.read_json(cfg_path)
        if old.get("config_hash") != h:
            raise OutputInUse(
                f"{pipe.source}: output {self.url} holds a run of a different config "
                f"(hash {old.get('config_hash')}, this config is {h}); "
                f"use another --output, or --overwrite to replace it"
            )
        fp_path = self.fingerprint_path()
        if self.fs.exists(_join(self.state_root, "input", "_plan.json")) and self.fs.exists(fp_path):
            if fingerprint is None:
                fingerprint = source_fingerprint(pipe.build(0))
            change = describe_change(self.read_json(fp_path).get("files", []), fingerprint)
            if change:
                spec = pipe.stages[0]
                raise InputChanged(
                    f"{pipe.source}: stages[{spec.index}] ({spec.name}): key 'path': the input changed since "
                    f"the run in {self.url} started ({change}); use --overwrite to start over, or another --output"
                )
        return True

    def prepare(self, pipe: Pipeline, overwrite: bool = False, fingerprint: list[dict] | None = None) -> bool:
        """Check the output against the config (``check``; ``fingerprint`` as there), then make it ready.
        Returns True when resuming a previous run. With ``overwrite``, its shards and run state are
        deleted first."""
        resuming = self.check(pipe, overwrite, fingerprint=fingerprint)
        if overwrite and self.fs.exists(self.root) and self.fs.ls(self.root, detail=False):
            self.clear()
        self.fs.makedirs(self.state_root, exist_ok=True)
        if not resuming:
            self.write_json(
                _join(self.state_root, "config.json"), {"config_hash": pipe.config_hash(), "config": pipe.resolved()}
            )
        self.remove_tmp()
        return resuming

    def clear(self) -> None:
        """Delete what clipcurate writes in the output (shards, manifest, report, run state)."""
        for p in self.fs.ls(self.root, detail=False):
            base = posixpath.basename(p.rstrip("/"))
            if base == STATE_DIR:
                self.fs.rm(p, recursive=True)
            elif base in (MANIFEST_NAME, SIZES_NAME, "report.html") or _is_shard_file(base):
                self.fs.rm(p)

    def remove_tmp(self) -> int:
        n = 0
        for p in self.fs.find(self.root):
            if TMP_MARK in posixpath.basename(p):
                self.fs.rm(p)
                n += 1
        return n

    # ---- input shards -------------------------------------------------------------------------
    def input_path(self, shard: int) -> str:
        return _join(self.state_root, "input", f"{shard:05d}.parquet")

    def fingerprint_path(self) -> str:
        return _join(self.state_root, "input", "_fingerprint.json")

    def input_plan(self, read_stage, samples_per_shard: int) -> InputPlan:
        """Split the input into shards once; later runs reuse the split (``check`` refuses a rerun
        whose input files changed since: their fingerprint is recorded before the split)."""
        from schemas.row import key_digits

        plan_path = _join(self.state_root, "input", "_plan.json")
        if self.fs.exists(plan_path):
            p = self.read_json(plan_path)
            return InputPlan(p["counts"], p["shard_digits"], p["index_digits"], p["name_digits"])
        self.write_json(self.fingerprint_path(), {"files": source_fingerprint(read_stage)})
        counts = read_stage.split(samples_per_shard, lambda i, t: self.write_parquet(self.input_path(i), t))
        sd, idd = key_digits(len(counts), samples_per_shard)
        plan = InputPlan(counts, sd, idd, max(5, len(str(max(len(counts) - 1, 0)))))
        self.write_json(plan_path, plan.__dict__)
        return plan

    # ---- global state and spills ----------------------------------------------------------------
    def state_path(self, index: int, name: str) -> str:
        return _join(self.state_root, "state", f"{index:02d}_{name}.json")

    def spill_path(self, index: int, shard: int) -> str:
        return _join(self.state_root, "spill", f"{index:02d}", f"{shard:05d}.parquet")

    def remove_spills(self) -> None:
        p = _join(self.state_root, "spill")
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    # ---- final shards -------------------------------------------------------------------------
    def completed_shards(self, plan: InputPlan) -> set[int]:
        """Shards whose Parquet and ``_stats.json`` exist (``_stats.json`` is written last, after the
        tar, so it marks completion; ``schemas.manifest.shard_complete``)."""
        names = {posixpath.basename(p) for p in self.fs.ls(self.root, detail=False)}
        done = set()
        for s in range(plan.n_shards):
            n = plan.name(s)
            if shard_complete(n, names):
                done.add(s)
        return done

    def shard_stats(self) -> list[dict]:
        out = []
        for p in sorted(self.fs.glob(_join(self.root, f"*{STATS_SUFFIX}"))):
            out.append(self.read_json(p))
        return out


def source_fingerprint(source) -> list[dict]:
    """The input files' fingerprint (path, size, version) of a source that offers one (``Read``);
    [] for a source without files to fingerprint."""
    fn = getattr(source, "fingerprint", None)
    return fn() if callable(fn) else []


def describe_change(old: list[dict], new: list[dict]) -> str | None:
    """How input fingerprint ``new`` differs from ``old`` (the first difference), or None."""
    from stages.io import shown_path

    before = {f["path"]: f for f in old}
    after = {f["path"]: f for f in new}
    for path in after:
        if path not in before:
            return f"new file {shown_path(path)}"
    for path in before:
        if path not in after:
            return f"{shown_path(path)} is gone"
    for path, f in after.items():
        b = before[path]
        if b.get("size") != f.get("size"):
            return f"{shown_path(path)}: {b.get('size')} bytes then, {f.get('size')} now"
        if b.get("version") != f.get("version"):
            return f"{shown_path(path)} was modified"
    if [f["path"] for f in old] != [f["path"] for f in new]:
        return "the files are in another order"
    return None


def _is_shard_file(base: str) -> bool:
    if TMP_MARK in base:  # a shard file written under its temporary name
        base = base.split(TMP_MARK)[0]
    return shard_of(base) is not None


def local_path(url: str) -> str | None:
    """The local filesystem path of ``url``, or None for remote filesystems."""
    fs, p = fsspec.core.url_to_fs(url)
    return os.path.abspath(p) if is_local(fs) else None
