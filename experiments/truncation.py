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


def prompt_kept(model_dir: Path, prompts: list[str], responses: list[str]) -> tuple[float, float]:
    """Share of responses whose input keeps no prompt token, and under a quarter of them, after truncation."""
    from transformers import AutoTokenizer

    from bayesrm.model import RMConfig, resolve_backbone
    from bayesrm.run import RunDir
    from bayesrm.templates import render, special_wrap, truncate

    cfg = RMConfig.from_dict(json.loads((RunDir.of(model_dir).model_dir / "bayesrm.json").read_text()))
    tok = AutoTokenizer.from_pretrained(resolve_backbone(cfg.backbone))
    head, tail = special_wrap(tok)
    budget = cfg.max_length - len(head) - len(tail)
    keep_end = cfg.response_keep == "end"  # MiniLM pools the first token: auto keeps the start
    none = quarter = 0
    for p, r in zip(prompts, responses, strict=True):
        pre, res = render(cfg.template, p, r, tok)
        n_pre, n_res = (len(tok(t, add_special_tokens=False)["input_ids"]) for t in (pre, res))
        n_after = len(tok(pre[pre.rindex(p) + len(p):], add_special_tokens=False)["input_ids"])  # template tail
        n_prompt = len(tok(p, add_special_tokens=False)["input_ids"])
        marked = truncate([-1] * n_pre, [1] * n_res, budget, int(cfg.prompt_budget * budget), keep_end)
        kept_prompt = max(0, marked.count(-1) - n_after)  # the prefix is cut from the left: its tail survives first
        none += kept_prompt == 0
        quarter += kept_prompt < 0.25 * n_prompt
    return none / len(prompts), quarter / len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="runs/truncation")
    ap.add_argument("--only", choices=list(range(len(VARIANTS))), type=int, default=None)
    ap.add_argument("--report", action="store_true", help="only recompute the truncation shares and the table")
    args = ap.parse_args()
    out = Path(args.out)
    rows = {}
    for i, (name, kw) in enumerate(VARIANTS.items()):
        if args.only is not None and i != args.only:
            continue
        run = out / f"v{i}"
        if args.report:
            rows[name] = json.loads((out / f"v{i}.json").read_text())
            val = load_pairs(run / "data" / "val.jsonl")
            none, quarter = prompt_kept(run / "proxy" / "member_0", [q.prompt for q in val], [q.chosen for q in val])
            rows[name] |= {"val_no_prompt_token": none, "val_under_quarter_prompt": quarter}
            continue
        cfg = demo_config(args.data_dir)
        cfg = replace(cfg, model=replace(cfg.model, **kw))
        res = run_bon(cfg, run)
        member = run / "proxy" / "member_0"
        model = RewardModel.load(member)
        post = LaplacePosterior.load(member)
        val = load_pairs(run / "data" / "val.jsonl")
        ev = pair_eval(model, val, post)
        sens = measure_prompt_sensitivity(lambda p, r, m=model, q=post: q.predict(m, p, r), [q.prompt for q in val],
                                          [q.chosen for q in val])
        none, quarter = prompt_kept(member, [q.prompt for q in val], [q.chosen for q in val])
        gold = {c["name"]: (c["gold"][-1], c["gold_lo"][-1], c["gold_hi"][-1]) for c in res["curves"]}
        rows[name] = {"val_accuracy": ev["map_accuracy"], "val_nll_map": ev["map_nll"], "val_nll_la": ev["la_nll"],
                      "prompt_sensitivity": sens, "val_no_prompt_token": none, "val_under_quarter_prompt": quarter,
                      "gold_at_max_n": gold, "kl_at_max_n": res["curves"][0]["kl"][-1]}
        atomic_write_json(out / f"v{i}.json", rows[name])
    if args.only is not None:
        return
    lines = ["| variant | val acc | P(own > swapped) | ties | σ AUROC (swap) | no prompt token | < ¼ of prompt | "
             "gold n=max: map | la:std:k=1 | la:var:k=1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        s, g = r["prompt_sensitivity"], r["gold_at_max_n"]
        cells = [f"{g[m][0]:.3f} [{g[m][1]:.3f}, {g[m][2]:.3f}]" if m in g else "–"
                 for m in ("map", "la:std:k=1", "la:var:k=1")]
        lines.append(f"| {name} | {r['val_accuracy']:.3f} | {s['own_prompt_higher']:.3f} | {s['ties']:.3f} | "
                     f"{s.get('sigma_auroc_swapped', float('nan')):.3f} | {r['val_no_prompt_token']:.2f} | "
                     f"{r['val_under_quarter_prompt']:.2f} | "
                     + " | ".join(cells) + " |")
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "results.json", rows)
    print("\n".join(lines))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
