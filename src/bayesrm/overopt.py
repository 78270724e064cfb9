"""Overoptimisation where it happens (issue 14): one policy's i.i.d. pool, a synthetic gold RM, every method.

The regime of Gao et al. 2022 / Coste et al. 2024 at CPU size. Stages, each resumable and skipped when done:
  split    — the 805 AlpacaEval instructions, prompt-disjoint: gold-training / proxy-training / validation / evaluation;
  generate — SmolLM2-135M-Instruct samples (temperature 1, top-p 1): `n_proxy` per proxy-training and validation
             prompt, then `n_eval` per evaluation prompt, as zstd parquet shards in `pool_dir` (committed);
  gold     — MiniLM LoRA gold RM(s) on clean judged AlpacaEval pairs of the gold-training prompts (checkpointed);
  label    — gold-labelled pairs of π_ref samples (25% flipped) for the proxy, clean ones for validation;
  proxy    — proxy members, each with a Laplace-LoRA and a head-only Laplace posterior;
  score    — gold and member scores (reward, σ²) of every evaluation shard, cached by shard;
  report   — `overopt_report`: best-of-n curves, Gao fits, the method table and σ's mechanism.
See docs/overoptimisation.md for the design, the status and the resume command.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bayesrm.data import DataError, Pair, load_pairs, save_pairs
from bayesrm.io import atomic_write_json
from bayesrm.laplace import LaplaceConfig
from bayesrm.model import RewardModel, RMConfig
from bayesrm.pool import NULL_MODELS, Pool, alpaca_eval_pool
from bayesrm.run import POSTERIOR_META, RunDir
from bayesrm.sample import SMOLLM2, Backend, SampleConfig, ShardFormat, sample_pool
from bayesrm.train import TrainConfig

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
    template: str = "chat"  # the policy's chat template (SmolLM2's default system prompt)

    def __post_init__(self) -> None:
        Backend(self.backend)


@dataclass
class GoldConfig:
    """The synthetic gold: MiniLM LoRA RM(s) on clean GPT-4-turbo judged pairs of the gold-training prompts only."""

    pairs: int = 24_000  # judged pairs: decisive (output vs reference) pairs, topped up with output-vs-output pairs
    min_confidence: float = 0.25  # direct pairs: keep |P(output beats reference) − 0.5| ≥ this (clean labels)
    min_gold_gap: float = 0.5  # derived pairs of two outputs: |P_a − P_b| ≥ this
    members: int = 1  # gold = mean reward of this many RMs (different seeds)
    model: RMConfig = field(default_factory=lambda: RMConfig(max_length=256, lora_r=16, lora_alpha=32))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, lr=3e-4, batch_size=16,
                                                                     checkpoint_every=50))


@dataclass
class ProxyConfig:
    """Proxy members: MiniLM LoRA RMs on gold-labelled pairs of π_ref samples (25% flipped, Coste et al. 2024)."""

    pairs_per_prompt: int = 8  # of the C(n_proxy, 2) sample pairs of a proxy-training prompt
    label_noise: float = 0.25
    members: int = 3
    model: RMConfig = field(default_factory=lambda: RMConfig(max_length=192))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, lr=3e-4, batch_size=8,
                                                                     checkpoint_every=50))
    laplace: LaplaceConfig = field(default_factory=LaplaceConfig)


@dataclass
class ReportConfig:
    """Best-of-n on the evaluation pool: every method on the same members and the same samples."""

    methods: list[str] = field(default_factory=lambda: [
        "map", "la:std:k=1", "la:var:k=1", "head:la:std:k=1", "head:la:var:k=1", "ens:mean", "ens:wco",
        "ens:uwo:lambda=0.5", "la-ens:var:k=1"])
    k_sweep: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    max_n_frac: float = 0.25  # best-of-n up to n = N/4 (Coste et al.: bootstrap variance grows as n → N)
    n_boot: int = 2000
    min_prompts: int = 40  # fail unless this many evaluation prompts are complete (generated and scored)
    max_prompts: int | None = None  # score and report only the first this many evaluation prompts (None: all)
    score_batch_size: int = 32
    results_dir: str = "docs/overopt"


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
    gold: GoldConfig = field(default_factory=GoldConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    eval: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        if self.eval.max_prompts is not None and self.eval.max_prompts < self.eval.min_prompts:
            raise ValueError(f"eval.max_prompts ({self.eval.max_prompts}) is below eval.min_prompts "
                             f"({self.eval.min_prompts})")
        if self.eval_prompts < 1 or self.val_prompts < 0 or self.proxy_prompts < 1:
            raise ValueError("eval_prompts and proxy_prompts must be ≥ 1, val_prompts ≥ 0")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> OveroptConfig:
    """Read an OveroptConfig from TOML/JSON plus `--set KEY=VALUE` overrides (unknown or mistyped fields fail)."""
    from bayesrm import config_file

    return config_file.load_config(OveroptConfig, path, overrides)


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
                        temperature=g.temperature, top_p=g.top_p, template=g.template,
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
        keys = ("seed", "max_prompt_chars", "parts", "sample_configs")
        differs = sorted(k for k in keys if old.get(k) != manifest[k])
        if differs:
            raise ValueError(f"{path}: the pool was drawn with other settings; use another pool_dir or restore "
                             f"the config (differs in {differs})")
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
        def shard_log(msg: str, part: str = part) -> None:
            log(f"{part} {msg}")

        sample_pool(splits[part], scfg, Path(cfg.pool_dir) / part, log=shard_log)
        log(f"{part}: done in {time.time() - t0:.0f} s")


# ------------------------------------------------------------------------------------------ pool and gold data


def pool_shards(cfg: OveroptConfig, part: str) -> list[Path]:
    """The finished shards of a part, in order (a snapshot: generation may add more meanwhile)."""
    return sorted((Path(cfg.pool_dir) / part).glob("shard_*.parquet"))


def eval_shards(cfg: OveroptConfig) -> list[Path]:
    """The evaluation shards `score` and `report` use: all on disk, or the first ones up to `eval.max_prompts`."""
    shards = pool_shards(cfg, "eval")
    k = cfg.eval.max_prompts
    return shards if k is None else shards[:-(-k // cfg.generation.eval_shard_prompts)]


def load_part(cfg: OveroptConfig, part: str, shards: list[Path] | None = None) -> Pool:
    """A part's samples from its parquet shards (default: all on disk), prompts in shard order."""
    import pyarrow.parquet as pq

    n = sample_config(cfg, part).n
    prompts: list[str] = []
    responses: list[list[str]] = []
    for path in pool_shards(cfg, part) if shards is None else shards:
        t = pq.read_table(path, columns=["prompt", "response"]).to_pydict()
        by: dict[str, list[str]] = {}
        for prompt, resp in zip(t["prompt"], t["response"], strict=True):
            by.setdefault(prompt, []).append(resp)
        for prompt, rs in by.items():
            if len(rs) != n:
                raise ValueError(f"{path}: a prompt has {len(rs)} samples, the config says {n} (damaged shard?)")
            prompts.append(prompt)
            responses.append(rs)
    return Pool(prompts, responses, meta={"source": str(Path(cfg.pool_dir) / part), "policy": cfg.generation.policy})


