"""Issue 18, before/after: the demo proxy trained with the old truncation (prompt cut first) and with the prompt
budget, on the same data and seeds. Reports in-domain accuracy, prompt sensitivity, σ AUROC for swapped prompts,
how much of the prompt survives truncation, and the demo's BoN gold at the largest n.

    python experiments/truncation.py --data-dir ../shared/data --out runs/truncation   (resumable; ~1 h on 2 CPUs)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from bayesrm.data import load_pairs
from bayesrm.experiment import demo_config, pair_eval, run_bon
from bayesrm.io import atomic_write_json, atomic_write_text
from bayesrm.laplace import LaplacePosterior
from bayesrm.model import RewardModel
from bayesrm.sensitivity import measure_prompt_sensitivity

VARIANTS = {"before (prompt cut first)": {"prompt_budget": 0.0, "response_keep": "end"},
            "after (prompt budget 0.25)": {"prompt_budget": 0.25, "response_keep": "auto"}}


def prompt_kept(model: RewardModel, prompts: list[str], responses: list[str]) -> tuple[float, float]:
    """Share of responses that keep no prompt token, and that keep under a quarter of it, after truncation."""
    ids = model.encode(prompts, responses)  # the model's own truncation
    none = quarter = 0
    for p, x in zip(prompts, ids, strict=True):
        p_ids = model.tokenizer(p, add_special_tokens=False)["input_ids"]
        kept = sum(1 for t in set(p_ids) if t in set(x)) / max(len(set(p_ids)), 1)
        none += kept == 0
        quarter += kept < 0.25
    return none / len(ids), quarter / len(ids)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="runs/truncation")
    ap.add_argument("--only", choices=list(range(len(VARIANTS))), type=int, default=None)
    args = ap.parse_args()
    out = Path(args.out)
    rows = {}
    for i, (name, kw) in enumerate(VARIANTS.items()):
        if args.only is not None and i != args.only:
            continue
        cfg = demo_config(args.data_dir)
        cfg = replace(cfg, model=replace(cfg.model, **kw))
        run = out / f"v{i}"
        res = run_bon(cfg, run)
        member = run / "proxy" / "member_0"
        model = RewardModel.load(member)
        post = LaplacePosterior.load(member)
        val = load_pairs(run / "data" / "val.jsonl")
        ev = pair_eval(model, val, post)
        sens = measure_prompt_sensitivity(lambda p, r, m=model, q=post: q.predict(m, p, r), [q.prompt for q in val],
                                          [q.chosen for q in val])
        none, quarter = prompt_kept(model, [q.prompt for q in val], [q.chosen for q in val])
        gold = {c["name"]: (c["gold"][-1], c["gold_lo"][-1], c["gold_hi"][-1]) for c in res["curves"]}
        rows[name] = {"val_accuracy": ev["map_accuracy"], "val_nll_map": ev["map_nll"], "val_nll_la": ev["la_nll"],
                      "prompt_sensitivity": sens, "val_no_prompt_token": none, "val_under_quarter_prompt": quarter,
                      "gold_at_max_n": gold, "kl_at_max_n": res["curves"][0]["kl"][-1]}
        atomic_write_json(out / f"v{i}.json", rows[name])
    if args.only is not None:
        return
    lines = ["| variant | val acc | P(own > swapped) | ties | σ AUROC (swap) | no prompt token | "
             "gold n=max: map | la:std:k=1 | la:var:k=1 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        s, g = r["prompt_sensitivity"], r["gold_at_max_n"]
        cells = [f"{g[m][0]:.3f} [{g[m][1]:.3f}, {g[m][2]:.3f}]" if m in g else "–"
                 for m in ("map", "la:std:k=1", "la:var:k=1")]
        lines.append(f"| {name} | {r['val_accuracy']:.3f} | {s['own_prompt_higher']:.3f} | {s['ties']:.3f} | "
                     f"{s.get('sigma_auroc_swapped', float('nan')):.3f} | {r['val_no_prompt_token']:.2f} | "
                     + " | ".join(cells) + " |")
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "results.json", rows)
    print("\n".join(lines))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
