"""Ensemble scoring cost: one RewardModel vs the multi-adapter EnsembleRewardModel vs M separate RewardModels.

Saves M freshly initialised members of the embedded backbone (all-MiniLM-L6-v2; LoRA B and heads random, seeds
0..M−1) to a temporary directory. Memory: one subprocess per setup loads it and scores a few batches, then reports
peak RSS (`resource.getrusage` ru_maxrss), PSS/USS (psutil) and the bytes of the unique parameter/buffer tensors
it holds. Time: one subprocess holds all three setups and scores the same AlpacaEval responses in interleaved
rounds (order rotated each round), so background load hits them alike.

    python benchmarks/ensemble_scoring.py [--members 3] [--n 256] [--batch-size 32] [--threads 1]
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
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval" / "model_outputs.jsonl.gz"
MODES = ("single", "ensemble", "separate")  # (a), (b), (c)


def load_rows(path: Path, n: int) -> tuple[list[str], list[str]]:
    """n (instruction, output) pairs spread evenly over the file (so several generators appear)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in map(json.loads, f) if isinstance(r.get("output"), str) and r["output"].strip()]
    step = max(1, len(rows) // n)
    picked = rows[::step][:n]
    return [r["instruction"] for r in picked], [r["output"] for r in picked]


def make_members(root: Path, members: int, max_length: int) -> list[Path]:
    """Save M random members (different lora_seed; LoRA B perturbed so adapters matter)."""
    import torch

    from bayesrm.model import RewardModel, RMConfig

    dirs = []
    for i in range(members):
        m = RewardModel(RMConfig(max_length=max_length, lora_seed=i))
        with torch.no_grad():
            g = torch.Generator().manual_seed(100 + i)
            for n, p in m.lora_parameters().items():
                if "lora_B" in n:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        m.save(root / f"member_{i}")
        dirs.append(root / f"member_{i}")
    return dirs


def _tensor_bytes(modules: list[Any]) -> int:
    """Bytes of the unique parameter and buffer storages held by `modules` (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for mod in modules:
        for t in [*mod.parameters(), *mod.buffers()]:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def _load(mode: str, dirs: list[Path]) -> list[Any]:
    from bayesrm.ensemble import EnsembleRewardModel
    from bayesrm.model import RewardModel

    if mode == "single":
        return [RewardModel.load(dirs[0])]
    if mode == "ensemble":
        return [EnsembleRewardModel.load(dirs)]
    return [RewardModel.load(d) for d in dirs]


def _score(mode: str, models: list[Any], prompts: list[str], responses: list[str], batch_size: int) -> Any:
    import torch

    if mode == "ensemble":
        return models[0].score_members(prompts, responses, batch_size)  # (M, N)
    return torch.stack([m.score(prompts, responses, batch_size) for m in models])  # (1 or M, N)


def memory_worker(mode: str, work: Path, members: int, batch_size: int, n: int) -> dict[str, Any]:
    """Load one setup alone, score n responses (the peak is set by the longest batch), report memory."""
    import psutil

    data = json.loads((work / "data.json").read_text())
    models = _load(mode, [work / f"member_{i}" for i in range(members)])
    _score(mode, models, data["prompts"][:n], data["responses"][:n], batch_size)
    full = psutil.Process().memory_full_info()
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, "pss_mb": full.pss / 2**20,
            "uss_mb": full.uss / 2**20, "tensor_mb": _tensor_bytes(models) / 2**20}


def timing_worker(work: Path, members: int, batch_size: int, repeats: int) -> dict[str, Any]:
    """All three setups in one process, timed in interleaved rounds so load drift hits them alike."""
    import torch

    data = json.loads((work / "data.json").read_text())
    prompts, responses = data["prompts"], data["responses"]
    dirs = [work / f"member_{i}" for i in range(members)]
    models = {m: _load(m, dirs) for m in MODES}
    times: dict[str, list[float]] = {m: [] for m in MODES}  # wall-clock seconds
    cpu: dict[str, list[float]] = {m: [] for m in MODES}  # process CPU seconds (robust to a busy machine)
    scores = {}
    for m in MODES:  # warm-up
        _score(m, models[m], prompts[:batch_size], responses[:batch_size], batch_size)
    for r in range(repeats):
        for m in MODES[r % len(MODES):] + MODES[: r % len(MODES)]:  # rotate, so no setup always runs first
            t0, c0 = time.perf_counter(), time.process_time()
            scores[m] = _score(m, models[m], prompts, responses, batch_size)
            times[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
    ens = models["ensemble"][0]
    t0 = time.perf_counter()
    for i in range(100):
        ens.backbone.set_adapter(ens.names[i % members])
    switch_ms = (time.perf_counter() - t0) * 10
    return {"times": times, "cpu": cpu, "switch_ms": switch_ms, "threads": torch.get_num_threads(),
            "max_diff": float((scores["ensemble"] - scores["separate"]).abs().max()),
            "single_vs_member0": float((scores["single"][0] - scores["ensemble"][0]).abs().max())}


def _run_worker(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--n", type=int, default=256, help="responses to score")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--mem-n", type=int, default=64, help="responses scored in each memory subprocess")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.worker == "timing":
        print(json.dumps(timing_worker(a.workdir, a.members, a.batch_size, a.repeats)))
        return
    if a.worker:
        print(json.dumps(memory_worker(a.worker, a.workdir, a.members, a.batch_size, a.mem_n)))
        return

    with tempfile.TemporaryDirectory(prefix="ens_bench_") as tmp:
        work = Path(tmp)
        prompts, responses = load_rows(a.data, a.n)
        (work / "data.json").write_text(json.dumps({"prompts": prompts, "responses": responses}))
        make_members(work, a.members, a.max_length)
        common = ["--workdir", str(work), "--members", str(a.members), "--batch-size", str(a.batch_size)]
        if a.threads:
            common += ["--threads", str(a.threads)]
        mem = {m: _run_worker(["--worker", m, "--mem-n", str(a.mem_n), *common]) for m in MODES}
        tim = _run_worker(["--worker", "timing", "--repeats", str(a.repeats), *common])
    M, t = a.members, tim["times"]
    best = {m: min(v) for m, v in t.items()}
    med = {m: statistics.median(v) for m, v in t.items()}
    cpu = {m: min(v) for m, v in tim["cpu"].items()}
    print(f"{len(responses)} AlpacaEval responses, max_length {a.max_length}, batch {a.batch_size}, M={M}, "
          f"{tim['threads']} torch thread(s), {a.repeats} interleaved rounds; all-MiniLM-L6-v2 on CPU")
    print(f"{'setup':<33}{'wall s min / median':>22}{'CPU s min':>11}{'peak RSS MB':>13}{'PSS MB':>9}{'USS MB':>9}"
          f"{'tensors MB':>12}")
    label = {"single": "(a) one RewardModel", "ensemble": f"(b) EnsembleRewardModel, M={M}",
             "separate": f"(c) {M} separate RewardModels"}
    for m in MODES:
        r = mem[m]
        print(f"{label[m]:<33}{best[m]:>13.2f} / {med[m]:<7.2f}{cpu[m]:>11.2f}{r['peak_rss_mb']:>13.0f}"
              f"{r['pss_mb']:>9.0f}{r['uss_mb']:>9.0f}{r['tensor_mb']:>12.1f}")
    print(f"ensemble_time / (M × single_time) = {best['ensemble'] / (M * best['single']):.3f} (wall min), "
          f"{med['ensemble'] / (M * med['single']):.3f} (wall median), {cpu['ensemble'] / (M * cpu['single']):.3f} "
          "(CPU min); target ≤ 1.1")
    print(f"ensemble / separate time = {best['ensemble'] / best['separate']:.3f} (wall min), "
          f"{cpu['ensemble'] / cpu['separate']:.3f} (CPU min); "
          f"adapter switch (set_adapter) {tim['switch_ms']:.2f} ms each")
    e, c = mem["ensemble"], mem["separate"]
    print(f"memory (b) vs (c): peak RSS {e['peak_rss_mb']:.0f} vs {c['peak_rss_mb']:.0f} MB, PSS {e['pss_mb']:.0f} vs "
          f"{c['pss_mb']:.0f} MB; unique parameter+buffer bytes {e['tensor_mb']:.1f} vs {c['tensor_mb']:.1f} MB")
    print("  (memory: one subprocess per setup scoring --mem-n responses; peak RSS = ru_maxrss, PSS/USS = psutil after "
          "scoring; RSS counts the mmap'd safetensors pages of each separate backbone again, PSS shares them)")
    print(f"max |ensemble − separate| score: {tim['max_diff']:.2e}; |single − ensemble member 0|: "
          f"{tim['single_vs_member0']:.2e}")


if __name__ == "__main__":
    main()
