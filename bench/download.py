"""Download throughput: img2dataset 1.47 vs our Download stage, side by side.

    .venv/bin/python bench/download.py                 # 1500 images, 2 processes each, 2 rounds
    .venv/bin/python bench/download.py --images 600    # quicker

1. Generates a corpus of real-looking JPEGs (smooth colour fields, gradients, shapes, sensor-like
   noise; sides drawn from 256..1024 px; quality 80..95), cached under --corpus.
2. Serves it from ONE loopback HTTP/1.1 server (``demo.server``'s handler, keep-alive on), in its
   own process, started once and used by both contestants.
3. Runs img2dataset's ``download()`` (processes_count=2, output_format=webdataset) and our stage in
   2 spawned processes (one shard each, a tar + parquet written per shard like img2dataset), with
   the same resize settings (image_size 256, border, jpg q95, exif + sha256 on, thread_count).
4. Reports, per contestant (best of --rounds alternating rounds):
   - images/s end to end (wall clock of the whole call, process start and imports included);
   - images/s in-shard: images / (last shard end - first shard start), img2dataset's own
     _stats.json clock, and the same clock for ours;
   - worker CPU ms per image (process CPU time of the shard workers, all threads; img2dataset's
     measured by a thin Downloader subclass): the figure that a busy shared machine disturbs least;
   - the ratios, and the CPU floor: decode + resize + encode of the corpus bytes in a tight loop on
     one core, through img2dataset's Resizer and through our ImageProcessor.

Never run in CI. Prints a Markdown block for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before albumentations is imported

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESIZE = dict(image_size=256, resize_mode="border", encode_format="jpg", encode_quality=95)


# ---- corpus -------------------------------------------------------------------------------------


def make_image(rng: np.random.Generator) -> bytes:
    import cv2

    w, h = (int(x) for x in rng.integers(256, 1025, 2))
    # smooth colour field: low-resolution noise upsampled, plus a gradient
    low = rng.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3)).astype(np.float32)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    img += np.linspace(-40, 40, w, dtype=np.float32)[None, :, None]
    for _ in range(int(rng.integers(3, 12))):  # shapes with hard edges
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(10, max(11, min(w, h) // 3)))
        if rng.random() < 0.5:
            cv2.circle(img, (cx, cy), r, colour, -1, lineType=cv2.LINE_AA)
        else:
            cv2.rectangle(img, (cx - r, cy - r // 2), (cx + r, cy + r // 2), colour, -1)
    img = cv2.GaussianBlur(img, (0, 0), 1.2)
    img += rng.normal(0, 4, img.shape).astype(np.float32)  # sensor-like grain
    ok, enc = cv2.imencode(
        ".jpg", np.clip(img, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(80, 96))]
    )
    assert ok
    return enc.tobytes()


def make_corpus(folder: Path, n: int, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}.jpg" for i in range(n)]
    missing = [i for i, name in enumerate(names) if not (folder / name).exists()]
    if missing:
        print(f"generating {len(missing)} images in {folder} ...", flush=True)
    for i in missing:
        (folder / names[i]).write_bytes(make_image(np.random.default_rng(seed * 1_000_003 + i)))
    return names


# ---- server (its own process, HTTP/1.1 keep-alive) -----------------------------------------------


def _serve(folder: str, port_q) -> None:
    import functools
    from http.server import ThreadingHTTPServer

    from demo.server import QuietHandler

    handler = type("KeepAliveHandler", (QuietHandler,), {"protocol_version": "HTTP/1.1"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=folder))
    server.daemon_threads = True
    server.request_queue_size = 1024
    port_q.put(server.server_address[1])
    server.serve_forever()


# ---- contestants -----------------------------------------------------------------------------------


def _make_timed_downloader() -> type:
    from img2dataset.downloader import Downloader

    class TimedDownloader(Downloader):
        """img2dataset's Downloader, recording the CPU time of its worker process per shard (bench
        instrumentation only: the downloading is img2dataset's code, unchanged)."""

        def __call__(self, row):
            c0 = time.process_time()
            res = super().__call__(row)
            cpu = time.process_time() - c0
            Path(self.output_folder, f"{row[0]:05d}.cpu").write_text(json.dumps({"cpu": cpu}))
            return res

    TimedDownloader.__module__, TimedDownloader.__qualname__ = __name__, "TimedDownloader"
    return TimedDownloader


