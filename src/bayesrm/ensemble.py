"""Reward-model ensembles (Coste et al. 2024; Yang et al. 2024 §4 "LA-Ens"): M LoRA members on one backbone.

Members differ in LoRA/head initialisation (`RMConfig.lora_seed`) and data order (`TrainConfig.data_seed`), set
separately. `train_ensemble` trains them into `out_dir/member_i/` (ordinary `train()` run directories) with a
resumable `manifest.json`: one after another, or under `accelerate launch` / `torchrun` one member per process.
`EnsembleRewardModel` loads ONE backbone with M peft adapters named `member_i` and M scalar heads, and scores all
members on shared tokenisation and batches.

BT rewards are defined only up to a shift and a scale per member, so aggregates across members (min, variance,
LA-Ens sums) need each member standardised on a fixed reference set (overoptimisation note §8). The statistics
are computed once (`fit_standardization`; `train_ensemble` does it on the training responses) and stored in the
manifest; `EnsembleRewardModel.standardize` applies them, so every consumer (`Scorer`, hence `score`, `serve`,
TRL, and the BoN experiment) gives the same numbers for the same spec.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, replace
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bayesrm import dist
from bayesrm.batching import scoring_batches
from bayesrm.data import DataError, Pair, pairs_fingerprint
from bayesrm.heads import Head, LinearHead
from bayesrm.integrity import load_tensors, one_line, require_finite, verify_checksums
from bayesrm.io import atomic_write_json
from bayesrm.laplace import LaplacePosterior
from bayesrm.model import (
    ADAPTER_NAME,
    CONFIG_NAME,
    HEAD_NAME,
    INIT_NAME,
    Pooling,
    RewardModel,
    RMConfig,
    is_encoder,
    load_backbone,
    read_config,
)
from bayesrm.objectives import reference_stats, standardize, standardize_var
from bayesrm.run import MANIFEST_NAME, MODEL_DIR, RunDir, find_model_dir
from bayesrm.train import TrainConfig, train

SHARED_FIELDS = ("backbone", "gguf_file", "dtype", "template", "max_length", "pooling", "prompt_budget",
                 "response_keep")  # must match across members


class MemberStatus(str, Enum):
    """Training state of one member in the manifest."""

    PENDING = "pending"  # not started
    RUNNING = "running"  # started; may have a checkpoint to resume from
    DONE = "done"  # final model written to member_i/model


def member_name(i: int) -> str:
    """Directory and adapter name of member i."""
    return f"member_{i}"


# --------------------------------------------------------------------------- training


def _seeds(given: Sequence[int] | None, start: int, members: int, what: str) -> list[int]:
    if given is None:
        return [start + i for i in range(members)]
    if len(given) != members:
        raise ValueError(f"{what}: got {len(given)} seeds for {members} members")
    return [int(s) for s in given]


def _check_resumable(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    """Refuse to resume `old` (a saved manifest) as `new` unless the configs, data and seeds agree; configs are
    compared after filling the defaults of fields added since `old` was written."""
    try:
        old = old | {"model": asdict(RMConfig.from_dict(old["model"])), "train": asdict(TrainConfig(**old["train"]))}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{out}: the existing ensemble's manifest cannot be read ({e}); use a new out_dir") from None
    for key in ("model", "train", "data_sha256"):
        if old.get(key) != new[key]:
            raise ValueError(f"{out}: the existing ensemble was trained with a different '{key}'; "
                             "use a new out_dir or resume=False")
    if len(old["entries"]) > len(new["entries"]):
        raise ValueError(f"{out}: holds {len(old['entries'])} members, more than the {len(new['entries'])} "
                         "requested; pass members ≥ the existing count")
    for a, b in zip(old["entries"], new["entries"], strict=False):
        if (a["lora_seed"], a["data_seed"]) != (b["lora_seed"], b["data_seed"]):
            raise ValueError(f"{out}: {a['name']} was trained with lora_seed={a['lora_seed']}, "
                             f"data_seed={a['data_seed']}, not {b['lora_seed']}, {b['data_seed']}")


def train_ensemble(
    cfg: RMConfig,
    train_cfg: TrainConfig,
    pairs: Sequence[Pair],
    out_dir: str | Path,
    members: int = 5,
    lora_seeds: Sequence[int] | None = None,
    data_seeds: Sequence[int] | None = None,
    eval_pairs: Sequence[Pair] = (),
    resume: bool = True,
    show_progress: bool = True,
    log: Callable[[str], None] | None = None,
    standardize_on_train: bool = True,
) -> list[Path]:
    """Train M members into `out_dir/member_i/`; returns the member run directories.

    In one process the members train one after another. Under P processes (`accelerate launch`, `torchrun`) the
    unfinished members train in waves of P, one member per process (each an ordinary one-process `train()` run,
    so the weights are those of the sequential run); rank 0 writes the manifest after every wave.

    Seeds default to `cfg.lora_seed + i` and `train_cfg.data_seed + i` (`train()` also seeds dropout from the data
    seed, so a rerun reproduces the weights exactly). With `resume=True`, finished members are skipped, an
    interrupted one continues from its checkpoint, and a larger `members` grows the ensemble; a manifest from a
    different model/train config, data or seeds raises ValueError. The manifest is rewritten atomically.
    Afterwards each member's standardisation statistics are fitted on (up to 1,000 of) the training responses,
    unless `standardize_on_train=False` (the caller then calls `save_standardization` on its own reference set).
    """
    if members < 1:
        raise ValueError(f"members must be ≥ 1, got {members}")
    out = Path(out_dir)
    ls = _seeds(lora_seeds, cfg.lora_seed, members, "lora_seeds")
    ds = _seeds(data_seeds, train_cfg.data_seed, members, "data_seeds")
    manifest: dict[str, Any] = {
        "format_version": 1,
        "members": members,
        "model": asdict(cfg),
        "train": asdict(train_cfg),
        "n_train": len(pairs),
        "data_sha256": pairs_fingerprint(pairs),
        "entries": [{"name": member_name(i), "path": member_name(i), "lora_seed": ls[i], "data_seed": ds[i],
                     "status": MemberStatus.PENDING.value} for i in range(members)],
    }
    path = out / MANIFEST_NAME
    refused = None
    if dist.is_main():
        try:
            if resume and path.exists():
                old = json.loads(path.read_text())
                _check_resumable(old, manifest, out)
                for i, e in enumerate(old["entries"]):
                    manifest["entries"][i] = e
                done = sum(e["status"] == MemberStatus.DONE.value for e in manifest["entries"])
                if log is not None:
                    log(f"resuming from {path}: {done} of {members} members done")
            elif log is not None:
                log(f"starting fresh: no ensemble manifest in {out}" if resume else
                    f"starting fresh (resume not requested) in {out}")
            atomic_write_json(path, manifest)
        except ValueError as e:
            refused = str(e)
    manifest, refused = dist.broadcast((manifest, refused))  # every rank continues, or every rank raises
    if refused is not None:
        raise ValueError(refused)
    entries = manifest["entries"]
    dirs = [out / e["path"] for e in entries]
    todo = []
    for i, entry in enumerate(entries):
        if resume and entry["status"] == MemberStatus.DONE.value and (dirs[i] / MODEL_DIR / CONFIG_NAME).exists():
            if log is not None and dist.is_main():
                log(f"{entry['name']}: done, skipped")
        else:
            todo.append(i)
    rank, size = dist.world()
    for start in range(0, len(todo), size):
        wave = todo[start:start + size]  # member wave[r] trains on rank r
        for i in wave:
            entries[i]["status"] = MemberStatus.RUNNING.value
        if dist.is_main():
            atomic_write_json(path, manifest)
        final: dict[str, Any] | None = None
        if rank < len(wave):
            i = wave[rank]
            entry = entries[i]
            mc = replace(cfg, lora_seed=entry["lora_seed"],
                         target_modules=None if cfg.target_modules is None else list(cfg.target_modules),
                         extra=dict(cfg.extra) | {"ensemble_member": i, "data_seed": entry["data_seed"]})
            tc = replace(train_cfg, data_seed=entry["data_seed"])
            if log is not None:
                where = f" on rank {rank}" if size > 1 else ""
                log(f"{entry['name']}: training{where} (lora_seed={mc.lora_seed}, data_seed={tc.data_seed})")
            with dist.solo() if size > 1 else nullcontext():
                history = train(RewardModel(mc), pairs, tc, dirs[i], eval_pairs=eval_pairs, resume=resume,
                                show_progress=show_progress and size == 1, log=log)
            final = history[-1] if history else {}
        for i, metrics in zip(wave, dist.gather(final), strict=False):
            entries[i]["status"] = MemberStatus.DONE.value
            entries[i]["final_metrics"] = metrics
        if dist.is_main():
            atomic_write_json(path, manifest)
    if standardize_on_train and STANDARDIZATION_KEY not in manifest:
        if dist.is_main():  # scores every member once on the reference responses, then writes the manifest
            prompts, responses = reference_responses(pairs)
            fit_standardization(out, prompts, responses, source=f"training responses ({len(responses)})")
        dist.barrier()
    return dirs


STANDARDIZATION_KEY = "standardization"


def reference_responses(pairs: Sequence[Pair], limit: int = 1000, seed: int = 0) -> tuple[list[str], list[str]]:
    """Distinct (prompt, response) of the pairs' chosen and rejected sides, a seeded sample of at most `limit`."""
    import random

    seen = dict.fromkeys((p.prompt, r) for p in pairs for r in (p.chosen, p.rejected))
    items = list(seen)
    if len(items) > limit:
        items = random.Random(seed).sample(items, limit)
    return [a for a, _ in items], [b for _, b in items]


