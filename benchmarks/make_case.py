"""Build the benchmark case: 19 organ-like structures in a 512 x 512 x 200 CT grid.

Deterministic from a seed. Every structure is a smooth, lobed ellipsoid of a
realistic volume (liver ~1 L down to adrenal glands of a few mL; the tubular
structures are long along z), placed without overlap (bounding boxes at least
``MARGIN`` voxels apart) in a volume of 200 x 512 x 512 voxels (z, y, x) at
spacing (2.5, 0.8, 0.8) mm. Labels follow ``oarbench.labels.DEFAULT_LABELS``.

The prediction is the reference perturbed per structure: shifted by 1-2 voxels
along each axis, then eroded or dilated by one voxel (6-connectivity), with one
structure (``Glnd_Adrenal_R``) missed entirely. Perturbations stay inside the
margin, so prediction structures never overlap either.

Usage::

    python benchmarks/make_case.py --out /tmp/oarbench-bench [--cases 4] [--seed 0]

writes ``OUT/reference.nii.gz`` and ``OUT/prediction.nii.gz`` (case 0) and an
nnU-Net-style folder pair ``OUT/folder/labelsTr/case_NNN.nii.gz`` /
``OUT/folder/predictions/case_NNN.nii.gz`` with ``--cases`` cases (different
seeds), plus ``OUT/folder/dataset.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from oarbench.labels import DEFAULT_LABELS

SHAPE = (200, 512, 512)  # (z, y, x) voxels
SPACING = (2.5, 0.8, 0.8)  # (z, y, x) mm
MARGIN = 7  # voxels between bounding boxes: > 2 x (shift 2 + dilation 1)
MISSED = "Glnd_Adrenal_R"


@dataclass(frozen=True)
class Organ:
    """Target volume (mL) and elongation of one structure: semi-axes ratio (z, y, x)."""

    name: str
    volume_ml: float
    aspect: tuple[float, float, float]


# Adult-ish volumes; tubular structures are long in z.
ORGANS: tuple[Organ, ...] = (
    Organ("Liver", 1000.0, (1.0, 1.3, 1.05)),
    Organ("Spleen", 150.0, (1.2, 1.0, 0.6)),
    Organ("Kidney_L", 130.0, (1.6, 0.8, 0.7)),
    Organ("Kidney_R", 130.0, (1.6, 0.8, 0.7)),
    Organ("Glnd_Adrenal_L", 5.0, (1.5, 1.0, 0.4)),
    Organ("Glnd_Adrenal_R", 4.0, (1.5, 1.0, 0.4)),
    Organ("Pancreas", 70.0, (0.5, 0.6, 2.0)),
    Organ("Stomach", 300.0, (1.2, 1.0, 1.0)),
    Organ("Duodenum", 50.0, (1.0, 0.6, 0.8)),
    Organ("Bowel", 900.0, (0.8, 1.0, 1.2)),
    Organ("Gallbladder", 30.0, (1.2, 0.8, 0.8)),
    Organ("Esophagus", 25.0, (8.0, 0.8, 1.0)),
    Organ("Heart", 550.0, (0.9, 1.0, 1.1)),
    Organ("Lung_L", 1400.0, (1.7, 1.2, 0.8)),
    Organ("Lung_R", 1600.0, (1.7, 1.2, 0.85)),
    Organ("SpinalCord", 20.0, (20.0, 1.0, 1.1)),
    Organ("A_Aorta", 90.0, (9.0, 1.0, 1.0)),
    Organ("VenaCava_I", 45.0, (7.0, 1.0, 1.2)),
    Organ("Vertebrae", 250.0, (4.0, 1.0, 1.3)),
)


def _semi_axes_mm(organ: Organ) -> np.ndarray:
    """Semi-axes (z, y, x) in mm of an ellipsoid of the organ's volume and aspect."""
    aspect = np.asarray(organ.aspect, dtype=np.float64)
    scale = (organ.volume_ml * 1000.0 / (4.0 / 3.0 * math.pi * np.prod(aspect))) ** (1.0 / 3.0)
    return aspect * scale


