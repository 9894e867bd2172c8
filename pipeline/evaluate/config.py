"""The config of ``clipcurate eval``: a small YAML (``--config``) and/or flags (``--set KEY=VALUE``).

    model: local-dir:demo/assets/toy_clip   # the architecture only: training starts from random weights
    samples_seen: 16384                     # the budget, the same for every output compared
    batch_size: 64
    seed: 0
    classification: demo_out/evalset/classes.parquet
    templates: ["a {}", "a drawing of a {}"]
    retrieval: demo_out/evalset/captions.parquet

Relative paths follow the workflow rule (``pipeline/paths.py``): the YAML's folder first, then the
working directory. A bad key or value fails in one line naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.config import ConfigError
from pipeline.paths import base_dirs, resolve_config_paths
from stages.base import path_field

DEFAULT_TEMPLATES = ["a photo of a {}.", "a {}.", "an image of a {}.", "a drawing of a {}."]


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = path_field(
        "local-dir:demo/assets/toy_clip",
        prefixed=True,
        description="open_clip architecture to train: a built-in name (`ViT-B-32`) or `local-dir:FOLDER` "
        "with an `open_clip_config.json`. Only the architecture and its preprocessing are used: training "
        "starts from random weights, whatever weights the folder holds.",
    )
    samples_seen: int = Field(
        16384,
        ge=1,
        description="Training budget in samples seen (not epochs): every output is trained on this many "
        "samples, rounded up to whole batches; a small output is repeated, a large one is not seen whole.",
    )
    batch_size: int = Field(64, ge=2, description="Training batch size (the contrastive loss's negatives).")
    seed: int = Field(0, description="Seed of the trainer (`--seed`): initialisation and shard order.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (cosine schedule after the warmup).")
    warmup: int = Field(10, ge=0, description="Warmup steps.")
    wd: float = Field(0.1, ge=0, description="Weight decay.")
    precision: str = Field("fp32", description="Trainer precision (`fp32`, `amp`, `bf16`, ...).")
    device: str = Field("cpu", description="`cpu` or `cuda` (training and evaluation).")
    workers: int = Field(0, ge=0, description="Trainer data loader workers (0: in the training process).")
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads for training and evaluation; null: torch's default."
    )
    classification: str | None = path_field(
        None,
        description="Labelled zero-shot set: a folder with one sub-folder of images per class (the "
        "sub-folder's name is the class name), or a Parquet file with image bytes and a label column.",
    )
    templates: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TEMPLATES),
        min_length=1,
        description="Zero-shot prompt templates; `{}` is replaced by the class name. A class's text "
        "embedding is the normalised mean over the templates.",
    )
    class_names: dict[str, str] = Field(
        default_factory=dict,
        description="Name used in the prompts per label (e.g. `n01440764: tench`); labels not listed are "
        "used as they are, with `_` as a space.",
    )
    retrieval: str | None = path_field(
        None,
        description="Held-out image-caption set: a Parquet file with image bytes and a caption column, or "
        "a folder of `KEY.jpg` + `KEY.txt` pairs.",
    )
    recall_k: list[int] = Field(
        default_factory=lambda: [1, 5], min_length=1, description="k of the recall@k figures of retrieval."
    )
    image_column: str = Field("image", description="Image bytes column of a Parquet eval set.")
    label_column: str = Field("label", description="Label column of a Parquet classification set.")
    caption_column: str = Field("caption", description="Caption column of a Parquet retrieval set.")
    eval_batch_size: int = Field(256, ge=1, description="Images per forward pass when evaluating.")
    check_overlap: bool = Field(
        True,
        description="Count evaluation images whose exact bytes are in the training tars "
        "(`in_training_data` in eval.json; reads every tar once).",
    )
    keep_checkpoint: bool = Field(
        False, description="Keep the trained checkpoint under `OUTPUT/_eval/` (default: only eval.json)."
    )

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t.count("{}") != 1]
        if bad:
            raise ValueError(f"each template needs exactly one {{}} for the class name: {bad[0]!r}")
        return v

    @field_validator("recall_k")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError("recall_k values must be >= 1")
        return sorted(set(v))


def load(path: str | None = None, overrides: list[str] | None = None) -> EvalConfig:
    """The eval config from the YAML at ``path`` (optional) and ``KEY=VALUE`` overrides."""
    source = path or "eval flags"
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot open: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of eval keys")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: --set expects KEY=VALUE, got {item!r}")
        raw[key.strip()] = yaml.safe_load(value)
    raw = resolve_config_paths([EvalConfig], raw, base_dirs(path))
    try:
        return EvalConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise ConfigError(f"{source}: key '{key}': {err['msg']}") from None
