"""The whole page: which sections a run gets, in order, and writing ``report.html``."""

from __future__ import annotations

from pipeline.html import evaluation, sections
from pipeline.html.data import (
    entry_stages,
    image_fillers,
    load_rows,
    report_config,
    stage_entries,
    wanted_columns,
)
from pipeline.html.dataset import dataset_section
from pipeline.html.languages import language_columns, language_section, language_stages
from pipeline.html.markup import CSS, e
from pipeline.html.pairs import pairs_section
from pipeline.html.rewrites import rewrites_section
from pipeline.html.samples import rejected, samples
from pipeline.html.timing import timing_section
from pipeline.runs import RunDir
from schemas.manifest import MANIFEST_NAME
from stages.io import atomic_write_bytes

REPORT_NAME = "report.html"


def render(output: str) -> str:
    """The report's HTML for the run in ``output``."""
    rd = RunDir(output)
    manifest = rd.read_json(rd.path(MANIFEST_NAME))
    stages = stage_entries(manifest)
    order = [s.name for s in stages]
    rc = report_config(manifest)
    df = load_rows(rd, [*wanted_columns(manifest, stages, rc), *language_columns(manifest, stages)])
    parts = [sections.overview(manifest, df), sections.funnel(manifest, df, order)]
    parts.append(timing_section(manifest, order))
    parts += sections.score_sections(manifest, df, rc)
    parts += [sections.entry_section(rd, manifest, df, s) for s in entry_stages(manifest, stages)]
    parts += [language_section(manifest, df, s) for s in language_stages(manifest, stages)]
    if rc.label_column:
        parts.append(sections.label_section(df, rc, order))
    parts += [dataset_section(df), rewrites_section(df)]
    parts += [samples(rd, df, rc), rejected(df, rc), pairs_section(rd, manifest, df, rc)]
    parts += [sections.failure_section(df, s) for s in image_fillers(stages)]
    parts += evaluation.sections(rd)
    parts.append(sections.metadata(manifest))
    parts = [p for p in parts if p]  # sections that do not apply to this run are None
    ids = [p.split('"', 2)[1] for p in parts]  # every part starts with <section id="...">
    nav = " &middot; ".join(f'<a href="#{s}">{s}</a>' for s in ids)
    title = f"clipcurate report: {e(manifest.get('name'))}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{CSS}</style></head><body><header><h1>{title}</h1>"
        f"<p>{e(manifest.get('output'))} &middot; finished {e(manifest.get('finished_at'))}</p></header>"
        f"<main><p>{nav}</p>{''.join(parts)}</main></body></html>"
    )


def build(output: str) -> str:
    """Write ``OUTPUT/report.html`` and return its path (a URL for remote filesystems)."""
    rd = RunDir(output)
    page = render(output)
    path = rd.path(REPORT_NAME)
    atomic_write_bytes(rd.fs, path, page.encode("utf-8"))
    return rd.url_of(path)
