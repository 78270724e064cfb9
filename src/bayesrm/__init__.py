"""bayesrm: uncertainty-aware (Bayesian) reward models for LLM alignment."""

from bayesrm.bon import BonCurve, bon_curve, bon_estimate, bon_weights, kl_bon
from bayesrm.data import DataError, Pair, load_pairs, split_by_prompt
from bayesrm.ensemble import EnsembleRewardModel, train_ensemble
from bayesrm.laplace import LaplaceConfig, LaplacePosterior, fit_laplace
from bayesrm.model import RewardModel, RMConfig
from bayesrm.objectives import SelectionSpec, parse_spec
from bayesrm.scoring import Scorer, Scores
from bayesrm.train import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "BonCurve",
    "DataError",
    "EnsembleRewardModel",
    "LaplaceConfig",
    "LaplacePosterior",
    "Pair",
    "RMConfig",
    "RewardModel",
    "Scorer",
    "Scores",
    "SelectionSpec",
    "TrainConfig",
    "__version__",
    "bon_curve",
    "bon_estimate",
    "bon_weights",
    "fit_laplace",
    "kl_bon",
    "load_pairs",
    "parse_spec",
    "split_by_prompt",
    "train_ensemble",
]