def __getattr__(name: str):
    # Built on first use (pickle finds it here in img2dataset's spawned workers), so that processes
    # running only our stage never import the img2dataset package (torch, wandb, ...).
    if name == "TimedDownloader":
        globals()[name] = _make_timed_downloader()
        return globals()[name]
    raise AttributeError(name)


def run_img2dataset(urls: list[str], out: Path, threads: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from img2dataset import download

    # the package's `main` attribute is a function, hence sys.modules
    sys.modules["img2dataset.main"].Downloader = sys.modules[__name__].TimedDownloader

    src = out / "urls.parquet"
    pq.write_table(pa.table({"url": urls}), src)
    t0 = time.time()
    download(
        url_list=str(src),
        input_format="parquet",
        url_col="url",
        output_folder=str(out / "out"),
        output_format="webdataset",
        processes_count=2,
        thread_count=threads,
        number_sample_per_shard=(len(urls) + 1) // 2,
        timeout=10,
        **RESIZE,
    )
    wall = time.time() - t0
    stats = [json.loads(p.read_text()) for p in sorted((out / "out").glob("*_stats.json"))]
    ok = sum(s["successes"] for s in stats)
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    cpu = sum(json.loads(p.read_text())["cpu"] for p in (out / "out").glob("*.cpu"))
    return {"ok": ok, "count": sum(s["count"] for s in stats), "wall": wall, "in_shard": span, "cpu": cpu}


def _write_like_img2dataset(res, out: str, shard: int) -> None:
    """A tar (image + json per ok row) and a parquet of every row, as img2dataset's writer does."""
    import pyarrow.parquet as pq

    with tarfile.open(Path(out) / f"{shard:05d}.tar", "w") as tar:
        for row in res.select(["key", "image", "width", "height", "sha256", "status"]).to_pylist():
            if row["status"] != "ok":
                continue
            for ext, data in (("jpg", row["image"]), ("json", json.dumps(row | {"image": None}).encode())):
                info = tarfile.TarInfo(f"{row['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pq.write_table(res.drop(["image"]), Path(out) / f"{shard:05d}.parquet")


def _ours_shard(shard: int, urls: list[str], out: str, threads: int, barrier=None) -> dict:
    """One shard through our stage in this process (the stage set up before the clock starts,
    as img2dataset's worker has its Downloader before its clock starts)."""
    import pyarrow as pa

    from stages.download import Download

    stage = Download(dict(allowed_networks=["127.0.0.0/8"], thread_count=threads, timeout=10, **RESIZE))
    stage.setup()
    table = pa.table(
        {"key": [f"{shard:05d}{i:04d}" for i in range(len(urls))], "url": urls, "status": ["ok"] * len(urls)}
    )
    if barrier is not None:
        barrier.wait()
    start, c0 = time.time(), time.process_time()
    res = stage(table)
    _write_like_img2dataset(res, out, shard)
    end, cpu = time.time(), time.process_time() - c0
    stage.close()
    statuses = res.column("status").to_pylist()
    return {"ok": statuses.count("ok"), "count": len(statuses), "start": start, "end": end, "cpu": cpu}


def img2dataset_shard_downloader(shard: int, urls: list[str], out: str, threads: int, timeout: float):
    """img2dataset's own Downloader (with its Resizer and webdataset writer) for one shard of ``urls``,
    set up exactly as ``img2dataset.download()`` sets it up, minus its reader and distributor.
    Returns ``(downloader, shard_file)``: run it as ``downloader((shard, shard_file))``."""
    import pyarrow as pa
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    path = Path(out) / f"{shard:05d}.feather"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("url", pa.string())])) as w:
        w.write_table(pa.table({"url": urls}))
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=Resizer(resize_only_if_bigger=False, **RESIZE),
        thread_count=threads,
        save_caption=False,
        extract_exif=True,
        output_folder=out,
        column_list=["url"],
        timeout=timeout,
        number_sample_per_shard=len(urls),
        oom_shard_count=5,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format=RESIZE["encode_format"],
        retries=0,
        user_agent_token=None,
        disallowed_header_directives={"noai", "noimageai", "noindex", "noimageindex"},
    )
    return downloader, str(path)


