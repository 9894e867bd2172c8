"""The download stage, called directly (no Ray), against real HTTP servers on 127.0.0.1.

``tests/badserver.py`` serves one path per bad-input case (Acceptance 1 of the download issue);
the resize tests compare our output with img2dataset 1.47's own ``Resizer`` on the same bytes
(Acceptance 2). Timeouts are 1-4 s, so the whole file runs in well under a minute.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re

import cv2
import numpy as np
import pyarrow as pa
import pytest
from img2dataset.blurrer import BoundingBoxBlurrer
from img2dataset.resizer import Resizer
from PIL import Image

from schemas.status import STATUSES
from stages.download import (
    RESIZE_MODES,
    AddressPolicy,
    Download,
    DownloadConfig,
    ImageProcessor,
    InvalidURL,
    is_disallowed,
    jpeg_complete,
    normalize_url,
)
from tests.badserver import make_jpeg, make_png_rgba, serve_bad
from tests.conftest import REPO, run_download

LOOPBACK = ["127.0.0.0/8"]  # lets the tests reach the bad server while the guard stays on for the rest


def run(urls, extra_cols=None, **cfg) -> pa.Table:
    cfg.setdefault("timeout", 1)
    cfg.setdefault("thread_count", 16)
    return run_download(urls, extra_cols, **cfg)


# (path or raw URL, status, reason pattern); a path starting with "/" is served by badserver.
BAD_CASES = [
    ("/ok.jpg", "ok", None),
    ("/404", "download_failed", r"^HTTP 404$"),
    ("/500", "download_failed", r"^HTTP 500$"),
    ("/slow", "download_failed", r"^ReadTimeout: .*read timeout=2"),
    ("/drip", "download_failed", r"^Timeout: body not complete within total_timeout 4s$"),
    ("/truncated.jpg", "decode_failed", r"^truncated JPEG \(no end-of-image marker\)$"),
    ("/html.jpg", "decode_failed", r"^not an image \(HTML\)$"),
    ("/empty.jpg", "decode_failed", r"^empty body$"),
    ("/bomb.png", "decode_failed", r"^image over max_pixels 89478485: 10000x10000$"),
    ("/loop", "download_failed", r"^redirect loop$"),
    ("/redirect-chain/11", "download_failed", r"^too many redirects \(>10\)$"),
    ("/redirect-private", "blocked_address", r"^private address 10\.255\.255\.1 refused$"),
    ("/redirect-linklocal", "blocked_address", r"^link-local address 169\.254\.169\.254 refused$"),
    ("/big-nolength", "download_failed", r"^body over max_response_bytes 1000000$"),
    ("/big-chunked", "download_failed", r"^body over max_response_bytes 1000000$"),
    ("/big-cl", "download_failed", r"^Content-Length 50000000 over max_response_bytes 1000000$"),
    ("/lying-cl", "decode_failed", r"^truncated JPEG"),  # only the announced 2000 bytes are read
    ("/noai.jpg", "opted_out", r"^X-Robots-Tag: noai$"),
    ("/otherbot.jpg", "ok", None),  # "otherbot: noai" targets another agent
    ("/ünïcode.jpg", "ok", None),
    ("/redirect-ok", "ok", None),
    ("", "invalid_url", r"^empty URL$"),
    (None, "invalid_url", r"^null URL$"),
    ("www.example.com/cat.jpg", "invalid_url", r"^no scheme"),
    ("ftp://127.0.0.1/cat.jpg", "invalid_url", r"^unsupported scheme ftp: "),
    ("javascript:alert(1)", "invalid_url", r"^unsupported scheme javascript: "),
    ("http://[::1/x.jpg", "invalid_url", r"^unparsable URL"),
]


# the stable rule tag (``rule`` column) of each failing case (README, "Statuses and reasons")
BAD_RULES = {
    "/404": "http_404", "/500": "http_500", "/slow": "read_timeout", "/drip": "total_timeout",
    "/truncated.jpg": "truncated_jpeg", "/html.jpg": "not_an_image", "/empty.jpg": "empty_body",
    "/bomb.png": "max_pixels", "/loop": "redirect_loop", "/redirect-chain/11": "too_many_redirects",
    "/redirect-private": "blocked:private", "/redirect-linklocal": "blocked:link_local",
    "/big-nolength": "max_response_bytes", "/big-chunked": "max_response_bytes", "/big-cl": "max_response_bytes",
    "/lying-cl": "truncated_jpeg", "/noai.jpg": "x_robots_tag", "": "empty_url", None: "null_url",
    "www.example.com/cat.jpg": "no_scheme", "ftp://127.0.0.1/cat.jpg": "unsupported_scheme",
    "javascript:alert(1)": "unsupported_scheme", "http://[::1/x.jpg": "unparsable_url",
}  # fmt: skip


@pytest.fixture(scope="module")
def bad_out() -> pa.Table:
    """The stage's output on ``BAD_CASES``, one row per case, in order."""
    with serve_bad() as srv:
        urls = [srv.url(c) if isinstance(c, str) and c.startswith("/") else c for c, _, _ in BAD_CASES]
        # 2 s per read, 4 s in all: /slow (6 s) and /drip (10 s) exceed them by far, while a busy
        # machine still serves the good rows in time
        return run(urls, allowed_networks=LOOPBACK, max_response_bytes=1_000_000, timeout=2, total_timeout=4)