def gold_training_pairs(cfg: OveroptConfig, prompts: set[str], seed: int, top_up: bool = True) -> list[Pair]:
    """Clean judged pairs of these prompts: decisive (output, reference) pairs, topped up with output pairs.

    Direct pairs are the judge's own comparisons (weighted GPT-4-turbo, |P − 0.5| ≥ min_confidence); the top-up
    pairs two outputs of one prompt whose judged P(beats reference) differ by ≥ min_gold_gap (Gao et al. 2022's
    synthetic labelling with the judge as gold). The adversarial null model is excluded throughout. Without
    `top_up`: every direct pair (held-out evaluation).
    """
    g = cfg.gold
    ann = Path(cfg.data_dir) / "alpaca_eval" / "annotations.jsonl.gz"
    direct = [p for p in load_pairs(ann, format="alpaca_eval", skip_invalid=True)  # some outputs are empty
              if p.prompt in prompts and abs(float(p.meta["preference"]) - 1.5) >= g.min_confidence
              and str(p.meta.get("generator_2")) not in NULL_MODELS]
    rng = random.Random(seed)
    rng.shuffle(direct)
    if not top_up:
        return direct
    if len(direct) >= g.pairs:
        return direct[:g.pairs]
    pool = alpaca_eval_pool(cfg.data_dir, min_size=2)
    keep = [i for i, p in enumerate(pool.prompts) if p in prompts]
    cand = []
    for i in keep:
        rs, gs = pool.responses[i], pool.gold[i]  # type: ignore[index]
        cand += [(i, a, b) for a in range(len(rs)) for b in range(a + 1, len(rs))
                 if abs(gs[a] - gs[b]) >= g.min_gold_gap and rs[a] != rs[b]]
    derived = []
    for i, a, b in rng.sample(cand, min(len(cand), g.pairs - len(direct))):
        rs, gs = pool.responses[i], pool.gold[i]  # type: ignore[index]
        w, l_ = (a, b) if gs[a] > gs[b] else (b, a)
        derived.append(Pair(pool.prompts[i], rs[w], rs[l_], id=f"alpaca:{i}:{w}>{l_}", source="judged-derived",
                            meta={"gold_margin": gs[w] - gs[l_]}))
    return direct + derived


