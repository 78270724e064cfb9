"""The run directory: the one place that knows where a run's model, posterior, data splits and checkpoints live.

    RUN/
      train_config.json     TrainConfig + RMConfig of the run (margin, centering, …)
      metrics.jsonl         per-epoch metrics
      checkpoint/           resumable training state
      data/train.jsonl      the exact training split (`bayesrm laplace RUN` fits on it by default)
      data/eval.jsonl       the held-out split
      model/                adapter, head, bayesrm.json (a model directory)
      model/laplace/        the Laplace posterior fitted at model/'s weights
      manifest.json         ensembles only: members member_i/, each a run directory

Every reader goes through `RunDir`; it imports nothing heavy, so the CLI can use it before torch loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_NAME = "bayesrm.json"  # a model directory holds this file
MODEL_DIR = "model"
POSTERIOR_DIR = "laplace"
POSTERIOR_META = "posterior.json"
DATA_DIR = "data"
TRAIN_SPLIT = "train.jsonl"
EVAL_SPLIT = "eval.jsonl"
CHECKPOINT_DIR = "checkpoint"
TRAIN_CONFIG = "train_config.json"
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class RunDir:
    """A run directory, or a bare model directory (then `root` is the model dir and there are no splits)."""

    root: Path

    @classmethod
    def of(cls, path: str | Path) -> RunDir:
        """The run that `path` names: a run directory, its model/ subdirectory, or a bare model directory."""
        p = Path(path)
        if p.name == MODEL_DIR and (p / CONFIG_NAME).exists() and not (p / MODEL_DIR / CONFIG_NAME).exists():
            parent = p.parent
            if (parent / TRAIN_CONFIG).exists() or (parent / DATA_DIR).is_dir():
                return cls(parent)
        return cls(p)

    @property
    def model_dir(self) -> Path:
        """Where the model's files are: RUN/model, or RUN itself when it is a bare model directory."""
        if not (self.root / CONFIG_NAME).exists() and (self.root / MODEL_DIR / CONFIG_NAME).exists():
            return self.root / MODEL_DIR
        return self.root

    @property
    def has_model(self) -> bool:
        """A bayesrm model, or a transformers sequence-classification reward model (`is_seq_cls_dir`)."""
        return (self.model_dir / CONFIG_NAME).exists() or is_seq_cls_dir(self.model_dir)

    @property
    def posterior_dir(self) -> Path:
        """Where `bayesrm laplace` writes the posterior: next to the model weights it was fitted at."""
        return self.model_dir / POSTERIOR_DIR

    def find_posterior(self) -> Path | None:
        """The saved posterior (model/laplace; RUN/laplace from older experiment runs), or None."""
        for cand in (self.posterior_dir, self.root / POSTERIOR_DIR):
            if (cand / POSTERIOR_META).exists():
                return cand
        return None

    def require_posterior(self) -> Path:
        """The posterior directory, or FileNotFoundError telling the user how to make one."""
        found = self.find_posterior()
        if found is None:
            raise FileNotFoundError(f"{self.root}: no Laplace posterior; run `bayesrm laplace {self.root}` first")
        return found

    @property
    def train_split(self) -> Path:
        """The training pairs `train` saved (the default data of `laplace`)."""
        return self.root / DATA_DIR / TRAIN_SPLIT

    @property
    def eval_split(self) -> Path:
        return self.root / DATA_DIR / EVAL_SPLIT

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME

    def train_config(self) -> dict[str, Any]:
        """The saved TrainConfig fields ({} for a bare model directory or an older run without one)."""
        f = self.root / TRAIN_CONFIG
        if not f.exists():
            return {}
        try:
            train: dict[str, Any] = json.loads(f.read_text())["train"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{f}: not a train_config.json written by bayesrm ({e})") from None
        return train


def is_seq_cls_dir(path: Path) -> bool:
    """True for a saved transformers model (config.json) whose architecture is a *ForSequenceClassification."""
    f = path / "config.json"
    if (path / CONFIG_NAME).exists() or not f.is_file():
        return False
    try:
        archs = json.loads(f.read_text()).get("architectures") or []
    except json.JSONDecodeError:
        raise ValueError(f"{f}: malformed JSON") from None
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def find_model_dir(path: str | Path) -> Path:
    """The model directory of a run directory (`run/model`), or `path` itself when it holds a model."""
    return RunDir.of(path).model_dir
