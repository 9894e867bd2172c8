"""Time per stage: the manifest's ``stage_seconds`` (busy seconds summed over workers, this run) and
``fit_seconds`` (the fit pass of global stages), in pipeline order, as a chart and a table."""

from __future__ import annotations

from pipeline.html import charts
from pipeline.html.markup import img, section, share, table


def timing_section(manifest: dict, order: list[str]) -> str | None:
    """The ``stage-time`` section, or None when the manifest records no stage time."""
    busy, fit = manifest.get("stage_seconds") or {}, manifest.get("fit_seconds") or {}
    if not busy:
        return None
    names = [s for s in order if s in busy or s in fit] + [s for s in busy if s not in order]
    b = [float(busy.get(s) or 0.0) for s in names]
    f = [float(fit.get(s) or 0.0) for s in names]
    total = sum(b) + sum(f)
    rows = [[s, f"{x:.1f}", f"{y:.1f}" if y else "-", share(x + y, total)] for s, x, y in zip(names, b, f)]
    body = (
        f"<p>{total:.1f} s of stage time in all (workers run in parallel: wall time "
        f"{float(manifest.get('wall_seconds') or 0):.1f} s). On a resumed run, this run's time only.</p>"
    )
    body += table(["stage", "busy s", "fit s", "share"], rows, {1, 2, 3})
    body += img(charts.stage_time(names, b, f), "time per stage")
    return section("stage-time", "Time per stage", body)
