"""Rebuild the Quickstart files in examples/ from ../shared/data (selection rules in examples/LICENSES.md).

    python examples/build_examples.py [DATA_DIR]     # default ../shared/data; overwrites examples/*.jsonl
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

JUDGE = "weighted_alpaca_eval_gpt4_turbo"
MAX_CHARS = 400  # judged outputs longer than this are left out (small files; 128 tokens keep most of each)
SKIP = ("example", "gpt4_1106_preview")  # the adversarial null model, and the reference judged against itself


def main(data: Path, out: Path) -> None:
    by_prompt: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    order: list[str] = []
    ref: dict[str, str] = {}
    with gzip.open(data / "alpaca_eval" / "annotations.jsonl.gz", "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            if r["annotator"] != JUDGE or r["preference"] is None:
                continue
            p = r["instruction"]
            if p not in ref:
                order.append(p)
            ref[p] = r["output_1"]
            o = r["output_2"]
            if isinstance(o, str) and o.strip() and len(o) <= MAX_CHARS and r["generator_2"] not in SKIP:
                by_prompt[p].append((i, r))
    # prompts in file order with a short prompt and reference and at least 8 short judged outputs
    good = [p for p in order if len(p) <= 200 and len(ref[p]) <= 600 and len(by_prompt[p]) >= 8]
    train_p, test_p, pool_p = good[:16], good[16:24], good[24:48]

    def pairs_for(p: str, k: int) -> list[dict]:
        """k pairs reference vs judged output with the clearest decisions; chosen is the judge's winner."""
        rows = sorted(by_prompt[p], key=lambda t: -abs(float(t[1]["preference"]) - 1.5))[:k]
        out = []
        for i, r in rows:
            win2 = float(r["preference"]) > 1.5
            out.append({"prompt": p, "chosen": r["output_2"] if win2 else r["output_1"],
                        "rejected": r["output_1"] if win2 else r["output_2"], "id": f"alpaca_eval:{i}"})
        return out

    def write(name: str, rows: list[dict]) -> None:
        with open(out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    write("pairs.jsonl", [x for p in train_p for x in pairs_for(p, 3)])
    write("test_pairs.jsonl", [x for p in test_p for x in pairs_for(p, 2)])
    write("pool.jsonl", [{"prompt": p, "response": r["output_2"], "gold": round(float(r["preference"]) - 1.0, 6),
                          "generator": r["generator_2"]} for p in pool_p for _, r in by_prompt[p][:8]])
    write("responses.jsonl", [{"prompt": p, "response": r["output_2"], "generator": r["generator_2"]}
                              for p in test_p for _, r in by_prompt[p][:2]])
    with gzip.open(data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        write("hh_pairs.jsonl", [json.loads(line) for _, line in zip(range(24), f, strict=False)])


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"), Path(__file__).resolve().parent)
