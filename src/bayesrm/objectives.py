"""Selection rewards: uncertainty penalties, ensemble aggregates, transforms, and a spec language naming them.

Every objective is a pure tensor function over member rewards (M, N) or a single model's (N,) rewards. A
`SelectionSpec` (parsed from strings such as ``"la:var:k=1"`` or ``"ens:uwo:lambda=0.5+logsig"``) applies one of
them to member means/variances of shape (M, N); a single model is the case M = 1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- pure maths


def penalize_std(mean: torch.Tensor, var: torch.Tensor, k: float) -> torch.Tensor:
    """Standard-deviation penalty r − k·σ (Yang et al. 2024, Eq. 18; Eq. 21 with LA-Ens moments)."""
    return mean - k * var.clamp_min(0.0).sqrt()


def penalize_var(mean: torch.Tensor, var: torch.Tensor, k: float) -> torch.Tensor:
    """Variance penalty r − k·σ² (Yang et al. 2024, Eq. 19; Eq. 22 with LA-Ens moments)."""
    return mean - k * var


def ensemble_mean(rewards: torch.Tensor) -> torch.Tensor:
    """Mean over members (M, N) → (N,) (Coste et al. 2024, §3, mean objective)."""
    return rewards.mean(0)


def ensemble_min(rewards: torch.Tensor) -> torch.Tensor:
    """Worst-case optimisation: min over members (M, N) → (N,) (Coste et al. 2024, §3, WCO)."""
    return rewards.min(0).values


def ensemble_uwo(rewards: torch.Tensor, lam: float) -> torch.Tensor:
    """Uncertainty-weighted optimisation mean − λ·Var_members, ddof 0, (M, N) → (N,) (Coste et al. 2024, Eq. 5)."""
    # ddof 0 as Eq. 5 and Coste's BoN code (np.var); their PPO path uses torch.var (ddof 1), 1.25× larger at k=5
    return rewards.mean(0) - lam * rewards.var(0, correction=0)


def la_ens(means: torch.Tensor, variances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LA-Ens moments of independent Gaussian members: (Σμ_i/M, Σσ_i²/M²), (M, N) → (N,), (N,) (Yang Eq. 20)."""
    m = means.shape[0]
    return means.mean(0), variances.sum(0) / m**2


def log_sigmoid_transform(r: torch.Tensor, r_ref: torch.Tensor | float) -> torch.Tensor:
    """log σ(r − r_ref) = −softplus(r_ref − r), the log-probability of beating the reference (Wang et al. 2024)."""
    return -F.softplus(torch.as_tensor(r_ref, dtype=r.dtype, device=r.device) - r)


def clip_reward(r: torch.Tensor, r_ref: torch.Tensor | float) -> torch.Tensor:
    """Clipped reward min(r − r_ref, 0), sequence-level analogue of J. Gao et al. 2024's clip (overopt. note §5)."""
    return (r - r_ref).clamp_max(0.0)


def standardize(rewards: torch.Tensor, ref_mean: torch.Tensor | float, ref_std: torch.Tensor | float
                ) -> torch.Tensor:
    """Per-member z-score (r − m_i)/s_i with statistics from a fixed reference set (overopt. note §8).

    `rewards` (M, N) with `ref_mean`, `ref_std` of shape (M,) (or anything broadcastable). Scale a Laplace
    variance by the same factor with `standardize_var` so σ stays in the member's new units.
    """
    mu, sd = _per_member(ref_mean, rewards), _per_member(ref_std, rewards)
    return (rewards - mu) / sd


def standardize_var(variances: torch.Tensor, ref_std: torch.Tensor | float) -> torch.Tensor:
    """Variance in standardised units, σ²/s_i², matching `standardize` (overopt. note §8, LA-Ens)."""
    return variances / _per_member(ref_std, variances).square()


