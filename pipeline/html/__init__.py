"""``report.html``: one self-contained page per run (inline CSS, plots and thumbnails as ``data:``
URIs, no script, no network), written beside ``manifest.json``.

The numbers come from the shard Parquet files (every row, every status), aggregated with polars;
``manifest.json`` adds the config, the models, the versions, stage timings and the fitted global
state summaries; ``_clipcurate/state/`` holds the fitted states (entry counts); kept images are read
back from the shard tars. Everything is read through fsspec, so ``s3://`` outputs work.

The package knows no stage by name. Sections, in this order (ids are stable for a given run):

* ``overview``, ``funnel``: always;
* ``stage-time``: when the manifest has ``stage_seconds`` (``timing``);
* one per score column (``clip_score`` and the float columns the stages write) present in the rows, id ``<column>s`` with
  ``_`` as ``-`` (``clip-scores``), with every threshold of the run: a stage config's ``min_score``
  or a global state summary's ``threshold``, drawn on the columns their stage requires or produces;
* one per global stage whose state summary has ``top_entries``, id = the stage name: entry counts
  before (the fitted ``counts``) and after (the kept rows' entry-id column the stage produces);
* one per global stage whose state summary lists ``languages``, id ``<stage>-languages``: each
  language's threshold t, pool, matches, and the rows kept (``languages``);
* ``labels``: only with the workflow's ``report.label_column``;
* ``dataset``: statistics of all rows against the kept rows, from the size, caption and language columns
  the rows have (``dataset``);
* one for the rewrites column (``schemas.row.REWRITES_COLUMN``) when present, id ``caption-rewrites``:
  outcome counts and why generations were rejected (``rewrites``);
* ``samples``: always, kept rows (shows ``report.show_columns`` under each sample);
* ``rejected``: always, rejected rows per (status, rule), pictures from the ``thumbnail`` column;
* ``pairs``: when a rejected row's reason names another row's key (``key K``: the dedup tiers), counts per
  (stage, rule) and a few pairs side by side; and the global state summaries' ``*_histogram`` tables (``pairs``);
* one per stage that declares it fills the ``image`` column, id ``<stage>-failures``;
* ``metadata``: always.

    build("demo_out/output")  -> "demo_out/output/report.html"

Modules: ``data`` (reading, declarations), ``markup`` (HTML pieces), ``charts`` (matplotlib),
``sections``, ``languages``, ``timing``, ``dataset``, ``rewrites``, ``samples``, ``pairs``, ``page`` (``render``, ``build``).
"""

from pipeline.html.data import thresholds
from pipeline.html.page import REPORT_NAME, build, render
from pipeline.html.samples import SAMPLES_PER_GROUP

__all__ = ["REPORT_NAME", "SAMPLES_PER_GROUP", "build", "render", "thresholds"]
