"""`bayesrm` command line: train, eval, laplace, score, bon, demo."""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from bayesrm.data import (
    DataError,
    DataFormat,
    LoadReport,
    Pair,
    iter_rows,
    load_pairs,
    save_pairs,
    split_by_prompt,
)
from bayesrm.evaluation import EvalConfig
from bayesrm.model import find_model_dir
from bayesrm.progress import progress_bar

app = typer.Typer(help="Uncertainty-aware reward models: Bradley–Terry LoRA RMs, Laplace-LoRA, best-of-n.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
_EVAL_DEFAULTS = EvalConfig()


def _friendly(fn: F) -> F:
    """Turn expected user errors into one red line and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DataError, ValueError, FileNotFoundError, KeyError) as e:
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _parse_fields(fields: list[str] | None) -> dict[str, str]:
    out = {}
    for f in fields or []:
        if "=" not in f:
            raise ValueError(f"--field expects NAME=COLUMN (e.g. prompt=question), got {f!r}")
        k, v = f.split("=", 1)
        if k not in ("prompt", "chosen", "rejected", "id", "source"):
            raise ValueError(f"--field name must be prompt, chosen, rejected, id or source, got {k!r}")
        out[k] = v
    return out


def _load(path: str, fmt: str, fields: list[str] | None, skip_invalid: bool, limit: int | None = None) -> list[Pair]:
    rep = LoadReport()
    pairs = load_pairs(path, format=fmt, fields=_parse_fields(fields), skip_invalid=skip_invalid, limit=limit,
                       report=rep)
    msg = f"{path}: {rep.kept} pairs"
    if rep.skipped:
        msg += f", {rep.skipped} invalid rows skipped (first: {rep.errors[0]})"
    if rep.ties:
        msg += f", {rep.ties} ties dropped"
    console.print(msg)
    if not pairs:
        raise DataError("no usable pairs", file=path)
    return pairs


FormatOpt = Annotated[str, typer.Option("--format", help="auto | pairs | hh | alpaca_eval")]
FieldOpt = Annotated[list[str] | None, typer.Option("--field", help="map schema name to column: prompt=question")]
SkipOpt = Annotated[bool, typer.Option("--skip-invalid", help="skip (and count) invalid rows instead of failing")]


@app.command("train")
@_friendly
def train_cmd(
    data: Annotated[str, typer.Argument(help="training pairs: .jsonl/.json/.csv/.parquet(.gz) or hf:NAME[:SPLIT]")],
    out: Annotated[Path, typer.Option(help="run directory (model in OUT/model)")] = Path("runs/rm"),
    eval_data: Annotated[str | None, typer.Option(help="evaluation pairs; default: a prompt-disjoint split")] = None,
    eval_frac: Annotated[float, typer.Option(help="fraction of prompts held out when no --eval-data")] = 0.1,
    backbone: Annotated[str, typer.Option(help="hub id, local path, or the embedded all-MiniLM-L6-v2")] = (
        "all-MiniLM-L6-v2"),
    template: Annotated[str, typer.Option(help="oasst | chat | plain")] = "oasst",
    max_length: int = 500,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: Annotated[str | None, typer.Option(help="comma-separated module names")] = None,
    head: Annotated[str, typer.Option(help="linear (BT scalar head) | bnrm (Bayesian non-negative head)")] = "linear",
    bnrm_k: Annotated[int, typer.Option(help="BNRM latent factors K")] = 1024,
    bnrm_eta: Annotated[float, typer.Option(help="BNRM KL weight η")] = 1e-5,
    freeze_backbone: Annotated[bool, typer.Option(help="train the head only (LoRA stays a no-op)")] = False,
    epochs: int = 1,
    lr: float = 2e-4,
    batch_size: int = 8,
    grad_accum: int = 1,
    warmup_ratio: float = 0.03,
    margin: float = 0.0,
    center_coef: float = 0.0,
    lora_seed: int = 0,
    data_seed: int = 0,
    split_seed: int = 0,
    mixed_precision: Annotated[str, typer.Option(help="no | bf16")] = "no",
    max_steps: int | None = None,
    limit: Annotated[int | None, typer.Option(help="use only the first N pairs")] = None,
    sample: Annotated[int | None, typer.Option(help="use a random N pairs (seeded by --split-seed)")] = None,
    resume: Annotated[bool, typer.Option(help="continue from OUT/checkpoint")] = False,
    format: FormatOpt = DataFormat.AUTO.value,
    field: FieldOpt = None,
    skip_invalid: SkipOpt = False,
) -> None:
    """Train a Bradley–Terry LoRA reward model."""
    from bayesrm.model import RewardModel, RMConfig
    from bayesrm.train import TrainConfig, train

    pairs = _load(data, format, field, skip_invalid, limit)
    if sample is not None and sample < len(pairs):
        pairs = [pairs[i] for i in sorted(random.Random(split_seed).sample(range(len(pairs)), sample))]
    if eval_data:
        train_pairs, eval_pairs = pairs, _load(eval_data, format, field, skip_invalid)
    else:
        train_pairs, eval_pairs = split_by_prompt(pairs, (1 - eval_frac, eval_frac), split_seed)
    mc = RMConfig(backbone=backbone, template=template, max_length=max_length, lora_r=lora_r, lora_alpha=lora_alpha,
                  lora_dropout=lora_dropout, lora_seed=lora_seed,
                  target_modules=target_modules.split(",") if target_modules else None,
                  head=head, bnrm={"k": bnrm_k, "eta": bnrm_eta} if head == "bnrm" else None,
                  freeze_backbone=freeze_backbone,
                  extra={"train_data": data, "eval_data": eval_data, "split_seed": split_seed})
    tc = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum, warmup_ratio=warmup_ratio,
                     margin=margin, center_coef=center_coef, data_seed=data_seed, mixed_precision=mixed_precision,
                     max_steps=max_steps)
    model = RewardModel(mc)
    save_pairs(train_pairs, out / "data" / "train.jsonl")  # the exact split, for `laplace` and `eval`
    save_pairs(eval_pairs, out / "data" / "eval.jsonl")
    console.print(f"training on {len(train_pairs)} pairs, evaluating on {len(eval_pairs)} (prompt-disjoint); "
                  f"splits in {out / 'data'}")
    history = train(model, train_pairs, tc, out, eval_pairs=eval_pairs, resume=resume)
    _print_metrics("final", history[-1])
    console.print(f"model saved to {out / 'model'}")


def _print_metrics(title: str, row: dict[str, Any]) -> None:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in row.items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(t)


@app.command("laplace")
@_friendly
def laplace_cmd(
    model_dir: Annotated[Path, typer.Argument(help="trained model (run dir or model dir)")],
    data: Annotated[str, typer.Argument(help="the pairs the model was trained on")],
    val_data: Annotated[str | None, typer.Option(help="validation pairs (for --tau-method val_nll)")] = None,
    kfac: Annotated[str, typer.Option(help="pair | reduce | expand (Kronecker factorisation of the BT GGN)")] = "pair",
    subset: Annotated[str | None, typer.Option(help="lora (Laplace-LoRA) | head (last-layer); default lora, or "
                                                    "head for a model without LoRA (a transformers reward "
                                                    "model)")] = None,
    tau_method: Annotated[str, typer.Option(help="marglik | mackay | val_nll | fixed")] = "marglik",
    prior_structure: Annotated[str, typer.Option(help="global | layerwise")] = "layerwise",
    prior_precision: Annotated[float, typer.Option(help="initial / fixed τ")] = 1.0,
    rank: Annotated[int | None, typer.Option(help="rank of large (≥ --lowrank-threshold) factors")] = None,
    lowrank_threshold: int = 2048,
    batch_size: int = 8,
    limit: int | None = None,
    format: FormatOpt = DataFormat.AUTO.value,
    field: FieldOpt = None,
    skip_invalid: SkipOpt = False,
) -> None:
    """Fit a post-hoc Laplace-LoRA posterior (KFAC GGN of the BT likelihood) and tune the prior precision."""
    from bayesrm.laplace import POSTERIOR_DIR, LaplaceConfig, fit_laplace
    from bayesrm.model import RewardModel

    model = RewardModel.load(model_dir)
    pairs = _load(data, format, field, skip_invalid, limit)
    val = _load(val_data, format, field, skip_invalid) if val_data else []
    if subset is None:
        subset = "head" if model.config.seq_cls else LaplaceConfig.subset
    cfg = LaplaceConfig(subset=subset, kfac=kfac, tau_method=tau_method, prior_structure=prior_structure,
                        prior_precision=prior_precision, rank=rank, lowrank_threshold=lowrank_threshold,
                        batch_size=batch_size)
    with progress_bar("KFAC fit (pairs)", len(pairs), console) as advance:
        post = fit_laplace(model, pairs, cfg, val_pairs=val, progress=advance)
    dest = find_model_dir(model_dir) / POSTERIOR_DIR
    post.save(dest)
    taus = sorted(post.tau.values())
    console.print(f"posterior saved to {dest}; τ ({cfg.tau_method}, {cfg.prior_structure}): "
                  f"min {taus[0]:.4g}, median {taus[len(taus) // 2]:.4g}, max {taus[-1]:.4g}; "
                  f"log marginal likelihood {post.log_marginal_likelihood():.2f}")



@app.command("eval")
@_friendly
def eval_cmd(
    model_dir: Annotated[Path, typer.Argument(help="trained model (with its Laplace posterior if fitted) or an "
                                                   "ensemble dir")],
    data: Annotated[str, typer.Argument(help="test pairs (a source/subset column gives per-subset results)")],
    out: Annotated[Path, typer.Option(help="output dir: report.json, report.md, reliability.png, selective.png, "
                                           "predictions.jsonl")] = Path("runs/eval"),
    ood: Annotated[str | None, typer.Option(help="out-of-distribution pairs: AUROC of σ for ID vs OOD")] = None,
    levels: Annotated[str, typer.Option(help="nominal levels of the predictive intervals, comma-separated")] = ",".join(
        f"{x:g}" for x in _EVAL_DEFAULTS.levels),
    n_bins: Annotated[int, typer.Option(help="confidence bins (ECE, MCE, reliability)")] = _EVAL_DEFAULTS.n_bins,
    n_boot: Annotated[int, typer.Option(help="bootstrap replicates over prompts for CIs")] = _EVAL_DEFAULTS.n_boot,
    batch_size: int = _EVAL_DEFAULTS.batch_size,
    limit: int | None = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the headline numbers here")] = None,
    format: FormatOpt = DataFormat.AUTO.value,
    field: FieldOpt = None,
    skip_invalid: SkipOpt = False,
) -> None:
    """Accuracy, NLL, Brier, ECE/MCE, interval coverage, selective prediction and σ's error/OOD AUROC for the MAP
    and the Bayesian predictive (Laplace, BNRM or ensemble), per subset when the data has one."""
    from bayesrm.evaluation import EvalConfig, evaluate, render_markdown, summary
    from bayesrm.io import atomic_write_json

    try:
        lv = tuple(float(x) for x in levels.split(","))
    except ValueError:
        raise ValueError(f"--levels expects numbers in (0, 1) separated by commas, got {levels!r}") from None
    cfg = EvalConfig(levels=lv, n_bins=n_bins, n_boot=n_boot, batch_size=batch_size)
    pairs = _load(data, format, field, skip_invalid, limit)
    ood_pairs = _load(ood, DataFormat.AUTO.value, None, skip_invalid, limit) if ood else []
    report = evaluate(model_dir, pairs, cfg, out, ood_pairs, meta={"data": data, "ood": ood})
    console.print(render_markdown(report))
    console.print(f"report: {out / 'report.md'}, {out / 'report.json'}; plots: {out / 'reliability.png'}, "
                  f"{out / 'selective.png'}; predictions: {out / 'predictions.jsonl'}")
    row = summary(report)
    if json_out:
        atomic_write_json(json_out, row)
    print(json.dumps(row))


@app.command("export")
@_friendly
def export_cmd(
    run: Annotated[Path, typer.Argument(help="trained bayesrm model (run dir or model dir)")],
    out: Annotated[Path, typer.Argument(help="output: a transformers AutoModelForSequenceClassification folder, "
                                             "with the peft adapter form in OUT/adapter")],
) -> None:
    """Export to plain transformers (LoRA merged) and to a peft adapter (head in modules_to_save), both checked."""
    from bayesrm.export import ADAPTER_DIR, export_model

    info = export_model(run, out)
    console.print(f"exported to {out} (merged; max |Δr| {info['merged_max_abs_error']:.2g} through transformers) "
                  f"and {out / ADAPTER_DIR} (peft; max |Δr| {info['adapter_max_abs_error']:.2g}); input format in "
                  f"{out / 'README.md'}")


def _score_rows(input: str, prompt_field: str, response_field: str) -> Iterator[dict[str, Any]]:
    """Rows of a `score` input, each checked to hold text in the prompt and response fields."""
    for line, row in iter_rows(input):
        for f in (prompt_field, response_field):
            if not isinstance(row.get(f), str):
                raise DataError("missing or not text", file=input, line=line, field=f)
        yield row


def _add_scores(scorer: Any, rows: list[dict[str, Any]], fields: tuple[str, str],
                progress: Callable[[int], None] | None = None) -> None:
    """Add `reward` to each row and, for uncertainty specs, reward_std, reward_var, reward_penalized and penalty."""
    if not rows:
        return
    scores = scorer.score([r[fields[0]] for r in rows], [r[fields[1]] for r in rows], progress=progress)
    for r, s in zip(rows, scores.rows(), strict=True):
        r["reward"] = s["reward"]
        if scorer.spec.family.value != "map":
            std = s["std"]
            if std is not None:
                r |= {"reward_std": std, "reward_var": std**2}
            r |= {"reward_penalized": s["selection"], "penalty": str(scorer.spec)}


def _score_device(device: str, index: int) -> str | None:
    """`--device auto`: GPU index mod #GPUs when CUDA is available, else None (CPU); anything else as given."""
    import torch

    if device != "auto":
        return device
    return f"cuda:{index % torch.cuda.device_count()}" if torch.cuda.is_available() else None


def _score_shard(model_dir: Path, input: str, out: Path, spec: str, fields: tuple[str, str], index: int, num: int,
                 batch_size: int, device: str | None) -> None:
    """Score rows of shard `index` of `num` into its shard file (skipped if that file exists)."""
    import itertools
    import time

    from bayesrm import shard as sh
    from bayesrm.scoring import Scorer

    total = sum(1 for _ in _score_rows(input, *fields))
    sh.prepare_shards(out, sh.ShardRun.describe(input, total, model_dir, spec, fields, num))
    if sh.shard_path(out, index, num).exists():
        console.print(f"shard {index}/{num} already done")
        return
    span, t0 = sh.shard_range(total, index, num), time.perf_counter()
    rows = list(itertools.islice(_score_rows(input, *fields), span.start, span.stop))
    _add_scores(Scorer.load(model_dir, spec, device=device, batch_size=batch_size), rows, fields)
    sh.write_shard(out, index, num, rows)
    console.print(f"shard {index}/{num}: {len(rows)} rows in {time.perf_counter() - t0:.1f} s")


def _score_parallel(model_dir: Path, input: str, out: Path, spec: str, fields: tuple[str, str], num: int,
                    batch_size: int, threads: int | None, device: str) -> None:
    """Score `num` shards in `num` processes, then merge in input order.

    This process scores the first unfinished shard itself and starts `bayesrm score --shard i/num` for the others.
    """
    import os
    import shutil
    import subprocess
    import sys

    import torch

    from bayesrm import shard as sh

    total = sum(1 for _ in _score_rows(input, *fields))  # every row is checked before any worker starts
    if sh.prepare_shards(out, sh.ShardRun.describe(input, total, model_dir, spec, fields, num), discard=True):
        console.print(f"discarded shards of a different earlier run in {sh.shard_dir(out)}")
    todo = sh.pending_shards(out, num)
    if len(todo) < num:
        console.print(f"{num - len(todo)} of {num} shards already done")
    t = threads or sh.threads_per_process(max(len(todo), 1))
    env = os.environ | {"OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t), "RAYON_NUM_THREADS": str(t)}
    base = [sys.executable, "-m", "bayesrm", "score", str(model_dir), input, "--out", str(out), "--spec", spec,
            "--batch-size", str(batch_size), "--prompt-field", fields[0], "--response-field", fields[1],
            "--threads", str(t)]
    procs = {i: subprocess.Popen([*base, "--shard", f"{i}/{num}", "--device", _score_device(device, i) or "cpu"],
                                 env=env) for i in todo[1:]}
    try:
        if todo:
            torch.set_num_threads(t)
            _score_shard(model_dir, input, out, spec, fields, todo[0], num, batch_size, _score_device(device, todo[0]))
        codes = {i: p.wait() for i, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait()
    failed = {i: c for i, c in codes.items() if c != 0}
    if failed:
        raise ValueError(f"shards {sorted(failed)} of {num} failed (exit codes {sorted(set(failed.values()))}); "
                         "rerun the same command to redo only unfinished shards")
    rows = sh.merge_shards(out, num, total)
    shutil.rmtree(sh.shard_dir(out))
    console.print(f"wrote {rows} scored rows to {out} ({num} shards)")


@app.command("score")
@_friendly
def score_cmd(
    model_dir: Annotated[Path, typer.Argument(help="trained model, or an ensemble dir for ens:/la-ens: specs")],
    input: Annotated[str, typer.Argument(help="jsonl/csv/parquet rows with prompt and response")],
    out: Annotated[Path, typer.Option(help="output jsonl (input rows + reward columns)")] = Path("scores.jsonl"),
    spec: Annotated[str | None, typer.Option(help="selection reward, e.g. map, la:var:k=1, vi:std:k=2, "
                                                  "ens:uwo:lambda=0.5, la-ens:var:k=1")] = None,
    uncertainty: Annotated[bool, typer.Option(help="shorthand for --spec la:PENALTY:k=K")] = False,
    penalty: Annotated[str, typer.Option(help="with --uncertainty: std (r − kσ) | var (r − kσ²)")] = "var",
    k: Annotated[float, typer.Option(help="with --uncertainty: penalty weight")] = 1.0,
    batch_size: int = 16,
    prompt_field: str = "prompt",
    response_field: str = "response",
    num_processes: Annotated[int, typer.Option(help="shard the input over N worker processes (one per GPU where "
                                                    "there are GPUs); per-shard files in OUT.shards/ make reruns "
                                                    "skip finished shards")] = 1,
    shard: Annotated[str | None, typer.Option(help="I/N: score only shard I (0-based) of N into OUT.shards/ (job "
                                                   "arrays; a later --num-processes N run merges)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads per process (default: cores / N with "
                                                     "--num-processes N, else torch's default)")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA if available) | cpu | cuda:0 …")] = "auto",
) -> None:
    """Score responses: reward per row and, for uncertainty specs, σ and the penalised (selection) reward.

    Under `accelerate launch` / `torchrun` (WORLD_SIZE > 1) each rank scores its shard and rank 0 merges.
    """
    import shutil

    import torch

    from bayesrm import shard as sh
    from bayesrm.io import write_jsonl
    from bayesrm.objectives import parse_spec
    from bayesrm.scoring import Scorer

    if spec is not None and uncertainty:
        raise ValueError("pass either --spec or --uncertainty, not both")
    if num_processes < 1 or (shard is not None and num_processes > 1):
        raise ValueError("--num-processes must be ≥ 1 and cannot be combined with --shard")
    spec = str(parse_spec(f"la:{penalty}:k={k}" if uncertainty else (spec or "map")))
    fields = (prompt_field, response_field)
    if threads:
        torch.set_num_threads(threads)
    ranked = sh.launcher_rank() if shard is None and num_processes == 1 else None
    if shard is not None:
        i, n = sh.parse_shard(shard)
        _score_shard(model_dir, input, out, spec, fields, i, n, batch_size, _score_device(device, i))
    elif ranked is not None:
        rank, world, local = ranked
        _score_shard(model_dir, input, out, spec, fields, rank, world, batch_size, _score_device(device, local))
        if rank == 0:
            sh.wait_for_shards(out, world)
            merged = sh.merge_shards(out, world)
            shutil.rmtree(sh.shard_dir(out))
            console.print(f"wrote {merged} scored rows to {out} ({world} ranks)")
    elif num_processes > 1:
        _score_parallel(model_dir, input, out, spec, fields, num_processes, batch_size, threads, device)
    else:
        rows = list(_score_rows(input, *fields))
        scorer = Scorer.load(model_dir, spec, device=_score_device(device, 0), batch_size=batch_size)
        with progress_bar("scoring", len(rows), console) as advance:
            _add_scores(scorer, rows, fields, advance)
        write_jsonl(out, rows)
        console.print(f"wrote {len(rows)} scored rows to {out}")


@app.command("bon")
@_friendly
def bon_cmd(
    config: Annotated[Path, typer.Argument(help="experiment config (.toml or .json)")],
    out: Annotated[Path, typer.Option(help="output directory (resumable: finished stages are reused)")] = Path(
        "runs/bon"),
) -> None:
    """Best-of-n overoptimisation experiment: gold vs proxy vs KL for MAP, Laplace and ensemble rewards."""
    from bayesrm.experiment import load_config, run_bon

    _report(run_bon(load_config(config), out, log=console.print), out)


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
    policy: Annotated[str, typer.Argument(help="causal LM: hub id or local path")],
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
    backend: Annotated[str, typer.Option(help="auto | transformers | vllm")] = "auto",
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
                       backend=backend)
    with progress_bar(f"sampling {n} per prompt", len(texts), console) as advance:
        path = sample_pool(texts, cfg, out, progress=advance)
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
    from bayesrm.bnrm import explain_factors
    from bayesrm.io import atomic_write_json
    from bayesrm.model import RewardModel

    model = RewardModel.load(model_dir)
    model.bnrm_head  # noqa: B018 - fail before loading data when the head is linear
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
                        f"active {f['active_frac']:.0%}, r(θ, words)={f['length_corr']:.2f}")
        for col in ("θ", "words", "prompt", "response"):
            t.add_column(col, justify="right" if col in ("θ", "words") else "left")
        for x in f["top"]:
            t.add_row(f"{x['theta']:.4g}", str(x["words"]), x["prompt"][:60].replace("\n", " "),
                      x["response"][:100].replace("\n", " "))
        console.print(t)
    if json_out:
        atomic_write_json(json_out, rep)


@app.command("serve")
@_friendly
def serve_cmd(
    model_dir: Annotated[Path, typer.Argument(help="trained model, or an ensemble dir for ens:/la-ens: specs")],
    spec: Annotated[str, typer.Option(help="selection reward served: map, la:var:k=1, ens:uwo:lambda=0.5, …")] = "map",
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: Annotated[int, typer.Option(help="responses per micro-batch (whole requests; 1 = no batching)")] = 64,
    max_wait_ms: Annotated[float, typer.Option(help="longest wait for a micro-batch to fill")] = 5.0,
    max_body_bytes: Annotated[int, typer.Option(help="larger request bodies get 413")] = 1 << 20,
    max_responses: Annotated[int, typer.Option(help="responses per request; more get 422")] = 256,
    max_tokens: Annotated[int, typer.Option(help="untruncated tokens of prompt + response; more get 413")] = 2048,
    api_key_env: Annotated[str | None, typer.Option(help="NAME of an environment variable holding the API key "
                                                         "(the key itself never goes on the command line)")] = None,
    batch_size: Annotated[int, typer.Option(help="forward batch size inside a micro-batch")] = 16,
    device: Annotated[str | None, typer.Option(help="cpu | cuda:0 … (default: where the model loads)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's)")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level (warning: no access log)")] = "info",
) -> None:
    """HTTP scoring server: POST /v1/score {prompt, responses} → reward, std, selection; /health, /metrics."""
    import torch

    from bayesrm.serve import ServeConfig, serve

    if threads:
        torch.set_num_threads(threads)
    serve(model_dir, ServeConfig(host=host, port=port, spec=spec, max_batch_responses=max_batch,
                                 max_wait_ms=max_wait_ms, max_body_bytes=max_body_bytes, max_responses=max_responses,
                                 max_tokens=max_tokens, api_key_env=api_key_env, batch_size=batch_size,
                                 log_level=log_level),
          device=device)


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
) -> None:
    """RLHF overoptimisation: RLOO/GRPO on a proxy RM per selection spec; gold, proxy and KL per step."""
    from bayesrm.rlhf import load_config, run_rlhf

    cfg = load_config(config)
    if steps is not None:
        cfg.steps = steps
    results = run_rlhf(cfg, out, only=only, log=console.print)
    console.print((out / "results.md").read_text())
    done = ", ".join(f"{n} {r['seconds'] / 60:.1f} min" for n, r in results["runs"].items())
    console.print(f"results: {out / 'results.json'}, plot: {out / 'rlhf.png'} ({done})")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
