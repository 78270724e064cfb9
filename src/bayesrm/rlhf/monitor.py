"""The proxy reward TRL optimises, with a gold reward model scoring every batch outside the loss."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bayesrm.integrations.trl import RewardFunction
from bayesrm.io import json_text
from bayesrm.scoring import Scorer


class GoldMonitor:
    """TRL reward function: the proxy's selection reward; gold scores of the same completions are only logged.

    Logs `proxy_reward` (mean reward), `sigma` (mean σ, when the spec reads one) and `gold` per generation batch
    through TRL's `log_metric`, and appends one row per completion to `rows_path` (jsonl).
    """

    __name__ = "proxy"  # TRL logs the training reward as rewards/proxy/mean

    def __init__(self, proxy: RewardFunction, gold: Scorer, rows_path: Path | None = None) -> None:
        self.proxy, self.gold, self.rows_path = proxy, gold, rows_path

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        p, c = self.proxy.texts(prompts, completions, **kwargs)
        s = self.proxy.scorer.score(p, c)
        g = self.gold.score(p, c).reward  # (N,) never returned: gold does not shape the policy
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            log_metric("proxy_reward", float(s.reward.mean()))
            log_metric("gold", float(g.mean()))
            if s.std is not None:
                log_metric("sigma", float(s.std.mean()))
        if self.rows_path is not None:
            state = kwargs.get("trainer_state")
            step = int(state.global_step) + 1 if state is not None else None  # the step these samples train
            std = s.std.tolist() if s.std is not None else [None] * len(p)
            with open(self.rows_path, "a", encoding="utf-8") as f:
                for i in range(len(p)):
                    f.write(json_text({"step": step, "prompt": p[i], "completion": c[i],
                                       "proxy": float(s.selection[i]), "reward": float(s.reward[i]),
                                       "sigma": std[i], "gold": float(g[i])}, self.rows_path) + "\n")
        return [float(x) for x in s.selection.tolist()]
