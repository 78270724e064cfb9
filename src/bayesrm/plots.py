"""Figures (BoN overoptimisation, reliability diagrams, selective prediction) as PNGs, written atomically
(`io.atomic_path`).

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend state), so it is safe to call
from scripts, tests and worker threads alike.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bayesrm.bon import BonCurve
from bayesrm.io import atomic_path

KL_LABEL = "KL(π_BoN ‖ π_ref) [nats]"
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]


def _styles(n_lines: int) -> list[tuple[tuple[float, ...], str]]:
    """A distinct (colour, marker) per line: tab10 up to 10 lines, tab20 beyond."""
    cmap = colormaps["tab10" if n_lines <= 10 else "tab20"]
    return [(tuple(cmap(i % cmap.N)), _MARKERS[i % len(_MARKERS)]) for i in range(n_lines)]


def _save_atomic(fig: Figure, path: str | os.PathLike[str], dpi: int = 150) -> Path:
    """Render fig into place atomically (`io.atomic_path`: no reader sees half a file)."""
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".").lower() or "png", dpi=dpi)
    return out


def plot_bon(curves: list[BonCurve], path: str | os.PathLike[str], title: str) -> Path:
    """Overoptimisation figure in the papers' layout: proxy vs KL (left), gold vs KL with CI band (right)."""
    if not curves:
        raise ValueError("plot_bon needs at least one curve")
    fig = Figure(figsize=(12.0, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax_proxy, ax_gold = fig.subplots(1, 2)
    for c, (colour, marker) in zip(curves, _styles(len(curves)), strict=True):
        for ax, y in ((ax_proxy, c.proxy), (ax_gold, c.gold)):
            ax.plot(c.kl, y, label=c.name, color=colour, marker=marker, markersize=4, linewidth=1.5)
        ax_gold.fill_between(c.kl, c.gold_lo, c.gold_hi, color=colour, alpha=0.15, linewidth=0)
    for ax, ylabel, name in ((ax_proxy, "proxy reward", "Proxy"), (ax_gold, "gold reward", "Gold")):
        ax.set_xlabel(KL_LABEL)
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0.0)
    handles, labels = ax_gold.get_legend_handles_labels()
    ncol = min(len(curves), 5)
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, frameon=False)
    fig.suptitle(title)
    return _save_atomic(fig, path)


def plot_k_sweep(results: dict[str, dict[float, float]], path: str | os.PathLike[str], title: str) -> Path:
    """Gold reward at the largest N against penalty weight k, one line per penalty type ("std", "var", …)."""
    if not results:
        raise ValueError("plot_k_sweep needs at least one penalty type")
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    all_k: list[float] = []
    for (penalty, by_k), (colour, marker) in zip(results.items(), _styles(len(results)), strict=True):
        ks = np.array(sorted(by_k), dtype=np.float64)  # (M,)
        gold = np.array([by_k[k] for k in sorted(by_k)], dtype=np.float64)  # (M,)
        ax.plot(ks, gold, label=penalty, color=colour, marker=marker, markersize=5, linewidth=1.5)
        all_k.extend(ks.tolist())
    positive = [k for k in all_k if k > 0]
    if positive and max(positive) / min(positive) > 100:  # weights spanning decades: log scale, 0 kept linear
        ax.set_xscale("symlog", linthresh=min(positive))
    ax.set_xlabel("penalty weight k")
    ax.set_ylabel("gold reward at largest N")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(title="penalty", frameon=False)
    return _save_atomic(fig, path)


def plot_reliability(reliability: dict[str, dict[str, list[float | None]]], path: str | os.PathLike[str],
                     title: str) -> Path:
    """Reliability diagram: accuracy vs mean confidence per bin, one line per predictive, and the bins' counts."""
    if not reliability:
        raise ValueError("plot_reliability needs at least one predictive")
    fig = Figure(figsize=(6.0, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_n = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0.5, 1.0], [0.5, 1.0], color="0.5", linestyle="--", linewidth=1, label="perfect calibration")
    n_bins = len(next(iter(reliability.values()))["count"])
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    width = 0.5 / n_bins / (len(reliability) + 1)
    for j, ((name, r), (colour, marker)) in enumerate(zip(reliability.items(), _styles(len(reliability)),
                                                          strict=True)):
        keep = [i for i, c in enumerate(r["count"]) if c and r["confidence"][i] is not None]
        conf = np.array([r["confidence"][i] for i in keep], dtype=np.float64)  # (K,)
        acc = np.array([r["accuracy"][i] for i in keep], dtype=np.float64)  # (K,)
        ax.plot(conf, acc, label=name, color=colour, marker=marker, markersize=5, linewidth=1.5)
        ax_n.bar(edges[:-1] + (j + 0.5) * width, r["count"], width=width, color=colour, label=name)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    ax_n.set_xlabel("confidence max(p, 1 − p)")
    ax_n.set_ylabel("pairs")
    ax_n.set_xlim(0.5, 1.0)
    return _save_atomic(fig, path)


def plot_selective(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike[str],
                   title: str) -> Path:
    """Selective prediction: accuracy of the most confident fraction of pairs against that fraction (coverage)."""
    if not curves:
        raise ValueError("plot_selective needs at least one curve")
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for (name, (cov, acc)), (colour, _) in zip(curves.items(), _styles(len(curves)), strict=True):
        ax.plot(cov, acc, label=f"{name} (area {float(np.mean(acc)):.3f})", color=colour, linewidth=1.5)
    ax.set_xlabel("coverage (fraction of pairs kept)")
    ax.set_ylabel("accuracy on kept pairs")
    ax.set_title(title)
    ax.set_xlim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    return _save_atomic(fig, path)