def test_bad_inputs_get_documented_statuses(bad_out):
    rows = bad_out.to_pylist()
    for (case, status, pattern), row in zip(BAD_CASES, rows):
        assert row["status"] == status, (case, row["status"], row["reason"])
        if pattern is None:
            assert row["reason"] is None and row["image"], case
            assert (row["width"], row["height"]) == (256, 256), case
            assert (row["original_width"], row["original_height"]) == (640, 480), case
            assert row["sha256"] and row["http_status"] == 200
        else:
            assert row["reason"] and re.search(pattern, row["reason"]), (case, row["reason"])
            assert row["image"] is None and row["sha256"] is None, case
            assert row["rejected_by"] == "download"
        assert row["rule"] == BAD_RULES.get(case), (case, row["reason"])
    by_case = {c: r for (c, _, _), r in zip(BAD_CASES, rows)}
    assert by_case["/404"]["http_status"] == 404 and by_case["/500"]["http_status"] == 500
    assert by_case["/noai.jpg"]["http_status"] == 200


def test_guard_refuses_loopback_before_connecting():
    with serve_bad() as srv:
        out = run([srv.url("/ok.jpg"), srv.url("/redirect-ok")])
        assert srv.hits["/ok.jpg"] == 0 and srv.hits["/redirect-ok"] == 0  # nothing was dialled
    assert out.column("status").to_pylist() == ["blocked_address"] * 2
    assert set(out.column("reason").to_pylist()) == {"loopback address 127.0.0.1 refused"}


def test_https_and_ipv6_go_through_the_guard_too():
    with serve_bad() as srv:
        port = srv.base.rsplit(":", 1)[1]
        blocked = run([f"https://127.0.0.1:{port}/ok.jpg", f"http://[::1]:{port}/ok.jpg"])
        tls = run([f"https://127.0.0.1:{port}/ok.jpg"], allowed_networks=LOOPBACK)
    assert blocked.column("reason").to_pylist() == [
        "loopback address 127.0.0.1 refused",
        "loopback address ::1 refused",
    ]
    # allowed, dialled, and the plain-HTTP server cannot speak TLS: a download failure, not a crash
    assert tls.column("status").to_pylist() == ["download_failed"]
    assert re.search(r"SSL|Timeout|Protocol", tls.column("reason")[0].as_py())


def test_allow_private_networks_turns_the_guard_off():
    with serve_bad() as srv:
        out = run([srv.url("/ok.jpg")], allow_private_networks=True)
    assert out.column("status").to_pylist() == ["ok"]


def test_redirects_are_checked_on_every_hop():
    # The first hop (127.0.0.1) is allowed; the redirect target 10.x is refused without dialling it.
    with serve_bad() as srv:
        out = run([srv.url("/redirect-private")], allowed_networks=["127.0.0.1/32"], max_redirects=3)
    assert out.column("reason").to_pylist() == ["private address 10.255.255.1 refused"]