def reference_stats(ref_rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member mean and std (ddof 0) of rewards (M, K) on a reference set → (M,), (M,)."""
    return ref_rewards.mean(-1), ref_rewards.std(-1, correction=0)


def _per_member(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    return t.unsqueeze(-1) if t.dim() == 1 and like.dim() == 2 else t  # (M,) → (M, 1)


# --------------------------------------------------------------------------- spec language


class Family(str, Enum):
    """Which reward model(s) and moments a selection reward reads."""

    MAP = "map"  # one model's MAP reward
    LA = "la"  # one model's Laplace mean and variance
    VI = "vi"  # one BNRM's variational (mean-field) predictive mean and variance
    ENS = "ens"  # M members' MAP rewards
    LA_ENS = "la-ens"  # M members' Laplace means and variances (independent Gaussians)


class Rule(str, Enum):
    """How moments or members are combined into one reward."""

    MEAN = "mean"  # plain mean
    STD = "std"  # mean − k·σ
    VAR = "var"  # mean − k·σ²
    WCO = "wco"  # min over members
    UWO = "uwo"  # mean − λ·Var over members


class Transform(str, Enum):
    """Per-prompt reference transform applied to the selection reward (needs `ref`)."""

    LOGSIG = "logsig"  # log σ(s − s_ref) (Wang et al. 2024)
    CLIP = "clip"  # min(s − s_ref, 0)


_RULES: dict[Family, tuple[Rule, ...]] = {
    Family.MAP: (),
    Family.LA: (Rule.STD, Rule.VAR),
    Family.VI: (Rule.STD, Rule.VAR),
    Family.ENS: (Rule.MEAN, Rule.WCO, Rule.UWO),
    Family.LA_ENS: (Rule.MEAN, Rule.STD, Rule.VAR),
}
_PARAM: dict[Rule, str] = {Rule.STD: "k", Rule.VAR: "k", Rule.UWO: "lambda"}
VALID_FORMS = ("map", "la:std:k=K", "la:var:k=K", "vi:std:k=K", "vi:var:k=K",
               "ens:mean", "ens:wco", "ens:uwo:lambda=L", "la-ens:mean",
               "la-ens:std:k=K", "la-ens:var:k=K")
_HELP = (f"valid forms: {', '.join(VALID_FORMS)}; optionally followed by one of "
         f"{', '.join('+' + t.value for t in Transform)} (needs a per-prompt reference reward)")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


@dataclass(frozen=True)
class SelectionSpec:
    """A selection reward: family (map | la | vi | ens | la-ens), rule, its weight, and an optional transform."""

    family: Family
    rule: Rule | None = None  # None only for MAP
    weight: float | None = None  # k for std/var, λ for uwo; None otherwise
    transform: Transform | None = None

    def __post_init__(self) -> None:
        fam = Family(self.family)
        rule = None if self.rule is None else Rule(self.rule)
        tr = None if self.transform is None else Transform(self.transform)
        object.__setattr__(self, "family", fam)
        object.__setattr__(self, "rule", rule)
        object.__setattr__(self, "transform", tr)
        if (rule is None) != (fam is Family.MAP) or (rule is not None and rule not in _RULES[fam]):
            raise ValueError(f"'{fam.value}' does not take rule {rule.value if rule else None!r}; {_HELP}")
        if rule in _PARAM:
            w = self.weight
            if w is None or not math.isfinite(w) or w < 0:
                raise ValueError(f"'{fam.value}:{rule.value}' needs a finite {_PARAM[rule]} ≥ 0, got {w!r}")
            object.__setattr__(self, "weight", float(w))
        elif self.weight is not None:
            raise ValueError(f"'{self.family.value}{':' + rule.value if rule else ''}' takes no weight; {_HELP}")

    @property
    def needs_variance(self) -> bool:
        """True when the reward reads predictive variances (la, vi, la-ens std/var)."""
        return self.family in (Family.LA, Family.VI) or (self.family is Family.LA_ENS and self.rule is not Rule.MEAN)

    @property
    def needs_ensemble(self) -> bool:
        """True when the reward combines all members (ens, la-ens); map/la read a single model (M = 1)."""
        return self.family in (Family.ENS, Family.LA_ENS)

    @property
    def needs_reference(self) -> bool:
        """True when a transform needs the per-prompt reference reward."""
        return self.transform is not None

    def __str__(self) -> str:
        s = self.family.value
        if self.rule is not None:
            s += f":{self.rule.value}"
        if self.rule in _PARAM:
            assert self.weight is not None
            s += f":{_PARAM[self.rule]}={_fmt(self.weight)}"
        if self.transform is not None:
            s += f"+{self.transform.value}"
        return s

    def apply(self, means: torch.Tensor, variances: torch.Tensor | None = None,
              ref: torch.Tensor | float | None = None) -> torch.Tensor:
        """Selection reward (N,) from member means (M, N), variances (M, N) and reference rewards (N,).

        map/la need M = 1 (pass a single member's row); `ref` is the reference *selection* reward of each
        response's prompt (e.g. a high quantile of this spec's reward over reference-policy samples).
        """
        if means.dim() == 1:
            means = means.unsqueeze(0)  # (1, N)
            variances = None if variances is None else variances.reshape(1, -1)
        if means.dim() != 2 or means.shape[0] < 1:
            raise ValueError(f"means must be (M, N) with M ≥ 1, got shape {tuple(means.shape)}")
        if not self.needs_ensemble and means.shape[0] != 1:
            raise ValueError(f"'{self}' scores one model but got M={means.shape[0]} members; pass means[:1] "
                             "or use an ens:/la-ens: spec")
        if self.needs_variance:
            if variances is None:
                raise ValueError(f"'{self}' needs predictive variances (Laplace posterior or BNRM head)")
            if variances.shape != means.shape:
                raise ValueError(f"variances {tuple(variances.shape)} do not match means {tuple(means.shape)}")
        s = self._reward(means, variances)  # (N,)
        if self.transform is None:
            return s
        if ref is None:
            raise ValueError(f"'{self}' needs a per-prompt reference reward (ref)")
        if self.transform is Transform.LOGSIG:
            return log_sigmoid_transform(s, ref)
        return clip_reward(s, torch.as_tensor(ref, dtype=s.dtype, device=s.device))

    def _reward(self, means: torch.Tensor, variances: torch.Tensor | None) -> torch.Tensor:
        fam, rule, w = self.family, self.rule, self.weight
        if fam is Family.MAP:
            return means[0]
        if fam is Family.ENS:
            if rule is Rule.MEAN:
                return ensemble_mean(means)
            if rule is Rule.WCO:
                return ensemble_min(means)
            assert w is not None
            return ensemble_uwo(means, w)
        if fam is Family.LA_ENS and rule is Rule.MEAN:
            return ensemble_mean(means)
        assert variances is not None and w is not None
        mu, var = la_ens(means, variances) if fam is Family.LA_ENS else (means[0], variances[0])
        return penalize_std(mu, var, w) if rule is Rule.STD else penalize_var(mu, var, w)


_PARAM_RE = re.compile(r"^([A-Za-z_]+)=(.+)$")


def parse_spec(spec: str | SelectionSpec) -> SelectionSpec:
    """Parse e.g. "map", "la:var:k=1", "ens:uwo:lambda=0.5", "la-ens:std:k=2+logsig" into a SelectionSpec."""
    if isinstance(spec, SelectionSpec):
        return spec
    text = spec.strip().lower()
    body, *suffixes = text.split("+")
    if len(suffixes) > 1:
        raise ValueError(f"bad selection spec {spec!r}: at most one transform suffix; {_HELP}")
    transform = None
    if suffixes:
        try:
            transform = Transform(suffixes[0].strip())
        except ValueError:
            raise ValueError(f"bad selection spec {spec!r}: unknown transform '+{suffixes[0]}'; {_HELP}") from None
    parts = [p.strip() for p in body.split(":")]
    try:
        family = Family(parts[0])
    except ValueError:
        raise ValueError(f"bad selection spec {spec!r}: unknown family '{parts[0]}'; {_HELP}") from None
    if family is Family.MAP:
        if len(parts) != 1:
            raise ValueError(f"bad selection spec {spec!r}: 'map' takes no rule or weight; {_HELP}")
        return SelectionSpec(family, transform=transform)
    if len(parts) < 2:
        raise ValueError(f"bad selection spec {spec!r}: '{family.value}' needs a rule; {_HELP}")
    try:
        rule = Rule(parts[1])
    except ValueError:
        raise ValueError(f"bad selection spec {spec!r}: unknown rule '{parts[1]}'; {_HELP}") from None
    if rule not in _RULES[family]:
        raise ValueError(f"bad selection spec {spec!r}: '{family.value}' does not take rule '{rule.value}'; {_HELP}")
    want = _PARAM.get(rule)
    if want is None:
        if len(parts) != 2:
            raise ValueError(f"bad selection spec {spec!r}: '{family.value}:{rule.value}' takes no weight; {_HELP}")
        return SelectionSpec(family, rule, transform=transform)
    m = _PARAM_RE.match(parts[2]) if len(parts) == 3 else None
    if m is None or m.group(1) != want:
        raise ValueError(f"bad selection spec {spec!r}: '{family.value}:{rule.value}' needs '{want}=<number>'; "
                         f"{_HELP}")
    try:
        weight = float(m.group(2))
    except ValueError:
        raise ValueError(f"bad selection spec {spec!r}: {want}={m.group(2)!r} is not a number") from None
    try:
        return SelectionSpec(family, rule, weight, transform)
    except ValueError as e:
        raise ValueError(f"bad selection spec {spec!r}: {e}") from None