def gold_root(cfg: OveroptConfig) -> Path:
    """Where the gold lives: beside the pool (committed, ~0.9 MB a member), since it costs an hour of CPU to train."""
    return Path(cfg.pool_dir) / "gold"


def _timed(cfg: OveroptConfig, stage: str, seconds: float) -> None:
    """Add `seconds` to the stage's total in pool_dir/timings.json (committed with the pool)."""
    path = Path(cfg.pool_dir) / "timings.json"
    t = json.loads(path.read_text()) if path.exists() else {}
    t[stage] = t.get(stage, 0.0) + seconds
    atomic_write_json(path, t)


def stage_gold(cfg: OveroptConfig, log: Callable[[str], None] = print) -> list[Path]:
    """Train the gold RM(s) on gold-training prompts (resumable); held-out accuracy on validation-prompt pairs."""
    from bayesrm.ensemble import train_ensemble
    from bayesrm.train import evaluate

    t0 = time.time()
    splits = stage_split(cfg, log)
    work = Path(cfg.work_dir)
    train_pairs = gold_training_pairs(cfg, set(splits["gold_train"]), cfg.seed)
    held = gold_training_pairs(cfg, set(splits["val"]), cfg.seed + 1, top_up=False)
    save_pairs(train_pairs, work / "data" / "gold_train.jsonl")
    save_pairs(held, work / "data" / "gold_heldout.jsonl")
    log(f"gold: {len(train_pairs)} judged pairs from {len(splits['gold_train'])} prompts; "
        f"{len(held)} held-out judged pairs from the validation prompts")
    dirs = train_ensemble(cfg.gold.model, cfg.gold.train, train_pairs, gold_root(cfg), members=cfg.gold.members,
                          eval_pairs=held[:500], log=log)
    acc_path = gold_root(cfg) / "heldout.json"
    if not acc_path.exists():
        acc = {d.name: evaluate(RewardModel.load(d), held) for d in dirs}
        atomic_write_json(acc_path, {"n_pairs": len(held), "members": acc})
    log(f"gold held-out: {acc_path.read_text()}")
    _timed(cfg, "gold", time.time() - t0)
    return dirs


def gold_dirs(cfg: OveroptConfig) -> list[Path]:
    """The finished gold members (ValueError naming the folder if the gold stage has not run)."""
    from bayesrm.ensemble import member_name

    dirs = [gold_root(cfg) / member_name(i) for i in range(cfg.gold.members)]
    for d in dirs:
        if not RunDir.of(d).has_model:
            raise ValueError(f"{d}: gold member not trained yet; run --stage gold first")
    return dirs


# ------------------------------------------------------------------------------------------------ score cache


