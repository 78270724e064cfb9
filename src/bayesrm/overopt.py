"""Overoptimisation where it happens (issue 14): one policy's i.i.d. pool, a synthetic gold RM, every method.

The regime of Gao et al. 2022 / Coste et al. 2024 at CPU size. Stages, each resumable and skipped when done:
  split    — the 805 AlpacaEval instructions, prompt-disjoint: gold-training / proxy-training / validation / evaluation;
  generate — SmolLM2-135M-Instruct samples (temperature 1, top-p 1): `n_proxy` per proxy-training and validation
             prompt, then `n_eval` per evaluation prompt, as zstd parquet shards in `pool_dir` (committed);
  (gold, label, proxy, laplace, score, bon: see docs/overoptimisation.md for what exists.)
"""

from __future__ import annotations

import gzip
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bayesrm.data import DataError
from bayesrm.io import atomic_write_json
from bayesrm.sample import SMOLLM2, Backend, SampleConfig, ShardFormat, sample_pool

PARTS = ("gold_train", "proxy_train", "val", "eval")


@dataclass
class GenerationConfig:
    """How π_ref is sampled (i.i.d. samples of one policy: temperature 1, top-p 1)."""

    policy: str = SMOLLM2
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    backend: str = Backend.CTRANSLATE2.value
    threads: int = 1
    max_batch: int = 128  # sequences per engine call
    n_proxy: int = 8  # samples per proxy-training and validation prompt (pairs for the proxy, τ and calibration)
    n_eval: int = 1024  # samples per evaluation prompt (best-of-n up to n_eval/4: KL_BoN 4.55 nats)
    proxy_batch_prompts: int = 16
    proxy_shard_prompts: int = 50
    eval_shard_prompts: int = 1  # one evaluation prompt (n_eval samples) per shard

    def __post_init__(self) -> None:
        Backend(self.backend)


@dataclass
class OveroptConfig:
    """The whole experiment; `bayesrm overopt CONFIG` reads it from TOML."""

    data_dir: str = "../shared/data"
    pool_dir: str = "data/smollm_pool"  # split, manifest and pool shards (committed, compact)
    work_dir: str = "runs/overopt"  # models and caches that are not committed
    seed: int = 0
    eval_prompts: int = 64  # ≥ 40; generated in order, so the first k shards are a usable pool
    val_prompts: int = 40
    proxy_prompts: int = 300
    max_prompt_chars: int = 400  # evaluation / proxy / validation prompts only (sampling cost); gold: all the rest
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self) -> None:
        if self.eval_prompts < 1 or self.val_prompts < 0 or self.proxy_prompts < 1:
            raise ValueError("eval_prompts and proxy_prompts must be ≥ 1, val_prompts ≥ 0")


def load_config(path: str | Path) -> OveroptConfig:
    """Read an OveroptConfig from TOML/JSON (unknown fields named with their section)."""
    import tomllib

    from bayesrm.experiment import _fill

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: config file not found")
    try:
        data = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except ValueError as e:
        raise ValueError(f"{p}: cannot parse config: {e}") from None
    cfg: OveroptConfig = _fill(OveroptConfig, data, str(p))
    return cfg


def alpaca_instructions(data_dir: str | Path) -> list[str]:
    """The unique AlpacaEval instructions, in file order."""
    path = Path(data_dir) / "alpaca_eval" / "annotations.jsonl.gz"
    if not path.exists():
        raise DataError("AlpacaEval annotations not found (set data_dir to shared/data)", file=str(path))
    seen: dict[str, None] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line).get("instruction")
            if isinstance(text, str):
                seen.setdefault(text, None)
    return list(seen)


