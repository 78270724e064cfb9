"""bayesrm: uncertainty-aware (Bayesian) reward models for LLM alignment.

Names are re-exported lazily (PEP 562), so `import bayesrm` and the CLI's `--help` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "BonCurve": "bayesrm.bon", "bon_curve": "bayesrm.bon", "bon_estimate": "bayesrm.bon",
    "bon_weights": "bayesrm.bon", "kl_bon": "bayesrm.bon",
    "DataError": "bayesrm.data", "Pair": "bayesrm.data", "load_pairs": "bayesrm.data",
    "split_by_prompt": "bayesrm.data",
    "EnsembleRewardModel": "bayesrm.ensemble", "train_ensemble": "bayesrm.ensemble",
    "EvalConfig": "bayesrm.config", "LaplaceConfig": "bayesrm.config", "TrainConfig": "bayesrm.config",
    "evaluate": "bayesrm.evaluation", "export_model": "bayesrm.export",
    "LaplacePosterior": "bayesrm.laplace", "fit_laplace": "bayesrm.laplace",
    "RewardModel": "bayesrm.model", "RMConfig": "bayesrm.model",
    "SelectionSpec": "bayesrm.objectives", "parse_spec": "bayesrm.objectives",
    "RunDir": "bayesrm.run",
    "Scorer": "bayesrm.scoring", "Scores": "bayesrm.scoring",
    "HeadConfig": "bayesrm.config", "pair_features": "bayesrm.features",
    "fit_head_laplace": "bayesrm.feature_heads", "train_heads": "bayesrm.feature_heads",
    "bald_bt": "bayesrm.active", "select_top": "bayesrm.active",
}

__all__ = [
    "BonCurve",
    "DataError",
    "EnsembleRewardModel",
    "EvalConfig",
    "HeadConfig",
    "LaplaceConfig",
    "LaplacePosterior",
    "Pair",
    "RMConfig",
    "RewardModel",
    "RunDir",
    "Scorer",
    "Scores",
    "SelectionSpec",
    "TrainConfig",
    "__version__",
    "bald_bt",
    "bon_curve",
    "bon_estimate",
    "bon_weights",
    "evaluate",
    "export_model",
    "fit_head_laplace",
    "fit_laplace",
    "kl_bon",
    "load_pairs",
    "pair_features",
    "parse_spec",
    "select_top",
    "split_by_prompt",
    "train_ensemble",
    "train_heads",
]

if TYPE_CHECKING:
    from bayesrm.active import bald_bt, select_top
    from bayesrm.bon import BonCurve, bon_curve, bon_estimate, bon_weights, kl_bon
    from bayesrm.config import EvalConfig, HeadConfig, LaplaceConfig, TrainConfig
    from bayesrm.data import DataError, Pair, load_pairs, split_by_prompt
    from bayesrm.ensemble import EnsembleRewardModel, train_ensemble
    from bayesrm.evaluation import evaluate
    from bayesrm.export import export_model
    from bayesrm.feature_heads import fit_head_laplace, train_heads
    from bayesrm.features import pair_features
    from bayesrm.laplace import LaplacePosterior, fit_laplace
    from bayesrm.model import RewardModel, RMConfig
    from bayesrm.objectives import SelectionSpec, parse_spec
    from bayesrm.run import RunDir
    from bayesrm.scoring import Scorer, Scores


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'bayesrm' has no attribute {name!r}")
