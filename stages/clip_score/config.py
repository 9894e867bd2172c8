"""``clip_score`` configuration: one model (the flat keys of the original stage) or a ``models:`` list,
plus ``heads:`` on the models' image embeddings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stages.base import ComputeConfig, path_field

DEFAULT_COLUMN = "clip_score"
_COLUMN_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class ModelSpec(BaseModel):
    """One open_clip model of a ``models:`` list; it writes its own score column."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    column: str = Field(description="Score column it writes (e.g. `clip_l14`, `dfn_b32`).")
    model: str = path_field(
        description="open_clip model: an architecture name (`ViT-L-14`), `hf-hub:ORG/NAME`, or `local-dir:PATH`.",
        prefixed=True,
    )
    pretrained: str | None = path_field(None, description="Pretrained tag (`openai`) or checkpoint path.")
    model_config_path: str | None = path_field(
        None,
        always=True,
        description="A custom open_clip model config (JSON); `pretrained` is then the checkpoint path.",
    )
    embeddings: bool = Field(
        False,
        description="Also output `<column>_image_embedding` / `<column>_text_embedding` (float16, normalised).",
    )
    flipped: bool = Field(
        False, description="Also output `<column>_flipped`: the score of the horizontally flipped image."
    )
    min_score: float | None = Field(
        None, description="Reject rows whose score is below this (`filtered_clip`)."
    )

    @model_validator(mode="after")
    def _check(self):
        if not _COLUMN_RE.match(self.column):
            raise ValueError(f"column {self.column!r}: use lower-case letters, digits and '_'")
        if self.model_config_path and not self.pretrained:
            raise ValueError("model_config_path needs 'pretrained' (the checkpoint path)")
        return self