def _img2dataset_shard(shard: int, urls: list[str], out: str, threads: int, barrier=None) -> dict:
    """One shard through img2dataset's own Downloader (``img2dataset_shard_downloader``)."""
    downloader, path = img2dataset_shard_downloader(shard, urls, out, threads, timeout=10)
    if barrier is not None:
        barrier.wait()
    start, c0 = time.time(), time.process_time()
    downloader((shard, path))
    end, cpu = time.time(), time.process_time() - c0
    stats = json.loads((Path(out) / f"{shard:05d}_stats.json").read_text())
    return {"ok": stats["successes"], "count": stats["count"], "start": start, "end": end, "cpu": cpu}


_BARRIER = None


def _init_worker(barrier) -> None:
    """Warm worker: import both contestants once, so rounds time only the downloading."""
    global _BARRIER
    _BARRIER = barrier
    import img2dataset.resizer  # noqa: F401
    import img2dataset.writer  # noqa: F401

    import stages.download  # noqa: F401


def _warm_task(args) -> dict:
    who, shard, urls, out, threads = args
    fn = _ours_shard if who == "ours" else _img2dataset_shard
    return fn(shard, urls, out, threads, _BARRIER)


def _our_shard(args) -> dict:
    return _ours_shard(*args)


def run_ours(urls: list[str], out: Path, threads: int) -> dict:
    (out / "out").mkdir(parents=True, exist_ok=True)
    half = (len(urls) + 1) // 2
    jobs = [(0, urls[:half], str(out / "out"), threads), (1, urls[half:], str(out / "out"), threads)]
    t0 = time.time()
    with mp.get_context("spawn").Pool(2) as pool:  # img2dataset's distributor uses spawn too
        res = pool.map(_our_shard, jobs)
    wall = time.time() - t0
    span = max(r["end"] for r in res) - min(r["start"] for r in res)
    ok, count, cpu = (sum(r[k] for r in res) for k in ("ok", "count", "cpu"))
    return {"ok": ok, "count": count, "wall": wall, "in_shard": span, "cpu": cpu}


# ---- CPU floor -------------------------------------------------------------------------------------


def cpu_floor(blobs: list[bytes]) -> dict:
    from img2dataset.resizer import Resizer

    from stages.download import DownloadConfig, ImageProcessor

    resizer = Resizer(resize_only_if_bigger=False, **RESIZE)
    ours = ImageProcessor(DownloadConfig(**RESIZE))
    out = {}
    for name, fn in (("resizer", lambda b: resizer(io.BytesIO(b))), ("ours", ours)):
        fn(blobs[0])  # warm up (cv2 thread settings, lazy imports)
        c0 = time.process_time()
        for b in blobs:
            fn(b)
        out[name] = len(blobs) / (time.process_time() - c0)
    return out


