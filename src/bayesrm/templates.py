"""Prompt templates and tokenisation with truncation that always keeps the end of the response."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any

import torch


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


def truncate(pre: list[int], res: list[int], budget: int) -> list[int]:
    """Keep at most `budget` ids of prefix + response: cut the prefix from the left, then the response's start."""
    if len(res) >= budget:
        return res[len(res) - budget:]
    keep = budget - len(res)
    return pre[max(len(pre) - keep, 0):] + res


def encode(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    template: Template | str = Template.OASST,
    max_length: int = 500,
) -> list[list[int]]:
    """Token ids of each (prompt, response), at most `max_length` long, with the tokenizer's special tokens.

    Truncation drops the start of the prompt first, then the start of the response, so the end of the
    response (where a decoder reads the reward) is always kept.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return []
    t = Template(template)
    head, tail = special_wrap(tokenizer)
    budget = max_length - len(head) - len(tail)
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for text")
    parts = [render(t, p, r, tokenizer) for p, r in zip(prompts, responses, strict=True)]
    pre_ids = tokenizer([a for a, _ in parts], add_special_tokens=False, verbose=False)["input_ids"]
    res_ids = tokenizer([b for _, b in parts], add_special_tokens=False, verbose=False)["input_ids"]
    out = []
    for pre, res in zip(pre_ids, res_ids, strict=True):
        if t is Template.CHAT:
            pre, res = _strip_wrap(list(pre), list(res), head, tail)
        out.append(head + truncate(list(pre), list(res), budget) + tail)
    return out


def collate(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (input_ids, attention_mask), both (B, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), to avoid padding waste."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
