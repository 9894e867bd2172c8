"""The run report (issue #8): ``report.html`` rendered in real headless Chromium (acceptance 1) and the
terminal summary's numbers against ``manifest.json`` and the shard Parquet files (acceptance 3).

Two real runs on local Ray feed it: the session's demo run (read, download, clip_score, write), and a
fuller run of the same demo world that adds ``clip_filter`` (a fitted top-fraction threshold) and
MetaCLIP ``balance``, so that every section of the report has something to draw.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it); it is driven from the command line
(``--dump-dom`` after a small inline probe script, ``--screenshot``), nothing is downloaded.
"""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import html as report_html
from pipeline import report
from schemas import OK
from stages.thumbnails import THUMBNAIL_PX

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.usefixtures("chromium")  # skips without chromium; fails under CI=true

# Written into a copy of the report: after load, it records every section and every <img> (natural
# size) in a <pre>, which --dump-dom then prints. A deliberately broken image is the control.
PROBE = """
<img id="probe-control" alt="control: not an image" src="data:image/png;base64,bm90IGFuIGltYWdl">
<script>
window.addEventListener('load', () => {
  const out = {
    sections: [...document.querySelectorAll('section[id]')].map(s => ({
      id: s.id, title: (s.querySelector('h2') || {}).textContent || '', height: s.getBoundingClientRect().height,
      plots: s.querySelectorAll('img.plot').length, text: s.innerText})),
    images: [...document.images].map(i => ({id: i.id, cls: i.className, alt: i.alt,
      section: (i.closest('section') || {}).id || null, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight})),
    external: [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href'))
      .filter(u => !u.startsWith('data:') && !u.startsWith('#')),
  };
  const pre = document.createElement('pre');
  pre.id = 'clipcurate-probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def _chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *args,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def probe(report_path: Path, work: Path) -> dict:
    page = work / "probe.html"
    page.write_text(report_path.read_text().replace("</body>", PROBE + "</body>"))
    r = _chromium("--virtual-time-budget=10000", "--dump-dom", page.as_uri())
    m = re.search(r'<pre id="clipcurate-probe">(.*?)</pre>', r.stdout, re.S)
    assert m, f"the probe did not run; chromium rc={r.returncode}\n{r.stderr[-3000:]}"
    return json.loads(html.unescape(m.group(1)))


def screenshot(report_path: Path, png: Path) -> None:
    from PIL import Image

    r = _chromium("--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={png}", report_path.as_uri())
    assert png.exists(), f"no screenshot; chromium rc={r.returncode}\n{r.stderr[-3000:]}"
    with Image.open(png) as im:
        assert im.size == (1280, 2400)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 100, "the screenshot is (nearly) blank"
    print(f"screenshot: {png}")


def _parquet(out: Path) -> pl.DataFrame:
    return pl.concat(
        [
            pl.from_arrow(pq.read_table(p)).with_columns(pl.lit(p.name).alias("_file"))
            for p in sorted(out.glob("*.parquet"))
        ],
        how="diagonal_relaxed",
    )


@pytest.fixture(scope="module")
def full_run(ray_session, demo_urls, tmp_path_factory):
    """The demo workflow (one rewrite per caption) plus basic_filter (language ID, caption length),
    clip_filter (top 80% of the pool) and balance (shapes metadata, t=20)."""
    from pipeline import config, plan
    from pipeline import ray as executor

    raw = yaml.safe_load((REPO / "workflows" / "demo.yaml").read_text())
    stages = []
    for s in raw["stages"]:
        name, cfg = next(iter(s.items()))
        if name == "clip_score":
            cfg = {k: v for k, v in cfg.items() if k != "min_score"}
        if name == "rewrite":  # one rewrite per caption: the toy LM is most of a demo run's time
            cfg = {**cfg, "n_rewrites": 1}
        if name == "write":
            stages.append({"clip_filter": {"top_fraction": 0.8}})
            # caption language (py3langid) and short captions out, nothing else; after the actor pools
            # (a task stage among them would need a third CPU)
            stages.append(
                {"basic_filter": {"english": False, "min_image_side": None, "max_aspect_ratio": None}}
            )
            stages.append({"balance": {"metadata": "demo/assets/shapes_metadata.json", "t": 20}})
        stages.append({name: cfg})
    raw.update(name="demo_full", stages=stages)
    tmp = tmp_path_factory.mktemp("report_full")
    (tmp / "full.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp / "output"
    pipe = config.load(
        tmp / "full.yaml",
        overrides=[f"stages.read.path={demo_urls}", "ray.show_progress=false"],
        output=str(out),
    )
    plan.check(pipe)
    manifest = executor.run(pipe)
    return out, manifest


@pytest.fixture(params=[pytest.param("demo_run", marks=pytest.mark.integration),
                        pytest.param("full_run", marks=pytest.mark.integration)])  # fmt: skip
def run(request):
    return request.param, *request.getfixturevalue(request.param)


# ---- acceptance 1: the report renders --------------------------------------------------------------


@needs_chromium
def test_report_renders_in_chromium(run, tmp_path):
    name, out, manifest = run
    from pipeline import cli

    assert cli.main(["report", str(out)]) == 0
    path = out / "report.html"
    assert path.exists()
    size = path.stat().st_size
    assert size < 2_000_000, f"report.html is {size} bytes"

    p = probe(path, tmp_path)
    ids = [s["id"] for s in p["sections"]]
    # the sections follow the run: entry counts for the stage whose summary ranks entries (balance),
    # labels from the workflow's report.label_column, failures of the stage that fills the image column
    entries = ["balance"] if name == "full_run" else []
    assert ids == [
        "overview",
        "funnel",
        "stage-time",
        "clip-scores",
        *entries,
        "labels",
        "dataset",
        "caption-rewrites",
        "samples",
        "rejected",
        "download-failures",
        "metadata",
    ]
    for s in p["sections"]:
        assert s["height"] > 0 and s["title"], s["id"]
    control = [i for i in p["images"] if i["id"] == "probe-control"]
    assert control and control[0]["w"] == 0, "the probe must see a broken image as broken"
    images = [i for i in p["images"] if i["id"] != "probe-control"]
    broken = [i["alt"] for i in images if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
    assert broken == [], f"images that did not load: {broken}"
    assert p["external"] == [], "the report must not reference anything outside itself"

    plots = {i["section"] for i in images if i["cls"] == "plot"}
    expected = {"funnel", "stage-time", "clip-scores", "dataset"} | (
        {"balance"} if name == "full_run" else set()
    )
    assert plots == expected
    sections = {s["id"]: s for s in p["sections"]}
    if name == "demo_run":
        assert "balance" not in sections
    thumbs = [i for i in images if i["cls"] == "thumb"]
    kept_thumbs = [i for i in thumbs if i["section"] == "samples"]
    assert 0 < len(kept_thumbs) <= report_html.SAMPLES_PER_GROUP
    # images of rejected samples: the thumbnails the run kept (filtered_clip rows had image bytes)
    rejected_thumbs = [i for i in thumbs if i["section"] == "rejected"]
    assert rejected_thumbs and all(max(i["w"], i["h"]) <= THUMBNAIL_PX for i in rejected_thumbs)
    assert {i["section"] for i in thumbs} == {"samples", "rejected"}
    # every threshold the run used is named in the score section
    for label, value, _columns in report_html.thresholds(manifest):
        assert f"{label} = {value:.4f}" in sections["clip-scores"]["text"]
    assert report_html.thresholds(manifest), "both runs filter on the CLIP score"
    # the download failures of the demo world's broken entries are listed with their reasons
    df = _parquet(out)
    failed = df.filter(pl.col("rejected_by") == "download")
    assert failed.height > 0
    assert f"{failed.height} of {df.height} rows failed to download" in sections["download-failures"]["text"]
    for reason in failed["reason"].unique().to_list():
        assert reason[:40] in sections["download-failures"]["text"]
    assert "127.0.0.1" in sections["download-failures"]["text"], "failures by host (the demo server)"
    _numbers_equal_the_parquet(sections, df, manifest, name)

    screenshot(path, tmp_path / f"report_{name}.png")


def _numbers_equal_the_parquet(sections: dict, df: pl.DataFrame, manifest: dict, name: str) -> None:
    """What the rendered page says (innerText: table cells tab-separated) against the Parquet files
    and the manifest: rejected rows per (status, rule) and thumbnails, dataset statistics, caption
    rewrites, stage time."""
    kept = df.filter(pl.col("status") == OK)
    rej = df.filter(pl.col("status") != OK)
    text = sections["rejected"]["text"]
    assert f"{rej.height} of {df.height} rows rejected" in text
    for status, rule, n in rej.group_by(["status", "rule"]).len().iter_rows():
        thumbs = rej.filter((pl.col("rule") == rule) & pl.col("thumbnail").is_not_null()).height
        assert f"{status}\t{rule}\t{n}\t{thumbs}" in text, (status, rule)
    per_shard = rej.filter(pl.col("thumbnail").is_not_null()).group_by(["_file", "status"]).len()
    assert per_shard["len"].max() <= 8  # write.rejected_thumbnails (default)
    assert (rej.filter(pl.col("status") == "filtered_clip")["thumbnail"].is_not_null()).any()

    text = sections["dataset"]["text"]
    stats = {
        "original width (px)": pl.col("original_width"),
        "caption length (words)": pl.col("caption").map_elements(lambda c: len(c.split()), pl.Int64),
    }
    for label, expr in stats.items():
        cells = []
        for frame in (df, kept):
            v = frame.select(expr).to_series().drop_nulls().to_numpy()
            cells += [str(len(v)), f"{float(np.median(v)):.4g}"]
        pattern = "\t".join([re.escape(label), cells[0], cells[1], "[^\t]+", cells[2], cells[3]])
        assert re.search(pattern, text), (label, cells)
    if name == "full_run":
        for lang, n in df.filter(pl.col("language").is_not_null()).group_by("language").len().iter_rows():
            k = kept.filter(pl.col("language") == lang).height
            assert re.search(rf"\n{lang}\t{n}\t[^\t]+\t{k}\t", text), lang
    else:
        assert "Caption language" not in text  # no language column in the demo

    text = sections["caption-rewrites"]["text"]
    got = df.filter(pl.col("caption_rewrites").is_not_null())  # later stages may reject such rows
    n_rw = got["caption_rewrites"].list.len()
    assert f"{got.height} rows reached the rewriting stage; {int(n_rw.sum())} rewrites in all" in text
    full = got.filter((n_rw > 0) & pl.col("rewrite_reason").is_null()).height
    assert f"all rewrites asked for\t{full}\t" in text

    text = sections["stage-time"]["text"]
    for stage, secs in manifest["stage_seconds"].items():
        assert f"\n{stage}\t{secs:.1f}\t" in text, stage


def test_balance_section_numbers(full_run):
    """The rank plot's data: 'before' = the fitted state's counts, 'after' = entries of the kept rows."""
    out, manifest = full_run
    state_files = sorted((out / "_clipcurate" / "state").glob("*_balance.json"))
    assert len(state_files) == 1
    before = json.loads(state_files[0].read_text())["counts"]
    df = _parquet(out)
    kept = df.filter(pl.col("status") == OK)
    after: dict[int, int] = {}
    for ids in kept["metaclip_entries"].to_list():
        for e in ids:
            after[e] = after.get(e, 0) + 1
    page = report_html.render(str(out))
    sec = re.search(r'<section id="balance">(.*?)</section>', page, re.S).group(1)
    t = manifest["global_state"]["balance"]["t"]
    assert f"t = {t}" in sec
    rows = re.findall(
        r"<tr><td class=n>(\d+)</td><td>[^<]*</td><td class=n>(\d+)</td><td class=n>(\d+)</td>", sec
    )
    assert len(rows) >= 10
    for i, b, a in rows:
        assert int(b) == before[int(i)]
        assert int(a) == after.get(int(i), 0)
    # the most frequent entries of the pool come first
    assert [int(b) for _, b, _ in rows] == sorted((c for c in before if c), reverse=True)[: len(rows)]
    assert max(after.values()) < max(before), "balancing flattens the head"


def test_report_reads_any_fsspec_filesystem(demo_run):
    """The same report from a copy of the output on fsspec's memory filesystem (as for s3://)."""
    import fsspec

    out, _ = demo_run
    fs = fsspec.filesystem("memory")
    root = "/report-copy"
    for p in out.rglob("*"):
        if p.is_file() and p.name != "report.html":
            fs.pipe(f"{root}/{p.relative_to(out).as_posix()}", p.read_bytes())
    try:
        url = report_html.build(f"memory://{root}")
        assert url == f"memory://{root}/report.html"
        assert fs.cat(f"{root}/report.html").decode() == report_html.render(str(out))
    finally:
        fs.rm(root, recursive=True)


