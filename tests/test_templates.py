"""Rendering (OASST, chat template, plain), truncation that keeps the response's end, padding and batching."""

from __future__ import annotations

import random
from typing import Any

import pytest

from bayesrm.model import resolve_backbone
from bayesrm.templates import Template, encode, render, special_wrap, truncate

SIMPLE_CHAT = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </{{ m['role'] }}> {% endfor %}"
               "{% if add_generation_prompt %}<assistant> {% endif %}")
WRAPPED_CHAT = "[CLS] " + SIMPLE_CHAT + "{% if not add_generation_prompt %}[SEP]{% endif %}"  # writes its own specials


@pytest.fixture
def tok() -> Any:
    """A fresh copy of the embedded MiniLM WordPiece tokenizer ([CLS] … [SEP], no chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_backbone("all-MiniLM-L6-v2"))


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_oasst_and_plain_render_exact_text() -> None:
    assert render("oasst", "Hi there", "Yo") == ("<|prompter|>Hi there<|endoftext|><|assistant|>", "Yo<|endoftext|>")
    assert render(Template.PLAIN, "Hi there", "Yo") == ("Hi there\n\n", "Yo")
    with pytest.raises(ValueError, match="'nope' is not a valid Template"):
        render("nope", "a", "b")


def test_encode_oasst_is_the_tokenised_text_with_specials(tok: Any) -> None:
    ids = encode(tok, ["Hi there"], ["Yo, how are you?"], template="oasst", max_length=64)[0]
    full = "<|prompter|>Hi there<|endoftext|><|assistant|>Yo, how are you?<|endoftext|>"
    assert ids == tok(full)["input_ids"]  # [CLS] … [SEP], same tokens as the whole string
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    plain = encode(tok, ["Hi there"], ["Yo"], template="plain", max_length=64)[0]
    assert plain == tok("Hi there\n\nYo")["input_ids"]


def test_special_wrap_of_wordpiece(tok: Any) -> None:
    assert special_wrap(tok) == ([tok.cls_token_id], [tok.sep_token_id])


def test_chat_template_renders_turns(tok: Any) -> None:
    tok.chat_template = SIMPLE_CHAT
    pre, res = render("chat", "Hi", "Yo", tok)
    assert (pre, res) == ("<user> Hi </user> <assistant> ", "Yo </assistant> ")
    ids = encode(tok, ["Hi"], ["Yo"], template="chat", max_length=64)[0]
    assert ids == tok(pre + res)["input_ids"]  # specials added once around the template text


def test_chat_template_that_writes_specials_gets_them_once(tok: Any) -> None:
    tok.chat_template = WRAPPED_CHAT
    pre, res = render("chat", "Hi", "Yo", tok)
    assert pre.startswith("[CLS]") and res.endswith("[SEP]")
    ids = encode(tok, ["Hi"], ["Yo"], template="chat", max_length=64)[0]
    assert ids.count(tok.cls_token_id) == 1 and ids.count(tok.sep_token_id) == 1
    assert ids == _ids(tok, pre + res)
    # truncated from the left, [CLS] is still first
    short = encode(tok, ["many words in this prompt " * 5], ["Yo"], template="chat", max_length=10)[0]
    assert len(short) == 10 and short[0] == tok.cls_token_id and short[-1] == tok.sep_token_id


def test_chat_template_missing_is_an_error(tok: Any) -> None:
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template; use 'oasst' or 'plain'"):
        encode(tok, ["Hi"], ["Yo"], template="chat")
    with pytest.raises(ValueError, match="chat_template"):
        render("chat", "Hi", "Yo", None)


def test_long_response_keeps_its_end(tok: Any) -> None:
    response = " ".join(f"word{i}" for i in range(200)) + " the very end."
    ids = encode(tok, ["a prompt that will be dropped"], [response], template="oasst", max_length=32)[0]
    res_ids = _ids(tok, response + "<|endoftext|>")
    assert len(ids) == 32
    assert ids == [tok.cls_token_id, *res_ids[-30:], tok.sep_token_id]  # response end + tail special
    assert tok.decode(ids[1:-1]).replace(" ", "").endswith("theveryend.<|endoftext|>")


def test_prompt_is_truncated_from_the_left_first(tok: Any) -> None:
    prompt = " ".join(f"p{i}" for i in range(100))
    ids = encode(tok, [prompt], ["short answer"], template="plain", max_length=24)[0]
    pre_ids, res_ids = _ids(tok, prompt + "\n\n"), _ids(tok, "short answer")
    assert len(ids) == 24
    assert ids == [tok.cls_token_id, *pre_ids[-(22 - len(res_ids)):], *res_ids, tok.sep_token_id]
    assert "p99" in tok.decode(ids) and "p0 " not in tok.decode(ids)  # the prompt's end survives


@pytest.mark.parametrize("template", ["oasst", "plain"])
def test_never_exceeds_max_length_and_always_ends_with_response(tok: Any, template: str) -> None:
    rng = random.Random(0)
    for _ in range(30):
        prompt = " ".join(rng.choice(["cat", "dog", "a", "xylophone"]) for _ in range(rng.randint(0, 60)))
        response = " ".join(rng.choice(["yes", "no", "maybe", "zebra"]) for _ in range(rng.randint(1, 60)))
        max_length = rng.randint(3, 80)
        ids = encode(tok, [prompt], [response], template=template, max_length=max_length)[0]
        res_ids = _ids(tok, render(template, prompt, response)[1])
        k = min(len(res_ids), max_length - 2)
        assert len(ids) <= max_length
        assert ids[-1 - k:-1] == res_ids[-k:] and ids[-1] == tok.sep_token_id


def test_max_length_without_room_and_length_mismatch(tok: Any) -> None:
    with pytest.raises(ValueError, match="max_length=2 leaves no room"):
        encode(tok, ["a"], ["b"], max_length=2)
    with pytest.raises(ValueError, match="1 prompts but 2 responses"):
        encode(tok, ["a"], ["b", "c"])
    assert encode(tok, [], []) == []


def test_truncate_is_pure() -> None:
    assert truncate([1, 2, 3], [7, 8], 10) == [1, 2, 3, 7, 8]
    assert truncate([1, 2, 3], [7, 8], 4) == [2, 3, 7, 8]
    assert truncate([1, 2, 3], [7, 8, 9], 3) == [7, 8, 9]
    assert truncate([1, 2, 3], [6, 7, 8, 9], 2) == [8, 9]


def test_truncate_keeps_a_prompt_budget_brute_force() -> None:
    """Every length combination: never over budget, the prompt keeps its end (≥ its budget or all of it), the
    response keeps the chosen end, and no room is left unused while either part was cut."""
    for n_pre in range(0, 9):
        for n_res in range(0, 12):
            pre, res = list(range(100, 100 + n_pre)), list(range(200, 200 + n_res))
            for budget in range(1, 16):
                for pb in range(0, budget + 2):
                    for keep_end in (True, False):
                        out = truncate(pre, res, budget, pb, keep_end)
                        p, r = [t for t in out if t < 200], [t for t in out if t >= 200]
                        assert len(out) <= budget and out == p + r
                        assert p == pre[len(pre) - len(p):]  # a suffix of the prompt
                        assert r == (res[len(res) - len(r):] if keep_end else res[:len(r)])
                        assert len(p) >= min(n_pre, pb, budget - 1) or len(p) == n_pre
                        if len(out) < budget:
                            assert (len(p), len(r)) == (n_pre, n_res)
                        if n_res and budget > 1:
                            assert r, "the response is never cut away entirely"


def test_long_pairs_keep_prompt_and_response(tok: Any) -> None:
    """Before the prompt budget, a response longer than max_length left no prompt token (issue 18)."""
    prompt = "please explain the rules of chess to a beginner"
    response = " ".join(["word"] * 200)
    old = encode(tok, [prompt], [response], template="plain", max_length=64)[0]
    new = encode(tok, [prompt], [response], template="plain", max_length=64, prompt_budget=0.25)[0]
    prompt_ids = set(tok(prompt, add_special_tokens=False)["input_ids"])
    assert not prompt_ids & set(old)
    assert len(new) == 64 and "beginner" in tok.decode(new) and len(prompt_ids & set(new)) >= 5
    start = encode(tok, [prompt], [response + " finale"], template="plain", max_length=64, prompt_budget=0.25,
                   keep_end=False)[0]
    assert "finale" not in tok.decode(start) and "finale" in tok.decode(
        encode(tok, [prompt], [response + " finale"], template="plain", max_length=64, prompt_budget=0.25)[0])


def test_model_config_records_truncation_and_old_models_keep_theirs(tiny_cfg: Any) -> None:
    from bayesrm.model import RMConfig

    cfg = tiny_cfg("bert")
    assert (cfg.prompt_budget, cfg.response_keep) == (0.25, "auto")
    d = cfg.to_dict()
    assert d["prompt_budget"] == 0.25 and RMConfig.from_dict(d).prompt_budget == 0.25
    legacy = {k: v for k, v in d.items() if k not in ("prompt_budget", "response_keep")}
    old = RMConfig.from_dict(legacy)
    assert (old.prompt_budget, old.response_keep) == (0.0, "end")
    with pytest.raises(ValueError, match="response_keep"):
        RMConfig(response_keep="middle")
