"""Anatomy guard benchmark: seconds per series for ``analysis.anatomy.guard_lungs``.

Run with ``.venv/bin/python bench/guard.py [--series FOLDER]``. It

1. loads the real LIDC chest CT (``../shared/data/ct-chest-lidc``, 275 x 512 x 512) when
   it is there, otherwise a generated 200 x 512 x 512 chest phantom (``--series`` names
   any other folder);
2. makes the guard's input once: the classical pipeline's final masks on the source
   grid (the guard's cost depends on the volume and the lungs' extent, not on which
   segmenter drew them);
3. times ``guard_lungs`` ``--rounds`` times after one cold call, with the time spent in
   each of its parts (airways, rib cage, pooling and labelling the pieces, judging);
4. prints whether the target (under 1 s warm for a 512 x 512 chest CT) is met and writes
   ``bench/out/guard.json``.

The machine is shared: the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis import anatomy  # noqa: E402
from analysis.types import ImageVolume  # noqa: E402

LIDC = ROOT.parent / "shared" / "data" / "ct-chest-lidc"
TARGET_S = 1.0
#: The guard's parts, by the module function that does them.
PARTS = {"airways": (anatomy, "_remove_airways"), "rib cage": (anatomy, "_caged"),
         "pooling (also inside the others)": (anatomy._Grid, "pool"), "deep body": (anatomy, "_deep_body"),
         "judging": (anatomy, "_judge"), "under the dome": (anatomy, "_under_dome")}


def load_series(folder: Path | None) -> tuple[ImageVolume, str]:
    """The series to guard, and what it is."""
    if folder is None and LIDC.is_dir():
        folder = LIDC
    if folder is not None:
        from analysis.training.region import load_series as read_series

        _, volume = read_series(folder)[0]
        return volume, str(folder)
    import numpy as np

    from analysis.phantoms.trunk import PhantomSpec, make_phantom

    spec = PhantomSpec(slices=200, rows=512, columns=512, pixel_spacing_mm=0.7)
    phantom, px, dz = make_phantom(spec), spec.pixel_spacing_mm, spec.slice_thickness_mm
    affine = np.array([[0.0, 0.0, px, -255.5 * px], [0.0, px, 0.0, -255.5 * px],
                       [-dz, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # head first, supine
    return ImageVolume(phantom.hu, (dz, px, px), affine), "generated chest phantom 200x512x512"


def guard_input(volume: ImageVolume) -> dict[str, Any]:
    """The classical masks on the source grid: what the guard gets in ``ct-body-lungs``."""
    from analysis.pipeline import _classical_mask_steps, _run_steps

    return _run_steps(_classical_mask_steps(), volume, "masks")


def timed_parts() -> tuple[dict[str, float], Callable[[], None]]:
    """Wrap the guard's parts to add up their time; returns the totals and an undo."""
    totals: dict[str, float] = defaultdict(float)
    originals = []
    for name, (owner, attr) in PARTS.items():
        original = getattr(owner, attr)
        originals.append((owner, attr, original))

        def wrapper(*args: Any, _f: Any = original, _n: str = name, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                totals[_n] += time.perf_counter() - start

        setattr(owner, attr, wrapper)

    def undo() -> None:
        for owner, attr, original in originals:
            setattr(owner, attr, original)

    return totals, undo


def run_once(volume: ImageVolume, masks: dict[str, Any]) -> float:
    start = time.perf_counter()
    anatomy.guard_lungs(dict(masks), volume.hu, volume.spacing_mm, volume.affine, [])
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=Path, help="a CT series folder (default: LIDC or a phantom)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    volume, what = load_series(args.series)
    masks = guard_input(volume)
    load_before = os.getloadavg()
    cold = run_once(volume, masks)
    warm = [run_once(volume, masks) for _ in range(args.rounds)]
    totals, undo = timed_parts()
    try:
        run_once(volume, masks)
    finally:
        undo()
    load_after = os.getloadavg()
    median = statistics.median(warm)
    result = {
        "series": what, "shape": list(volume.hu.shape), "cold_s": round(cold, 3),
        "warm_s": [round(t, 3) for t in warm], "median_s": round(median, 3),
        "parts_s": {k: round(v, 3) for k, v in totals.items()}, "target_s": TARGET_S,
        "met": median < TARGET_S, "load_average": [round(load_before[0], 2), round(load_after[0], 2)],
    }
    print(f"guard on {what} {tuple(volume.hu.shape)}: cold {cold:.2f} s, warm median "
          f"{median:.2f} s (best {min(warm):.2f}); target < {TARGET_S:g} s: "
          f"{'met' if result['met'] else 'NOT met'}")
    print("  parts (one warm call): " + ", ".join(f"{k} {v:.2f} s" for k, v in totals.items()))
    print(f"  load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2 cores)")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "guard.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