# ---- the report knows no stage by name -------------------------------------------------------------


def _section_ids(page: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)">', page)


def _section(page: str, sid: str) -> str:
    return re.search(rf'<section id="{re.escape(sid)}">(.*?)</section>', page, re.S).group(1)


def test_label_section_only_when_configured(demo_run, tmp_path):
    """The demo's workflow sets report.label_column (its generator's truth): a 'labels' section with
    the rows per value, the histogram split by value, the label and show_columns under each sample.
    The same run with the report keys removed has none of it."""
    out, _ = demo_run
    page = report_html.render(str(out))
    df = _parquet(out)
    sec = _section(page, "labels")
    for value, name in (("true", "mismatched caption"), ("false", "matched caption")):
        g = df.filter(pl.col("is_mismatched").cast(pl.String) == value)  # a bool column, as in the input
        kept = g.filter(pl.col("status") == OK).height
        assert f"<td>{name}</td><td>{value}</td><td class=n>{g.height}</td><td class=n>{kept}</td>" in sec
    assert "<td>mismatched caption</td>" in _section(page, "clip-scores")  # a group per label value
    samples = _section(page, "samples")
    row = df.filter(pl.col("status") == OK).sort("key").row(0, named=True)
    assert "label: " in samples and f"{row['true_colour']} {row['true_shape']}" in samples

    copy = tmp_path / "output"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"].pop("report", None)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    bare = report_html.render(str(copy))
    assert "labels" not in _section_ids(bare)
    assert "label: " not in _section(bare, "samples")
    assert "<td>kept (ok)</td>" in _section(bare, "clip-scores")  # kept vs rejected without a label