def split_instructions(instructions: list[str], cfg: OveroptConfig) -> dict[str, list[str]]:
    """Seeded prompt-disjoint parts; evaluation, validation and proxy-training prompts are ≤ max_prompt_chars."""
    order = sorted(set(instructions))
    random.Random(cfg.seed).shuffle(order)
    short = [p for p in order if len(p) <= cfg.max_prompt_chars]
    need = cfg.eval_prompts + cfg.val_prompts + cfg.proxy_prompts
    if len(short) < need:
        raise ValueError(f"only {len(short)} instructions have ≤ {cfg.max_prompt_chars} characters; {need} needed")
    ev = short[:cfg.eval_prompts]
    va = short[cfg.eval_prompts:cfg.eval_prompts + cfg.val_prompts]
    pr = short[cfg.eval_prompts + cfg.val_prompts:need]
    taken = set(short[:need])
    return {"gold_train": [p for p in order if p not in taken], "proxy_train": pr, "val": va, "eval": ev}


def sample_config(cfg: OveroptConfig, part: str) -> SampleConfig:
    """The sampler for one part (seeds differ per part, so parts never share draws)."""
    g = cfg.generation
    is_eval = part == "eval"
    return SampleConfig(model=g.policy, n=g.n_eval if is_eval else g.n_proxy, max_new_tokens=g.max_new_tokens,
                        temperature=g.temperature, top_p=g.top_p, template="chat",
                        batch_prompts=1 if is_eval else g.proxy_batch_prompts, max_batch=g.max_batch,
                        shard_size=g.eval_shard_prompts if is_eval else g.proxy_shard_prompts,
                        seed=cfg.seed * 1_000_003 + PARTS.index(part) * 10_000_019, backend=g.backend,
                        threads=g.threads, fmt=ShardFormat.PARQUET.value)


def _check_manifest(cfg: OveroptConfig, pool: Path, splits: dict[str, list[str]]) -> None:
    manifest = {"generation": asdict(cfg.generation), "seed": cfg.seed, "max_prompt_chars": cfg.max_prompt_chars,
                "parts": {k: len(v) for k, v in splits.items()},
                "sample_configs": {p: asdict(sample_config(cfg, p)) for p in PARTS[1:]}}
    path = pool / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != manifest:
            raise ValueError(f"{path}: the pool was drawn with other settings; use another pool_dir or restore "
                             f"the config (differs in {sorted(k for k in manifest if old.get(k) != manifest[k])})")
    else:
        atomic_write_json(path, manifest)


def stage_split(cfg: OveroptConfig, log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Write (or read and check) pool_dir/splits.json."""
    pool = Path(cfg.pool_dir)
    path = pool / "splits.json"
    splits = split_instructions(alpaca_instructions(cfg.data_dir), cfg)
    if path.exists():
        if json.loads(path.read_text()) != splits:
            raise ValueError(f"{path}: stored split differs from the config's (seed, part sizes, data)")
    else:
        atomic_write_json(path, splits)
    _check_manifest(cfg, pool, splits)
    log(f"split: {', '.join(f'{k} {len(v)}' for k, v in splits.items())} prompts")
    return splits


def stage_generate(cfg: OveroptConfig, parts: tuple[str, ...] = ("proxy_train", "val", "eval"),
                   log: Callable[[str], None] = print) -> None:
    """Draw the pool shard by shard, skipping shards on disk (proxy-training and validation first: small)."""
    splits = stage_split(cfg, log)
    for part in parts:
        scfg = sample_config(cfg, part)
        t0 = time.time()
        done = len(list((Path(cfg.pool_dir) / part).glob("shard_*.parquet")))
        total = -(-len(splits[part]) // scfg.shard_size)
        log(f"{part}: {len(splits[part])} prompts × {scfg.n} samples, {done}/{total} shards on disk")
        sample_pool(splits[part], scfg, Path(cfg.pool_dir) / part, log=lambda m, part=part: log(f"{part} {m}"))
        log(f"{part}: done in {time.time() - t0:.0f} s")


STAGES: dict[str, Callable[..., object]] = {"split": stage_split, "generate": stage_generate}
