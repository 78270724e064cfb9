"""RewardUQ's MLP-head ensemble trained on features handed to it: the worker `heads_vs_rewarduq.py` runs in the
benchmark venv (RewardUQ 0.1.0 needs transformers 4.57 / trl 0.23; see requirements-rewarduq.txt).

    .bench-venv/bin/python benchmarks/rewarduq_heads.py IN.safetensors OUT.safetensors --backbone PATH

IN holds train_chosen, train_rejected, test_chosen, test_rejected (N, d) float32 features from bayesrm's cache. The
RewardUQ trainer gets them through its own `precomputed_features_train` argument, so no backbone pass happens here;
the dataset's texts are placeholders (the trainer tokenises them, the model never reads them when features are
given). OUT gets the members' test rewards `chosen` / `rejected` (M, N) and the training wall/CPU seconds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def _with_chat_template(src: str, dst: str) -> str:
    """A copy of the backbone folder whose tokenizer has a (trivial) chat template and an EOS (RewardUQ needs both)."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tok.eos_token = tok.sep_token  # RewardUQ appends an EOS; MiniLM's tokenizer has none
    tok.save_pretrained(dst)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("inp")
    ap.add_argument("out")
    ap.add_argument("--backbone", required=True, help="local path of the MiniLM weights (only its config is used)")
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="default: TRL RewardConfig's")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from datasets import Dataset
    from rewarduq.methods.mlp_head_ensemble.mlp_head_ensemble_model import (
        MLPHeadEnsembleModel,
        MLPHeadEnsembleModelConfig,
    )
    from rewarduq.methods.mlp_head_ensemble.mlp_head_ensemble_trainer import (
        MLPHeadEnsembleTrainer,
        MLPHeadEnsembleTrainerConfig,
    )
    from safetensors.torch import load_file, save_file
    from transformers import set_seed

    torch.set_num_threads(1)
    set_seed(args.seed)
    t = load_file(args.inp)
    n = t["train_chosen"].shape[0]
    feats = torch.stack([t["train_chosen"], t["train_rejected"]], 1)  # (N, 2, d): RewardUQ's layout
    ds = Dataset.from_dict({"prompt": ["q"] * n, "chosen": ["a"] * n, "rejected": ["b"] * n})
    kw = {"learning_rate": args.lr} if args.lr is not None else {}
    with tempfile.TemporaryDirectory() as tmp:
        backbone = _with_chat_template(args.backbone, os.path.join(tmp, "backbone"))
        model = MLPHeadEnsembleModel(MLPHeadEnsembleModelConfig(
            base_model_name_or_path=backbone, num_heads=args.heads, feature_extraction_pooling_strategy="last"))
        cfg = MLPHeadEnsembleTrainerConfig(
            output_dir=tmp, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
            precompute_features=True, precompute_features_path=os.path.join(tmp, "features"), report_to=[],
            save_strategy="no", eval_strategy="no", logging_strategy="no", seed=args.seed, use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True, **kw)
        trainer = MLPHeadEnsembleTrainer(model=model, args=cfg, train_dataset=ds, processing_class=model.tokenizer,
                                         precomputed_features_train=feats)
        w0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    model.eval()
    with torch.no_grad():
        out = {k: torch.stack([mlp(t[f"test_{k}"]).squeeze(-1) for mlp in model.mlps]).contiguous()  # (M, N)
               for k in ("chosen", "rejected")}
    out["seconds"] = torch.tensor([wall, cpu], dtype=torch.double)
    out["lr"] = torch.tensor([cfg.learning_rate], dtype=torch.double)
    save_file(out, args.out)


if __name__ == "__main__":
    main()
