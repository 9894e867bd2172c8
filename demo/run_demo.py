"""``make demo``: generate the shapes world, serve it on 127.0.0.1, run workflows/demo.yaml on a
local Ray, and print where the output and the report are.

    python -m demo.run_demo [--workflow workflows/demo.yaml] [--n 400] [--out demo_out]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pyarrow.parquet as pq  # noqa: E402

from demo.server import serve  # noqa: E402
from demo.world import make_world, url_list  # noqa: E402


def write_url_list(world: Path, base_url: str) -> Path:
    urls = world / "urls.parquet"
    pq.write_table(url_list(world, base_url), urls)
    return urls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo.run_demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workflow", default="workflows/demo.yaml")
    ap.add_argument("--out", default="demo_out", help="folder for the world and the output")
    ap.add_argument("--n", type=int, default=400, help="pairs in the demo world")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="extra config overrides")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    world = out / "world"
    if not (world / "world.parquet").exists():
        make_world(world, n=a.n, seed=a.seed)
    from pipeline import cli

    # The URL list names this server's port, so each demo run starts its output afresh (--overwrite).
    with serve(world) as base_url:
        urls = write_url_list(world, base_url)
        print(f"demo world: {a.n} pairs served at {base_url} (list: {urls})", flush=True)
        args = ["run", a.workflow, "--output", str(out / "output"), "--overwrite", "--set", f"stages.read.path={urls}"]
        for s in a.set:
            args += ["--set", s]
        return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
