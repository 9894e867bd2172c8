"""The ``clip_score`` stage (see ``stages.clip_score.stage``): config, model loading and the single
decode, heads on embeddings, and the stage itself."""

from stages.clip_score.config import ClipScoreConfig, HeadSpec, ModelSpec
from stages.clip_score.heads import Head, save_head
from stages.clip_score.stage import ClipScore

__all__ = ["ClipScore", "ClipScoreConfig", "Head", "HeadSpec", "ModelSpec", "save_head"]