def cached_scores(cfg: OveroptConfig, part: str, shards: list[Path], name: str, source: dict[str, Any],
                  compute: Callable[[list[str], list[str]], dict[str, np.ndarray]],
                  log: Callable[[str], None] = print) -> dict[str, np.ndarray]:
    """Per-sample scores of a part, cached as pool_dir/scores/PART/NAME/shard_*.parquet (float32, zstd).

    `source` identifies the scorer (model folder and a fingerprint); a cache made by another scorer raises.
    Shards already scored are read, the others scored: a rerun computes only what is missing.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bayesrm.io import atomic_path

    cache = Path(cfg.pool_dir) / "scores" / part / name
    src_path = cache / "source.json"
    if src_path.exists() and json.loads(src_path.read_text()) != source:
        raise ValueError(f"{src_path}: these scores came from another model ({src_path.read_text().strip()}); "
                         f"delete {cache} to rescore")
    atomic_write_json(src_path, source)
    cols: dict[str, list[np.ndarray]] = {}
    for path in shards:
        out = cache / path.name
        if not out.exists():
            t = pq.read_table(path, columns=["prompt", "response"]).to_pydict()
            t0 = time.time()
            scores = compute(t["prompt"], t["response"])
            with atomic_path(out) as tmp:
                pq.write_table(pa.table({k: v.astype(np.float32) for k, v in scores.items()}), tmp,
                               compression="zstd")
            log(f"scored {part}/{path.name} with {name}: {len(t['prompt'])} samples, {time.time() - t0:.0f} s")
        table = pq.read_table(out)
        for k in table.column_names:
            cols.setdefault(k, []).append(table.column(k).to_numpy().astype(np.float64))
    return {k: np.concatenate(v) for k, v in cols.items()}


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def gold_scores(cfg: OveroptConfig, part: str, shards: list[Path], log: Callable[[str], None] = print
                ) -> np.ndarray:
    """Gold reward per sample of a part: the mean of the gold members' rewards."""
    dirs = gold_dirs(cfg)
    source = {"gold": [d.name for d in dirs],  # the members and their weights' fingerprint, not where they lie
              "fingerprint": _fingerprint([f for d in dirs
                                           for f in sorted(RunDir.of(d).model_dir.glob("*.safetensors"))])}
    models = [RewardModel.load(d) for d in dirs]

    def compute(prompts: list[str], responses: list[str]) -> dict[str, np.ndarray]:
        rs = [m.score(prompts, responses, cfg.eval.score_batch_size).double().numpy() for m in models]
        return {"gold": np.mean(rs, axis=0)}

    return cached_scores(cfg, part, shards, "gold", source, compute, log)["gold"]


def stage_label(cfg: OveroptConfig, log: Callable[[str], None] = print) -> tuple[list[Pair], list[Pair]]:
    """Gold-label pairs of π_ref samples: proxy-training (label_noise flipped, seeded) and validation (clean)."""
    from bayesrm.gold import NoiseMode, label_pairs_from_gold

    t0 = time.time()
    out = []
    for part, noise, seed in (("proxy_train", cfg.proxy.label_noise, cfg.seed), ("val", 0.0, cfg.seed + 1)):
        shards = pool_shards(cfg, part)
        pool = load_part(cfg, part, shards)
        if len(pool) != len(json.loads((Path(cfg.pool_dir) / "splits.json").read_text())[part]):
            raise ValueError(f"{cfg.pool_dir}/{part}: {len(pool)} prompts generated, not all; run --stage generate")
        pool.gold = pool.unflatten(gold_scores(cfg, part, shards, log))
        pairs = label_pairs_from_gold(pool, cfg.proxy.pairs_per_prompt, noise, NoiseMode.FLIP, seed)
        save_pairs(pairs, Path(cfg.work_dir) / "data" / f"{part}_pairs.jsonl")
        log(f"label: {part} {len(pairs)} pairs ({sum(p.meta['flipped'] for p in pairs)} flipped)")
        out.append(pairs)
    _timed(cfg, "label", time.time() - t0)
    return out[0], out[1]


def posterior_dirs(member: Path) -> tuple[Path, Path]:
    """A proxy member's Laplace-LoRA posterior (where `bayesrm laplace` puts it) and its head-only one beside it."""
    lora = RunDir.of(member).posterior_dir
    return lora, lora.with_name(f"{lora.name}_head")