def _blob(organ: Organ, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask (z, y, x) of a smooth lobed ellipsoid, tight to its box plus one voxel."""
    semi = _semi_axes_mm(organ)
    lobe = 1.12  # the radial modulation below reaches at most +12 %
    half = np.ceil(semi * lobe / np.asarray(SPACING)).astype(int) + 1
    axes = [np.arange(-h, h + 1) * s for h, s in zip(half, SPACING)]
    z, y, x = np.meshgrid(*axes, indexing="ij", sparse=True)
    u, v, w = z / semi[0], y / semi[1], x / semi[2]
    r = np.sqrt(u * u + v * v + w * w)
    # Smooth radial modulation: a few low-frequency cosines of the direction.
    modulation = np.ones_like(r)
    for _ in range(3):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        freq = rng.uniform(1.5, 3.0)
        phase = rng.uniform(0, 2 * math.pi)
        proj = (u * direction[0] + v * direction[1] + w * direction[2]) / np.maximum(r, 1e-9)
        modulation = modulation + 0.04 * np.cos(freq * math.pi * proj + phase)
    mask = r <= modulation
    return mask[ndimage.find_objects(mask.astype(np.uint8))[0]]


def _place(shapes: list[tuple[int, int, int]], rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """Corner positions for boxes of the given shapes, pairwise MARGIN voxels apart.

    Largest first, random positions with rejection; deterministic from ``rng``.
    """
    order = sorted(range(len(shapes)), key=lambda i: -int(np.prod(shapes[i])))
    placed: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i in order:
        size = np.asarray(shapes[i])
        for _ in range(20000):
            lo = np.array([rng.integers(MARGIN, SHAPE[k] - size[k] - MARGIN + 1) for k in range(3)])
            hi = lo + size
            if all(np.any(lo >= h + MARGIN) or np.any(l >= hi + MARGIN) for l, h in placed.values()):
                placed[i] = (lo, hi)
                break
        else:
            raise RuntimeError(f"could not place structure {i} of shape {tuple(size)}")
    return [tuple(int(v) for v in placed[i][0]) for i in range(len(shapes))]


def make_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference, prediction) uint8 label volumes (z, y, x) for one seed."""
    rng = np.random.default_rng(seed)
    blobs = [_blob(o, rng) for o in ORGANS]
    corners = _place([b.shape for b in blobs], rng)
    reference = np.zeros(SHAPE, dtype=np.uint8)
    prediction = np.zeros(SHAPE, dtype=np.uint8)
    cross = ndimage.generate_binary_structure(3, 1)
    for organ, blob, corner in zip(ORGANS, blobs, corners):
        value = DEFAULT_LABELS.value(organ.name)
        box = tuple(slice(c, c + s) for c, s in zip(corner, blob.shape))
        reference[box][blob] = value
        if organ.name == MISSED:
            continue
        # Perturb inside a window padded by MARGIN - 1 voxels: shift, then erode or dilate.
        pad = MARGIN - 1
        window = np.pad(blob, pad)
        shift = tuple(int(rng.choice([-2, -1, 1, 2])) for _ in range(3))
        window = np.roll(window, shift, axis=(0, 1, 2))
        if rng.random() < 0.5:
            window = ndimage.binary_erosion(window, cross)
        else:
            window = ndimage.binary_dilation(window, cross)
        wbox = tuple(slice(c - pad, c + s + pad) for c, s in zip(corner, blob.shape))
        prediction[wbox][window] = value
    return reference, prediction


def write_labels(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(SPACING)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial.nii.gz")
    sitk.WriteImage(image, str(tmp), useCompression=True)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/oarbench-bench"))
    parser.add_argument("--cases", type=int, default=4, help="cases in the folder pair")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    folder = args.out / "folder"
    for i in range(args.cases):
        ref, pred = make_case(args.seed + i)
        if i == 0:
            write_labels(ref, args.out / "reference.nii.gz")
            write_labels(pred, args.out / "prediction.nii.gz")
            vox_ml = float(np.prod(SPACING)) / 1000.0
            counts_ref = np.bincount(ref.ravel(), minlength=20)
            counts_pred = np.bincount(pred.ravel(), minlength=20)
            for value, name in DEFAULT_LABELS:
                print(f"{value:2d} {name:15s} ref {counts_ref[value] * vox_ml:8.1f} mL"
                      f"  pred {counts_pred[value] * vox_ml:8.1f} mL")
        write_labels(ref, folder / "labelsTr" / f"case_{i:03d}.nii.gz")
        write_labels(pred, folder / "predictions" / f"case_{i:03d}.nii.gz")
    labels = {"background": 0, **{name: value for value, name in DEFAULT_LABELS}}
    (folder / "dataset.json").write_text(json.dumps(
        {"labels": labels, "file_ending": ".nii.gz", "channel_names": {"0": "CT"}, "numTraining": args.cases},
        indent=2))
    print(f"wrote case 0 and {args.cases} folder cases under {args.out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