def test_connection_is_reused_and_not_poisoned_by_a_lying_content_length():
    """21 URLs on one keep-alive host with 2 threads: the connections the stage opens (counted by
    the download package's dial hook, called before every ``connect()``) are a few, not one per
    URL; the connection a lying Content-Length leaves unusable is not reused for the next image."""
    from stages.download import set_dial_hook

    dials: list[tuple[str, int]] = []
    set_dial_hook(lambda ip, port: dials.append((ip, port)))
    try:
        with serve_bad() as srv:
            urls = [srv.url("/lying-cl")] + [srv.url(f"/ok.jpg?n={i}") for i in range(20)]
            out = run(urls, allowed_networks=LOOPBACK, thread_count=2)
    finally:
        set_dial_hook(None)
    assert out.column("status").to_pylist() == ["decode_failed"] + ["ok"] * 20
    assert len(set(dials)) == 1 and dials[0][0] == "127.0.0.1", dials
    # 2 threads: a connection each, one more for the lying one (a few spare for a busy machine)
    assert 1 <= len(dials) <= 5, f"{len(dials)} connections opened for {len(urls)} URLs on one host"


def test_retries_only_transient_failures():
    with serve_bad() as srv:
        urls = [srv.url("/flaky?id=a"), srv.url("/404")]
        out = run(urls, allowed_networks=LOOPBACK, retries=1)
        assert srv.hits["/flaky"] == 2 and srv.hits["/404"] == 1
    assert out.column("status").to_pylist() == ["ok", "download_failed"]
    with serve_bad() as srv:
        out = run([srv.url("/flaky?id=b")], allowed_networks=LOOPBACK, retries=0)
    assert out.column("reason").to_pylist() == ["HTTP 503"]


def test_user_agent_specific_opt_out():
    with serve_bad() as srv:
        url = srv.url("/otherbot.jpg")
        mine = run([url], allowed_networks=LOOPBACK, user_agent_token="OtherBot")
        off = run([srv.url("/noai.jpg")], allowed_networks=LOOPBACK, disallowed_header_directives=[])
    assert mine.column("status").to_pylist() == ["opted_out"]
    assert off.column("status").to_pylist() == ["ok"]


def test_is_disallowed_follows_img2dataset():
    d = {"noai", "noimageai", "noindex", "noimageindex"}
    assert is_disallowed(["noai"], None, d)
    assert is_disallowed(["nofollow, NoImageIndex"], None, d)
    assert not is_disallowed(["nofollow"], None, d)
    assert not is_disallowed(["otherbot: noai"], None, d)
    assert is_disallowed(["otherbot: noai"], "otherbot", d)
    assert is_disallowed(["nofollow", "noindex"], None, d)  # several headers


def test_hashes_exif_and_verify_hash():
    with serve_bad() as srv:
        ok = srv.url("/exif.jpg")
        body = make_jpeg(exif=True)
        good = hashlib.sha256(body).hexdigest()
        out = run(
            [ok, ok, ok],
            extra_cols={"expected": [good, "0" * 64, None]},
            allowed_networks=LOOPBACK,
            verify_hash=("expected", "sha256"),
        )
        md5 = run([ok], allowed_networks=LOOPBACK, compute_hash="md5", extract_exif=False)
    assert out.column("status").to_pylist() == ["ok", "hash_mismatch", "hash_mismatch"]
    assert out.column("reason").to_pylist()[1] == "sha256 mismatch"
    assert out.column("sha256").to_pylist()[0] == good
    exif = json.loads(out.column("exif")[0].as_py())
    assert exif["Image Make"] == "TestMake" and exif["Image Model"] == "TestModel"
    assert md5.column("md5").to_pylist() == [hashlib.md5(body).hexdigest()]
    assert md5.column("sha256").to_pylist() == [None] and "exif" not in md5.column_names


def test_size_filters_use_img2dataset_messages():
    with serve_bad() as srv:
        url = srv.url("/ok.jpg")  # 640x480
        small = run([url], allowed_networks=LOOPBACK, min_image_size=500)
        area = run([url], allowed_networks=LOOPBACK, max_image_area=640 * 480 - 1)
        ratio = run([url], allowed_networks=LOOPBACK, max_aspect_ratio=1.2)
    assert small.select(["status", "reason"]).to_pylist() == [
        {"status": "filtered_size", "reason": "image too small"}
    ]
    assert area.column("reason").to_pylist() == ["image area too large"]
    assert ratio.column("reason").to_pylist() == ["aspect ratio too large"]


def test_bbox_blurring_matches_img2dataset():
    boxes = [[0.1, 0.1, 0.5, 0.6]]
    with serve_bad() as srv:
        out = run(
            [srv.url("/ok.jpg"), srv.url("/ok.jpg")],
            extra_cols={"face_bboxes": [json.dumps(boxes), None]},
            allowed_networks=LOOPBACK,
            bbox_col="face_bboxes",
        )
    assert out.column("status").to_pylist() == ["ok", "ok"]
    ref = Resizer(256, "border", False, blurrer=BoundingBoxBlurrer())(io.BytesIO(make_jpeg()), boxes)
    assert ref[-1] is None
    assert out.column("image")[0].as_py() == ref[0]
    assert out.column("image")[0].as_py() != out.column("image")[1].as_py()  # the box was blurred


