"""Sharded scoring speed-up: `bayesrm score` with 1 process × 1 thread, 1 process × 2 threads, 2 processes × 1 thread.

Writes `--rows` AlpacaEval (instruction, output) rows to a temporary jsonl and scores them with each setup as a
separate `python -m bayesrm score` run, in rotated order over `--rounds` rounds (so background load hits all of them
alike). Times are end to end (start-up, model load, scoring, merge) — what a user waits — and the CPU seconds of
all processes of the run. All setups must give the same rewards (checked). A 2-row run of the 1 × 1 setup measures
the fixed start-up cost, to show the scoring-only speed-up as well.

Without `--model` it trains a throwaway all-MiniLM-L6-v2 LoRA model (see serve_load.py) in a temporary directory.

    python benchmarks/score_sharded.py [--rows 256] [--rounds 2] [--spec map]
    python benchmarks/score_sharded.py --model runs/alpaca --spec la:var:k=1
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import DATA, loadavg, make_model

SETUPS = {"1 proc × 1 thread": (1, 1), "1 proc × 2 threads": (1, 2), "2 procs × 1 thread": (2, 1)}


def write_input(path: Path, n: int) -> None:
    """n (instruction, output) rows spread evenly over the AlpacaEval outputs."""
    with gzip.open(DATA / "model_outputs.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [r for r in map(json.loads, f) if isinstance(r.get("output"), str) and r["output"].strip()]
    picked = rows[:: max(1, len(rows) // n)][:n]
    path.write_text("".join(json.dumps({"id": i, "prompt": r["instruction"], "response": r["output"]}) + "\n"
                            for i, r in enumerate(picked)))


def run_score(model: Path, inp: Path, out: Path, spec: str, procs: int, threads: int, batch_size: int
              ) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the run's processes) of one `bayesrm score` run."""
    cmd = [sys.executable, "-m", "bayesrm", "score", str(model), str(inp), "--out", str(out), "--spec", spec,
           "--threads", str(threads), "--batch-size", str(batch_size), "--device", "cpu"]
    if procs > 1:
        cmd += ["--num-processes", str(procs)]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return wall, (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model or run dir (default: train a throwaway MiniLM model)")
    ap.add_argument("--spec", default="map")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=192, help="throwaway model's max tokens")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="score_sharded_") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model
        if model is None:
            t = time.perf_counter()
            model = make_model(tmp, args.spec, args.max_length)
            print(f"trained a throwaway model in {time.perf_counter() - t:.0f} s: {model}")
        inp, tiny = tmp / "in.jsonl", tmp / "tiny.jsonl"
        write_input(inp, args.rows)
        write_input(tiny, 2)
        print(f"cpus {os.cpu_count()}, load before {loadavg()}; {args.rows} rows, spec {args.spec}")
        startup = [run_score(model, tiny, tmp / "tiny_out.jsonl", args.spec, 1, 1, args.batch_size)[0]
                   for _ in range(args.rounds)]
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in SETUPS}
        rewards: dict[str, list[float]] = {}
        names = list(SETUPS)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                out = tmp / f"out_{SETUPS[name][0]}_{SETUPS[name][1]}.jsonl"
                wall, cpu = run_score(model, inp, out, args.spec, *SETUPS[name], args.batch_size)
                times[name].append((wall, cpu))
                rewards[name] = [json.loads(x)["reward"] for x in out.read_text().splitlines()]
                print(f"  round {r} {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, load {loadavg()}")
        load_after = loadavg()

    ref = rewards[names[0]]
    for name, rw in rewards.items():
        assert len(rw) == args.rows and max(abs(a - b) for a, b in zip(rw, ref, strict=True)) < 1e-4, name
    start = statistics.median(startup)
    base = statistics.median(w for w, _ in times[names[0]])
    rows = {}
    print(f"\nstart-up + model load (2-row run, median): {start:.1f} s")
    print("| setup | wall s (median) | CPU s | rows/s | speed-up | scoring-only s | scoring-only speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        wall, cpu = statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts)
        rows[name] = {"wall_s": wall, "cpu_s": cpu, "rows_per_s": args.rows / wall, "speedup": base / wall,
                      "scoring_s": wall - start, "scoring_speedup": (base - start) / max(wall - start, 1e-9)}
        x = rows[name]
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {x['rows_per_s']:.1f} | {x['speedup']:.2f}× | "
              f"{x['scoring_s']:.1f} | {x['scoring_speedup']:.2f}× |")
    print(f"\nrewards agree across setups (max |Δ| < 1e-4); load after {load_after}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "startup_s": start,
                                         "rows": rows, "load_after": load_after}, indent=2) + "\n")


if __name__ == "__main__":
    main()
