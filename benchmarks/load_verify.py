"""Cost of verifying a tensor artifact on load (sha256 + finiteness check) against loading it unverified.

    python benchmarks/load_verify.py [--mb 128] [--repeats 3]

Writes one float32 safetensors file of about --mb MiB in a temporary directory (the size of a Laplace posterior
of a 7B model with rank-limited factors, or a large LoRA adapter), then times, best of --repeats, on the same file:
- load: `safetensors.torch.load_file` plus one copy of every tensor (load_file maps the file lazily; the copy is
  what `load_state_dict` does with it), i.e. what loading cost before checksums;
- sha256: `bayesrm.integrity.file_sha256`;
- finite: `require_finite` over the loaded tensors;
- verified: `verify_checksums` + `load_tensors` + `require_finite`, what `RewardModel.load` / `LaplacePosterior.load`
  now do per file. Prints seconds, MB/s and the ratio verified / load. A second read of a file just written comes
  from the page cache, so these are CPU costs; a cold disk read adds the same I/O to both sides.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bayesrm.integrity import file_sha256, load_tensors, require_finite, tensor_checksums, verify_checksums


def best(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "posterior.safetensors"
        n_tensors = 16
        per = args.mb * (1 << 20) // 4 // n_tensors
        save_file({f"{i}.t": torch.randn(per) for i in range(n_tensors)}, str(path))
        meta = {"checksums": tensor_checksums(d)}
        mb = path.stat().st_size / (1 << 20)
        tensors = load_file(str(path))

        def verified() -> None:
            verify_checksums(d, meta, Path(d) / "posterior.json")
            loaded = load_tensors(path)
            require_finite(loaded, path)
            for t in loaded.values():
                t.clone()

        def load() -> None:
            for t in load_file(str(path)).values():
                t.clone()

        rows = [("load (unverified)", best(load, args.repeats)),
                ("sha256", best(lambda: file_sha256(path), args.repeats)),
                ("finite check", best(lambda: require_finite(tensors, path), args.repeats)),
                ("verified load", best(verified, args.repeats))]
    print(f"file: {mb:.0f} MiB, {n_tensors} float32 tensors; best of {args.repeats}; torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'step':<20}{'seconds':>10}{'MiB/s':>10}")
    for name, s in rows:
        print(f"{name:<20}{s:>10.3f}{mb / s:>10.0f}")
    print(f"verified load / unverified load: {rows[3][1] / rows[0][1]:.1f}x")


if __name__ == "__main__":
    main()
