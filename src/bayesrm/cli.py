"""`bayesrm` command line: train, eval, laplace, score, bon, demo."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bayesrm.config import EvalConfig, LaplaceConfig, RMConfig, Subset, TrainConfig
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
from bayesrm.io import check_target
from bayesrm.progress import progress_bar
from bayesrm.run import RunDir

app = typer.Typer(help="Uncertainty-aware reward models: Bradley–Terry LoRA RMs, Laplace-LoRA, best-of-n.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
_TC = TrainConfig()  # `bayesrm train` defaults are TrainConfig's
_RM = RMConfig()  # defaults of the model options of `train`


def _error(message: str) -> None:
    """One red line on stderr, never wrapped, the message taken literally (no rich markup)."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _friendly(fn: F) -> F:
    """Turn expected user errors into one red line and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DataError, ValueError, FileNotFoundError, KeyError) as e:
            _error(str(e))
            raise typer.Exit(2) from None
        except OSError as e:  # unreadable input, full disk, …: name the path, no traceback
            _error(f"{e.filename}: {e.strerror or e}" if e.filename else str(e))
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
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a config field: KEY=VALUE (repeatable; "
                                                       "nested with dots, e.g. --set model.max_length=128)")]


@app.command("train")
@_friendly
def train_cmd(
    data: Annotated[str, typer.Argument(help="training pairs: .jsonl/.json/.csv/.parquet(.gz) or hf:NAME[:SPLIT]")],
    out: Annotated[Path, typer.Option(help="run directory (model in OUT/model)")] = Path("runs/rm"),
    eval_data: Annotated[str | None, typer.Option(help="evaluation pairs; default: a prompt-disjoint split")] = None,
    eval_frac: Annotated[float, typer.Option(help="fraction of prompts held out when no --eval-data")] = 0.1,
    backbone: Annotated[str, typer.Option(help="hub id, local path, or the embedded all-MiniLM-L6-v2")] = (
        _RM.backbone),
    template: Annotated[str, typer.Option(help="oasst | chat | plain")] = _RM.template,
    max_length: Annotated[int, typer.Option(help="tokens per (prompt, response), special tokens included")] = (
        _RM.max_length),
    prompt_budget: Annotated[float, typer.Option(help="share of max-length kept for the end of the prompt when a "
                                                      "pair is too long")] = _RM.prompt_budget,
    response_keep: Annotated[str, typer.Option(help="auto | end | start: which end of a long response is kept "
                                                    "(auto: end for last-token pooling, start for encoders)")] = (
        _RM.response_keep),
    lora_r: int = _RM.lora_r,
    lora_alpha: int = _RM.lora_alpha,
    lora_dropout: float = _RM.lora_dropout,
    target_modules: Annotated[str | None, typer.Option(help="comma-separated module names")] = None,
    head: Annotated[str, typer.Option(help="linear (BT scalar head) | bnrm (Bayesian non-negative head)")] = _RM.head,
    bnrm_k: Annotated[int, typer.Option(help="BNRM latent factors K")] = 1024,
    bnrm_eta: Annotated[float, typer.Option(help="BNRM KL weight η")] = 1e-5,
    freeze_backbone: Annotated[bool, typer.Option(help="train the head only (LoRA stays a no-op); with the linear "
                                                       "head this runs on cached features (--feature-cache)")] = False,
    feature_cache: Annotated[Path | None, typer.Option(help="--freeze-backbone: where backbone features are cached "
                                                            "(keyed by weights, template, data)")] = Path(
        ".cache/features"),
    epochs: Annotated[int, typer.Option(help="passes over the training pairs")] = _TC.epochs,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate")] = _TC.lr,
    batch_size: Annotated[int, typer.Option(help="pairs per micro-batch")] = _TC.batch_size,
    grad_accum: Annotated[int, typer.Option(help="micro-batches per optimizer step")] = _TC.grad_accum,
    warmup_ratio: Annotated[float, typer.Option(help="fraction of steps with linear warm-up")] = _TC.warmup_ratio,
    weight_decay: Annotated[float, typer.Option(help="AdamW decoupled weight decay")] = _TC.weight_decay,
    max_grad_norm: Annotated[float, typer.Option(help="gradient clipping norm (0 disables)")] = _TC.max_grad_norm,
    margin: Annotated[float, typer.Option(help="BT margin m in −log σ(r_w − r_l − m)")] = _TC.margin,
    center_coef: Annotated[float, typer.Option(help="weight of the reward-centering term")] = _TC.center_coef,
    lora_seed: Annotated[int, typer.Option(help="LoRA A and head initialisation")] = _RM.lora_seed,
    data_seed: Annotated[int, typer.Option(help="data order and dropout RNG")] = _TC.data_seed,
    split_seed: int = 0,
    group_by_length: Annotated[bool, typer.Option(help="batches of similar length, in random order")] = (
        _TC.group_by_length),
    mixed_precision: Annotated[str, typer.Option(help="no | bf16")] = _TC.mixed_precision,
    dtype: Annotated[str, typer.Option(help="backbone weights dtype: float32 | bfloat16 | float16")] = _RM.dtype,
    eval_batch_size: Annotated[int, typer.Option(help="responses per evaluation batch")] = _TC.eval_batch_size,
    checkpoint_every: Annotated[int, typer.Option(help="optimizer steps between atomic checkpoints in OUT/checkpoint "
                                                       "(0: epoch ends only); a killed run continued with --resume "
                                                       "loses at most this many")] = _TC.checkpoint_every,
    max_steps: Annotated[int | None, typer.Option(help="stop after this many optimizer steps")] = _TC.max_steps,
    limit: Annotated[int | None, typer.Option(help="use only the first N pairs")] = None,
    sample: Annotated[int | None, typer.Option(help="use a random N pairs (seeded by --split-seed)")] = None,
    resume: Annotated[bool, typer.Option(help="continue from OUT/checkpoint")] = False,
    format: FormatOpt = DataFormat.AUTO.value,
    field: FieldOpt = None,
    skip_invalid: SkipOpt = False,
) -> None:
    """Train a Bradley–Terry LoRA reward model.

    Under `accelerate launch --num_processes P` / `torchrun` each optimizer step takes P × --batch-size pairs, split
    over the processes; rank 0 writes the run directory.
    """
    from bayesrm import dist
    from bayesrm.model import RewardModel
    from bayesrm.train import train

    rank, size = dist.init_from_launcher()
    if rank:
        console.quiet = True  # one process reports
    check_target(out, want_dir=True)  # before any work: a bad --out is one line, not a failure at the end
    pairs = _load(data, format, field, skip_invalid, limit)
    if sample is not None and sample < len(pairs):
        pairs = [pairs[i] for i in sorted(random.Random(split_seed).sample(range(len(pairs)), sample))]
    if eval_data:
        train_pairs, eval_pairs = pairs, _load(eval_data, format, field, skip_invalid)
    else:
        train_pairs, eval_pairs = split_by_prompt(pairs, (1 - eval_frac, eval_frac), split_seed)
    mc = RMConfig(backbone=backbone, template=template, max_length=max_length, prompt_budget=prompt_budget,
                  response_keep=response_keep, lora_r=lora_r, lora_alpha=lora_alpha,
                  lora_dropout=lora_dropout, lora_seed=lora_seed,
                  target_modules=target_modules.split(",") if target_modules else None,
                  head=head, bnrm={"k": bnrm_k, "eta": bnrm_eta} if head == "bnrm" else None, dtype=dtype,
                  freeze_backbone=freeze_backbone,
                  extra={"train_data": data, "eval_data": eval_data, "split_seed": split_seed})
    tc = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum, warmup_ratio=warmup_ratio,
                     weight_decay=weight_decay, max_grad_norm=max_grad_norm, margin=margin, center_coef=center_coef,
                     data_seed=data_seed, group_by_length=group_by_length, mixed_precision=mixed_precision,
                     eval_batch_size=eval_batch_size, checkpoint_every=checkpoint_every, max_steps=max_steps)
    model = RewardModel(mc)
    if rank == 0:
        save_pairs(train_pairs, out / "data" / "train.jsonl")  # the exact split, for `laplace` and `eval`
        save_pairs(eval_pairs, out / "data" / "eval.jsonl")
    procs = f" in {size} processes (global batch {batch_size * size})" if size > 1 else ""
    console.print(f"training on {len(train_pairs)} pairs{procs}, evaluating on {len(eval_pairs)} (prompt-disjoint); "
                  f"splits in {out / 'data'}")
    if freeze_backbone and head == "linear" and mixed_precision == "no":  # one backbone pass, then the head
        from bayesrm.train import train_on_features

        console.print("frozen backbone: training the head on cached features")
        history = train_on_features(model, train_pairs, tc, out, eval_pairs=eval_pairs, cache_dir=feature_cache,
                                    log=console.print)
    else:
        history = train(model, train_pairs, tc, out, eval_pairs=eval_pairs, resume=resume, log=console.print)
    _print_metrics("final", history[-1])
    console.print(f"model saved to {out / 'model'}")


def _fmt(value: float | None, spec: str) -> str:
    """A number formatted with `spec`, or 'n/a' for an undefined (None) one."""
    return "n/a" if value is None else format(value, spec)


def _print_metrics(title: str, row: dict[str, Any]) -> None:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in row.items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(t)


_LA = LaplaceConfig()  # defaults of the options below
_EVAL = EvalConfig()


@app.command("laplace")
@_friendly
def laplace_cmd(
    model_dir: Annotated[Path, typer.Argument(help="trained run (or model) directory")],
    data: Annotated[str | None, typer.Argument(help="the pairs the model was trained on (default: the training "
                                                    "split `train` saved in RUN/data/train.jsonl)")] = None,
    val_data: Annotated[str | None, typer.Option(help="validation pairs (for --tau-method val_nll)")] = None,
    kfac: Annotated[str, typer.Option(help="pair | reduce | expand (Kronecker factorisation of the BT GGN)")] = (
        _LA.kfac),
    subset: Annotated[str | None, typer.Option(help="lora (Laplace-LoRA) | head (last-layer); default lora, or "
                                                    "head for a model without LoRA (a transformers reward "
                                                    "model)")] = None,
    tau_method: Annotated[str, typer.Option(help="marglik | mackay | val_nll | fixed")] = _LA.tau_method,
    prior_structure: Annotated[str, typer.Option(help="global | layerwise")] = _LA.prior_structure,
    prior_precision: Annotated[float, typer.Option(help="initial / fixed τ")] = _LA.prior_precision,
    rank: Annotated[int | None, typer.Option(help="rank of large (≥ --lowrank-threshold) factors")] = _LA.rank,
    lowrank_threshold: int = _LA.lowrank_threshold,
    batch_size: int = _LA.batch_size,
    fit_fraction: Annotated[float, typer.Option(help="accumulate the curvature on this seeded share of the pairs "
                                                     "(sums scaled by n/m; the fit's cost scales with it)")] = (
        _LA.fit_fraction),
    limit: int | None = None,
    format: FormatOpt = DataFormat.AUTO.value,
    field: FieldOpt = None,
    skip_invalid: SkipOpt = False,
) -> None:
    """Fit a post-hoc Laplace-LoRA posterior (KFAC GGN of the BT likelihood) and tune the prior precision.

    The likelihood is the one the run was trained with (margin, centering: read from RUN/train_config.json).
    Under `accelerate launch` / `torchrun` each process accumulates the factors of its share of the pairs (one
    all-reduce sums them); rank 0 tunes τ and saves.
    """
    import torch

    from bayesrm import dist

    proc, world = dist.init_from_launcher()  # (`rank` is the factors' rank option)
    if proc:
        console.quiet = True  # one process reports
    run = RunDir.of(model_dir)
    if not run.has_model:
        raise FileNotFoundError(f"{model_dir}: no trained model here (train one with `bayesrm train`)")
    if data is None:
        if not run.train_split.exists():
            raise FileNotFoundError(f"{model_dir}: no saved training split ({run.train_split}); pass the pairs the "
                                    "model was trained on as DATA")
        data = str(run.train_split)
    pairs = _load(data, format, field, skip_invalid, limit)
    val = _load(val_data, format, field, skip_invalid) if val_data else []
    from bayesrm.laplace import curvature_subsample, fit_laplace
    from bayesrm.model import RewardModel

    device = None
    if world > 1 and torch.cuda.is_available():
        from accelerate import PartialState

        device = PartialState().device  # this rank's GPU
    model = RewardModel.load(run.model_dir, device=device)
    if subset is None:
        subset = Subset.HEAD.value if model.config.seq_cls else _LA.subset
    cfg = LaplaceConfig(subset=subset, kfac=kfac, tau_method=tau_method, prior_structure=prior_structure,
                        prior_precision=prior_precision, rank=rank, lowrank_threshold=lowrank_threshold,
                        batch_size=batch_size, fit_fraction=fit_fraction).for_training(run.train_config())
    with progress_bar("KFAC fit (pairs)", len(dist.shard(curvature_subsample(pairs, fit_fraction))),
                      console) as advance:
        post = fit_laplace(model, pairs, cfg, val_pairs=val, progress=advance)
    if proc == 0:
        post.save(run.posterior_dir)
    dist.barrier()
    taus = sorted(post.tau.values())
    console.print(f"posterior (fitted on {len(pairs)} pairs of {data}) saved to {run.posterior_dir}; "
                  f"τ ({cfg.tau_method}, {cfg.prior_structure}): min {taus[0]:.4g}, median {taus[len(taus) // 2]:.4g}, "
                  f"max {taus[-1]:.4g}; log marginal likelihood {post.log_marginal_likelihood():.2f}")


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
        f"{x:g}" for x in _EVAL.levels),
    n_bins: Annotated[int, typer.Option(help="confidence bins (ECE, MCE, reliability)")] = _EVAL.n_bins,
    n_boot: Annotated[int, typer.Option(help="bootstrap replicates over prompts for CIs")] = _EVAL.n_boot,
    batch_size: int = _EVAL.batch_size,
    limit: int | None = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the headline numbers here")] = None,
    format: FormatOpt = DataFormat.AUTO.value,
    field: FieldOpt = None,
    skip_invalid: SkipOpt = False,
) -> None:
    """Accuracy, NLL, Brier, ECE/MCE, interval coverage, selective prediction and σ's error/OOD AUROC for the MAP
    and the Bayesian predictive (Laplace, BNRM or ensemble), per subset when the data has one."""
    from bayesrm.evaluation import evaluate, render_markdown, summary
    from bayesrm.io import atomic_write_json, check_target, json_text

    try:
        lv = tuple(float(x) for x in levels.split(","))
    except ValueError:
        raise ValueError(f"--levels expects numbers in (0, 1) separated by commas, got {levels!r}") from None
    cfg = EvalConfig(levels=lv, n_bins=n_bins, n_boot=n_boot, batch_size=batch_size)
    check_target(out, want_dir=True)
    if json_out:
        check_target(json_out)
    pairs = _load(data, format, field, skip_invalid, limit)
    ood_pairs = _load(ood, DataFormat.AUTO.value, None, skip_invalid, limit) if ood else []
    report = evaluate(model_dir, pairs, cfg, out, ood_pairs, meta={"data": data, "ood": ood})
    console.print(render_markdown(report))
    seen = report["meta"]["in_sample_fraction"]
    if seen:
        console.print(f"[bold yellow]warning:[/] {seen:.0%} of the pairs in {data} were used to fit the posterior: "
                      "these metrics are in-sample")
    console.print(f"report: {out / 'report.md'}, {out / 'report.json'}; plots: {out / 'reliability.png'}, "
                  f"{out / 'selective.png'}; predictions: {out / 'predictions.jsonl'}")
    row = summary(report)
    if json_out:
        atomic_write_json(json_out, row)
    print(json_text(row, "<stdout>"))


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
    check_target(out)
    fields = (prompt_field, response_field)
    if threads:
        torch.set_num_threads(threads)
    ranked = sh.launcher_rank() if shard is None and num_processes == 1 else None
    if shard is not None:
        i, n = sh.parse_shard(shard)
        sh.score_shard(model_dir, input, out, spec, fields, i, n, batch_size, sh.score_device(device, i), console.print)
    elif ranked is not None:
        sh.score_ranked(model_dir, input, out, spec, fields, *ranked, batch_size, device, console.print)
    elif num_processes > 1:
        sh.score_parallel(model_dir, input, out, spec, fields, num_processes, batch_size, threads, device,
                          console.print)
    else:
        rows = list(sh.score_rows(input, *fields))
        scorer = Scorer.load(model_dir, spec, device=sh.score_device(device, 0), batch_size=batch_size)
        with progress_bar("scoring", len(rows), console) as advance:
            sh.add_scores(scorer, rows, fields, advance)
        write_jsonl(out, rows)
        console.print(f"wrote {len(rows)} scored rows to {out}")


@app.command("standardize")
@_friendly
def standardize_cmd(
    ensemble_dir: Annotated[Path, typer.Argument(help="ensemble directory (manifest.json + member_i/)")],
    reference: Annotated[str, typer.Argument(help="reference responses: rows with prompt and response (e.g. "
                                                  "samples of the policy you will select from), or pairs")],
    prompt_field: str = "prompt",
    response_field: str = "response",
    limit: Annotated[int, typer.Option(help="use at most this many reference responses")] = 1000,
    batch_size: int = 32,
) -> None:
    """Fit and store each member's standardisation statistics (mean, std) on a reference set (ens:/la-ens: specs)."""
    from bayesrm.ensemble import fit_standardization, reference_responses

    first = next(iter_rows(reference), (0, {}))[1]
    if isinstance(first.get("chosen"), str) and isinstance(first.get("rejected"), str):  # pairs: both sides
        prompts, responses = reference_responses(_load(reference, DataFormat.AUTO.value, None, False), limit)
    else:
        from bayesrm.shard import score_rows

        checked = list(score_rows(reference, prompt_field, response_field))[:limit]
        prompts, responses = [r[prompt_field] for r in checked], [r[response_field] for r in checked]
    mean, std = fit_standardization(ensemble_dir, prompts, responses, source=f"{reference} ({len(responses)})",
                                    batch_size=batch_size)
    console.print(f"{ensemble_dir}: standardisation on {len(responses)} responses of {reference}: "
                  f"mean {[round(float(m), 4) for m in mean]}, std {[round(float(s), 4) for s in std]}")


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
    max_queue_s: Annotated[float | None, typer.Option(help="a request not being scored after this long gets 503 "
                                                           "+ Retry-After (default: ServeConfig's)")] = None,
    request_timeout_s: Annotated[float | None, typer.Option(help="a request not answered after this long gets 504 "
                                                                 "+ Retry-After (default: ServeConfig's)")] = None,
    header_timeout_s: Annotated[float | None, typer.Option(help="close connections that have not sent complete "
                                                                "headers after this long (default: ServeConfig's)")
                                ] = None,
) -> None:
    """HTTP scoring server: POST /v1/score {prompt, responses} → reward, std, selection; /health, /metrics."""
    import torch

    from bayesrm.serve import ServeConfig, serve

    if threads:
        torch.set_num_threads(threads)
    limits: dict[str, Any] = {k: v for k, v in (("max_queue_s", max_queue_s), ("request_timeout_s", request_timeout_s),
                                ("header_timeout_s", header_timeout_s)) if v is not None}
    serve(model_dir, ServeConfig(host=host, port=port, spec=spec, max_batch_responses=max_batch,
                                 max_wait_ms=max_wait_ms, max_body_bytes=max_body_bytes, max_responses=max_responses,
                                 max_tokens=max_tokens, api_key_env=api_key_env, batch_size=batch_size,
                                 log_level=log_level, **limits),
          device=device)


import bayesrm.cli_experiments  # noqa: E402 - registers bon, demo, sample, explain, merge, rlhf, overopt
import bayesrm.cli_fast  # noqa: E402, F401 - registers `heads` and `select` on `app`


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
