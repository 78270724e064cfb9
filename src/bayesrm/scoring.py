"""One entry point from a saved reward model (or ensemble) and a selection spec to rewards, σ and penalised rewards.

`Scorer` is what every consumer outside training uses — `bayesrm score`, the TRL reward function, the HTTP
server — so that a spec such as ``"la:var:k=1"`` means the same everywhere. It reads:

- `map`: one model's MAP reward;
- `la`: the linearised Laplace predictive of one model (posterior saved with the model by `bayesrm laplace`);
- `vi`: a BNRM head's mean-field variational predictive (`RewardModel.predict_moments`);
- `ens` / `la-ens`: the members of an ensemble directory (and their Laplace posteriors for `la-ens` std/var);
- a fast-heads directory (`bayesrm heads`): `map` / `la` for one head, `ens` for M heads, on the frozen backbone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bayesrm.objectives import Family, Rule, SelectionSpec, la_ens, parse_spec
from bayesrm.run import POSTERIOR_DIR, POSTERIOR_META, RunDir


@dataclass
class Scores:
    """Per-response outputs (N,): mean reward, predictive std (None where the spec reads none), selection reward."""

    reward: torch.Tensor
    std: torch.Tensor | None
    selection: torch.Tensor

    def rows(self) -> list[dict[str, float | None]]:
        """One JSON-ready dict per response: reward, std, selection."""
        std = self.std.tolist() if self.std is not None else [None] * len(self.reward)
        return [{"reward": float(r), "std": s, "selection": float(p)}
                for r, s, p in zip(self.reward.tolist(), std, self.selection.tolist(), strict=True)]


def check_source(path: str | Path, spec: str | SelectionSpec = "map", what: str = "model") -> None:
    """Fail fast, before loading anything, when `path` lacks what `spec` reads (a model, ensemble or posterior)."""
    from bayesrm.ensemble import _member_dirs
    from bayesrm.feature_heads import is_heads_dir

    s = parse_spec(spec)
    if is_heads_dir(path):
        return _check_heads(path, s, what)
    if s.needs_ensemble:
        members = [RunDir.of(m) for m in _member_dirs(path)]
    elif not RunDir.of(path).has_model:
        raise FileNotFoundError(f"{what} {path}: not a trained bayesrm model; train one with "
                                f"`bayesrm train PAIRS --out {path}`")
    else:
        members = [RunDir.of(path)]
    if s.family is Family.LA or (s.family is Family.LA_ENS and s.needs_variance):
        for m in members:
            if m.find_posterior() is None:
                raise FileNotFoundError(f"{what} {m.root}: no Laplace posterior for spec '{s}'; run "
                                        f"`bayesrm laplace {m.root}`")


def _check_heads(path: str | Path, s: SelectionSpec, what: str) -> None:
    """`check_source` for a fast-heads directory: M > 1 heads are an ensemble, `la` needs its saved posterior."""
    import json

    from bayesrm.feature_heads import HEADS_CONFIG

    try:
        members = int(json.loads((Path(path) / HEADS_CONFIG).read_text())["head"]["members"])
    except (ValueError, KeyError, TypeError):
        return  # damaged: loading reports it with the file's name
    if s.needs_ensemble != (members > 1) or s.family in (Family.VI, Family.LA_ENS):
        raise ValueError(f"{what} {path}: {members} fast head(s); spec '{s}' needs "
                         f"{'an ensemble' if s.needs_ensemble else 'one model'} — use "
                         f"{'ens:mean, ens:wco or ens:uwo' if members > 1 else 'map or la:…'}")
    if s.family is Family.LA and not (Path(path) / POSTERIOR_DIR / POSTERIOR_META).exists():
        raise FileNotFoundError(f"{what} {path}: these heads have no Laplace posterior (trained with --no-laplace)")


class Scorer:
    """Selection rewards of (prompt, response) pairs under `spec` from a loaded model or ensemble.

    Thread-safe: calls are serialised with a lock (one forward at a time), so a server can share one Scorer.
    """

    def __init__(self, model: Any, spec: str | SelectionSpec = "map", posteriors: Sequence[Any] | None = None,
                 batch_size: int = 16) -> None:
        from bayesrm.bnrm import BNRMHead
        from bayesrm.ensemble import EnsembleRewardModel
        from bayesrm.feature_heads import FeatureHeads

        self.spec = parse_spec(spec)
        self.model = model
        self.posteriors = list(posteriors) if posteriors is not None else None
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._heads = isinstance(model, FeatureHeads)
        is_ens = isinstance(model, EnsembleRewardModel) or (self._heads and len(model) > 1)
        if self.spec.needs_ensemble != is_ens:
            raise ValueError(f"spec '{self.spec}' needs {'an ensemble' if self.spec.needs_ensemble else 'one model'}"
                             f", got {'an ensemble' if is_ens else 'one model'}")
        fam = self.spec.family
        if fam is Family.LA and not self.posteriors:
            raise ValueError(f"spec '{self.spec}' needs a Laplace posterior; run `bayesrm laplace MODEL` first")
        if fam is Family.VI and not isinstance(getattr(model, "head", None), BNRMHead):
            raise ValueError(f"spec '{self.spec}' needs a BNRM model (train with --head bnrm)")

    @classmethod
    def load(cls, path: str | Path, spec: str | SelectionSpec = "map", device: str | torch.device | None = None,
             batch_size: int = 16) -> Scorer:
        """Load what `spec` reads from `path`: a model dir (+ its Laplace posterior), an ensemble dir or fast heads."""
        from bayesrm.ensemble import EnsembleRewardModel
        from bayesrm.feature_heads import FeatureHeads, is_heads_dir
        from bayesrm.laplace import LaplacePosterior
        from bayesrm.model import RewardModel

        s = parse_spec(spec)
        if is_heads_dir(path):
            _check_heads(path, s, "model")
            heads = FeatureHeads.load(path, device=device)
            return cls(heads, s, [heads.posterior] if s.family is Family.LA else None, batch_size)
        if s.needs_ensemble:
            ens = EnsembleRewardModel.load(path, device=device)
            return cls(ens, s, ens.load_posteriors() if s.needs_variance else None, batch_size)
        model = RewardModel.load(path, device=device)
        posts = None
        if s.family is Family.LA:
            post = LaplacePosterior.load(RunDir.of(path).require_posterior(), model)  # checked against the model
            posts = [post]
        return cls(model, s, posts, batch_size)

    def moments(self, prompts: Sequence[str], responses: Sequence[str],
                progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Member means (M, N) and, where the spec reads them, predictive variances (M, N); M = 1 for one model.

        Ensemble members come standardised with the statistics stored in the ensemble (`ensemble` module doc).
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        fam, bs = self.spec.family, self.batch_size
        with self._lock, torch.no_grad():
            if self._heads:
                return self.model.moments(prompts, responses, bs, progress, variance=fam is Family.LA)
            if fam is Family.LA:
                assert self.posteriors is not None
                mu, var = self.posteriors[0].predict(self.model, prompts, responses, bs, progress)
                return mu.unsqueeze(0), var.unsqueeze(0)
            if fam is Family.VI:
                mu, var = self.model.predict_moments(prompts, responses, bs, progress)
                return mu.unsqueeze(0).double(), var.unsqueeze(0).double()
            if fam is Family.LA_ENS and self.spec.needs_variance:  # members standardised (overopt. note §8)
                return self.model.standardize(*self.model.predict_members(self.posteriors, prompts, responses, bs,
                                                                          progress))
            if self.spec.needs_ensemble:
                return self.model.standardize(self.model.score_members(prompts, responses, bs, progress))
            return self.model.score(prompts, responses, bs, progress).unsqueeze(0).double(), None

    def score(self, prompts: Sequence[str], responses: Sequence[str], ref: torch.Tensor | float | None = None,
              progress: Callable[[int], None] | None = None) -> Scores:
        """Mean reward, σ and the spec's selection reward for each (prompt, response)."""
        means, variances = self.moments(prompts, responses, progress)
        selection = self.spec.apply(means, variances, ref)
        if variances is not None:
            var = variances[0] if means.shape[0] == 1 else la_ens(means, variances)[1]
            std: torch.Tensor | None = var.clamp_min(0).sqrt()
        elif self.spec.rule in (Rule.MEAN, Rule.WCO, Rule.UWO):  # ensemble spread across members (ddof 0)
            std = means.std(0, correction=0)
        else:
            std = None
        return Scores(means.mean(0), std, selection)

    __call__ = score
