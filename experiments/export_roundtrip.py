"""Issue 15 item 5, checked on a real run: bayesrm's rewards against the exported model's, through plain
transformers (merged folder) and peft (adapter) with the README's input recipe, on every response of a pair file.

    python experiments/export_roundtrip.py runs/eval_example runs/eval_example/export runs/eval_example/data/eval.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bayesrm.data import load_pairs
    from bayesrm.export import ADAPTER_DIR, FORMAT_FILE, hf_rewards, recipe_ids
    from bayesrm.model import RewardModel, resolve_backbone

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run", type=Path, help="the bayesrm run that was exported")
    ap.add_argument("export", type=Path, help="the `bayesrm export` output folder")
    ap.add_argument("pairs", help="pairs whose chosen and rejected responses are scored")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    pairs = load_pairs(args.pairs)
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    model = RewardModel.load(args.run)
    reference = model.score(prompts, responses)  # (2P,)
    fmt = json.loads((args.export / FORMAT_FILE).read_text())
    pad = int(json.loads((args.export / "bayesrm_export.json").read_text())["pad_token_id"])
    tok = AutoTokenizer.from_pretrained(str(args.export))
    ids = [recipe_ids(tok, fmt, p, r) for p, r in zip(prompts, responses, strict=True)]
    merged = AutoModelForSequenceClassification.from_pretrained(str(args.export)).eval()
    base = AutoModelForSequenceClassification.from_pretrained(resolve_backbone(model.config.backbone), num_labels=1,
                                                              pad_token_id=pad)
    adapter = PeftModel.from_pretrained(base, str(args.export / ADAPTER_DIR)).eval()
    out: dict[str, float | int] = {"responses": len(ids), "truncated": sum(len(x) == fmt["max_length"] for x in ids),
                                   "ids_equal_bayesrm": int(ids == model.encode(prompts, responses)),
                                   "reward_abs_max": float(reference.abs().max())}
    for name, hf in (("merged", merged), ("adapter", adapter)):
        got = torch.cat([hf_rewards(hf, ids[i:i + args.batch_size], pad) for i in range(0, len(ids), args.batch_size)])
        out[f"{name}_max_abs_diff"] = float((got - reference).abs().max())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