class HeadSpec(BaseModel):
    """A small MLP (or linear) head on one model's image embedding, writing one score column."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    column: str = Field(description="Column it writes (e.g. `aesthetic`, `nsfw`, `quality`).")
    path: str = path_field(
        description="Weights: a `.safetensors` file (preferred) or a PyTorch state dict (`.pt`/`.pth`) with "
        "tensors `layers.N.weight` [out, in] and `layers.N.bias` [out], applied in increasing N."
    )
    model: str | None = Field(
        None,
        description="Score column of the model whose image embedding it reads (default: the only model).",
    )
    normalize: bool = Field(
        True,
        description="Feed the L2-normalised image embedding (true, as LAION's heads expect) or the raw one.",
    )
    activation: Literal["relu", "none"] = Field(
        "relu", description="Between layers: `relu`, or `none` (LAION's aesthetic MLP has no activations)."
    )
    sigmoid: bool = Field(False, description="Apply a sigmoid to the output (a probability head).")

    @model_validator(mode="after")
    def _check(self):
        if not _COLUMN_RE.match(self.column):
            raise ValueError(f"column {self.column!r}: use lower-case letters, digits and '_'")
        return self


class ClipScoreConfig(ComputeConfig):
    model: str | None = path_field(
        None,
        description="open_clip model: an architecture name (`ViT-B-32`), `hf-hub:ORG/NAME`, or "
        "`local-dir:PATH` (a folder with `open_clip_config.json` and weights). Writes `clip_score`. "
        "Give this or `models`.",
        prefixed=True,
    )
    pretrained: str | None = path_field(
        None, description="Pretrained tag (`datacomp_xl_s13b_b90k`) or checkpoint path."
    )
    model_config_path: str | None = path_field(
        None,
        always=True,
        description="A custom open_clip model config (JSON); `pretrained` is then the checkpoint path.",
    )
    models: list[ModelSpec] | None = Field(
        None,
        description="Several open_clip models scored on one decode of each image, each writing its own column "
        "(keys below). Give this or `model`.",
    )
    heads: list[HeadSpec] = Field(
        default_factory=list,
        description="Heads on a model's image embedding, each writing a column (keys below).",
    )
    batch_size: int = Field(
        2048,
        ge=1,
        description="Rows per `process` call; the rows are scored in forward batches of `forward_batch_size`, "
        "the next one decoded while the model runs the current one.",
    )
    forward_batch_size: int = Field(256, ge=1, description="Images per model forward pass.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when the worker has a GPU."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU."
    )
    decode: Literal["pil", "tensor"] = Field(
        "pil",
        description="pil: the model's own transform on CPU threads; tensor: torchvision JPEG decode on the model's device.",
    )
    decode_threads: int = Field(4, description="CPU threads decoding/preprocessing ahead of the model.")
    min_score: float | None = Field(
        None, description="Reject rows whose score is below this (`filtered_clip`)."
    )
    embeddings: bool = Field(False, description="Also output `image_embedding` / `text_embedding` (float16).")
    text_column: str = Field(
        "caption",
        description="The caption column scored against the image: `caption` (the alt-text), or another "
        "string column an earlier stage writes (`caption_recap`, `caption_fused`); null cells score as ''. "
        "To keep several caption kinds' scores, run the stage again with `models:` naming another column.",
    )
    flipped: bool = Field(
        False, description="Also output `clip_score_flipped`: the score of the horizontally flipped image."
    )

    @model_validator(mode="after")
    def _check(self):
        if self.models is not None:
            flat = [k for k in ("model", "pretrained", "model_config_path") if getattr(self, k)]
            flat += [k for k in ("min_score",) if getattr(self, k) is not None]
            flat += [k for k in ("embeddings", "flipped") if getattr(self, k)]
            if flat:
                raise ValueError(f"give 'models' or the one-model keys, not both (found {', '.join(flat)}; "
                                 "put them on the model's entry)")  # fmt: skip
            if not self.models:
                raise ValueError("'models' is empty")
        elif not self.model:
            raise ValueError("give 'model' (one model) or 'models' (a list)")
        if self.model_config_path and not self.pretrained:
            raise ValueError("model_config_path needs 'pretrained' (the checkpoint path)")
        plans = model_plans(self)
        score_cols = [p.column for p in plans]
        for h in self.heads:
            if h.model is None and len(plans) > 1:
                raise ValueError(f"head {h.column!r}: name its 'model' (one of {', '.join(score_cols)})")
            if h.model is not None and h.model not in score_cols:
                raise ValueError(
                    f"head {h.column!r}: model {h.model!r} is not a model column ({', '.join(score_cols)})"
                )
        cols = [c for p in plans for c in p.columns()] + [h.column for h in self.heads]
        dup = sorted({c for c in cols if cols.count(c) > 1})
        if dup:
            raise ValueError(f"column(s) written twice: {', '.join(dup)}")
        return self


@dataclass(frozen=True)
class ModelPlan:
    """One model as the stage runs it, whichever form configured it, with its output column names."""

    column: str
    model: str
    pretrained: str | None
    model_config_path: str | None
    embeddings: bool
    flipped: bool
    min_score: float | None
    image_embedding_col: str
    text_embedding_col: str

    @property
    def flipped_col(self) -> str:
        return f"{self.column}_flipped"

    def columns(self) -> list[str]:
        cols = [self.column]
        if self.flipped:
            cols.append(self.flipped_col)
        if self.embeddings:
            cols += [self.image_embedding_col, self.text_embedding_col]
        return cols


def model_plans(c: ClipScoreConfig) -> list[ModelPlan]:
    """The models to run: the one-model form is one plan writing `clip_score` (and `image_embedding`...)."""
    if c.models is None:
        return [
            ModelPlan(
                DEFAULT_COLUMN,
                c.model or "",
                c.pretrained,
                c.model_config_path,
                c.embeddings,
                c.flipped,
                c.min_score,
                "image_embedding",
                "text_embedding",
            )  # fmt: skip
        ]
    return [
        ModelPlan(
            m.column,
            m.model,
            m.pretrained,
            m.model_config_path,
            m.embeddings,
            m.flipped,
            m.min_score,
            f"{m.column}_image_embedding",
            f"{m.column}_text_embedding",
        )  # fmt: skip
        for m in c.models
    ]


def head_model(c: ClipScoreConfig, head: HeadSpec) -> str:
    """The score column of the model a head reads."""
    return head.model or model_plans(c)[0].column