FETCH_PLUGIN = """
from stages.base import Stage


class FetchImages(Stage):
    name = "fetch_images"
    fills = ("image", "width", "height")

    def process(self, batch):
        return batch
"""


def _fake_run(root: Path, stages: list[dict], rejected_by: str) -> Path:
    """A run folder as the report reads it (manifest.json and one shard Parquet), without Ray."""
    import pyarrow as pa

    root.mkdir(parents=True)
    rows = {
        "key": ["0", "1", "2", "3"],
        "url": ["http://a.example/0.jpg", "http://a.example/1.jpg", "https://b.example:8080/2", None],
        "caption": ["a", "b", "c", "d"],
        "status": [OK, "download_failed", "download_failed", "filtered_basic"],
        "reason": [
            None,
            "http:404 not found",
            "timeout: read timed out",
            "basic:min_chars caption too short",
        ],
        "rejected_by": [None, rejected_by, rejected_by, rejected_by],
    }
    pq.write_table(pa.table(rows), root / "00000.parquet")
    manifest = {"name": "fake", "output": str(root), "total_rows": 4, "total_samples": 1,
                "shard_pattern": f"{root}/{{00000..00000}}.tar", "config": {"stages": stages}}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_failure_sections_follow_the_image_filling_declaration(tmp_path, monkeypatch):
    """No stage fills the image column: no failure section (and no score section without a score
    column). A plug-in stage that declares it fills 'image' gets one, under its own name."""
    run = _fake_run(tmp_path / "plain", [{"read": {}}, {"basic_filter": {}}, {"write": {}}], "basic_filter")
    page = report_html.render(str(run))
    assert _section_ids(page) == ["overview", "funnel", "dataset", "samples", "rejected", "metadata"]
    assert "failed to" not in page

    (tmp_path / "report_plugin.py").write_text(FETCH_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "report_plugin:FetchImages"
    run = _fake_run(tmp_path / "plugin", [{"read": {}}, {name: {}}, {"write": {}}], name)
    page = report_html.render(str(run))
    sid = "report-plugin-fetchimages-failures"
    assert _section_ids(page) == ["overview", "funnel", "dataset", "samples", "rejected", sid, "metadata"]
    sec = _section(page, sid)
    assert f"3 of 4 rows failed to {name} (75.0%)" in sec
    for cls in ("<td>http:404</td>", "<td>timeout:</td>", "<td>basic:min_chars</td>"):
        assert cls in sec  # by class: the reason's first word
    assert "<td>a.example</td><td class=n>1</td>" in sec and "<td>b.example</td><td class=n>1</td>" in sec


def test_html_package_names_no_stage_and_stays_small():
    """tests/test_layout.py's two rules, for the report's package alone."""
    from test_layout import ENGINE_NAMES, _strings_and_names

    from pipeline import registry

    words = set(registry.names()) | set(ENGINE_NAMES)
    files = sorted((REPO / "pipeline" / "html").glob("*.py"))
    assert len(files) >= 5
    for f in files:
        text = f.read_text()
        assert len(text.splitlines()) <= 300, f
        strings, names = _strings_and_names(text)
        for w in words:
            pat = rf"(?<![A-Za-z0-9_]){re.escape(w)}(?![A-Za-z0-9_])"
            assert not any(re.search(pat, s, flags=re.IGNORECASE) for s in strings), (f, w)
            assert w in ("read", "write") or w not in names, (f, w)
    assert not (REPO / "pipeline" / "report_html.py").exists()


# ---- acceptance 3: the summary's numbers --------------------------------------------------------


def parse_summary(text: str) -> tuple[dict[str, list[str]], str]:
    """The rows of print_summary's rich table (stage -> cells; wrapped cells re-joined) and the rest."""
    rows: dict[str, list[str]] = {}
    cur = None
    rest = []
    for line in text.splitlines():
        if "│" not in line:
            rest.append(line)
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells[0]:
            cur = cells[0]
            rows[cur] = cells
        elif cur is not None:
            rows[cur] = [f"{a} {b}".strip() for a, b in zip(rows[cur], cells)]
    return rows, "\n".join(rest)


def test_summary_counts_equal_manifest_and_parquet(run):
    name, out, manifest = run
    buf = io.StringIO()
    report.print_summary(manifest, report_path=str(out / "report.html"), file=buf)
    rows, rest = parse_summary(buf.getvalue())

    df = _parquet(out)
    by_stage: dict[str, dict[str, int]] = {}
    for stage, status, n in (
        df.filter(pl.col("status") != OK).group_by(["rejected_by", "status"]).len().iter_rows()
    ):
        by_stage.setdefault(stage, {})[status] = n
    status_counts = dict(df.group_by("status").len().iter_rows())
    assert manifest["stage_status"] == by_stage
    assert manifest["status_counts"] == status_counts

    order = [next(iter(s)) for s in manifest["config"]["stages"]]
    assert list(rows) == order
    remaining = df.height
    for stage in order:
        stage_in, rejected, ok_out = rows[stage][1], rows[stage][2], rows[stage][3]
        shown = {k: int(v) for k, v in re.findall(r"([a-z_]+): (\d+)", rejected)}
        assert shown == by_stage.get(stage, {}), stage
        assert int(stage_in) == remaining
        remaining -= sum(shown.values())
        assert int(ok_out) == remaining
    assert remaining == status_counts[OK] == manifest["total_samples"]
    # every rejecting stage is in the table, so the table accounts for every row
    assert set(by_stage) <= set(order)
    m = re.search(r"rows: (\d+) in, (\d+) out \((\d+) ok samples in (\d+) shards\)", rest)
    assert m, rest
    assert int(m[1]) == int(m[2]) == df.height
    assert int(m[3]) == status_counts[OK]
    assert int(m[4]) == len(list(out.glob("*.tar")))
    assert f"report:   {out / 'report.html'}" in rest
