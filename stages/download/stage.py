"""Download images: img2dataset's options and results, with safer defaults, per-host politeness and no tail stall.

    stage = Download(Download.Config(image_size=256, allowed_networks=["127.0.0.0/8"]))
    stage.setup()
    out = stage(table)          # needs ``url``; fills image, width, height, original_*, sha256, http_status
    stage.teardown()

Options keep img2dataset 1.47's names, meanings and defaults (``image_size``, ``resize_mode``,
``encode_format``, ``timeout``, ``disallowed_header_directives``, ``compute_hash``, ...); resizing is
img2dataset's own ``Resizer`` (and ``BoundingBoxBlurrer`` for ``bbox_col``). Differences, all on
purpose:

* **Concurrency.** A call hands all its rows' URLs at once to the worker's download window
  (``stages/download/window.py``): ``thread_count`` requests in flight across micro-batch
  boundaries, at most ``max_per_host`` per host, keep-alive connections per host, ``Retry-After``
  honoured up to ``max_retry_after``, a breaker per host, a DNS cache per worker. Decode + resize
  run in the calling thread as downloads complete, so a slow URL holds up only itself, and no URL
  takes longer than ``total_timeout`` from its first request. ``process`` still returns
  ``batch_size`` rows at a time, in input order.
* **Safety.** Only http/https. Every connection, the first and each redirect's, checks the
  address it dials (after the DNS cache, so DNS rebinding cannot slip past it) and refuses
  private, loopback, link-local, multicast, reserved and unspecified addresses unless
  ``allowed_networks`` lists them; ``allow_private_networks`` opens private and loopback only.
  Redirects are followed by hand up to ``max_redirects``, with loop detection. The body is
  streamed under ``max_response_bytes`` whatever Content-Length says. The image header is read
  (PIL) before any decode; more than ``max_pixels`` pixels is refused (decompression bombs);
  truncated JPEGs are refused.
* **Non-ASCII URLs** are IDNA/percent-encoded as browsers do (img2dataset fails on them).
* **retries** retries only what may succeed later: timeouts, connection errors, HTTP 408/5xx.
* **Opt-out.** X-Robots-Tag as img2dataset; robots.txt (``check_robots_txt``) and the TDMRep
  ``tdm-reservation`` header (``respect_tdm_reservation``) are off by default, as in img2dataset.
* **Speed.** Large JPEGs that are only downscaled are decoded at 1/2, 1/4 or 1/8 scale by
  libjpeg (DCT scaling) with the Resizer's geometry (``fast_decode: false`` turns it off).
* **save_additional_columns** is a ``read`` option here (as in img2dataset, where the reader
  applies it): this stage passes every column through. ``bbox_col`` and the ``verify_hash``
  column must be among them.

Every row ends ``ok`` or with a status from ``schemas.status``, a short reason whose first word
is its class, and a stable ``rule`` tag (``stages/download/rules.py``; README, "Statuses and
reasons"). ``sha256`` (or the ``compute_hash`` column) is the hash of the bytes as downloaded,
like img2dataset; when ``verify_hash`` checks that same column, rows with no hash computed
(``hash_mismatch``, failed downloads) keep the input's expected value there;
``width``/``height`` describe the stored (resized) image.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from schemas import Status
from stages.base import Resources, Stage, StageFailed, one_line, replace_column, set_status
from stages.download.config import DownloadConfig
from stages.download.http import Fetched, Fetcher, short
from stages.download.images import ImageProcessor, ImageReject, exif_json
from stages.download.rules import rule_of
from stages.download.window import Session, Window

_DIMS = ("width", "height", "original_width", "original_height")


@dataclass
class _Row:
    """One row's outcome, decoded and ready for the output columns."""

    status: str = Status.OK.value
    reason: str | None = None
    http_status: int | None = None
    image: bytes | None = None
    dims: tuple = (None, None, None, None)
    hash: str | None = None
    exif: str | None = None
    error: BaseException | None = None  # an unexpected error, re-raised in its row's process()


