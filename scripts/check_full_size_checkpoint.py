"""Export a full-size random model as an fp16 single-file checkpoint and load it back with the default configs.

The check behind ``studio model export`` at real size: the file goes through diffusers' ``from_single_file`` with the
bundled full-size configs (no ``--model-config``), exactly as a downloaded A1111/ComfyUI checkpoint would, and every
UNet weight must come back equal to the original rounded to fp16. Too slow and too big for the test suite
(SD1.5: about 2 GB written, 6 GB of memory); prints the timings and the peak memory.

Usage: python scripts/check_full_size_checkpoint.py [--model sd15-random|sdxl-random] [--keep FILE]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from studio.checkpoint import export_single_file  # noqa: E402
from studio.models import architecture, load_pipeline  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15-random", choices=["sd15-random", "sdxl-random"])
    p.add_argument("--keep", default="", help="Write the checkpoint here and keep it (default: a temporary file).")
    args = p.parse_args()
    times = {}
    with tempfile.TemporaryDirectory(dir=Path(args.keep).parent if args.keep else None) as tmp:
        path = Path(args.keep or Path(tmp) / f"{args.model}.safetensors")
        t = time.perf_counter()
        pipe = load_pipeline(args.model, device="cpu", dtype="fp32")
        times["build"] = time.perf_counter() - t
        t = time.perf_counter()
        export_single_file(pipe, path, dtype="fp16")
        times["export"] = time.perf_counter() - t
        arch = architecture(pipe)
        expected = {k: v.half() for k, v in pipe.unet.state_dict().items()}
        del pipe
        t = time.perf_counter()
        loaded = load_pipeline(str(path), device="cpu", dtype="fp32")  # the default full-size config path
        times["load"] = time.perf_counter() - t
        got = loaded.unet.state_dict()
        bad = [k for k, v in expected.items() if k not in got or not torch.equal(got[k].half(), v)]
        size_gb = path.stat().st_size / 1e9
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"{args.model} ({arch}): file {size_gb:.2f} GB, " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
          + f", peak memory {peak_gb:.1f} GB")
    print(f"UNet weights equal after the fp16 roundtrip: {len(expected) - len(bad)}/{len(expected)}")
    return 1 if bad or architecture(loaded) != arch else 0


if __name__ == "__main__":
    sys.exit(main())
