"""Regenerate the shipped default reference portraits in mvportrait/weights/reference/.

    python benchmarks/tools/make_reference.py [--out mvportrait/weights/reference] [--identity 1000000]

Renders the corpus reference (neutral expression, zero pose, un-jittered front camera, the
identity's own appearance and light) of a held-out *test* identity -- by default
``DEFAULT_REFERENCE_IDENTITY`` = ``TEST_ID_BASE`` (1,000,000), the first test identity, so the
default portrait is never a training image -- at 128 x 128 (``default.png``) and 256 x 256
(``default_256.png``), with ``head_seed`` 0 (the synthetic head every shipped model uses).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mvportrait.data.images import save_image
from mvportrait.data.multiview import DEFAULT_REFERENCE_IDENTITY, TEST_ID_BASE, reference_image

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "mvportrait" / "weights" / "reference"
log = logging.getLogger("make_reference")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--identity", type=int, default=DEFAULT_REFERENCE_IDENTITY,
                    help="identity id; must be a test identity (>= %d)" % TEST_ID_BASE)
    args = ap.parse_args(argv)
    if args.identity < TEST_ID_BASE:
        ap.error(f"identity {args.identity} is a training identity; use one >= {TEST_ID_BASE}")
    args.out.mkdir(parents=True, exist_ok=True)
    for size, name in ((128, "default.png"), (256, "default_256.png")):
        path = save_image(reference_image(args.identity, size), args.out / name)
        log.info("wrote %s (%dx%d, identity %d)", path, size, size, args.identity)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
