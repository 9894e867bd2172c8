"""``clipcurate eval OUTPUT``: train at a fixed budget, evaluate, write ``OUTPUT/eval.json``.

Work files (the trainer's logs, the architecture copy, the checkpoint when kept) go to
``OUTPUT/_eval/``; the log of each training run is kept there as ``train-seedN.log``.
"""

from __future__ import annotations

import glob
import json
import logging
import shutil
import time
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.evaluate import evalsets, train
from pipeline.evaluate.config import EvalConfig
from pipeline.evaluate.retrieval import retrieval
from pipeline.evaluate.zeroshot import zeroshot
from schemas.manifest import MANIFEST_NAME, TAR_SUFFIX

EVAL_NAME = "eval.json"
WORK_DIR = "_eval"
log = logging.getLogger("clipcurate.eval")


def _manifest(output: Path) -> dict:
    if "://" in str(output):
        raise ConfigError(f"{output}: eval needs a local output folder")
    path = output / MANIFEST_NAME
    if not path.is_file():
        raise ConfigError(f"{output}: no {MANIFEST_NAME} (not a finished clipcurate output)")
    return json.loads(path.read_text())


def caption_member(manifest: dict) -> str:
    """Which caption the tars hold (``KEY.txt``): the sink's ``caption_member`` when it has one."""
    for entry in manifest.get("config", {}).get("stages", []):
        for body in entry.values() if isinstance(entry, dict) else ():
            if isinstance(body, dict) and body.get("caption_member"):
                return str(body["caption_member"])
    return "original"


def model_config(cfg: EvalConfig, work: Path) -> dict:
    """The architecture trained: the config file of a ``local-dir:`` model, else the built-in name."""
    name = train.model_arg(cfg, work)
    if name.startswith(train.LOCAL_DIR):
        return json.loads((Path(name[len(train.LOCAL_DIR) :]) / train.MODEL_CONFIG_NAME).read_text())
    return {"name": name}


def shard_spec(tars: list[str]) -> str:
    """The trainer's ``--train-data`` for the tars found in the output folder (not the manifest's
    pattern: the folder may have moved): a brace range when the names are contiguous numbers of one
    width (short, whatever the count), else the paths joined by ``::``."""
    stems = [Path(t).name[: -len(TAR_SUFFIX)] for t in tars]
    folder = str(Path(tars[0]).parent)
    same_dir = all(str(Path(t).parent) == folder for t in tars)
    if len(tars) > 1 and same_dir and all(s.isdigit() and len(s) == len(stems[0]) for s in stems):
        if [int(s) for s in stems] == list(range(int(stems[0]), int(stems[0]) + len(stems))):
            return f"{folder}/{{{stems[0]}..{stems[-1]}}}{TAR_SUFFIX}"
    return "::".join(tars)


def check(cfg: EvalConfig, manifest: dict, output: Path) -> tuple[list[str], int]:
    """(tar paths, samples) of the output; one-line errors for what cannot be trained on."""
    if cfg.classification is None and cfg.retrieval is None:
        raise ConfigError("eval: no evaluation set: set 'classification' and/or 'retrieval'")
    tars = sorted(glob.glob(str(output / f"*{TAR_SUFFIX}")))
    samples = int(manifest.get("total_samples") or 0)
    if not tars or samples < cfg.batch_size:
        raise ConfigError(
            f"{output}: {samples} samples in {len(tars)} tars, fewer than one batch "
            f"(batch_size {cfg.batch_size}): nothing to train on"
        )
    if cfg.workers > len(tars):
        raise ConfigError(f"eval: key 'workers': {cfg.workers} workers but only {len(tars)} tars")
    return tars, samples


def evaluate(output: str, cfg: EvalConfig) -> dict:
    """Train and evaluate on ``output``; write and return ``eval.json``'s content."""
    out = Path(output)
    manifest = _manifest(out)
    tars, samples = check(cfg, manifest, out)
    # Load the eval sets first: a bad set fails before the (long) training.
    labelled = (
        evalsets.labelled_set(cfg.classification, cfg.image_column, cfg.label_column)
        if cfg.classification
        else None
    )
    captions = (
        evalsets.caption_set(cfg.retrieval, cfg.image_column, cfg.caption_column) if cfg.retrieval else None
    )
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    work = out / WORK_DIR
    b = train.budget(cfg, samples)
    log.info("training %s on %d samples for %d samples seen (%d steps of %d)", cfg.model, samples,
             b.samples_seen, b.steps, b.batch_size)  # fmt: skip
    t0 = time.perf_counter()
    shards = shard_spec(tars)
    trained = train.train(cfg, shards, b, work)
    train_s = time.perf_counter() - t0
    if trained.samples_seen != b.samples_seen:  # equal compute is the point: never report an unequal run
        raise RuntimeError(f"the trainer saw {trained.samples_seen} samples, the budget is {b.samples_seen} "
                           f"(full log {trained.log})")  # fmt: skip
    model, preprocess, tokenizer = train.load_model(cfg, work, trained.checkpoint)
    result: dict = {
        "output": str(out),
        "output_samples": samples,
        "config_hash": manifest.get("config_hash"),
        "caption_member": caption_member(manifest),
        "seed": cfg.seed,
        "budget": b.as_dict(),
        "trainer": {
            "samples_seen": trained.samples_seen,
            "final_loss": trained.final_loss,
            "seconds": round(train_s, 1),
            "log": str(trained.log),
        },
        "model": {"name": cfg.model, "config": model_config(cfg, work)},
        "eval_config": cfg.model_dump(),
    }
    t0 = time.perf_counter()
    hashes = evalsets.tar_image_hashes(tars) if cfg.check_overlap else None
    for part, data, fn in (("classification", labelled, zeroshot), ("retrieval", captions, retrieval)):
        if data is not None:
            result[part] = {"set": getattr(cfg, part), **fn(model, preprocess, tokenizer, data, cfg)}
            if hashes is not None:
                result[part]["in_training_data"] = sum(evalsets.sha256(i) in hashes for i in data.images)
    result["eval_seconds"] = round(time.perf_counter() - t0, 1)
    for part in ("classification", "retrieval"):
        n = result.get(part, {}).get("in_training_data")
        if n:
            log.warning("%d images of the %s set are also in the training tars (same bytes)", n, part)
    if not cfg.keep_checkpoint:
        shutil.rmtree(trained.checkpoint.parent, ignore_errors=True)
    else:
        result["trainer"]["checkpoint"] = str(trained.checkpoint)
    tmp = out / f"{EVAL_NAME}.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out / EVAL_NAME)
    return result


def summary(result: dict) -> str:
    """A few lines for the terminal."""
    b = result["budget"]
    lines = [
        f"trained on {result['output_samples']} samples for {b['samples_seen']} samples seen "
        f"({b['steps']} steps of {b['batch_size']}, {b['passes']:.2f} passes; seed {result['seed']}; "
        f"final loss {result['trainer']['final_loss']})"
    ]
    c = result.get("classification")
    if c:
        lines.append(
            f"zero-shot: mean per-class accuracy {c['mean_accuracy']:.2%} over {c['n_classes']} classes "
            f"(top-1 {c['accuracy']:.2%}, chance {c['chance']:.2%})"
        )
    r = result.get("retrieval")
    if r:
        i2t = " ".join(f"{k} {v:.2%}" for k, v in r["image_to_text"].items())
        t2i = " ".join(f"{k} {v:.2%}" for k, v in r["text_to_image"].items())
        lines.append(f"retrieval ({r['n_pairs']} pairs): image->text {i2t}; text->image {t2i}")
    return "\n".join(lines)