def test_missing_bbox_column_is_a_row_status_not_a_crash():
    with serve_bad() as srv:
        out = run([srv.url("/ok.jpg")], allowed_networks=LOOPBACK, bbox_col="nope")
    assert out.column("status").to_pylist() == ["stage_error"]
    assert "nope" in out.column("reason")[0].as_py()


def test_rows_already_rejected_pass_through_untouched():
    with serve_bad() as srv:
        table = pa.table(
            {
                "key": ["a", "b"],
                "url": [srv.url("/ok.jpg"), srv.url("/ok.jpg")],
                "status": ["ok", "duplicate"],
                "reason": [None, "same as a"],
            }
        )
        stage = Download(DownloadConfig(allowed_networks=LOOPBACK, timeout=1))
        out = stage(table)
        stage.close()
        assert srv.hits["/ok.jpg"] == 1
    assert out.column("status").to_pylist() == ["ok", "duplicate"]
    assert out.column("reason").to_pylist() == [None, "same as a"]


def test_stage_pickles_before_and_after_setup():
    stage = Download(DownloadConfig(allow_private_networks=True))
    pickle.loads(pickle.dumps(stage))
    stage.setup()
    clone = pickle.loads(pickle.dumps(stage))
    with serve_bad() as srv:
        table = pa.table({"key": ["a"], "url": [srv.url("/ok.jpg")], "status": ["ok"]})
        assert clone(table).column("status").to_pylist() == ["ok"]
    stage.close()


def test_normalize_url():
    assert (
        normalize_url("  http://Example.com/a b/ü.jpg?q=ä ") == "http://example.com/a%20b/%C3%BC.jpg?q=%C3%A4"
    )
    assert normalize_url("https://bücher.example/x.jpg") == "https://xn--bcher-kva.example/x.jpg"
    assert normalize_url("http://h.test/%41.jpg") == "http://h.test/%41.jpg"  # already encoded: unchanged
    assert normalize_url("http://[::1]:8080/x") == "http://[::1]:8080/x"
    for bad, why in [
        ("data:image/png;base64,AAAA", "unsupported scheme data:"),
        ("file:///etc/passwd", "unsupported scheme file:"),
        ("http:///x.jpg", "no host"),
        ("http://h.test:99999/x", "bad host or port"),
        (12, "not a string"),
    ]:
        with pytest.raises(InvalidURL, match=re.escape(why)):
            normalize_url(bad)


def test_address_policy():
    guard = AddressPolicy(False, [])
    assert guard.refusal("93.184.216.34") is None
    assert guard.refusal("2606:2800:220:1:248:1893:25c8:1946") is None
    assert guard.refusal("127.0.0.1") == "loopback address 127.0.0.1 refused"
    assert guard.refusal("::1") == "loopback address ::1 refused"
    assert guard.refusal("10.1.2.3") == "private address 10.1.2.3 refused"
    assert guard.refusal("192.168.0.1") == "private address 192.168.0.1 refused"
    assert guard.refusal("169.254.169.254") == "link-local address 169.254.169.254 refused"
    assert guard.refusal("fe80::1") == "link-local address fe80::1 refused"
    assert guard.refusal("224.0.0.1") == "multicast address 224.0.0.1 refused"
    assert guard.refusal("0.0.0.0") == "unspecified address 0.0.0.0 refused"
    assert guard.refusal("::ffff:10.0.0.1") == "private address 10.0.0.1 refused"  # IPv4-mapped
    assert guard.refusal("100.64.0.1") == "non-public address 100.64.0.1 refused"  # carrier-grade NAT
    assert AddressPolicy(False, ["10.0.0.0/8"]).refusal("10.1.2.3") is None
    assert AddressPolicy(True, []).refusal("127.0.0.1") is None


