"""Best-of-n (BoN) evaluation: unbiased pool estimator, BoN KL, Gao et al. functional forms, bootstrap CIs.

Notation (see ``shared/papers/overoptimisation.md`` §1–3): P prompts, each with a pool of n reference samples;
best-of-N with N ≤ n; ``select`` is the reward that picks the best candidate (proxy, possibly penalised) and
``evaluate`` the reward it is scored with (gold, or a proxy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

# A (P, n) matrix, or P 1-D pools of possibly different sizes ("ragged").
Pools = np.ndarray | Sequence[ArrayLike]

_CHUNK_ELEMS = 1 << 22  # rows are processed in chunks of about this many elements (≈32 MiB per float64 array)


# ----------------------------------------------------------------------------------------------- estimator


def default_ns(n_pool: int) -> list[int]:
    """BoN sizes 1, 2, 4, …, 2^k ≤ n_pool, then n_pool itself (Coste et al. 2024: {1, …, 8192, 12500})."""
    if n_pool < 1:
        raise ValueError(f"n_pool must be ≥ 1, got {n_pool}")
    ns = [1 << k for k in range(n_pool.bit_length()) if 1 << k <= n_pool]
    if ns[-1] != n_pool:
        ns.append(n_pool)
    return ns


def _check_ns(ns: Sequence[int] | int) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(ns))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("ns must be a non-empty 1-D sequence of integers")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"ns must be integers, got {arr.tolist()}")
        arr = arr.astype(np.int64)
    if arr.min() < 1:
        raise ValueError(f"every N in ns must be ≥ 1, got {arr.tolist()}")
    return arr.astype(np.int64)


def bon_weights(n_pool: int, ns: Sequence[int]) -> np.ndarray:
    """BoN weights w_{i,N} = C(i−1,N−1)/C(n,N) at ascending sorted position i (Yang et al. 2024 App.B Eq.25).

    Returns a (K, n_pool) float64 matrix whose rows sum to 1. Computed in log space from the exact ratio
    w_{i−1,N}/w_{i,N} = (i−N)/(i−1), anchored at w_{n,N} = N/n; a reverse cumulative sum of log1p terms keeps
    the relative error ≲ 1e−12 for n in the tens of thousands (the lgamma form loses ≈ eps·lgamma(n) ≈ 5e−11
    at n = 12,500 to cancellation). Positions below N get weight 0; far-below-top weights underflow to 0.
    """
    if n_pool < 1:
        raise ValueError(f"n_pool must be ≥ 1, got {n_pool}")
    big_n = _check_ns(ns)
    if big_n.max() > n_pool:
        raise ValueError(f"N={int(big_n.max())} exceeds the pool size n={n_pool}")
    N = big_n.astype(np.float64)[:, None]  # (K, 1)
    j = np.arange(2, n_pool + 1, dtype=np.float64)[None, :]  # (1, n−1): positions i = 2..n
    # step[:, i−2] = log w_{i−1,N} − log w_{i,N} = log1p(−(N−1)/(i−1)); −inf where w_{i−1,N} = 0 (i−1 < N).
    valid = j > N  # (K, n−1)
    step = np.full(valid.shape, -np.inf)  # (K, n−1)
    np.log1p(-(N - 1.0) / (j - 1.0), out=step, where=valid)
    log_w = np.empty((big_n.size, n_pool))  # (K, n)
    log_w[:, -1] = 0.0
    log_w[:, :-1] = np.cumsum(step[:, ::-1], axis=1)[:, ::-1]  # log w_i − log w_n = Σ_{m=i+1}^{n} step_m
    log_w += np.log(N / n_pool)
    return np.exp(log_w)


def _as_pools(x: Pools, name: str) -> np.ndarray | list[np.ndarray]:
    """A (P, n) float64 matrix, or a list of 1-D float64 pools when their sizes differ."""
    if isinstance(x, np.ndarray) and x.dtype != object:
        if x.ndim != 2:
            raise ValueError(f"{name} must be a (P, n) array or a list of 1-D pools, got shape {x.shape}")
        return np.asarray(x, dtype=np.float64)
    rows = [np.asarray(r, dtype=np.float64) for r in x]
    if not rows:
        raise ValueError(f"{name} has no prompts")
    for p, r in enumerate(rows):
        if r.ndim != 1:
            raise ValueError(f"{name}[{p}] must be a 1-D pool, got shape {r.shape}")
    if len({r.size for r in rows}) == 1:
        return np.stack(rows)  # (P, n)
    return rows


def _check_finite(select: np.ndarray, evals: Sequence[np.ndarray], prompt_ids: np.ndarray) -> None:
    """NaN anywhere, or ±inf in an evaluation reward (inf·0 would poison the weighted sum), is an error."""
    bad = np.isnan(select).any(axis=1)  # (P,)
    for g in evals:
        bad |= ~np.isfinite(g).all(axis=1)
    if bad.any():
        p = int(prompt_ids[np.flatnonzero(bad)[0]])
        raise ValueError(
            f"non-finite reward in prompt {p} (NaN in the selection or evaluation reward, or ±inf in the "
            f"evaluation reward); {int(bad.sum())} prompt(s) affected"
        )


def _tie_average(s_sorted: np.ndarray, g_sorted: np.ndarray) -> np.ndarray:
    """Replace g within each run of equal sorted s by the run mean (rows are prompts)."""
    rows, n = s_sorted.shape
    start = np.ones((rows, n), dtype=bool)  # (R, n) True where a run of equal s begins
    start[:, 1:] = s_sorted[:, 1:] != s_sorted[:, :-1]
    run = np.cumsum(start.ravel()) - 1  # (R·n,) global run id
    sums = np.bincount(run, weights=g_sorted.ravel())
    counts = np.bincount(run)
    return (sums / counts)[run].reshape(rows, n)  # (R, n)


def _estimate_dense(select: np.ndarray, evals: Sequence[np.ndarray], weights: np.ndarray) -> list[np.ndarray]:
    """Σ_i w_{i,N} ḡ_(i) for each eval matrix: one sort of select shared by all evals, one matmul each."""
    n_prompts, n = select.shape
    out = [np.empty((n_prompts, weights.shape[0])) for _ in evals]  # each (P, K)
    step = max(1, _CHUNK_ELEMS // n)
    for a in range(0, n_prompts, step):
        s = select[a : a + step]  # (R, n)
        # The permutation equals argsort(kind="stable"): rows without ties have a unique sorted order, so the
        # (SIMD, ~4x faster on float64) default sort finds it; rows with ties are redone with a stable sort.
        # Tie-averaging makes the estimate independent of in-run order anyway, up to summation rounding.
        order = np.argsort(s, axis=1)  # (R, n)
        s_sorted = np.take_along_axis(s, order, axis=1)  # (R, n)
        tied = (s_sorted[:, 1:] == s_sorted[:, :-1]).any(axis=1)  # (R,)
        if tied.any():
            order[tied] = np.argsort(s[tied], axis=1, kind="stable")
            s_sorted[tied] = np.take_along_axis(s[tied], order[tied], axis=1)
        for g, o in zip(evals, out, strict=True):
            g_sorted = np.take_along_axis(g[a : a + step], order, axis=1)  # (R, n)
            if tied.any():
                g_sorted[tied] = _tie_average(s_sorted[tied], g_sorted[tied])
            o[a : a + step] = g_sorted @ weights.T  # (R, K)
    return out


def _bon_estimate_many(select: Pools, evaluates: Sequence[Pools], ns: Sequence[int]) -> list[np.ndarray]:
    """bon_estimate for several evaluation rewards sharing one selection (and one sort)."""
    big_n = _check_ns(ns)
    sel = _as_pools(select, "select")
    evs = [_as_pools(e, f"evaluate[{k}]") for k, e in enumerate(evaluates)]
    n_prompts = sel.shape[0] if isinstance(sel, np.ndarray) else len(sel)
    sizes = np.array([sel.shape[1]] * n_prompts if isinstance(sel, np.ndarray) else [r.size for r in sel])
    for k, e in enumerate(evs):
        e_sizes = [e.shape[1]] * e.shape[0] if isinstance(e, np.ndarray) else [r.size for r in e]
        if len(e_sizes) != n_prompts:
            raise ValueError(f"evaluate[{k}] has {len(e_sizes)} prompts, select has {n_prompts}")
        mismatch = np.flatnonzero(np.asarray(e_sizes) != sizes)
        if mismatch.size:
            p = int(mismatch[0])
            raise ValueError(f"prompt {p}: evaluate[{k}] has {e_sizes[p]} candidates, select has {sizes[p]}")
    if sizes.min() < 1:
        raise ValueError(f"prompt {int(np.argmin(sizes))} has an empty pool")
    too_small = np.flatnonzero(sizes < big_n.max())
    if too_small.size:
        p = int(too_small[0])
        raise ValueError(f"N={int(big_n.max())} exceeds the pool size n={int(sizes[p])} of prompt {p}")

    out = [np.empty((n_prompts, big_n.size)) for _ in evs]  # each (P, K)
    for n in np.unique(sizes):
        ids = np.flatnonzero(sizes == n)  # prompts in this group: one sort, one matmul per evaluation reward
        s_grp = sel if isinstance(sel, np.ndarray) else np.stack([sel[p] for p in ids])  # (P_g, n)
        e_grps = [e if isinstance(e, np.ndarray) else np.stack([e[p] for p in ids]) for e in evs]  # (P_g, n)
        _check_finite(s_grp, e_grps, ids)
        weights = bon_weights(int(n), big_n.tolist())  # (K, n)
        for o, r in zip(out, _estimate_dense(s_grp, e_grps, weights), strict=True):
            o[ids] = r
    return out


def bon_estimate(select: Pools, evaluate: Pools, ns: Sequence[int]) -> np.ndarray:
    """Per-prompt unbiased BoN reward R̂_N = Σ_i w_{i,N} g_(i) (Nakano et al. 2021; Coste et al. App. B Eq. 8).

    ``select`` and ``evaluate`` are (P, n) arrays, or lists of P 1-D pools of possibly different sizes
    (pools of equal size are batched into one sort and one matmul). Returns a (P, K) float64 array whose
    column k is for N = ns[k].

    Candidates are sorted by ``select``; within each run of equal selection rewards, ``evaluate`` is replaced
    by the run mean before weighting. This is exact for BoN with uniform random tie-breaking: whether the
    selected candidate lies in a given run depends only on the run's position, never on the order inside it,
    and each run member is then equally likely to be picked. (A plain argsort would instead break ties by
    array position — a bias when scores are quantised, e.g. bf16, or responses are duplicated.)
    """
    return _bon_estimate_many(select, [evaluate], ns)[0]


# --------------------------------------------------------------------------------------------------- KL


def kl_bon(ns: Sequence[int] | int) -> np.ndarray:
    """BoN KL log N − (N−1)/N nats (Stiennon et al. 2020 App. G.3); an upper bound if π_ref has atoms."""
    N = _check_ns(ns).astype(np.float64)
    return np.log(N) - (N - 1.0) / N


def kl_bon_beirami(n: ArrayLike, eps: ArrayLike) -> np.ndarray:
    """Beirami et al. 2024 BoN KL estimate given ε = π_ref(y_sel|x), broadcast over n and eps.

    KL̂ = (1−ε)^n [log n + (n−1) log(1−ε) − (n−1)/n] + (1−(1−ε)^n) log((1−(1−ε)^n)/ε) ∈ [0, log n − (n−1)/n].
    Evaluated with a = exp(n·log1p(−ε)) and 1−a = −expm1(n·log1p(−ε)); gives the bound where ε underflows.
    """
    n_arr = np.asarray(n, dtype=np.float64)
    e = np.asarray(eps, dtype=np.float64)
    if np.any(~(n_arr >= 1)):
        raise ValueError("n must be ≥ 1")
    if np.any(~((e >= 0) & (e <= 1))):
        raise ValueError("eps must lie in [0, 1]")
    n_arr, e = np.broadcast_arrays(n_arr, e)
    bound = np.log(n_arr) - (n_arr - 1.0) / n_arr
    inner = (e > 0) & (e < 1)
    e_in = np.where(inner, e, 0.5)  # placeholder keeps the masked-out lanes finite
    log1m = np.log1p(-e_in)  # log(1−ε)
    a = np.exp(n_arr * log1m)  # (1−ε)^n
    one_minus_a = -np.expm1(n_arr * log1m)  # 1 − (1−ε)^n, accurate for small nε
    kl = a * (np.log(n_arr) + (n_arr - 1.0) * log1m - (n_arr - 1.0) / n_arr) + one_minus_a * np.log(
        one_minus_a / e_in
    )
    # ε = 1: the selected response is certain, a = 0 and 1−a = 1 give log(1/1) = 0.
    return np.where(inner, kl, np.where(e == 0, bound, 0.0))


# --------------------------------------------------------------------------------------- Gao functional forms


def gao_bon_curve(d: ArrayLike, alpha: float, beta: float) -> np.ndarray:
    """Gao et al. 2022 BoN gold-reward form R(d) = d(α − βd), d = sqrt(KL)."""
    d_arr = np.asarray(d, dtype=np.float64)
    return d_arr * (alpha - beta * d_arr)


def gao_bon_peak(alpha: float, beta: float) -> tuple[float, float]:
    """Peak of the Gao et al. 2022 BoN form: d* = α/(2β), R* = α²/(4β) (∞ when β ≤ 0)."""
    if beta <= 0:
        return float("inf"), float("inf")
    return alpha / (2.0 * beta), alpha**2 / (4.0 * beta)


def fit_gao_bon(kl: ArrayLike, gold: ArrayLike, weights: ArrayLike | None = None) -> tuple[float, float]:
    """Least-squares (α, β) of Gao et al. 2022's BoN form: gold − gold[KL=0] ≈ α d − β d², no intercept.

    The baseline is the gold reward at the KL = 0 (N = 1) point, which must be present. Optional ``weights``
    (e.g. 1/SE²) give weighted least squares.
    """
    kl_arr = np.asarray(kl, dtype=np.float64).ravel()
    gold_arr = np.asarray(gold, dtype=np.float64).ravel()
    if kl_arr.shape != gold_arr.shape:
        raise ValueError(f"kl and gold differ in length: {kl_arr.size} vs {gold_arr.size}")
    if not (np.all(np.isfinite(kl_arr)) and np.all(np.isfinite(gold_arr))) or np.any(kl_arr < 0):
        raise ValueError("kl must be finite and ≥ 0, gold finite")
    zero = np.flatnonzero(np.abs(kl_arr) <= 1e-12)
    if zero.size == 0:
        raise ValueError("fit_gao_bon needs the KL = 0 (N = 1) point as the baseline")
    if np.count_nonzero(kl_arr > 1e-12) < 2:
        raise ValueError("fit_gao_bon needs at least two points with KL > 0")
    d = np.sqrt(kl_arr)  # (K,)
    y = gold_arr - gold_arr[zero[0]]  # (K,)
    X = np.stack([d, -(d**2)], axis=1)  # (K, 2)
    if weights is not None:
        sw = np.sqrt(np.asarray(weights, dtype=np.float64).ravel())  # (K,)
        if sw.shape != d.shape or not np.all(np.isfinite(sw)):
            raise ValueError("weights must be finite, ≥ 0 and one per point")
        X, y = X * sw[:, None], y * sw
    coef = np.linalg.lstsq(X, y, rcond=None)[0]
    return float(coef[0]), float(coef[1])


# -------------------------------------------------------------------------------------------- uncertainty


def bootstrap_ci(
    per_prompt: ArrayLike, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI, over prompts (rows), of the column means of a (P, K) matrix: (lo, hi)."""
    x = np.asarray(per_prompt, dtype=np.float64)
    if x.ndim not in (1, 2) or x.shape[0] == 0:
        raise ValueError(f"per_prompt must be a non-empty (P,) or (P, K) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("per_prompt contains non-finite values")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError("need 0 < level < 1 and n_boot ≥ 1")
    n_prompts = x.shape[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_prompts, size=(n_boot, n_prompts))  # (B, P) resampled prompt ids
    idx += np.arange(n_boot)[:, None] * n_prompts  # offset per replicate so one bincount does all rows
    counts = np.bincount(idx.ravel(), minlength=n_boot * n_prompts).reshape(n_boot, n_prompts)  # (B, P)
    means = counts.astype(np.float64) @ x.reshape(n_prompts, -1) / n_prompts  # (B, K)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=0)  # each (K,)
    return lo.reshape(x.shape[1:]), hi.reshape(x.shape[1:])


# ------------------------------------------------------------------------------------------------ curves


@dataclass(eq=False)  # arrays inside: no element-wise ==
class BonCurve:
    """One method's BoN overoptimisation curve, averaged over prompts."""

    name: str  # method label (legend entry)
    ns: np.ndarray  # (K,) BoN sizes N
    kl: np.ndarray  # (K,) analytic KL(π_BoN ‖ π_ref) = log N − (N−1)/N, nats
    proxy: np.ndarray  # (K,) mean evaluation-proxy reward of the BoN policy
    gold: np.ndarray  # (K,) mean gold reward of the BoN policy
    gold_lo: np.ndarray  # (K,) lower end of the bootstrap CI on ``gold``
    gold_hi: np.ndarray  # (K,) upper end of the bootstrap CI on ``gold``

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (arrays become lists)."""
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BonCurve:
        """Inverse of :meth:`to_dict`."""
        arrays = {
            k: np.asarray(v, dtype=np.int64 if k == "ns" else np.float64) for k, v in d.items() if k != "name"
        }
        return cls(name=str(d["name"]), **arrays)


def bon_curve(
    name: str,
    proxy_select: Pools,
    proxy_eval: Pools,
    gold: Pools,
    ns: Sequence[int] | None = None,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> BonCurve:
    """One method's BoN curve: ``proxy_select`` (maybe penalised) picks; ``proxy_eval`` and ``gold`` score it.

    ``proxy_eval`` is the caller's choice of proxy axis: the unpenalised MAP proxy, or ``proxy_select``
    itself. ``ns`` defaults to ``default_ns`` of the smallest pool; the gold CI is a percentile bootstrap
    over prompts. KL is the analytic ``kl_bon``.
    """
    if ns is None:
        sel = _as_pools(proxy_select, "proxy_select")
        n_min = sel.shape[1] if isinstance(sel, np.ndarray) else min(r.size for r in sel)
        ns = default_ns(int(n_min))
    proxy_pp, gold_pp = _bon_estimate_many(proxy_select, [proxy_eval, gold], ns)  # each (P, K)
    lo, hi = bootstrap_ci(gold_pp, n_boot=n_boot, level=level, seed=seed)
    return BonCurve(
        name=name,
        ns=_check_ns(ns),
        kl=kl_bon(ns),
        proxy=proxy_pp.mean(axis=0),
        gold=gold_pp.mean(axis=0),
        gold_lo=lo,
        gold_hi=hi,
    )
