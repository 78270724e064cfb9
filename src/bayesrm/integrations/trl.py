"""TRL reward functions: a saved bayesrm model (or ensemble) + a selection spec as `reward_funcs=` of TRL trainers.

TRL 1.x (`GRPOTrainer`, `RLOOTrainer`) calls a custom reward function as
``f(prompts=…, completions=…, completion_ids=…, trainer_state=…, log_extra=…, log_metric=…, **dataset_columns)``
and wants one float per completion; it logs the result as ``rewards/<f.__name__>/mean``. Prompts and completions
are strings (standard format) or lists of ``{"role", "content"}`` messages (conversational format).

TRL 1.x has no PPO trainer (neither ``trl.PPOTrainer`` nor one in ``trl.experimental``), so there is no
``nn.Module`` wrapper here: the trainers that remain take this callable, which also carries σ and the penalty.

    from trl import GRPOConfig, GRPOTrainer
    from bayesrm.integrations.trl import RewardFunction

    reward = RewardFunction.load("runs/rm", "la:var:k=1")  # r − σ² from the model's Laplace posterior
    GRPOTrainer(model=policy, reward_funcs=reward, args=GRPOConfig(...), train_dataset=prompts).train()
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bayesrm.objectives import SelectionSpec
from bayesrm.scoring import Scorer, Scores

Message = Mapping[str, Any]  # {"role": ..., "content": str | [{"type": "text", "text": ...}, ...]}


def message_text(content: Any) -> str:
    """Text of a message's content: a string, or the text parts of a multimodal list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(p.get("text", "") if isinstance(p, Mapping) else str(p) for p in content)
    raise TypeError(f"message content must be text or a list of parts, got {type(content).__name__}")


def conversation_prompt(messages: Sequence[Message]) -> str:
    """The reward model's prompt for a conversational prompt.

    One user turn gives its text; longer conversations give "Role: text" paragraphs, so earlier turns stay visible
    to the RM (its template renders a single prompt). System messages are dropped: they instruct the policy, and
    the RMs here are trained on user/assistant pairs.
    """
    turns = [(str(m.get("role", "user")), message_text(m.get("content"))) for m in messages]
    turns = [(r, t) for r, t in turns if r != "system"]
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    return "\n\n".join(f"{r.capitalize()}: {t}" for r, t in turns)


def completion_text(completion: str | Sequence[Message]) -> str:
    """Text of a completion: the string itself, or the joined content of its (assistant) messages."""
    if isinstance(completion, str):
        return completion
    return "".join(message_text(m.get("content")) for m in completion)


def default_name(spec: SelectionSpec | str) -> str:
    """Metric-safe name for a spec: "la:var:k=1" → "bayesrm_la_var_k_1"."""
    return re.sub(r"[^0-9A-Za-z]+", "_", f"bayesrm_{spec}").strip("_")


class RewardFunction:
    """`reward_funcs=` entry for TRL's GRPOTrainer / RLOOTrainer: selection rewards from a `Scorer`.

    Batching, device placement and the spec (MAP, Laplace r − kσ / r − kσ², ensembles) are the Scorer's. Each call
    also logs, through TRL's `log_metric`, the mean reward (`<name>/reward`) and mean σ (`<name>/sigma`, when the
    spec reads one), so a penalised run still shows the unpenalised proxy. Specs with a transform (``+logsig``,
    ``+clip``) read the per-prompt reference reward from dataset column `ref_key`.
    """

    def __init__(self, scorer: Scorer, name: str | None = None, prompt_key: str | None = None,
                 ref_key: str = "ref_reward") -> None:
        self.scorer = scorer
        self.__name__ = name or default_name(scorer.spec)  # TRL names metrics after it
        self.prompt_key = prompt_key  # read the RM's prompt text from this dataset column instead of `prompts`
        self.ref_key = ref_key

    @classmethod
    def load(cls, path: str | Path, spec: str | SelectionSpec = "map", *, device: str | torch.device | None = None,
             batch_size: int = 16, name: str | None = None, prompt_key: str | None = None,
             ref_key: str = "ref_reward") -> RewardFunction:
        """Load a saved model (with its Laplace posterior for la:) or ensemble dir for `spec`, see `Scorer.load`."""
        return cls(Scorer.load(path, spec, device=device, batch_size=batch_size), name, prompt_key, ref_key)

    @property
    def spec(self) -> SelectionSpec:
        return self.scorer.spec

    def texts(self, prompts: Sequence[str | Sequence[Message]], completions: Sequence[str | Sequence[Message]],
              **kwargs: Any) -> tuple[list[str], list[str]]:
        """(prompt, response) strings for the reward model from TRL's standard or conversational batch."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        if self.prompt_key is not None:
            if self.prompt_key not in kwargs:
                raise KeyError(f"prompt_key '{self.prompt_key}' is not a dataset column; got {sorted(kwargs)}")
            prompts = kwargs[self.prompt_key]
        p = [x if isinstance(x, str) else conversation_prompt(x) for x in prompts]
        return p, [completion_text(c) for c in completions]

    def scores(self, prompts: Sequence[str | Sequence[Message]], completions: Sequence[str | Sequence[Message]],
               **kwargs: Any) -> Scores:
        """Mean reward, σ and selection reward per completion (see `Scorer.score`)."""
        p, c = self.texts(prompts, completions, **kwargs)
        ref = None
        if self.spec.needs_reference:
            if self.ref_key not in kwargs:
                raise KeyError(f"spec '{self.spec}' needs a per-prompt reference reward in dataset column "
                               f"'{self.ref_key}'")
            ref = torch.as_tensor([float(r) for r in kwargs[self.ref_key]], dtype=torch.float64)
        return self.scorer.score(p, c, ref)

    def __call__(self, prompts: Sequence[str | Sequence[Message]], completions: Sequence[str | Sequence[Message]],
                 **kwargs: Any) -> list[float | None]:
        """One selection reward per completion (TRL's `RewardFunc` signature; never None here)."""
        s = self.scores(prompts, completions, **kwargs)
        log_metric: Callable[[str, float], None] | None = kwargs.get("log_metric")
        log_extra: Callable[[str, list[Any]], None] | None = kwargs.get("log_extra")
        if log_metric is not None and len(s.reward):
            log_metric(f"{self.__name__}/reward", float(s.reward.mean()))
            if s.std is not None:
                log_metric(f"{self.__name__}/sigma", float(s.std.mean()))
        if log_extra is not None and s.std is not None:
            log_extra(f"{self.__name__}_sigma", s.std.tolist())
        return [float(x) for x in s.selection.tolist()]

    def __repr__(self) -> str:
        return f"RewardFunction({self.__name__!r}, spec='{self.spec}')"
