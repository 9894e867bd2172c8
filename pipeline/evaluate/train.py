"""Train a CLIP on an output's shards with open_clip's own trainer, for a fixed number of samples seen.

The budget is in samples seen, as in DataComp: ``steps = ceil(samples_seen / batch_size)`` (rounded up to
a multiple of the data loader workers, as open_clip does), whatever the output's size. The trainer runs
one "epoch" of exactly that many samples (``--train-num-samples steps * batch_size --epochs 1``):
webdataset repeats a small output as often as needed and stops a large one early, so two outputs of
different sizes get the same compute. The cosine schedule therefore spans the whole budget.

The tars' ``KEY.txt`` is what the model learns from, so the caption trained on is the one the output
chose to put there (original or rewritten; the sink's ``caption_member``).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.evaluate.config import EvalConfig

LOCAL_DIR = "local-dir:"
MODEL_CONFIG_NAME = "open_clip_config.json"
TRAIN_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/(\d+)")
LOSS = re.compile(r"[A-Za-z_]*loss: ([-+0-9.eE]+|nan|inf) \(", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """What one training run costs, the same for every output at a given config."""

    samples_seen: int  # samples the trainer sees: steps * batch_size
    steps: int
    batch_size: int
    requested: int  # the config's samples_seen
    output_samples: int  # samples in the output's tars
    passes: float  # samples_seen / output_samples: how often the output is seen

    def as_dict(self) -> dict:
        return asdict(self)


def budget(cfg: EvalConfig, output_samples: int) -> Budget:
    """The training budget of ``cfg`` on an output of ``output_samples`` samples."""
    workers = max(1, cfg.workers)
    steps = math.ceil(math.ceil(cfg.samples_seen / cfg.batch_size) / workers) * workers
    seen = steps * cfg.batch_size
    passes = seen / output_samples if output_samples else math.inf
    return Budget(seen, steps, cfg.batch_size, cfg.samples_seen, output_samples, round(passes, 4))


def model_arg(cfg: EvalConfig, work: Path) -> str:
    """The trainer's ``--model``: a built-in name as it is; for ``local-dir:`` a copy of the folder's
    config alone (no weights), so that the model starts from random weights."""
    if not cfg.model.startswith(LOCAL_DIR):
        return cfg.model
    src = Path(cfg.model[len(LOCAL_DIR) :]) / MODEL_CONFIG_NAME
    if not src.is_file():
        raise ConfigError(
            f"eval: key 'model': {src} not found (a local-dir: model needs {MODEL_CONFIG_NAME})"
        )
    arch = work / "arch"
    arch.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, arch / MODEL_CONFIG_NAME)
    return f"{LOCAL_DIR}{arch}"


def command(cfg: EvalConfig, shards: str, b: Budget, model: str, logs: Path, name: str) -> list[str]:
    """The ``python -m open_clip_train.main`` command of one run."""
    return [
        sys.executable, "-m", "open_clip_train.main",
        "--model", model,
        "--train-data", shards,
        "--dataset-type", "webdataset",
        "--train-num-samples", str(b.samples_seen),
        "--epochs", "1",
        "--batch-size", str(cfg.batch_size),
        "--workers", str(cfg.workers),
        "--lr", str(cfg.lr), "--warmup", str(cfg.warmup), "--wd", str(cfg.wd),
        "--precision", cfg.precision,
        "--device", cfg.device,
        "--seed", str(cfg.seed),
        "--log-every-n-steps", str(max(1, b.steps // 10)),
        "--logs", str(logs), "--name", name,
        "--save-frequency", "1",
    ]  # fmt: skip


@dataclass(frozen=True)
class Trained:
    checkpoint: Path
    samples_seen: int  # as the trainer reports it (its last "Train Epoch" line)
    final_loss: float | None
    log: Path


def parse_log(text: str) -> tuple[int | None, int | None, float | None]:
    """(samples seen, samples per epoch, last loss) from the trainer's log text."""
    seen = TRAIN_LINE.findall(text)
    losses = LOSS.findall(text)
    last = seen[-1] if seen else (None, None)
    return (
        int(last[0]) if last[0] else None,
        int(last[1]) if last[1] else None,
        float(losses[-1]) if losses else None,
    )


def train(cfg: EvalConfig, shards: str, b: Budget, work: Path) -> Trained:
    """Run open_clip's trainer for budget ``b`` on ``shards``; the checkpoint and log land in ``work``."""
    name = f"seed{cfg.seed}"
    logs = work / "logs"
    shutil.rmtree(logs / name, ignore_errors=True)  # the trainer refuses an existing experiment
    logs.mkdir(parents=True, exist_ok=True)
    cmd = command(cfg, shards, b, model_arg(cfg, work), logs, name)
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if cfg.threads:
        env.update(OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    text = r.stdout + r.stderr
    log = work / f"train-{name}.log"
    log.write_text(" ".join(cmd) + "\n\n" + text)
    if r.returncode != 0:
        tail = " | ".join(line for line in text.strip().splitlines()[-3:])
        raise RuntimeError(f"the trainer failed (exit {r.returncode}; full log {log}): {tail}")
    seen, _, loss = parse_log(text)
    ckpt = logs / name / "checkpoints" / "epoch_1.pt"
    if seen is None or not ckpt.is_file():
        raise RuntimeError(f"the trainer wrote no checkpoint or progress line (full log {log})")
    return Trained(ckpt, seen, loss, log)


def load_model(cfg: EvalConfig, work: Path, checkpoint: Path):
    """(model in eval mode, image preprocess, tokenizer) of the trained checkpoint."""
    import open_clip
    import torch

    model_name = model_arg(cfg, work)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, device=cfg.device)
    state = torch.load(checkpoint, map_location=cfg.device, weights_only=False)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)
