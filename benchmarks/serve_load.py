"""Load test of `bayesrm serve`: N concurrent clients on localhost, micro-batching vs one request per batch.

Starts two server processes on the same model and spec — `--max-batch 1 --max-wait-ms 0` (each request scored
alone) and micro-batching (`--max-batch B --max-wait-ms W`) — then runs closed-loop clients against them in
alternating rounds of `--duration` seconds (so background load hits both alike; the idle server uses no CPU).
Each client posts one AlpacaEval instruction with `--responses` model outputs, waits for the answer, repeats.
Prints per server: requests/s, responses/s, p50/p99 latency, errors (must be 0), mean micro-batch size (from the
server's /metrics), and the batching gain (throughput ratio).

Without `--model` it trains a throwaway all-MiniLM-L6-v2 LoRA model (a few steps on AlpacaEval pairs, plus a
Laplace posterior when the spec needs one) in a temporary directory.

    python benchmarks/serve_load.py [--clients 8] [--duration 10] [--rounds 2] [--responses 4]
    python benchmarks/serve_load.py --model runs/alpaca --spec la:var:k=1
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "alpaca_eval"


def make_model(root: Path, spec: str, max_length: int) -> Path:
    """A throwaway MiniLM LoRA reward model (2 steps on 16 AlpacaEval pairs; Laplace posterior for la specs)."""
    from bayesrm.data import load_pairs
    from bayesrm.laplace import LaplaceConfig, fit_laplace
    from bayesrm.model import RewardModel, RMConfig
    from bayesrm.objectives import Family, parse_spec
    from bayesrm.run import POSTERIOR_DIR
    from bayesrm.train import TrainConfig, train

    pairs = load_pairs(DATA / "annotations.jsonl.gz", skip_invalid=True, limit=16)
    model = RewardModel(RMConfig(max_length=max_length))
    train(model, pairs, TrainConfig(max_steps=2, batch_size=8, checkpoint_every=0), root / "run", show_progress=False)
    if parse_spec(spec).family is Family.LA:
        fit_laplace(model, pairs, LaplaceConfig(batch_size=8)).save(root / "run" / "model" / POSTERIOR_DIR)
    return root / "run"


def load_requests(responses: int, n: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """Request bodies: an AlpacaEval instruction with `responses` outputs of different models."""
    by_prompt: dict[str, list[str]] = defaultdict(list)
    with gzip.open(DATA / "model_outputs.jsonl.gz", "rt", encoding="utf-8") as f:
        for row in map(json.loads, f):
            if isinstance(row.get("output"), str) and row["output"].strip():
                by_prompt[row["instruction"]].append(row["output"])
    rng = random.Random(seed)
    prompts = sorted(p for p, outs in by_prompt.items() if len(outs) >= responses)
    return [{"prompt": p, "responses": rng.sample(by_prompt[p], responses)} for p in rng.sample(prompts, n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: Path, spec: str, max_batch: int, max_wait_ms: float, threads: int, batch_size: int,
                 log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "bayesrm", "serve", str(model), "--spec", spec, "--port", str(port),
           "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--threads", str(threads),
           "--batch-size", str(batch_size), "--max-tokens", "1000000", "--log-level", "warning"]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


def server_metrics(url: str) -> dict[str, float]:
    from bayesrm.serve import parse_prometheus

    return parse_prometheus(httpx.get(f"{url}/metrics", timeout=10).text)


async def load_phase(url: str, bodies: list[dict[str, Any]], clients: int, duration: float, seed: int
                     ) -> dict[str, Any]:
    """Closed-loop clients for `duration` s; latencies of successful requests, error count, wall seconds."""
    lat: list[float] = []
    stats = {"errors": 0, "responses": 0}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        t0 = time.perf_counter()
        stop = t0 + duration

        async def client(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < stop:
                body = rng.choice(bodies)
                t = time.perf_counter()
                try:
                    ok = (await http.post("/v1/score", json=body)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    lat.append(time.perf_counter() - t)
                    stats["responses"] += len(body["responses"])
                else:
                    stats["errors"] += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return {"latencies": lat, "errors": stats["errors"], "responses": stats["responses"], "wall": wall}


def pct(values: list[float], q: float) -> float:
    from bayesrm.serve import quantile

    return quantile(sorted(values), q)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model or run dir (default: train a throwaway MiniLM model)")
    ap.add_argument("--spec", default="map")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per server per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=3.0, help="untimed seconds per server first")
    ap.add_argument("--responses", type=int, default=4, help="responses per request")
    ap.add_argument("--max-batch", type=int, default=64, help="micro-batching server: responses per batch")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=16, help="forward batch size inside a micro-batch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    ap.add_argument("--max-length", type=int, default=192, help="throwaway model's max tokens")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="serve_load_")
    model = args.model
    if model is None:
        t = time.perf_counter()
        model = make_model(Path(tmp.name), args.spec, args.max_length)
        print(f"trained a throwaway model in {time.perf_counter() - t:.0f} s: {model}")
    bodies = load_requests(args.responses)
    setups = {"batch=1": (1, 0.0), f"micro-batch≤{args.max_batch}": (args.max_batch, args.max_wait_ms)}
    servers = {}
    try:
        for name, (mb, wait) in setups.items():
            log = Path(tmp.name) / f"server_{mb}.log"
            servers[name] = (*start_server(model, args.spec, mb, wait, args.threads, args.batch_size, log), log)
        for proc, url, log in servers.values():
            wait_healthy(proc, url, log)
        print(f"cpus {os.cpu_count()}, load before {loadavg()}; {args.clients} clients × {args.responses} responses "
              f"per request, spec {args.spec}, server threads {args.threads}")
        for _, url, _ in servers.values():
            asyncio.run(load_phase(url, bodies, args.clients, args.warmup, seed=99))
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                url = servers[name][1]
                before = server_metrics(url)
                res = asyncio.run(load_phase(url, bodies, args.clients, args.duration, seed=r))
                after = server_metrics(url)
                res["batches"] = after["bayesrm_batches_total"] - before["bayesrm_batches_total"]
                res["batched_responses"] = after["bayesrm_responses_total"] - before["bayesrm_responses_total"]
                runs[name].append(res)
                print(f"  round {r} {name}: {res['responses'] / res['wall']:.1f} responses/s, load {loadavg()}")
        load_after = loadavg()
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(30)
        tmp.cleanup()

    rows = {}
    for name, rs in runs.items():
        lat = [x for r in rs for x in r["latencies"]]
        wall, resp = sum(r["wall"] for r in rs), sum(r["responses"] for r in rs)
        batches = sum(r["batches"] for r in rs)
        rows[name] = {"requests_per_s": len(lat) / wall, "responses_per_s": resp / wall,
                      "p50_ms": 1000 * pct(lat, 0.5), "p99_ms": 1000 * pct(lat, 0.99),
                      "errors": sum(r["errors"] for r in rs), "requests": len(lat),
                      "mean_batch_responses": sum(r["batched_responses"] for r in rs) / max(batches, 1),
                      "seconds": wall}
    base, micro = rows["batch=1"], rows[next(n for n in rows if n != "batch=1")]
    gain = micro["responses_per_s"] / base["responses_per_s"]
    print("\n| server | req/s | responses/s | p50 ms | p99 ms | errors | requests | mean batch (responses) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, x in rows.items():
        print(f"| {name} | {x['requests_per_s']:.2f} | {x['responses_per_s']:.1f} | {x['p50_ms']:.0f} | "
              f"{x['p99_ms']:.0f} | {x['errors']} | {x['requests']} | {x['mean_batch_responses']:.1f} |")
    print(f"\nbatching gain (responses/s, micro-batch / batch=1): {gain:.2f}×; load after {load_after}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "gain": gain, "load_after": load_after}, indent=2) + "\n")
    if any(x["errors"] for x in rows.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