def test_jpeg_complete():
    data = make_jpeg()
    assert jpeg_complete(data)
    assert not jpeg_complete(data[: len(data) // 2])
    assert not jpeg_complete(data[:-2])


def test_disable_all_reencoding_keeps_the_bytes_but_still_checks_them():
    proc = ImageProcessor(DownloadConfig(disable_all_reencoding=True))
    data = make_jpeg()
    out = proc(data)
    assert out.image == data and (out.width, out.height) == (640, 480)
    with pytest.raises(Exception, match="not an image"):
        proc(b"<html>nope</html>")


def test_bad_config_is_refused():
    with pytest.raises(ValueError):
        DownloadConfig(resize_mode="stretch")
    with pytest.raises(ValueError):
        DownloadConfig(allowed_networks=["not-a-net"])
    with pytest.raises(ValueError):
        DownloadConfig(unknown_key=1)
    assert DownloadConfig(disallowed_header_directives=None).disallowed_header_directives == [
        "noai",
        "noimageai",
        "noindex",
        "noimageindex",
    ]
    with pytest.raises(ValueError, match="0..9 for png"):
        DownloadConfig(encode_format="png", encode_quality=95)


# ---- Acceptance 2: the same images as img2dataset --------------------------------------------


def _gray_jpeg(w, h):
    arr = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, "JPEG", quality=90)
    return buf.getvalue()


SOURCES = {
    "jpeg_1000x700": make_jpeg(1000, 700, seed=1),  # DCT-scaled fast path for most modes
    "jpeg_500x900": make_jpeg(500, 900, seed=2),
    "jpeg_2400x1600": make_jpeg(2400, 1600, seed=3),  # 1/4 scale decode
    "jpeg_120x90": make_jpeg(120, 90, seed=4),  # upscaled: Resizer path
    "png_rgba_300x200": make_png_rgba(),  # alpha matting: Resizer path
    "gray_800x600": _gray_jpeg(800, 600),  # one channel: Resizer path
}


def _decode(b: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED).astype(np.int16)


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("only_bigger", [False, True])
def test_resize_matches_img2dataset(mode, only_bigger):
    cfg = DownloadConfig(image_size=256, resize_mode=mode, resize_only_if_bigger=only_bigger)
    ours = ImageProcessor(cfg)
    exact = ImageProcessor(cfg.model_copy(update={"fast_decode": False}))
    ref_resizer = Resizer(image_size=256, resize_mode=mode, resize_only_if_bigger=only_bigger)
    for name, data in SOURCES.items():
        ref = ref_resizer(io.BytesIO(data))
        assert ref[-1] is None, (name, ref[-1])
        got = ours(data)
        assert (got.width, got.height, got.original_width, got.original_height) == tuple(ref[1:5]), (
            mode,
            name,
        )
        a, b = _decode(got.image), _decode(ref[0])
        assert a.shape == b.shape
        diff = np.abs(a - b)
        psnr = 10 * np.log10(255**2 / max(1e-9, float((diff.astype(np.float64) ** 2).mean())))
        # DCT-scaled decoding is not bit-exact area averaging: within 3 levels on average, >= 35 dB.
        assert diff.mean() <= 3.0 and psnr >= 35, (mode, name, diff.mean(), psnr)
        assert exact(data).image == ref[0], (mode, name)  # fast_decode off: byte-identical to the Resizer


def test_fast_path_scales_and_encodes_like_the_resizer():
    cfg = DownloadConfig(image_size=256, resize_mode="keep_ratio", encode_format="webp", encode_quality=80)
    proc = ImageProcessor(cfg)
    assert proc.reduction(2400, 1600) == 4  # keeps >= image_size on the fitted (short) side
    assert proc.reduction(4000, 3000) == 8
    assert proc.reduction(600, 500) == 1
    assert proc.reduction(300, 300) == 1
    out = proc(SOURCES["jpeg_2400x1600"])
    assert out.image[:4] == b"RIFF" and (out.width, out.height) == (384, 256)


def readme_statuses() -> dict[str, tuple[str, str]]:
    """README "Statuses and reasons": status -> (set by, rule tags) as written in its table."""
    text = (REPO / "README.md").read_text().split("### Statuses and reasons", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \|([^|]*)\|([^|]*)\|", text, flags=re.MULTILINE)
    return {status: (by.strip(), tags) for status, by, tags in rows}


def test_status_vocabulary_is_the_shared_one(bad_out):
    """What the stage emits on real bad inputs (``BAD_CASES``, a hash mismatch, a size filter): every
    status is in ``schemas.status.STATUSES`` and documented in the README's table as set by download,
    every rule tag is listed there for its status, and every status the README says download sets
    is one the stage was seen to emit."""
    with serve_bad() as srv:
        url = srv.url("/ok.jpg")  # 640x480
        more = [
            run(
                [url],
                extra_cols={"expected": ["0" * 64]},
                allowed_networks=LOOPBACK,
                verify_hash=("expected", "sha256"),
            ),
            run([url], allowed_networks=LOOPBACK, min_image_size=500),
        ]
    emitted = {
        (r["status"], r["rule"]) for t in (bad_out, *more) for r in t.select(["status", "rule"]).to_pylist()
    }
    documented = readme_statuses()
    assert set(documented) == set(STATUSES), "the README's table is the vocabulary"
    for status, rule in emitted:
        assert status in STATUSES, status
        if status == "ok":
            assert rule is None
            continue
        by, tags = documented[status]
        assert "download" in by, (status, by)
        shown = "http_<code>" if re.fullmatch(r"http_\d{3}", rule) else rule
        assert f"`{shown}`" in tags, (status, rule, tags)
    download_statuses = {s for s, (by, _) in documented.items() if "download" in by}
    assert {s for s, _ in emitted} == download_statuses | {"ok"}


@pytest.mark.parametrize(
    "ip",
    ["169.254.169.254", "::ffff:169.254.169.254", "2002:a9fe:a9fe::1", "64:ff9b::a9fe:a9fe", "fe80::1%eth0",
     "192.0.0.8", "fec0::1", "0.0.0.0", "::", "224.0.0.1", "ff02::1"],
)  # fmt: skip
def test_link_local_and_other_non_public_addresses_stay_refused_with_private_networks_open(ip):
    """Cloud metadata (169.254.169.254) and other non-public addresses, also inside IPv6 (mapped,
    6to4, NAT64), are refused even with ``allow_private_networks: true``; private and loopback open."""
    from stages.download.guard import AddressPolicy

    assert AddressPolicy(True, []).refusal(ip) is not None
    assert AddressPolicy(False, []).refusal(ip) is not None
    assert (
        AddressPolicy(True, []).refusal("10.1.2.3") is None
        and AddressPolicy(True, []).refusal("127.0.0.1") is None
    )


@pytest.mark.timeout(120)
def test_a_row_that_raises_in_decoding_is_its_stage_error_and_never_stalls_the_shard():
    """One row's decoder raising (a bug, an odd file) makes that row ``stage_error`` while the other
    rows of the shard, downloaded in the same window, come out ok: no refetch, no stall."""
    from stages.download import Download

    with (
        serve_bad() as srv,
        Download({"allowed_networks": LOOPBACK, "thread_count": 2, "batch_size": 4, "timeout": 2}) as stage,
    ):
        real, calls = stage.images, []

        def flaky(data, bbox=None):  # the real decoder, except that its second call raises
            calls.append(1)
            if len(calls) == 2:
                raise KeyError("unexpected EXIF layout")
            return real(data, bbox)

        stage.images = flaky
        urls = [srv.url(f"/ok.jpg?id={i}") for i in range(40)]
        table = pa.table({"key": [f"{i:04d}" for i in range(40)], "url": urls, "status": ["ok"] * 40})
        out = stage(table)
        hits = srv.hits["/ok.jpg"]
    status = out.column("status").to_pylist()
    assert status.count("stage_error") == 1 and status.count("ok") == 39, status
    bad = [r for r in out.to_pylist() if r["status"] == "stage_error"][0]
    assert bad["reason"] == "download: KeyError: 'unexpected EXIF layout'" and bad["image"] is None
    assert hits == 40, "every URL fetched once: the failed row is not fetched again"


def test_verify_hash_keeps_the_expected_hash_on_hash_mismatch_rows():
    """DataComp's layout: the input's ``sha256`` column is both the hash checked and the hash computed.
    A row that matches has it (the bytes' hash); a hash_mismatch row keeps the expected value, not null."""
    with serve_bad() as srv:
        ok = srv.url("/exif.jpg")
        good = hashlib.sha256(make_jpeg(exif=True)).hexdigest()
        wrong = "0" * 64
        out = run(
            [ok, ok, srv.url("/404")],
            extra_cols={"sha256": [good.upper(), wrong, wrong]},
            allowed_networks=LOOPBACK,
            verify_hash=("sha256", "sha256"),
        )
    assert out.column("status").to_pylist() == ["ok", "hash_mismatch", "download_failed"]
    assert out.column("sha256").to_pylist() == [good, wrong, wrong]
