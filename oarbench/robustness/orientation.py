"""The canonical orientation of site harmonisation, and prediction in it.

Canonical orientation: identity direction cosines in the patient's LPS frame
(DICOM's): array axis x grows toward the patient's Left, y toward Posterior,
z toward Superior; what ``SimpleITK.DICOMOrient(image, "LPS")`` makes of an
axis-aligned image. Only the index order and the header change (a signed
permutation of the axes, :class:`oarbench.robustness.transforms.Reorient`), so
the voxel values are the stored ones and the way back is exact. Oblique
directions are refused. The training drivers use it through
:mod:`oarbench.train.harmonise`; the nnU-Net predictor of a model trained so
predicts through :func:`predict_in_canonical` (docs/training.md, "Site harmonisation").
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from oarbench.io import Volume, read_volume, write_volume
from oarbench.robustness.transforms import Reorient

__all__ = ["CANONICAL", "PLANS_KEY", "orientation_code", "to_canonical", "from_canonical", "predict_in_canonical"]

#: The canonical orientation (letters: where index axes x, y, z point; LPS = identity direction).
CANONICAL = "LPS"
#: Key in plans.json (and the dataset fingerprint) naming the orientation the model was trained in.
PLANS_KEY = "oarbench_orientation"

_AXIS_LETTERS = {(0, 1): "L", (0, -1): "R", (1, 1): "P", (1, -1): "A", (2, 1): "S", (2, -1): "I"}
_TOL = 1e-3  # the same tolerance as the robustness re-orientation (oarbench.robustness.transforms)


def orientation_code(direction: Iterable[float], what: str = "image") -> str:
    """Three letters naming where index axes x, y, z point (``LPS`` for the identity direction).

    Raises ValueError naming ``what`` when the direction is oblique (not a
    signed permutation within 1e-3) or not 3D.
    """
    d = np.asarray(list(direction), dtype=float)
    if d.size != 9:
        raise ValueError(f"{what}: harmonisation needs a 3D image (direction has {d.size} entries)")
    d = d.reshape(3, 3)
    r = np.round(d)
    ok = np.allclose(d, r, atol=_TOL) and all(np.count_nonzero(r[:, k]) == 1 and np.count_nonzero(r[k]) == 1
                                                for k in range(3))
    if not ok:
        raise ValueError(f"{what}: oblique image direction {np.round(d, 4).ravel().tolist()} (not a permutation "
                         "of the patient axes); oarbench does not resample for harmonisation: resample the image "
                         "onto an axis-aligned grid first")
    letters = []
    for m in range(3):
        axis = int(np.flatnonzero(r[:, m])[0])
        letters.append(_AXIS_LETTERS[(axis, int(r[axis, m]))])
    return "".join(letters)


def to_canonical(volume: Volume, what: str = "image") -> Volume:
    """``volume`` in the canonical orientation (same voxels and physical positions; new index order)."""
    if volume.array.ndim != 3:
        raise ValueError(f"{what}: harmonisation needs a 3D image, got array shape {volume.array.shape}")
    orientation_code(volume.direction, what)
    return Reorient(CANONICAL).apply(volume)


def from_canonical(prediction: Volume, original: Volume, what: str = "prediction") -> Volume:
    """A label map made on ``to_canonical(original)``'s grid, put back on ``original``'s grid (exact)."""
    orientation_code(original.direction, what)
    try:
        return Reorient(CANONICAL).map_back(prediction, original)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def predict_in_canonical(image_paths: list[Path], cases: list[str], out_dir: Path,
                         run: Callable[[list[Path], list[Path]], None], *, ending: str = ".nii.gz") -> dict[str, Path]:
    """Predict each image in the canonical orientation and write its label map on the image's own grid.

    ``run(inputs, output_stems)`` is the model: it writes ``<stem><ending>`` for
    each input, on that input's grid. Each image is read, brought to the
    canonical orientation (a temporary file; none for an image already
    stored so), predicted, and the label map is mapped back voxel for voxel
    (:func:`from_canonical`) into ``out_dir/<case><ending>``. Returns case -> file.
    """
    import tempfile

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="oarbench-canonical-") as tmp:
        inputs, stems = [], []
        for p, case in zip(image_paths, cases):
            vol = read_volume(p)
            if vol.array.ndim != 3:
                raise ValueError(f"{p}: harmonisation needs a 3D image, got array shape {vol.array.shape}")
            if np.array_equal(np.asarray(vol.direction, float), np.eye(3).ravel()):
                inputs.append(Path(p))
            else:
                inputs.append(write_volume(to_canonical(vol, str(p)), Path(tmp) / f"{case}_0000{ending}"))
            stems.append(Path(tmp) / "out" / case)
        (Path(tmp) / "out").mkdir()
        run(inputs, stems)
        written: dict[str, Path] = {}
        for p, case, stem in zip(image_paths, cases, stems):
            original = read_volume(p)
            pred = read_volume(stem.with_name(stem.name + ending))
            written[case] = write_volume(from_canonical(pred, original, f"prediction of {p}"),
                                         out_dir / f"{case}{ending}")
        return written
