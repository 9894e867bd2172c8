"""The report's ``#evaluation`` section: what ``clipcurate eval`` measured (``OUTPUT/eval.json``), when
the output has been evaluated. No eval.json, no section."""

from __future__ import annotations

import json

from pipeline.html.markup import e, note, section, table
from pipeline.runs import RunDir

EVAL_NAME = "eval.json"  # pipeline.evaluate.run.EVAL_NAME (not imported: the report needs no torch)
MAX_CLASS_ROWS = 20


def sections(rd: RunDir) -> list[str]:
    """``[html]`` of the evaluation section, or ``[]`` when the output has no eval.json."""
    path = rd.path(EVAL_NAME)
    if not rd.exists(path):
        return []
    try:
        ev = json.loads(rd.fs.cat_file(path))
    except (OSError, ValueError) as err:
        return [section("evaluation", "Evaluation", note(f"{EVAL_NAME} is unusable: {err}", "warn"))]
    return [section("evaluation", "Evaluation (a CLIP trained on this output)", _body(ev))]


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _body(ev: dict) -> str:
    b, tr = ev.get("budget", {}), ev.get("trainer", {})
    model = ev.get("model", {})
    kpis = [("samples seen", b.get("samples_seen")), ("seed", ev.get("seed"))]
    c, r = ev.get("classification"), ev.get("retrieval")
    if c:
        kpis.append(("zero-shot mean accuracy", _pct(c.get("mean_accuracy"))))
    if r:
        kpis += [(f"retrieval mean {k}", _pct(v)) for k, v in r.get("mean_recall", {}).items()]
    body = (
        '<div class="kpis">'
        + "".join(f'<div class="kpi"><b>{e(v)}</b>{e(k)}</div>' for k, v in kpis)
        + "</div>"
    )
    body += note(
        f"{model.get('name')} trained from random weights by open_clip's trainer on the "
        f"{ev.get('output_samples')} samples of this output ({ev.get('caption_member')} captions) for "
        f"{b.get('samples_seen')} samples seen: {b.get('steps')} steps of {b.get('batch_size')}, "
        f"{b.get('passes')} passes; final loss {tr.get('final_loss')}, trainer-reported samples "
        f"{tr.get('samples_seen')}, {tr.get('seconds')}s. Compare outputs at the same budget and seed."
    )
    if c:
        body += "<h3>Zero-shot classification</h3>"
        body += note(
            f"{c.get('set')}: {c.get('n_images')} images, {c.get('n_classes')} classes, "
            f"{len(c.get('templates', []))} prompt templates. Mean per-class accuracy {_pct(c.get('mean_accuracy'))}, "
            f"top-1 {_pct(c.get('accuracy'))}, chance {_pct(c.get('chance'))}."
        )
        per = sorted(c.get("per_class", {}).items(), key=lambda kv: (kv[1], kv[0]))
        shown = (
            per if len(per) <= MAX_CLASS_ROWS else per[: MAX_CLASS_ROWS // 2] + per[-MAX_CLASS_ROWS // 2 :]
        )
        body += table(["class", "accuracy"], [[k, _pct(v)] for k, v in shown], numeric={1})
        if len(per) > len(shown):
            body += note(
                f"the {MAX_CLASS_ROWS // 2} worst and best of {len(per)} classes; all in {EVAL_NAME}"
            )
        if c.get("in_training_data"):
            body += note(f"{c['in_training_data']} evaluation images are also in the training tars", "warn")
    if r:
        body += "<h3>Image-text retrieval</h3>"
        body += note(
            f"{r.get('set')}: {r.get('n_pairs')} held-out pairs ({r.get('n_distinct_captions')} distinct captions)"
        )
        ks = list(r.get("image_to_text", {}))
        rows = [[d, *(_pct(r.get(key, {}).get(k)) for k in ks)]
                for d, key in (("image -> text", "image_to_text"), ("text -> image", "text_to_image"))]  # fmt: skip
        body += table(["direction", *ks], rows, numeric=set(range(1, len(ks) + 1)))
        if r.get("in_training_data"):
            body += note(f"{r['in_training_data']} evaluation images are also in the training tars", "warn")
    return body