def save_standardization(ens_dir: str | Path, mean: Sequence[float], std: Sequence[float], source: str) -> None:
    """Record per-member reference mean and std (ddof 0) in the ensemble's manifest (overopt. note §8)."""
    path = RunDir.of(ens_dir).manifest
    if not path.exists():
        raise FileNotFoundError(f"{ens_dir}: no {MANIFEST_NAME}; standardisation is stored in an ensemble manifest")
    if any(not (s > 0) for s in std):
        raise ValueError(f"{ens_dir}: a member's reward has zero spread on the reference set ({source}); "
                         "choose a reference set with distinct responses")
    manifest = json.loads(path.read_text())
    if len(mean) != len(manifest["entries"]) or len(std) != len(mean):
        raise ValueError(f"{path}: {len(mean)} standardisation statistics for {len(manifest['entries'])} members")
    manifest[STANDARDIZATION_KEY] = {"mean": [float(m) for m in mean], "std": [float(s) for s in std],
                                     "source": source}
    atomic_write_json(path, manifest)


def fit_standardization(ens_dir: str | Path, prompts: Sequence[str], responses: Sequence[str], source: str,
                        batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Score the reference responses with every member and store their per-member mean and std (ddof 0)."""
    ens = EnsembleRewardModel.load(ens_dir)
    mean, std = reference_stats(ens.score_members(prompts, responses, batch_size).double())  # (M,), (M,)
    save_standardization(ens_dir, mean.tolist(), std.tolist(), source)
    return mean, std


# --------------------------------------------------------------------------- loading and scoring



def _member_dirs(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Member directories from an ensemble dir (manifest or member_* folders) or an explicit list."""
    if not isinstance(source, (str, Path)):
        dirs = [Path(s) for s in source]
    else:
        root = Path(source)
        if (root / MANIFEST_NAME).exists():
            entries = json.loads((root / MANIFEST_NAME).read_text())["entries"]
            unfinished = [e["name"] for e in entries if e["status"] != MemberStatus.DONE.value]
            if unfinished:
                raise ValueError(f"{root}: members {unfinished} are not trained; rerun train_ensemble to finish")
            dirs = [root / e["path"] for e in entries]
        elif (find_model_dir(root) / CONFIG_NAME).exists():
            dirs = [root]
        else:
            found = [(int(m.group(1)), d) for d in root.glob("member_*")
                     if (m := re.fullmatch(r"member_(\d+)", d.name))]
            dirs = [d for _, d in sorted(found)]
    if not dirs:
        raise FileNotFoundError(f"{source}: no ensemble members (manifest.json, member_* dirs or a model dir)")
    for d in dirs:
        if not (find_model_dir(d) / CONFIG_NAME).exists():
            raise FileNotFoundError(f"{d}: not a bayesrm model directory (no {CONFIG_NAME})")
    return dirs


def _rename_adapter(key: str, adapter: str) -> str:
    """`….lora_A.<any>.weight` → `….lora_A.<adapter>.weight` (peft keys carry the adapter name)."""
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", rf".\1.{adapter}.weight", key)


def _posterior_for(post: LaplacePosterior, adapter: str) -> LaplacePosterior:
    """The same posterior with block names of adapter `adapter` (a single model's adapter is 'default')."""
    blocks = {_rename_adapter(k, adapter): b for k, b in post.blocks.items()}
    out = LaplacePosterior(blocks, post.cfg, post.n_data, post.log_lik)
    out.tau = {_rename_adapter(k, adapter): t for k, t in post.tau.items()}
    out.head, out.source = post.head, post.source
    out.fitted_pairs, out.data_fingerprint = post.fitted_pairs, post.data_fingerprint
    return out


class _MemberView(RewardModel):
    """Member `adapter` of an ensemble as a RewardModel sharing the ensemble's backbone (no copy)."""

    def __init__(self, config: RMConfig, backbone: Any, head: nn.Linear, tokenizer: Any, encoder: bool,
                 adapter: str, lora_init: dict[str, torch.Tensor]) -> None:
        nn.Module.__init__(self)  # skip RewardModel.__init__: the backbone and head already exist
        self.config = config
        self.tokenizer = tokenizer
        self.encoder = encoder
        pooling = Pooling(config.pooling)  # resolved as in RewardModel.__init__
        self.pooling = (Pooling.FIRST if encoder else Pooling.LAST) if pooling is Pooling.AUTO else pooling
        self.backbone = backbone
        self.head = head
        self.adapter = adapter
        self.lora_init = lora_init

    def activate(self) -> None:
        """Make this member's adapter the active (and only trainable) one, as Laplace hooks expect."""
        self.backbone.set_adapter(self.adapter)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.backbone.active_adapter != self.adapter:
            self.activate()
        return super().forward(input_ids, attention_mask)


class EnsembleRewardModel(nn.Module):
    """M reward models as one backbone + M LoRA adapters (`member_i`) + M scalar heads."""

    def __init__(self, configs: Sequence[RMConfig], backbone: nn.Module, heads: nn.ModuleDict, tokenizer: Any,
                 lora_inits: Sequence[dict[str, torch.Tensor]] = (), member_dirs: Sequence[Path] = ()) -> None:
        super().__init__()
        if len(configs) != len(heads) or not configs:
            raise ValueError(f"{len(configs)} configs for {len(heads)} heads")
        self.configs = list(configs)
        self.config = self.configs[0]  # the shared fields (backbone, template, max_length, pooling) are equal
        self.tokenizer = tokenizer
        self.backbone = backbone  # peft model with one adapter per member
        self.heads = heads  # member_i → nn.Linear(d, 1)
        self.names = list(heads.keys())
        self.member_dirs = list(member_dirs)
        self.ref_mean: torch.Tensor | None = None  # (M,) per-member standardisation (None: not fitted)
        self.ref_std: torch.Tensor | None = None
        base = backbone.get_base_model()  # type: ignore[operator]
        self.encoder = is_encoder(base)
        inits = list(lora_inits) or [{} for _ in self.names]
        self._views = [_MemberView(c, backbone, heads[n], tokenizer, self.encoder, n, init)  # type: ignore[arg-type]
                       for c, n, init in zip(self.configs, self.names, inits, strict=True)]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def device(self) -> torch.device:
        return next(self.heads.parameters()).device

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @classmethod
    def load(cls, source: str | Path | Sequence[str | Path], device: str | torch.device | None = None
             ) -> EnsembleRewardModel:
        """Load an ensemble dir (manifest.json or member_* dirs) or a list of member dirs onto one backbone."""
        from peft import PeftModel

        dirs = _member_dirs(source)
        model_dirs = [find_model_dir(d) for d in dirs]
        configs = []
        for md in model_dirs:
            cfg, meta = read_config(md)
            verify_checksums(md, meta, md / CONFIG_NAME, required=(ADAPTER_NAME, HEAD_NAME))
            configs.append(cfg)
        if any(c.head != Head.LINEAR.value for c in configs):
            raise ValueError(f"{source}: ensembles of '{configs[0].head}' heads are not supported (members share one "
                             "backbone with linear BT heads); score BNRM members one at a time")
        for f in SHARED_FIELDS:
            vals = [getattr(c, f) for c in configs]
            if any(v != vals[0] for v in vals):
                raise ValueError(f"ensemble members differ in '{f}' ({vals}); they must share one backbone setup")
        names = [member_name(i) for i in range(len(dirs))]
        base, tok = load_backbone(configs[0])
        peft: Any = base
        for name, md in zip(names, model_dirs, strict=True):
            try:
                if peft is base:
                    peft = PeftModel.from_pretrained(base, str(md), adapter_name=name)
                else:
                    peft.load_adapter(str(md), adapter_name=name)
            except Exception as e:  # peft raises RuntimeError (size mismatch), SafetensorError, OSError, ValueError
                raise DataError(f"adapter does not load: {one_line(e)}", file=str(md / ADAPTER_NAME)) from None
        hidden = int(base.config.hidden_size)  # type: ignore[union-attr, arg-type]
        heads = nn.ModuleDict({n: LinearHead(hidden) for n in names})
        inits = []
        for name, md in zip(names, model_dirs, strict=True):
            head = load_tensors(md / HEAD_NAME)
            require_finite(head, md / HEAD_NAME)
            try:
                heads[name].load_state_dict(head)
            except RuntimeError as e:
                raise DataError(f"does not fit a linear head: {one_line(e)}", file=str(md / HEAD_NAME)) from None
            raw = load_tensors(md / INIT_NAME) if (md / INIT_NAME).exists() else {}
            inits.append({_rename_adapter(k, name): v for k, v in raw.items()})
        heads.requires_grad_(False)
        model = cls(configs, peft, heads, tok, inits, dirs)
        manifest = RunDir.of(source).manifest if isinstance(source, (str, Path)) else None
        if manifest is not None and manifest.exists():
            stats = json.loads(manifest.read_text()).get(STANDARDIZATION_KEY)
            if stats is not None:
                model.ref_mean = torch.tensor(stats["mean"], dtype=torch.double)
                model.ref_std = torch.tensor(stats["std"], dtype=torch.double)
        model.eval()
        if device is not None:
            model.to(device)
        return model

    def standardize(self, means: torch.Tensor, variances: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Members' rewards (M, N) as z-scores on the reference set, and variances scaled alike (note §8)."""
        if self.ref_mean is None or self.ref_std is None:
            src = self.member_dirs[0].parent if self.member_dirs else "this ensemble"
            raise ValueError(f"{src}: no per-member standardisation statistics in its {MANIFEST_NAME}; ensemble "
                             f"specs need them: run `bayesrm standardize {src} REFERENCE.jsonl`")
        z = standardize(means.double(), self.ref_mean, self.ref_std)
        return z, None if variances is None else standardize_var(variances.double(), self.ref_std)

    def member(self, i: int) -> RewardModel:
        """Member i as a RewardModel that shares this ensemble's weights; activates its adapter."""
        view = self._views[i]
        view.activate()
        return view

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        """Token ids per (prompt, response), shared by all members."""
        return self._views[0].encode(prompts, responses)  # the members share template and truncation

    @torch.no_grad()
    def score_members(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32,
                      progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """MAP rewards of every member, (M, N) in input order: one tokenisation, one batching, adapters switched."""
        was_training = self.training
        self.eval()
        ids = self.encode(prompts, responses)
        out = torch.empty(len(self), len(ids))  # (M, N)
        for idx, x, m in scoring_batches(ids, batch_size, self.pad_id, self.device):  # (B, T)
            for j, view in enumerate(self._views):
                out[j, idx] = view(x, m).float().cpu()
            if progress is not None:
                progress(len(idx))
        self.train(was_training)
        return out

    def load_posteriors(self) -> list[LaplacePosterior]:
        """Each member's saved posterior (member_i/laplace or member_i/model/laplace)."""
        posts = []
        for d in self.member_dirs:
            posts.append(LaplacePosterior.load(RunDir.of(d).require_posterior()))
        if len(posts) != len(self):
            raise ValueError("this ensemble was built without member directories; pass the posteriors")
        return posts

    def _per_member(self, posts: Sequence[LaplacePosterior],
                    fn: Callable[[LaplacePosterior, RewardModel], tuple[torch.Tensor, torch.Tensor]]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """fn(member's renamed and checked posterior, member view) for every member, stacked to (M, ·) each."""
        if len(posts) != len(self):
            raise ValueError(f"{len(posts)} posteriors for {len(self)} members")
        means, variances = [], []
        for i, (name, post) in enumerate(zip(self.names, posts, strict=True)):
            view = self.member(i)
            renamed = _posterior_for(post, name)
            renamed.check_matches(view)
            mu, var = fn(renamed, view)
            means.append(mu)
            variances.append(var)
        self.backbone.set_adapter(self.names[0], inference_mode=True)  # type: ignore[operator]
        return torch.stack(means), torch.stack(variances)

    def predict_members(self, posteriors: Sequence[LaplacePosterior | str | Path] | None, prompts: Sequence[str],
                        responses: Sequence[str], batch_size: int = 16,
                        progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Linearised Laplace (means (M, N), variances (M, N)), one posterior per member (None: load them).

        Posteriors fitted on a member's own single-adapter RewardModel (adapter 'default') are renamed to the
        member's adapter and checked against its weights; each member runs `LaplacePosterior.predict_ids` on a
        view sharing this backbone, on inputs tokenised once for all members.
        """
        posts = self.load_posteriors() if posteriors is None else [
            p if isinstance(p, LaplacePosterior) else LaplacePosterior.load(p) for p in posteriors]
        ids = self.encode(prompts, responses)
        return self._per_member(posts, lambda post, view: post.predict_ids(view, ids, batch_size, progress))

    def predict_member_pairs(self, posteriors: Sequence[LaplacePosterior], pairs: Sequence[Pair],
                             batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's Laplace (μ_Δ, Var(Δ)) per pair with the joint pair Jacobian, (M, P) each."""
        return self._per_member(posteriors, lambda post, view: post.predict_pairs(view, pairs, batch_size))
