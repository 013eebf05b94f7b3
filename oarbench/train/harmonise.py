"""Site harmonisation: every case in one canonical orientation before nnU-Net sees it.

nnU-Net reads voxel arrays as stored (``SimpleITKIO``): two centres that store
the same anatomy with different axis orders or directions hand the network
arrays in which left and right (or head and feet) sit at opposite ends. The
training drivers therefore bring every training case to the canonical
orientation :data:`CANONICAL` first, and predictions of a model trained so are
made on the canonical copy of each input and mapped back to the input's own
grid, voxel for voxel (docs/training.md, "Site harmonisation").

Canonical orientation: identity direction cosines in the patient's LPS frame
(DICOM's): array axis x grows toward the patient's Left, y toward Posterior,
z toward Superior; what ``SimpleITK.DICOMOrient(image, "LPS")`` makes of an
axis-aligned image. Only the index order and the header change (a signed
permutation of the axes), so the voxel values are the stored ones and the
way back is exact. Oblique directions (not a signed permutation within
1e-3) are refused: resampling would change voxel values and the mapping back
would no longer be voxel for voxel.

Needs neither torch nor nnU-Net.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from oarbench.io import atomic_write_text, read_volume, write_volume
from oarbench.robustness.orientation import (  # shared with the nnU-Net predictor
    CANONICAL,
    PLANS_KEY,
    from_canonical,
    orientation_code,
    predict_in_canonical,
    to_canonical,
)

#: File in a harmonised dataset folder that records what was done to each case.
RECORD = "harmonisation.json"

__all__ = [
    "CANONICAL",
    "RECORD",
    "PLANS_KEY",
    "orientation_code",
    "to_canonical",
    "from_canonical",
    "harmonise_dataset",
    "dataset_record",
    "record_summary",
    "predict_in_canonical",
]

def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def _harmonise_file(src: Path, dst: Path) -> str:
    """Write ``src`` in the canonical orientation to ``dst`` (a link when it already is); its orientation code."""
    vol = read_volume(src)
    code = orientation_code(vol.direction, str(src)) if vol.array.ndim == 3 else None
    if code is None:
        raise ValueError(f"{src}: harmonisation needs a 3D image, got array shape {vol.array.shape}")
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    if code == CANONICAL and np.allclose(vol.direction, np.eye(3).ravel(), atol=0):
        os.symlink(src.resolve(), dst)
    else:
        write_volume(to_canonical(vol, str(src)), dst)
    return code


def harmonise_dataset(dataset_dir: str | Path, out_root: str | Path) -> Path:
    """A copy of an nnU-Net raw dataset with every training case in the canonical orientation.

    Writes ``out_root/<DatasetXXX_Name>/`` with ``dataset.json``, ``imagesTr/``
    and ``labelsTr/`` (cases already canonical are symbolic links to the
    originals) and :data:`RECORD`: the canonical orientation and, per case,
    the orientation it was stored in. Returns that folder. Done again only
    for files that changed since (size and modification time).

    Raises ValueError naming the file for an oblique or non-3D image, and for a
    dataset.json that lists its files (``"dataset"`` key; only the
    ``imagesTr``/``labelsTr`` layout is harmonised).
    """
    src = Path(dataset_dir).resolve()
    meta = json.loads((src / "dataset.json").read_text())
    if "dataset" in meta:
        raise ValueError(f"{src / 'dataset.json'}: lists its files ('dataset' key); harmonisation supports the "
                         "imagesTr/labelsTr layout only (train with harmonise=False to use it as stored)")
    ending = str(meta["file_ending"])
    out = Path(out_root) / src.name
    record_path = out / RECORD
    old: dict[str, Any] = {}
    if record_path.is_file():
        try:
            old = json.loads(record_path.read_text())
        except json.JSONDecodeError:
            old = {}
    if old.get("source") != str(src) or old.get("canonical") != CANONICAL:
        old = {}
    old_files = old.get("files", {})
    files: dict[str, Any] = {}
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        folder = src / sub
        names = sorted(p.name for p in folder.iterdir() if p.name.endswith(ending) and not p.name.startswith(".")) \
            if folder.is_dir() else []
        for stale in (out / sub).iterdir():  # cases removed from the source since (and left-over temp files)
            if stale.name not in names and (stale.is_symlink() or stale.is_file()):
                stale.unlink()
        for name in names:
            f = folder / name
            rel = f"{sub}/{name}"
            key = _stat_key(f)
            dst = out / sub / name
            prev = old_files.get(rel)
            if prev and prev.get("stat") == key and (dst.is_symlink() or dst.exists()):
                files[rel] = prev
                continue
            files[rel] = {"stored": _harmonise_file(f, dst), "stat": key}
    atomic_write_text(out / "dataset.json", json.dumps(meta, indent=1))
    record = {"canonical": CANONICAL, "source": str(src), "files": files}
    atomic_write_text(record_path, json.dumps(record, indent=1, sort_keys=True))
    return out


def dataset_record(dataset_dir: str | Path) -> dict[str, Any] | None:
    """The harmonisation record of a raw dataset folder (``None``: used as stored)."""
    p = Path(dataset_dir) / RECORD
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def record_summary(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """What was done to a site's training cases, without case names (for its fingerprint).

    ``{"orientation": "LPS", "images_by_stored_orientation": {"RAS": 12}, "images_reoriented": 12}``,
    or ``{"orientation": "as stored"}`` for a dataset used as stored.
    """
    if record is None:
        return {"orientation": "as stored"}
    counts: dict[str, int] = {}
    for rel, info in record.get("files", {}).items():
        if rel.startswith("imagesTr/"):
            counts[info["stored"]] = counts.get(info["stored"], 0) + 1
    return {"orientation": record["canonical"], "images_by_stored_orientation": dict(sorted(counts.items())),
            "images_reoriented": int(sum(n for k, n in counts.items() if k != record["canonical"]))}
