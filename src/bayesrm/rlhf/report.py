"""RLHF results: per-step histories, final summaries, the markdown table and the gold/proxy-vs-KL plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def add_prompt_deltas(history: list[dict[str, Any]], rows_path: Path, first_pass: int) -> list[dict[str, Any]]:
    """Add `gold_delta` / `proxy_delta` per step: mean over its completions of the reward minus the mean reward of
    the same prompt's completions in the first `first_pass` steps (≈ the initial policy).

    Per-step means mix a handful of prompts whose gold levels differ far more than training moves them; centring
    each completion on its prompt's starting level removes that. Steps whose prompts lack a baseline get NaN.
    """
    text = rows_path.read_text() if rows_path.exists() else ""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    base: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["step"] <= first_pass:
            base.setdefault(r["prompt"], []).append((r["gold"], r["reward"]))
    ref = {p: (sum(g for g, _ in v) / len(v), sum(x for _, x in v) / len(v)) for p, v in base.items()}
    per_step: dict[int, list[tuple[float, float]]] = {}
    for r in rows:
        if r["prompt"] in ref:
            g0, p0 = ref[r["prompt"]]
            per_step.setdefault(r["step"], []).append((r["gold"] - g0, r["reward"] - p0))
    for h in history:
        d = per_step.get(h["step"], [])
        h["gold_delta"] = sum(g for g, _ in d) / len(d) if d else float("nan")
        h["proxy_delta"] = sum(x for _, x in d) / len(d) if d else float("nan")
    return history


def final_summary(history: Sequence[dict[str, Any]], window: int = 5) -> dict[str, float]:
    """First-step values and means over the last `window` steps (single steps are noisy: one batch each)."""
    first, tail = history[0], history[-window:]

    def mean(k: str) -> float:
        return sum(h.get(k, float("nan")) for h in tail) / len(tail)

    return {"gold_start": first["gold"], "proxy_reward_start": first["proxy_reward"],
            "gold_end": mean("gold"), "proxy_end": mean("proxy"), "proxy_reward_end": mean("proxy_reward"),
            "gold_delta_end": mean("gold_delta"), "proxy_delta_end": mean("proxy_delta"),
            "sigma_start": first["sigma"], "sigma_end": mean("sigma"), "kl_seq_end": mean("kl_seq"),
            "length_end": mean("length"), "window": float(len(tail))}


def results_table(results: dict[str, Any]) -> str:
    """Markdown: per run, gold / proxy / σ / KL at the start and averaged over the last steps."""
    lines = ["| run | spec | gold start → end | Δgold (prompt-centred) | proxy start → end | Δproxy "
             "| trained reward end | σ start → end | KL end (nats/seq) | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        f = r["final"]
        lines.append(f"| {name} | {r['spec']} | {f['gold_start']:.3f} → {f['gold_end']:.3f} | "
                     f"**{f['gold_delta_end']:+.3f}** | {f['proxy_reward_start']:.3f} → {f['proxy_reward_end']:.3f} | "
                     f"{f['proxy_delta_end']:+.3f} | {f['proxy_end']:.3f} | {f['sigma_start']:.3f} → "
                     f"{f['sigma_end']:.3f} | {f['kl_seq_end']:.2f} | {r['seconds'] / 60:.1f} |")
    w = next(iter(results["runs"].values()))["final"]["window"] if results["runs"] else 0
    lines += ["", f"End values are means over the last {int(w)} steps (one generation batch per step); start is "
              "the first batch, sampled from the initial policy. Δ: change from each prompt's mean over the first "
              "pass through the prompts. Proxy is the unpenalised proxy reward; the trained reward is the run's "
              "selection reward (penalised for la:)."]
    return "\n".join(lines) + "\n"


def _smooth(y: Sequence[float], w: int) -> list[float]:
    return [sum(y[max(0, i - w + 1): i + 1]) / len(y[max(0, i - w + 1): i + 1]) for i in range(len(y))]


def plot_rlhf(histories: dict[str, list[dict[str, Any]]], specs: dict[str, str], path: str | Path, title: str,
              smooth: int = 5) -> None:
    """Prompt-centred gold and proxy against KL(π‖π_ref) per sequence, one line per run (moving average; dots raw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, h) in enumerate(histories.items()):
        color = f"C{i}"
        kl = _smooth([r["kl_seq"] for r in h], smooth)
        for ax, key in zip(axes, ("gold_delta", "proxy_delta"), strict=True):
            y = [r[key] for r in h]
            ax.plot(kl, y, ".", color=color, alpha=0.25)
            ax.plot(kl, _smooth(y, smooth), "-", color=color, label=f"{name} ({specs[name]})")
    axes[0].set_title("Δ gold reward (prompt-centred)")
    axes[1].set_title("Δ proxy reward (MAP mean, unpenalised)")
    for ax in axes:
        ax.set_xlabel("KL(π ‖ π_ref), nats per completion")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