def summarise(res: list[dict]) -> dict:
    """Two shard results -> ok count, img/s over the span of both shards, CPU ms per image."""
    ok, count, cpu = (sum(r[k] for r in res) for k in ("ok", "count", "cpu"))
    span = max(r["end"] for r in res) - min(r["start"] for r in res)
    return {"ok": ok, "count": count, "rate": ok / span, "cpu_ms": 1000 * cpu / max(1, ok)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=32, help="thread_count for both")
    ap.add_argument("--corpus", default=str(Path(tempfile.gettempdir()) / "clipcurate_bench_corpus"))
    ap.add_argument("--floor-images", type=int, default=300)
    ap.add_argument(
        "--rounds", type=int, default=3, help="warm rounds of each, alternating; medians reported"
    )
    ap.add_argument("--no-cold", dest="cold", action="store_false", help="skip the cold end-to-end runs")
    a = ap.parse_args(argv)

    corpus = Path(a.corpus)
    names = make_corpus(corpus, a.images)
    sizes = [(corpus / n).stat().st_size for n in names]
    ctx = mp.get_context("spawn")
    port_q = ctx.Queue()
    server = ctx.Process(target=_serve, args=(str(corpus), port_q), daemon=True)
    server.start()
    base = f"http://127.0.0.1:{port_q.get(timeout=60)}"
    urls = [f"{base}/{n}" for n in names]
    load = os.getloadavg()
    half = (len(urls) + 1) // 2
    cold: dict[str, dict] = {}
    warm: dict[str, list[dict]] = {"img2dataset": [], "ours": []}
    try:
        if a.cold:
            with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
                print("cold: img2dataset.download() ...", flush=True)
                cold["img2dataset"] = run_img2dataset(urls, Path(d1), a.threads)
                print("cold: ours ...", flush=True)
                cold["ours"] = run_ours(urls, Path(d2), a.threads)
            print("cold:", cold, flush=True)
        barrier = ctx.Barrier(2, timeout=300)
        with ctx.Pool(2, initializer=_init_worker, initargs=(barrier,)) as pool:
            for r in range(a.rounds):  # alternate who goes first: load from elsewhere hits both
                for who in ("img2dataset", "ours") if r % 2 == 0 else ("ours", "img2dataset"):
                    with tempfile.TemporaryDirectory() as d:
                        jobs = [(who, 0, urls[:half], d, a.threads), (who, 1, urls[half:], d, a.threads)]
                        warm[who].append(summarise(pool.map(_warm_task, jobs, chunksize=1)))
                    print(f"warm round {r + 1} {who}: {warm[who][-1]}", flush=True)
    finally:
        server.terminate()
        server.join()
    blobs = [(corpus / n).read_bytes() for n in names[: a.floor_images]]
    floor = cpu_floor(blobs)

    med = {
        who: {k: float(np.median([r[k] for r in runs])) for k in ("rate", "cpu_ms")}
        for who, runs in warm.items()
    }
    oks = {who: f"{min(r['ok'] for r in runs)}/{runs[0]['count']}" for who, runs in warm.items()}
    lines = [
        f"corpus: {a.images} JPEGs, 256..1024 px sides, mean {np.mean(sizes) / 1024:.0f} KiB; "
        f"thread_count {a.threads}; 2 processes each; {os.cpu_count()} CPUs; Python {platform.python_version()}; "
        f"load average at start {load[0]:.1f}",
        "",
        f"Warm workers, same harness for both (median of {a.rounds} alternating rounds):",
        "",
        "| | ok / rows | img/s (wall) | worker CPU ms/img | img per CPU-s |",
        "|---|---|---|---|---|",
    ]
    for who, name in (("img2dataset", "img2dataset 1.47 Downloader"), ("ours", "clipcurate Download")):
        m = med[who]
        lines.append(
            f"| {name} | {oks[who]} | {m['rate']:.0f} | {m['cpu_ms']:.2f} | {1000 / m['cpu_ms']:.0f} |"
        )
    lines.append(
        f"| **ratio** | | **{med['ours']['rate'] / med['img2dataset']['rate']:.2f}x** | "
        f"| **{med['img2dataset']['cpu_ms'] / med['ours']['cpu_ms']:.2f}x** |"
    )
    if cold:
        ci, co = cold["img2dataset"], cold["ours"]
        lines += [
            "",
            "Cold, one run each (img2dataset's `download()` vs our stage in a fresh spawn pool; process start "
            "and imports included in end-to-end):",
            "",
            "| | ok / rows | end-to-end img/s | in-shard img/s | worker CPU ms/img |",
            "|---|---|---|---|---|",
        ]
        for name, r in (("img2dataset 1.47 download()", ci), ("clipcurate Download", co)):
            lines.append(
                f"| {name} | {r['ok']}/{r['count']} | {r['ok'] / r['wall']:.0f} | {r['ok'] / r['in_shard']:.0f} "
                f"| {1000 * r['cpu'] / r['ok']:.2f} |"
            )
        lines.append(
            f"| **ratio** | | **{ci['wall'] / co['wall']:.2f}x** | **{ci['in_shard'] / co['in_shard']:.2f}x** "
            f"| **{ci['cpu'] / co['cpu']:.2f}x** |"
        )
    lines += [
        "",
        f"CPU floor (one core, CPU time, decode + resize + encode in a tight loop over {len(blobs)} corpus "
        f"images): img2dataset Resizer {floor['resizer']:.0f} img/s, ours {floor['ours']:.0f} img/s "
        f"(x2 cores: {2 * floor['resizer']:.0f} / {2 * floor['ours']:.0f} img/s).",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
