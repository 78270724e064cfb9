"""Prompt templates and tokenisation with truncation that keeps a prompt budget and the response part pooling reads."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any


class Template(str, Enum):
    """How a (prompt, response) is rendered to text before tokenisation."""

    OASST = "oasst"  # <|prompter|>…<|endoftext|><|assistant|>…<|endoftext|> (Köpf et al.; Yang et al. App. C)
    CHAT = "chat"  # the tokenizer's own chat template (user / assistant turns)
    PLAIN = "plain"  # prompt, blank line, response


def render(template: Template | str, prompt: str, response: str, tokenizer: Any = None) -> tuple[str, str]:
    """Return (prefix, response_text): the text before the response and the response part itself."""
    t = Template(template)
    if t is Template.OASST:
        return f"<|prompter|>{prompt}<|endoftext|><|assistant|>", f"{response}<|endoftext|>"
    if t is Template.PLAIN:
        return f"{prompt}\n\n", response
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat' needs a tokenizer with a chat_template; use 'oasst' or 'plain'")
    user = [{"role": "user", "content": prompt}]
    prefix = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prefix):  # templates that rewrite earlier turns: fall back to plain concatenation
        return prefix, response
    return prefix, full[len(prefix):]


def special_wrap(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Special token ids the tokenizer puts before and after a text (e.g. [CLS] … [SEP], or BOS)."""
    probe = "hello"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return list(full[:k]), list(full[k + len(bare):])
    return [], []


def _strip_wrap(pre: list[int], res: list[int], head: list[int], tail: list[int]) -> tuple[list[int], list[int]]:
    """Drop special tokens a chat template already wrote into the text, so they are added exactly once."""
    if head and pre[: len(head)] == head:
        pre = pre[len(head):]
    if tail and len(res) >= len(tail) and res[len(res) - len(tail):] == tail:
        res = res[: len(res) - len(tail)]
    return pre, res


class ResponseKeep(str, Enum):
    """Which end of an over-long response truncation keeps."""

    AUTO = "auto"  # END when the reward is read at the last token (decoders), else START (encoders)
    END = "end"  # drop the response's start: a decoder's reward token (the last one) must survive
    START = "start"  # drop the response's end: an encoder reads every token, and the opening answers the prompt


def truncate(pre: list[int], res: list[int], budget: int, prompt_budget: int = 0, keep_end: bool = True
             ) -> list[int]:
    """At most `budget` ids: the prompt's last max(prompt_budget, budget − |res|) ids, then the response cut to fit.

    The prompt is cut from its start (its end holds the instruction and the assistant marker); the response
    from its start when `keep_end`, else from its end. `prompt_budget=0` gives the response priority.
    """
    n_pre = min(len(pre), max(min(prompt_budget, budget - 1), budget - len(res)))
    n_res = min(len(res), budget - n_pre)
    return pre[len(pre) - n_pre:] + (res[len(res) - n_res:] if keep_end else res[:n_res])


def encode(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    template: Template | str = Template.OASST,
    max_length: int = 500,
    prompt_budget: float = 0.0,
    keep_end: bool = True,
) -> list[list[int]]:
    """Token ids of each (prompt, response), at most `max_length` long, with the tokenizer's special tokens.

    When a pair is too long, up to `prompt_budget` × the text budget goes to the end of the prompt (more if the
    response is short) and the response keeps its end (`keep_end`, decoders) or its start (encoders): see
    `truncate`. The same function serves training, Laplace fitting and scoring.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not 0.0 <= prompt_budget < 1.0:
        raise ValueError(f"prompt_budget must be in [0, 1), got {prompt_budget}")
    if not prompts:
        return []
    t = Template(template)
    head, tail = special_wrap(tokenizer)
    budget = max_length - len(head) - len(tail)
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for text")
    n_prompt = int(prompt_budget * budget)
    parts = [render(t, p, r, tokenizer) for p, r in zip(prompts, responses, strict=True)]
    pre_ids = tokenizer([a for a, _ in parts], add_special_tokens=False, verbose=False)["input_ids"]
    res_ids = tokenizer([b for _, b in parts], add_special_tokens=False, verbose=False)["input_ids"]
    out = []
    for pre, res in zip(pre_ids, res_ids, strict=True):
        if t is Template.CHAT:
            pre, res = _strip_wrap(list(pre), list(res), head, tail)
        out.append(head + truncate(list(pre), list(res), budget, n_prompt, keep_end) + tail)
    return out