class _Shard:
    """The URLs of one ``__call__`` in the window, and their decoded outcomes by position."""

    def __init__(self, stage: Download, batch: pa.Table):
        self.stage = stage
        cfg = stage.config
        self.bboxes = batch.column(cfg.bbox_col).to_pylist() if cfg.bbox_col else None
        self.expected = batch.column(cfg.verify_hash[0]).to_pylist() if cfg.verify_hash else None
        self.by_key: dict[Any, deque] = defaultdict(deque)
        for pos, key in enumerate(batch.column("key").to_pylist()):
            self.by_key[key].append(pos)
        self.rows: dict[int, _Row] = {}
        self.session = Session(stage.window, batch.column("url").to_pylist())

    def take(self, keys: list) -> list[_Row | None]:
        """Outcomes of the rows with these keys (None for a row this shard does not hold),
        decoding whatever completes meanwhile, in completion order."""
        want = [self.by_key[k].popleft() if self.by_key.get(k) else None for k in keys]
        for pos in want:
            while pos is not None and pos not in self.rows:
                got_pos, got = self.session.get()
                self.rows[got_pos] = self.stage._outcome(got, got_pos, self.bboxes, self.expected)
        return [self.rows.pop(p) if p is not None else None for p in want]


class Download(Stage):
    name = "download"
    Config = DownloadConfig
    requires = ("url",)
    produces = ("http_status",)
    fills = ("image", "width", "height", "original_width", "original_height", "sha256")
    _extra_hash_columns: ClassVar[tuple[str, ...]] = ("md5", "sha512")

    def required_columns(self) -> tuple[str, ...]:
        """``url`` plus the configured ``bbox_col`` and ``verify_hash`` column (main's plan check)."""
        cfg = self.config
        extra = [c for c in (cfg.bbox_col, cfg.verify_hash[0] if cfg.verify_hash else None) if c]
        return (*self.requires, *extra)

    def filled_columns(self) -> tuple[str, ...]:
        # sha256 carries data only when it is the hash computed (dedup by sha256 needs it)
        return tuple(c for c in self.fills if c != "sha256" or self.config.compute_hash == "sha256")

    def resources(self) -> Resources:
        return Resources(
            num_cpus=1, concurrency=self.config.concurrency, batch_size=self.config.batch_size, actor=True
        )

    def extra_produces(self) -> dict[str, pa.DataType]:
        cols: dict[str, pa.DataType] = {}
        if self.config.extract_exif:
            cols["exif"] = pa.string()
        if self.config.compute_hash in self._extra_hash_columns:
            cols[self.config.compute_hash] = pa.string()
        return cols

    def setup(self) -> None:
        self.fetcher = Fetcher(self.config)
        self.images = ImageProcessor(self.config)
        self.window = Window(self.fetcher, self.config)
        self._shard: _Shard | None = None

    def teardown(self) -> None:
        """Stop the threads and drop pooled connections (a worker's end)."""
        if getattr(self, "window", None) is not None:
            self.window.close()
            self.fetcher.close()
            self.window = None
            self._setup_done = False

    close = teardown  # the old name

    def __getstate__(self):
        # Threads, sockets and the Resizer stay behind; the copy sets itself up again on first use.
        drop = ("fetcher", "images", "window", "_shard")
        state = {k: v for k, v in self.__dict__.items() if k not in drop}
        state["_setup_done"] = False
        return state

    # ---- one call: every ok row's URL in the window at once -------------------------------
    def _run_chunks(self, batch: pa.Table, out_cols: dict[str, pa.DataType]) -> pa.Table:
        """Start all the rows' downloads, then let the base class hand ``process`` its
        micro-batches; ``process`` collects the outcomes, which were decoded as they arrived."""
        cfg = self.config
        needed = [c for c in (cfg.bbox_col, cfg.verify_hash[0] if cfg.verify_hash else None) if c]
        if any(c not in batch.column_names for c in needed) or batch.num_rows <= 1:
            return super()._run_chunks(batch, out_cols)
        self._shard = _Shard(self, batch)
        try:
            return super()._run_chunks(batch, out_cols)
        finally:
            self._shard.session.cancel()
            self._shard = None

    def process(self, batch: pa.Table) -> pa.Table:
        cfg = self.config
        n = batch.num_rows
        needed = [c for c in (cfg.bbox_col, cfg.verify_hash[0] if cfg.verify_hash else None) if c]
        missing = [c for c in needed if c not in batch.column_names]
        if missing:
            msg = f"column {missing[0]!r} not in input (carry it with read's save_additional_columns)"
            return set_status(batch, [True] * n, Status.STAGE_ERROR, msg)

        keys = batch.column("key").to_pylist()
        rows = self._shard.take(keys) if self._shard is not None else [None] * n
        todo = [i for i, r in enumerate(rows) if r is None]
        if todo:  # rows no shard holds (a row-by-row retry, or a direct process() call)
            sub = _Shard(self, batch.take(todo))
            try:
                for i, r in zip(todo, sub.take([keys[i] for i in todo])):
                    rows[i] = r
            finally:
                sub.session.cancel()
        # A row whose decoding raised (not a rejection: a bug, an odd file) is that row's stage_error,
        # marked here rather than re-raised: a row-by-row retry would fetch its URL again while the
        # window holds the shard's other results. Every row of a batch raising is the stage's failure.
        errors = [r.error for r in rows if r.error is not None]
        if errors and len(errors) == n > 1:
            raise StageFailed(self.name, f"every row of a batch of {n} raised: {one_line(errors[0])}")
        for r in rows:
            if r.error is not None:
                r.status, r.reason = Status.STAGE_ERROR.value, f"{self.name}: {one_line(r.error)}"
                r.image, r.dims, r.hash, r.exif = None, (None,) * 4, None, None

        status = [r.status for r in rows]
        out = batch
        cols = [("image", [r.image for r in rows]), ("http_status", [r.http_status for r in rows])]
        cols += [(c, [r.dims[j] for r in rows]) for j, c in enumerate(_DIMS)]
        for col, vals in cols:
            out = replace_column(out, col, vals)
        if cfg.compute_hash:
            hashes = [r.hash for r in rows]
            if (
                cfg.verify_hash
                and cfg.verify_hash[0] == cfg.compute_hash
                and cfg.compute_hash in batch.column_names
            ):
                # the input's expected hash stays where none was computed (hash_mismatch, failed rows)
                given = batch.column(cfg.compute_hash).cast(pa.string()).to_pylist()
                hashes = [h if h is not None else g for h, g in zip(hashes, given)]
            out = replace_column(out, cfg.compute_hash, hashes, pa.string())
        if cfg.extract_exif:
            out = replace_column(out, "exif", [r.exif for r in rows], pa.string())
        if any(s != Status.OK.value for s in status):
            old = out.column("reason").to_pylist()
            reason = [r.reason if r.status != Status.OK.value else o for r, o in zip(rows, old)]
            rule = [rule_of(r.status, r.reason) if r.status != Status.OK.value else None for r in rows]
            out = replace_column(out, "status", pa.array(status, pa.string()))
            out = replace_column(out, "reason", pa.array(reason, pa.string()))
            out = replace_column(out, "rule", pa.array(rule, pa.string()))
        return out

    def _outcome(self, got: Fetched, pos: int, bboxes, expected) -> _Row:
        row = _Row(status=got.status, reason=got.reason, http_status=got.http_status)
        if got.data is None:
            if row.status == Status.OK.value:  # defensive: no body is never ok
                row.status, row.reason = Status.DOWNLOAD_FAILED.value, "empty response"
            return row
        try:
            self._finish_row(row, got.data, pos, bboxes, expected)
        except ImageReject as e:
            row.status, row.reason = e.status, e.reason
            row.image, row.dims, row.hash, row.exif = None, (None,) * 4, None, None
        except Exception as e:  # noqa: BLE001 - raised again in this row's process() call
            row.error = e
        return row

    def _finish_row(self, row: _Row, data: bytes, i: int, bboxes, expected) -> None:
        cfg = self.config
        if cfg.verify_hash:
            col, kind = cfg.verify_hash
            got = hashlib.new(kind, data).hexdigest()
            if expected[i] is None or got != str(expected[i]).strip().lower():
                raise ImageReject(Status.HASH_MISMATCH.value, f"{kind} mismatch")
        bbox = None
        if bboxes is not None and bboxes[i] is not None:
            try:
                bbox = _bbox_value(bboxes[i])
            except ValueError:
                raise ImageReject(Status.STAGE_ERROR.value, f"unreadable {cfg.bbox_col} value") from None
        done = self.images(data, bbox)
        row.image = done.image
        row.dims = (done.width, done.height, done.original_width, done.original_height)
        if cfg.compute_hash:
            row.hash = hashlib.new(cfg.compute_hash, data).hexdigest()
        if cfg.extract_exif:
            row.exif = exif_json(data)


def _bbox_value(v: Any) -> Any:
    if isinstance(v, str):
        v = json.loads(v)
    return v


__all__ = ["Download", "DownloadConfig", "short"]
