"""Make the example's upscaler weights and put them into the local model store.

The weights are a random-initialised Real-ESRGAN "Compact" x2 network (spandrel detects
it from the key names), drawn from numpy's legacy RandomState so the bytes -- and so the
sha256 in ``deployed.json`` -- are the same on every machine. Nothing is downloaded.

    python examples/upscale-x2/make_weights.py            # into RUNFLOW_CACHE_DIR's store
    python examples/upscale-x2/make_weights.py --out F    # only write the file
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

NUM_FEAT = 8
SCALE = 2


def compact_state(seed: int = 0) -> dict[str, np.ndarray]:
    """Key names and shapes of spandrel's Compact(num_feat=8, num_conv=2, upscale=2)."""
    rng = np.random.RandomState(seed)
    out_ch = 3 * SCALE * SCALE
    shapes = [("body.0.weight", (NUM_FEAT, 3, 3, 3)), ("body.0.bias", (NUM_FEAT,)),
              ("body.1.weight", (NUM_FEAT,)),
              ("body.2.weight", (NUM_FEAT, NUM_FEAT, 3, 3)), ("body.2.bias", (NUM_FEAT,)),
              ("body.3.weight", (NUM_FEAT,)),
              ("body.4.weight", (NUM_FEAT, NUM_FEAT, 3, 3)), ("body.4.bias", (NUM_FEAT,)),
              ("body.5.weight", (NUM_FEAT,)),
              ("body.6.weight", (out_ch, NUM_FEAT, 3, 3)), ("body.6.bias", (out_ch,))]
    state: dict[str, np.ndarray] = {}
    for name, shape in shapes:
        if len(shape) == 4:
            state[name] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        elif name in ("body.1.weight", "body.3.weight", "body.5.weight"):
            state[name] = np.full(shape, 0.25, dtype=np.float32)  # PReLU slopes
        else:
            state[name] = np.zeros(shape, dtype=np.float32)
    return state


def write_weights(path: Path) -> Path:
    """Write the weights to ``path`` and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(compact_state(), str(path))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="only write the weights to this file")
    args = parser.parse_args()
    if args.out:
        write_weights(args.out)
        print(args.out)
        return 0
    import json
    import tempfile

    from runflow_worker.cache.blobs import BlobStore
    from runflow_worker.cache.sources import Sources

    deployed = json.loads((Path(__file__).parent / "deployed.json").read_text())
    (entry,) = deployed["models"].values()
    digest = entry["sha256"]
    cache = Path(os.environ.get("RUNFLOW_CACHE_DIR", "~/.cache/runflow")).expanduser()
    with tempfile.TemporaryDirectory() as mirror:
        # The store takes the file from a mirror directory (named by its digest): it hashes,
        # verifies and publishes it exactly as it would a download.
        write_weights(Path(mirror) / digest)
        store = BlobStore(cache / "blobs", sources=Sources(mirror_dirs=[Path(mirror)]))
        try:
            path = store.ensure(digest)
        except Exception as exc:  # noqa: BLE001 - any failure is reported, exit 1
            print(f"cannot store the weights: {exc}", file=sys.stderr)
            return 1
    print(f"stored {path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
