#!/usr/bin/env python
"""Make the small IDRiD sample shipped in python/cobalance/data/idrid_sample.

Reads the half-resolution IDRiD segmentation set (../shared/data/idrid next to the
repository root by default), picks a few images, downscales them by ``--factor``
(images bilinearly, masks by max-pooling so that every lesion keeps at least one
pixel) and writes the same layout: images/, masks/<CLASS>/, index.csv, README.md.
The folder is built under a temporary name beside the destination and renamed into
place, so the destination is either the old sample or the complete new one.

    .venv/bin/python scripts/make_sample.py [--source DIR] [--dest DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO / ".." / "shared" / "data" / "idrid"
DEFAULT_DEST = REPO / "python" / "cobalance" / "data" / "idrid_sample"
CLASSES = ("MA", "HE", "EX", "SE", "OD")  # the order of the original dataset's README
PER_SPLIT = {"train": 6, "test": 2}


def read_index(source: Path):
    with open(source / "index.csv", newline="", encoding="utf-8") as f:
        return [(row["image"], row["split"], row["classes_present"].split()) for row in csv.DictReader(f)]


def choose(index):
    """Deterministic pick: every image lacking a class the others nearly always have
    (so the sample shows an absent class besides SE), then per split in id order,
    alternately an image with and one without SE (SE is in about half the images)."""
    common = [c for c in CLASSES if c != "SE"]
    chosen = [row for row in index if any(c not in row[2] for c in common)]
    for split, wanted in PER_SPLIT.items():
        rows = [r for r in index if r[1] == split and r not in chosen]
        with_se = [r for r in rows if "SE" in r[2]]
        without_se = [r for r in rows if "SE" not in r[2]]
        have = sum(r[1] == split for r in chosen)
        turn = 0
        while have < wanted and (with_se or without_se):
            pool = with_se if (turn % 2 == 0 and with_se) or not without_se else without_se
            chosen.append(pool.pop(0))
            have += 1
            turn += 1
    return sorted(chosen)


def max_pool(mask: np.ndarray, factor: int) -> np.ndarray:
    h, w = (mask.shape[0] // factor) * factor, (mask.shape[1] // factor) * factor
    blocks = mask[:h, :w].reshape(h // factor, factor, w // factor, factor)
    return blocks.any(axis=(1, 3))


def attribution(source: Path) -> str:
    """The title and citation/licence paragraph of the source README, verbatim."""
    text = (source / "README.md").read_text(encoding="utf-8")
    paragraphs = text.split("\n\n")
    quoted = "\n\n".join(paragraphs[:2]).strip().splitlines()
    return "\n".join(("> " + line).rstrip() for line in quoted)


def build(source: Path, out: Path, factor: int) -> list:
    rows = []
    (out / "images").mkdir(parents=True)
    for c in CLASSES:
        (out / "masks" / c).mkdir(parents=True)
    for image_id, split, _ in choose(read_index(source)):
        with Image.open(source / "images" / f"{image_id}.jpg") as img:
            w, h = img.size
            size = (w // factor, h // factor)
            img.convert("RGB").resize(size, Image.BILINEAR).save(out / "images" / f"{image_id}.jpg", quality=90)
        present = []
        for c in CLASSES:
            path = source / "masks" / c / f"{image_id}.png"
            if not path.exists():
                continue
            with Image.open(path) as m:
                pooled = max_pool(np.asarray(m) != 0, factor)
            if pooled.any():
                Image.fromarray(pooled).save(out / "masks" / c / f"{image_id}.png", optimize=True)
                present.append(c)
        rows.append((image_id, split, " ".join(present), size))
    with open(out / "index.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "split", "classes_present"])
        writer.writerows(r[:3] for r in rows)
    width, height = rows[0][3]
    listing = "\n".join(f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows)
    (out / "README.md").write_text(f"""# IDRiD sample (quarter of the half resolution)

A small subset of the IDRiD lesion segmentation set, shipped with cobalance so that
examples and tests run without downloading anything
(`cobalance.folders.sample_path()`).

## Attribution (copied from the source README)

{attribution(source)}

## How this subset was made

Made by `scripts/make_sample.py` from the half-resolution copy (2144x1424) described
above: {len(rows)} images ({", ".join(f"{n} {s}" for s, n in PER_SPLIT.items())} of the original split, picked
in id order alternately with and without SE, plus every image lacking one of
MA/HE/EX/OD), downscaled {factor}x more to {width}x{height}: images bilinearly (JPEG quality 90),
masks by {factor}x{factor} max-pooling so that every lesion keeps at least one pixel (this
enlarges small lesions, so pixel shares are higher than at full resolution).

Same layout as the source: `images/<id>.jpg`, one 1-bit PNG per image and class under
`masks/<CLASS>/` (a missing file means the class is absent), `index.csv` with the
original split and the classes present. Classes: `MA` microaneurysms, `HE`
haemorrhages, `EX` hard exudates, `SE` soft exudates, `OD` optic disc; they may
overlap (multi-label masks).

| image | split | classes present |
|---|---|---|
{listing}
""", encoding="utf-8")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    parser.add_argument("--factor", type=int, default=4)
    args = parser.parse_args(argv)
    source, dest = args.source.resolve(), args.dest.resolve()
    if not (source / "index.csv").is_file():
        raise SystemExit(f"{source} is not the IDRiD folder (no index.csv)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-" + dest.name + "-", dir=dest.parent))
    try:
        rows = build(source, tmp / "sample", args.factor)
        old = None
        if dest.exists():
            old = tmp / "old"
            os.replace(dest, old)
        os.replace(tmp / "sample", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"wrote {len(rows)} images to {dest} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
