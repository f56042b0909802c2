"""CNN inference benchmark: milliseconds per 256x256 slice of the body-and-lungs U-Net.

Run with ``.venv/bin/python bench/inference.py``. It

1. loads the shipped model (``analysis/models/lungs``), or builds an untrained one of
   the same architecture with ``--untrained`` (the speed does not depend on weights);
2. runs batched inference on ``--slices`` (200) slices of the model's input size,
   ``--rounds`` times after a warm-up, and reports the best and median round;
3. times the full path too, :meth:`SegmentationModel.predict` on a generated
   ``--slices`` x 512 x 512 CT (orientation, resampling to the model grid and back);
4. prints whether the target (15 ms per slice for the model) is met and writes
   ``bench/out/inference.json``.

The machine is shared: the load average before and after is recorded, as other
processes on the same two cores slow every number here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.cnn import (  # noqa: E402
    SHIPPED_CARD,
    SHIPPED_MODEL,
    SegmentationModel,
    quiet_tensorflow,
)
from analysis.phantoms.trunk import PhantomSpec, make_phantom, phantom_affine  # noqa: E402
from analysis.types import ImageVolume  # noqa: E402

OUT = ROOT / "bench" / "out"
TARGET_MS = 15.0


def model_under_test(untrained: bool) -> tuple[Any, int, dict[str, Any]]:
    """(batch inference function, input size, description)."""
    quiet_tensorflow()
    if untrained or not SHIPPED_MODEL.is_file():
        import tensorflow as tf

        from analysis.training.unet import build_unet

        model = build_unet(base_filters=12)
        run = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        info = {"model": "untrained build_unet(base_filters=12)", "parameters": int(model.count_params())}
        return (lambda x: run(tf.convert_to_tensor(x)).numpy()), 256, info
    loaded = SegmentationModel.shipped()
    info = {
        "model": str(SHIPPED_MODEL.relative_to(ROOT)),
        "model_bytes": SHIPPED_MODEL.stat().st_size,
        "parameters": loaded.card.training.get("architecture", {}).get("parameters"),
        "card": str(SHIPPED_CARD.relative_to(ROOT)),
    }
    return loaded.infer, int(loaded.card.input_shape[1]), info


def time_batches(infer: Any, x: np.ndarray, batch_size: int, rounds: int) -> list[float]:
    """Milliseconds per slice of each round over all of ``x``."""
    infer(x[:batch_size])  # warm-up: tracing and oneDNN kernel selection
    infer(x[: len(x) % batch_size or batch_size])
    per_round = []
    for _ in range(rounds):
        started = time.perf_counter()
        for start in range(0, len(x), batch_size):
            infer(x[start:start + batch_size])
        per_round.append((time.perf_counter() - started) / len(x) * 1000.0)
    return per_round


def time_end_to_end(slices: int, batch_size: int) -> dict[str, float]:
    """SegmentationModel.predict on a generated slices x 512 x 512 chest CT."""
    spec = PhantomSpec(slices=slices, rows=512, columns=512, pixel_spacing_mm=0.75, ribs=True, heart=True)
    phantom = make_phantom(spec)
    volume = ImageVolume(hu=phantom.hu, spacing_mm=(spec.slice_thickness_mm, 0.75, 0.75),
                         affine=phantom_affine(spec))
    model = SegmentationModel.shipped()
    model.predict(ImageVolume(hu=phantom.hu[:batch_size], spacing_mm=volume.spacing_mm,
                              affine=volume.affine), batch_size)
    started = time.perf_counter()
    model.predict(volume, batch_size)
    seconds = time.perf_counter() - started
    return {"slices": slices, "rows": 512, "columns": 512, "seconds": round(seconds, 3),
            "ms_per_slice": round(seconds / slices * 1000.0, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--untrained", action="store_true",
                        help="an untrained model of the same architecture instead of the shipped one")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the 512x512 predict() timing")
    args = parser.parse_args()

    load_before = os.getloadavg()
    infer, size, info = model_under_test(args.untrained)
    x = np.random.default_rng(0).uniform(0.0, 1.0, (args.slices, size, size, 1)).astype(np.float32)
    rounds = time_batches(infer, x, args.batch_size, args.rounds)
    best, median = min(rounds), statistics.median(rounds)
    end_to_end = None
    if not args.no_end_to_end and not args.untrained and SHIPPED_MODEL.is_file():
        end_to_end = time_end_to_end(args.slices, args.batch_size)
    load_after = os.getloadavg()

    met = best <= TARGET_MS
    print(f"{info['model']}: {args.slices} slices of {size}x{size}, batch {args.batch_size}")
    print(f"  model only: best {best:.2f} ms/slice, median {median:.2f} "
          f"(rounds: {', '.join(f'{r:.2f}' for r in rounds)})")
    print(f"  target {TARGET_MS:.0f} ms/slice: {'met' if met else 'NOT met'}")
    if end_to_end:
        print(f"  predict() on {args.slices}x512x512: {end_to_end['seconds']:.2f} s, "
              f"{end_to_end['ms_per_slice']:.2f} ms/slice including resampling")
    print(f"  load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"({os.cpu_count()} CPUs; other processes slow these numbers)")

    OUT.mkdir(parents=True, exist_ok=True)
    import keras
    import tensorflow as tf

    (OUT / "inference.json").write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **info,
        "input_size": size,
        "slices": args.slices,
        "batch_size": args.batch_size,
        "ms_per_slice_rounds": [round(r, 3) for r in rounds],
        "ms_per_slice_best": round(best, 3),
        "ms_per_slice_median": round(median, 3),
        "target_ms_per_slice": TARGET_MS,
        "target_met": met,
        "end_to_end_512": end_to_end,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "tensorflow": tf.__version__, "keras": keras.__version__},
    }, indent=2) + "\n")
    print(f"wrote {OUT / 'inference.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