def stage_proxy(cfg: OveroptConfig, log: Callable[[str], None] = print) -> list[Path]:
    """Train the proxy members (resumable), then fit Laplace-LoRA and the head-only Laplace per member."""
    from bayesrm.ensemble import train_ensemble
    from bayesrm.laplace import Subset, fit_laplace

    work = Path(cfg.work_dir)
    if not (work / "data" / "val_pairs.jsonl").exists():
        stage_label(cfg, log)
    train_pairs = load_pairs(work / "data" / "proxy_train_pairs.jsonl")
    val_pairs = load_pairs(work / "data" / "val_pairs.jsonl")
    t0 = time.time()
    dirs = train_ensemble(cfg.proxy.model, cfg.proxy.train, train_pairs, work / "proxy", members=cfg.proxy.members,
                          eval_pairs=val_pairs, log=log)
    _timed(cfg, "proxy_train", time.time() - t0)
    t0 = time.time()
    for d in dirs:
        model = RewardModel.load(d)
        for subset, post_dir in zip((Subset.LORA, Subset.HEAD), posterior_dirs(d), strict=True):
            if not (post_dir / POSTERIOR_META).exists():
                log(f"{d.name}: fitting {subset.value} Laplace on {len(train_pairs)} pairs")
                fit_laplace(model, train_pairs, replace(cfg.proxy.laplace, subset=subset.value),
                            val_pairs=val_pairs).save(post_dir)
    _timed(cfg, "laplace", time.time() - t0)
    return dirs


def member_scores(cfg: OveroptConfig, part: str, shards: list[Path], log: Callable[[str], None] = print
                  ) -> dict[str, np.ndarray]:
    """Per member: MAP reward `mean` (M, N), Laplace-LoRA `var` and head-only `var_head` over a part's samples."""
    from bayesrm.ensemble import member_name
    from bayesrm.laplace import LaplacePosterior

    out: dict[str, list[np.ndarray]] = {"mean": [], "var": [], "var_head": []}
    for i in range(cfg.proxy.members):
        d = Path(cfg.work_dir) / "proxy" / member_name(i)
        posts = posterior_dirs(d)
        if not all((p / POSTERIOR_META).exists() for p in posts):
            raise ValueError(f"{d}: proxy member or its posteriors missing; run --stage proxy first")
        files = sorted(RunDir.of(d).model_dir.glob("*.safetensors")) + [f for p in posts for f in sorted(p.iterdir())]
        model = RewardModel.load(d)
        lora, head = (LaplacePosterior.load(p, model) for p in posts)  # checked against the model

        def compute(prompts: list[str], responses: list[str], model: RewardModel = model,
                    lora: LaplacePosterior = lora, head: LaplacePosterior = head) -> dict[str, np.ndarray]:
            m, v, vh = lora.predict_ids_with_head(head, model, model.encode(prompts, responses),
                                                  cfg.eval.score_batch_size)
            return {"mean": m.numpy(), "var": v.numpy(), "var_head": vh.numpy()}

        sc = cached_scores(cfg, part, shards, member_name(i),
                           {"member": d.name, "fingerprint": _fingerprint(files)}, compute, log)
        for k in out:
            out[k].append(sc[k])
    return {k: np.stack(v) for k, v in out.items()}


def stage_score(cfg: OveroptConfig, log: Callable[[str], None] = print) -> None:
    """Score every evaluation shard on disk with the gold and every proxy member (cached by shard)."""
    t0 = time.time()
    shards = eval_shards(cfg)
    gold_scores(cfg, "eval", shards, log)
    member_scores(cfg, "eval", shards, log)
    _timed(cfg, "score", time.time() - t0)


def stage_report(cfg: OveroptConfig, log: Callable[[str], None] = print) -> object:
    """Best-of-n curves, Gao fits, the method table and σ's mechanism from the cached scores."""
    from bayesrm.overopt_report import run_report

    return run_report(cfg, log)


STAGES: dict[str, Callable[..., object]] = {
    "split": stage_split, "generate": stage_generate, "gold": stage_gold, "label": stage_label,
    "proxy": stage_proxy, "score": stage_score, "report": stage_report}
