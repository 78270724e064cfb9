"""Export a bayesrm reward model to plain `transformers` (merged `AutoModelForSequenceClassification`) and to a
peft adapter over that class, each with a record of how inputs must be rendered.

The reward is r = w·h + b with h the hidden state at the reward token (last real token for decoders, [CLS] /
<s> for encoders). Decoders' `*ForSequenceClassification` read `score(h)` at the rightmost non-pad token, which
is exactly that (bias-free `score`, so b must be 0). Encoders' heads put a tanh layer in front (BERT's pooler,
RoBERTa/MPNet's `classifier.dense`); the export sets that layer to s·I with s = 2⁻¹⁶ and the output layer to w/s,
so the logit is w·tanh(s h)/s + b = w·h + b up to a relative (s h)²/3 < 10⁻⁸ (s is a power of two: the scalings
are exact in floating point). Every export is checked by reloading it through plain transformers (and peft) and
comparing rewards with the bayesrm model; a mismatch fails loudly.

Plain transformers does not apply bayesrm's prompt template or its truncation (a budget for the end of the prompt,
then the end or the start of the response, see `templates.truncate`). The export records both in `config.json`
(`bayesrm_input_format`), and README.md carries a ten-line function that rebuilds the exact input ids with the
tokenizer alone; the export checks that it does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bayesrm.config import Pooling
from bayesrm.io import atomic_dir
from bayesrm.model import RewardModel, resolve_backbone
from bayesrm.templates import Template, render, special_wrap, truncate

INPUT_FORMAT_KEY = "bayesrm_input_format"  # config.json field read back by RewardModel.load
FORMAT_FILE = "bayesrm_input_format.json"  # the same record beside README.md in both folders
ADAPTER_DIR = "adapter"
TANH_SCALE = 2.0**-16
TOLERANCE = {"float32": 1e-4, "float64": 1e-8}  # largest |Δr| / max(1, |r|) the round-trip check accepts
HALF_TOLERANCE = 3e-2  # bfloat16 / float16: merging LoRA into half-precision weights rounds them
_BERT_POOLER = {"bert"}  # pooler.dense + tanh, then classifier
_DENSE_HEAD = {"roberta", "xlm-roberta", "camembert", "mpnet"}  # classifier.dense + tanh, then classifier.out_proj
_PROBES = [("What is 2 + 2?", "4."), ("Write a haiku about rain.", "Soft rain on the roof,\nthe gutters hum."),
           ("Explain gravity. " * 30, "Mass bends spacetime and things fall along the curves. " * 40)]


def input_format(model: RewardModel) -> dict[str, Any]:
    """How plain transformers must turn (prompt, response) into input ids for the exported model (see README)."""
    t = Template(model.config.template)
    head, tail = special_wrap(model.tokenizer)
    budget = model.config.max_length - len(head) - len(tail)
    prefix, response = render(t, "{prompt}", "{response}") if t is not Template.CHAT else (None, None)
    return {
        "template": t.value,
        "prefix": prefix,  # text before the response; "{prompt}" stands for the prompt (None: chat template)
        "response": response,  # "{response}" stands for the response
        "special_head": head,  # ids the tokenizer puts before the text ([CLS], BOS)
        "special_tail": tail,  # and after it ([SEP])
        "max_length": model.config.max_length,
        "prompt_budget": model.config.prompt_budget,  # share of the text budget kept for the prompt's end
        "prompt_tokens": int(model.config.prompt_budget * budget),  # that share in tokens (as templates.encode)
        "keep_response_end": model.keeps_response_end,  # an over-long response keeps its end (else its start)
        "response_keep": "end" if model.keeps_response_end else "start",
        "reward": "logits[:, 0]",
    }


def recipe_ids(tokenizer: Any, fmt: dict[str, Any], prompt: str, response: str) -> list[int]:
    """Input ids from the recorded format with the tokenizer alone (what README.md shows), via `truncate`."""
    if fmt["prefix"] is None:
        raise ValueError("a chat-template model's inputs need bayesrm.templates.encode (the split of the chat "
                         "template's text into prompt and response has no format string)")
    pre = tokenizer(fmt["prefix"].replace("{prompt}", prompt), add_special_tokens=False, verbose=False)["input_ids"]
    res = tokenizer(fmt["response"].replace("{response}", response), add_special_tokens=False,
                    verbose=False)["input_ids"]
    budget = fmt["max_length"] - len(fmt["special_head"]) - len(fmt["special_tail"])
    body = truncate(list(pre), list(res), budget, fmt["prompt_tokens"], fmt["keep_response_end"])
    return [*fmt["special_head"], *body, *fmt["special_tail"]]


def _head_weights(model: RewardModel, model_type: str, prefix: str) -> dict[str, torch.Tensor]:
    """State-dict entries of the sequence-classification head that reproduce r = w·h + b (see module doc)."""
    head = model.head
    if not isinstance(head, nn.Linear):
        raise ValueError("only a linear BT head can be exported (a BNRM head has no transformers equivalent)")
    w, b = head.weight.detach().float().cpu(), head.bias.detach().float().cpu()  # (1, d), (1,)
    d = w.shape[1]
    if model.pooling is Pooling.LAST and not model.encoder:
        if float(b.abs().max()) > 0:
            raise ValueError(f"the head bias is {float(b[0]):.4g}; transformers' decoder `score` has no bias")
        return {"score.weight": w}
    if model.pooling is Pooling.FIRST and model_type in _BERT_POOLER:
        return {f"{prefix}.pooler.dense.weight": TANH_SCALE * torch.eye(d), f"{prefix}.pooler.dense.bias":
                torch.zeros(d), "classifier.weight": w / TANH_SCALE, "classifier.bias": b}
    if model.pooling is Pooling.FIRST and model_type in _DENSE_HEAD:
        return {"classifier.dense.weight": TANH_SCALE * torch.eye(d), "classifier.dense.bias": torch.zeros(d),
                "classifier.out_proj.weight": w / TANH_SCALE, "classifier.out_proj.bias": b}
    raise ValueError(f"cannot export a '{model_type}' model with {model.pooling.value} pooling to "
                     f"AutoModelForSequenceClassification (supported: decoders with last-token pooling, "
                     f"{', '.join(sorted(_BERT_POOLER | _DENSE_HEAD))} with first-token pooling)")


def _feature_layer(prefix: str, heads: dict[str, torch.Tensor]) -> str | None:
    """The s·I layer in front of tanh (whose input is bayesrm's feature), or None for decoders' direct `score`."""
    for name in (f"{prefix}.pooler.dense", "classifier.dense"):
        if f"{name}.weight" in heads:
            return name
    return None


def _seq_cls_config(model: RewardModel, pad_id: int, fmt: dict[str, Any]) -> Any:
    """The backbone's config as a one-output sequence classifier, dropout off, with the input format recorded."""
    cfg = model.backbone.get_base_model().config.__class__.from_dict(
        model.backbone.get_base_model().config.to_dict())
    cfg.num_labels = 1
    cfg.pad_token_id = pad_id
    cfg.architectures = None
    for name, value in list(vars(cfg).items()):
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(cfg, name, 0.0)
    setattr(cfg, INPUT_FORMAT_KEY, fmt)
    return cfg


def _pad_id(model: RewardModel) -> int:
    """A pad id that never ends a real input (transformers finds a decoder's last token as the last non-pad)."""
    tok = model.tokenizer
    pad = int(tok.pad_token_id)
    if model.encoder:
        return pad
    last = {ids[-1] for ids in model.encode([p for p, _ in _PROBES], [r for _, r in _PROBES])}
    if pad not in last:
        return pad
    for cand in (tok.unk_token_id, tok.bos_token_id):
        if cand is not None and int(cand) not in last:
            return int(cand)
    raise ValueError(f"the pad token {pad} ends every input under template '{model.config.template}' and the "
                     "tokenizer has no other spare special token; use another template")


def _check(reference: torch.Tensor, got: torch.Tensor, dtype: str, what: str) -> float:
    """Max |Δr| between the bayesrm rewards and the reloaded export's; ValueError beyond the dtype's tolerance."""
    err = float((reference.double() - got.double()).abs().max())
    tol = TOLERANCE.get(dtype, HALF_TOLERANCE) * max(1.0, float(reference.abs().max()))
    if not err <= tol:
        raise ValueError(f"{what}: rewards differ from the bayesrm model by up to {err:.3g} (> {tol:.3g}); "
                         "export aborted")
    return err


@torch.no_grad()
def hf_rewards(hf_model: Any, ids: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Rewards `logits[:, 0]` of a plain transformers sequence classifier on right-padded input ids."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[*x, *[pad_id] * (width - len(x))] for x in ids])  # (B, T)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])  # (B, T)
    return hf_model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float()


def export_model(run: str | Path, out: str | Path) -> dict[str, Any]:
    """Write OUT (merged AutoModelForSequenceClassification + tokenizer + README) and OUT/adapter (peft, head in
    modules_to_save); both are reloaded with plain transformers/peft and checked against the bayesrm rewards."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = RewardModel.load(run)
    if model.config.seq_cls:
        raise ValueError(f"{run} already is a transformers sequence-classification model")
    prompts, responses = [p for p, _ in _PROBES], [r for _, r in _PROBES]
    reference = model.score(prompts, responses)  # (3,)
    fmt = input_format(model)
    ids = model.encode(prompts, responses)
    if fmt["prefix"] is not None:
        recipe = [recipe_ids(model.tokenizer, fmt, p, r) for p, r in zip(prompts, responses, strict=True)]
        if recipe != ids:
            raise ValueError("the recorded input format does not rebuild bayesrm's input ids for this tokenizer "
                             "(text that tokenises differently whole and in parts); export aborted")
    pad = _pad_id(model)
    base = model.backbone.get_base_model()
    model_type = str(base.config.model_type)
    lora = {k: p.detach().clone() for k, p in model.backbone.named_parameters() if "lora_" in k}
    cfg = _seq_cls_config(model, pad, fmt)
    dtype = getattr(torch, model.config.dtype)
    with atomic_dir(out) as tmp:
        tok = model.tokenizer
        tok.pad_token = tok.convert_ids_to_tokens(pad)
        # (a) merged: the backbone with LoRA folded in, plus the head
        merged = model.backbone.merge_and_unload()
        seq = AutoModelForSequenceClassification.from_config(cfg, dtype=dtype)
        prefix = seq.base_model_prefix
        res = seq.base_model.load_state_dict(merged.state_dict(), strict=False)
        missing = [k for k in res.missing_keys if not k.startswith("pooler.")]
        if missing or res.unexpected_keys:
            raise ValueError(f"backbone weights do not fit {type(seq).__name__}: missing {missing[:3]}, "
                             f"unexpected {list(res.unexpected_keys)[:3]}")
        heads = _head_weights(model, model_type, prefix)
        layer = _feature_layer(prefix, heads)
        # where bayesrm's feature and head sit (RewardModel.load reads them back, so a head-only posterior of the
        # export is the original's rather than one over the rescaled w/s); fmt is also the config's record
        fmt.update(feature_layer=layer, feature_scale=TANH_SCALE if layer else 1.0)
        setattr(seq.config, INPUT_FORMAT_KEY, fmt)
        seq.load_state_dict(heads, strict=False)
        seq.eval()
        seq.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(_readme(fmt, pad, model.config.backbone), encoding="utf-8")
        (tmp / FORMAT_FILE).write_text(json.dumps(fmt, indent=2) + "\n")
        hf = AutoModelForSequenceClassification.from_pretrained(str(tmp)).eval()
        err_merged = _check(reference, hf_rewards(hf, ids, pad), model.config.dtype, f"{out} (merged)")
        # (b) peft: LoRA over the original backbone as a sequence classifier, the head in modules_to_save
        src = resolve_backbone(model.config.backbone)
        kw: dict[str, Any] = {"gguf_file": model.config.gguf_file} if model.config.gguf_file else {}
        base_cls = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1, pad_token_id=pad,
                                                                       dtype=dtype, **kw)
        base_cls.load_state_dict(heads, strict=False)
        save = sorted({k.split(".")[0] if not k.startswith(f"{prefix}.") else k.split(".")[1] for k in heads})
        lcfg = LoraConfig(r=model.config.lora_r, lora_alpha=model.config.lora_alpha, bias="none",
                          target_modules=list(model.config.target_modules or []), modules_to_save=save)
        peft_model = get_peft_model(base_cls, lcfg)
        lead = "base_model.model."
        targets = dict(peft_model.named_parameters())
        with torch.no_grad():
            for k, v in lora.items():  # same LoRA tensors, under the classifier's base-model prefix
                name = f"{lead}{prefix}.{k[len(lead):]}"
                if name not in targets:
                    raise ValueError(f"LoRA tensor {k} has no place in {type(base_cls).__name__}")
                targets[name].copy_(v)
        adir = tmp / ADAPTER_DIR
        peft_model.save_pretrained(str(adir))
        tok.save_pretrained(str(adir))
        (adir / "README.md").write_text(_readme(fmt, pad, _hub_name(model.config.backbone), adapter=True),
                                        encoding="utf-8")
        (adir / FORMAT_FILE).write_text(json.dumps(fmt, indent=2) + "\n")
        fresh = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1, pad_token_id=pad, dtype=dtype,
                                                                   **kw)
        loaded = PeftModel.from_pretrained(fresh, str(adir)).eval()
        err_adapter = _check(reference, hf_rewards(loaded, ids, pad), model.config.dtype, f"{out} (adapter)")
        info = {"merged_max_abs_error": err_merged, "adapter_max_abs_error": err_adapter, "pad_token_id": pad,
                "input_format": fmt, "modules_to_save": save}
        (tmp / "bayesrm_export.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _hub_name(backbone: str) -> str:
    """The backbone as a user elsewhere would name it (the embedded MiniLM by its hub id)."""
    return "sentence-transformers/all-MiniLM-L6-v2" if resolve_backbone(backbone) != backbone else backbone


def _readme(fmt: dict[str, Any], pad: int, backbone: str, adapter: bool = False) -> str:
    """Usage notes: how to load, how to build input ids exactly as bayesrm does, what the logit means."""
    load = (f"BASE = {backbone!r}  # the backbone the adapter was trained on\n"
            f"base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1, pad_token_id={pad})\n"
            "model = PeftModel.from_pretrained(base, THIS_DIR).eval()" if adapter else
            "model = AutoModelForSequenceClassification.from_pretrained(THIS_DIR).eval()")
    kind = ("A peft LoRA adapter; the classification head is saved in full (`modules_to_save`)." if adapter else
            "LoRA merged into the weights.")
    if fmt["prefix"] is None:
        recipe = ("# chat template: build ids with bayesrm.templates.encode (pip install bayesrm), e.g.\n"
                  "# RewardModel.load(THIS_DIR).encode([prompt], [response])[0]\nids = ...\n")
    else:
        recipe = f"""FMT = json.loads(Path(THIS_DIR, "{FORMAT_FILE}").read_text())


def input_ids(prompt: str, response: str) -> list[int]:
    kw = dict(add_special_tokens=False, verbose=False)  # full length first: bayesrm truncates below
    pre = tok(FMT["prefix"].replace("{{prompt}}", prompt), **kw)["input_ids"]
    res = tok(FMT["response"].replace("{{response}}", response), **kw)["input_ids"]
    budget = FMT["max_length"] - len(FMT["special_head"]) - len(FMT["special_tail"])
    n_pre = min(len(pre), max(min(FMT["prompt_tokens"], budget - 1), budget - len(res)))
    n_res = min(len(res), budget - n_pre)
    res = res[len(res) - n_res:] if FMT["keep_response_end"] else res[:n_res]
    return FMT["special_head"] + pre[len(pre) - n_pre:] + res + FMT["special_tail"]


ids = input_ids(prompt, response)
"""
    return f"""# Reward model exported by bayesrm

A Bradley–Terry reward model: `logits[:, 0]` is the reward r(x, y); P(y_w ≻ y_l) = σ(r_w − r_l). {kind}

Inputs must be built as bayesrm built them in training: template `{fmt['template']}`, at most {fmt['max_length']}
tokens, up to {fmt['prompt_tokens']} of them for the end of the prompt when a pair is too long, and the
{'end' if fmt['keep_response_end'] else 'start'} of an over-long response kept. `tok(text, truncation=True)` would
cut elsewhere, so build the ids like this (`{FORMAT_FILE}` holds the constants):

```python
import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
{"from peft import PeftModel" if adapter else ""}
tok = AutoTokenizer.from_pretrained(THIS_DIR)
{load}
{recipe}with torch.no_grad():  # a batch: pad on the right with {pad} and pass attention_mask
    reward = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
```

`bayesrm score THIS_DIR …` and `bayesrm laplace THIS_DIR pairs.jsonl` (head-only posterior) load this folder too.
"""
