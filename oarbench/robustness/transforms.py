"""Deterministic, invertible perturbations of a CT volume in patient coordinates.

Every perturbation is a small frozen object with parameters, a ``condition``
name (the value of the ``condition`` column), :meth:`~Perturbation.apply`,
:meth:`~Perturbation.inverse` and :meth:`~Perturbation.map_back` (a prediction
made on the perturbed image, back onto the original reference grid).

Coordinates
-----------
Physical space is SimpleITK's (DICOM LPS): +x towards the patient's left, +y
posterior, +z superior (head). A voxel with index ``i = (ix, iy, iz)`` lies at
``p = origin + D @ (spacing_xyz * i)`` with ``D`` the 3x3 direction matrix
(column ``m`` = physical direction of index axis ``m``). Arrays are
``(z, y, x)`` as ``sitk.GetArrayFromImage`` returns them.

A *rigid* perturbation moves the patient by ``T(p) = c + R (p - c)`` about the
image centre ``c`` (the centre of the box of voxel centres), ``R`` orthogonal.
The perturbed image shows the moved patient on a grid with the **same
direction cosines**, so to any model the patient appears moved:
``I'(p) = I(T^-1(p))``.

* Flips (``R`` a reflection of one patient axis) and 90-degree steps are
  lossless: the grid maps onto a grid, and the new array is an index
  permutation (transpose + flips) of the old one. The direction is unchanged,
  the spacing is permuted with the axes (an anisotropic voxel stays the same
  physical box), the origin is that of the moved grid (unchanged for flips).
  They need an axis-aligned direction matrix (a signed permutation, within
  1e-3); oblique images raise ValueError.
* Small angles resample with linear interpolation (CT) onto an enlarged grid
  of the same spacing and direction, centred on ``c``, that holds every moved
  voxel centre (bounding box of the moved corners), padded with -1024 HU.
* ``reorient_XYZ`` is header-only: voxels and direction cosines change
  together, the patient does not move.

Rotations follow the right-hand rule about the positive physical axis
(``rot90_si`` turns +x (left) towards +y (posterior) about +z (superior)).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import SimpleITK as sitk

from oarbench.io import DIRECTION_ATOL, ORIGIN_ATOL_MM, SPACING_RTOL, Volume

__all__ = [
    "Perturbation",
    "Identity",
    "LosslessRigid",
    "SmallRotation",
    "Reorient",
    "ResampleControl",
    "control_for",
    "AIR_HU",
    "AXES",
    "DEFAULT_ROTATE_CONDITIONS",
    "parse_condition",
    "parse_conditions",
    "random_small_rotations",
    "image_centre",
    "physical_matrix",
]

#: Fill value of the enlarged grid of small-angle rotations (air, HU).
AIR_HU = -1024.0

#: Patient axes -> physical axis index (LPS): lr = x, ap = y, si = z.
AXES: dict[str, int] = {"lr": 0, "ap": 1, "si": 2, "x": 0, "y": 1, "z": 2}

#: The set ``oarbench robustness --rotate`` runs when no ``--conditions`` are given.
DEFAULT_ROTATE_CONDITIONS: tuple[str, ...] = (
    "flip_lr", "flip_ap", "flip_si",
    "rot90_si", "rot180_si", "rot270_si",
    "prone", "feet_first",
    "rot_z+10", "rot_z-10",
)

_PERM_ATOL = 1e-3


@runtime_checkable
class Perturbation(Protocol):
    """What every perturbation offers."""

    @property
    def condition(self) -> str: ...

    def params(self) -> dict[str, Any]: ...

    def apply(self, volume: Volume, *, labels: bool = False) -> Volume: ...

    def inverse(self) -> "Perturbation": ...

    def map_back(self, prediction: Volume, original: Volume) -> Volume: ...


# ----------------------------------------------------------------------------- geometry helpers


def physical_matrix(volume: Volume) -> np.ndarray:
    """The 3x3 direction matrix ``D`` (columns = index axes x, y, z)."""
    if volume.array.ndim != 3:
        raise ValueError(f"perturbations need a 3D volume, got array shape {volume.array.shape}")
    return np.asarray(volume.direction, dtype=float).reshape(3, 3)


def _spacing_xyz(volume: Volume) -> np.ndarray:
    return np.asarray(volume.spacing[::-1], dtype=float)


def _size_xyz(volume: Volume) -> np.ndarray:
    return np.asarray(volume.array.shape[::-1], dtype=float)


def image_centre(volume: Volume) -> np.ndarray:
    """Physical centre (x, y, z) mm of the box spanned by the voxel centres."""
    d = physical_matrix(volume)
    return np.asarray(volume.origin, float) + d @ (_spacing_xyz(volume) * (_size_xyz(volume) - 1) / 2.0)


def _axis_rotation(axis: int, degrees: float) -> np.ndarray:
    """Right-handed rotation matrix about physical axis ``axis`` (0=x, 1=y, 2=z)."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    # exact values for multiples of 90 degrees, so lossless steps stay exact
    if float(degrees) % 90 == 0:
        c, s = float(round(c)), float(round(s))
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _signed_permutation(q: np.ndarray, what: str) -> np.ndarray:
    rounded = np.round(q)
    ok = np.allclose(q, rounded, atol=_PERM_ATOL) and all(
        np.count_nonzero(rounded[k]) == 1 and np.count_nonzero(rounded[:, k]) == 1 for k in range(3)
    )
    if not ok:
        raise ValueError(
            f"{what}: the image direction is not axis-aligned ({np.round(q, 4).tolist()}); flips and "
            "90-degree steps need an axis-aligned grid (resample the image first)"
        )
    return rounded


def _permute_array(array: np.ndarray, q: np.ndarray) -> np.ndarray:
    """New array ``A'[j] = A[i]`` with index map ``j = Q i + k`` (xyz indices).

    ``Q`` is a signed permutation; ``k`` puts the flipped axes back in range.
    Row ``m`` of ``Q`` has its single non-zero entry in column ``pi(m)``:
    new index axis ``m`` is old axis ``pi(m)``, reversed where the sign is -1.
    """
    perm = [int(np.flatnonzero(q[m])[0]) for m in range(3)]
    sign = [int(q[m, perm[m]]) for m in range(3)]
    # array axis a <-> index axis 2 - a
    out = np.transpose(array, axes=[2 - perm[2 - a] for a in range(3)])
    flip_axes = tuple(a for a in range(3) if sign[2 - a] < 0)
    if flip_axes:
        out = np.flip(out, axis=flip_axes)
    return np.ascontiguousarray(out)


def _placeholder(shape: tuple[int, ...]) -> np.ndarray:
    """A read-only zero array of ``shape`` that takes no memory (grid arithmetic only)."""
    return np.broadcast_to(np.zeros((), dtype=np.uint8), shape)


def _permuted_grid(volume: Volume, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spacing and size (x, y, z) of the grid after the signed axis permutation ``q``,
    and the index shift ``k`` that keeps indices non-negative (``j = Q i + k``)."""
    abs_q = np.abs(q)
    s_new = abs_q @ _spacing_xyz(volume)
    n_new = abs_q @ _size_xyz(volume)
    return s_new, n_new, np.where(q.sum(axis=1) < 0, n_new - 1, 0.0)


def _move_grid(volume: Volume, r: np.ndarray, centre: np.ndarray, what: str, *, header_only: bool = False) -> Volume:
    """Apply ``T(p) = c + R (p - c)`` losslessly (``R`` maps the grid onto a grid).

    With ``header_only`` the returned volume holds a placeholder array: only
    its grid (shape, spacing, origin, direction) is meaningful.
    """
    d = physical_matrix(volume)
    q = _signed_permutation(d.T @ r @ d, what)
    s_new, n_new, k = _permuted_grid(volume, q)
    origin = centre + r @ (np.asarray(volume.origin, float) - centre) - d @ (s_new * k)
    array = _placeholder(tuple(int(v) for v in n_new[::-1])) if header_only else _permute_array(volume.array, q)
    return Volume(array, tuple(float(v) for v in s_new[::-1]), tuple(float(v) for v in origin), volume.direction)


def _snap_to_grid(candidate: Volume, original: Volume, what: str) -> Volume:
    """Return ``candidate``'s voxels with ``original``'s exact header (grids must agree)."""
    if candidate.array.shape != original.array.shape:
        raise ValueError(f"{what}: mapped-back shape {candidate.array.shape} differs from the reference {original.array.shape}")
    if not (
        np.allclose(candidate.spacing, original.spacing, rtol=SPACING_RTOL, atol=0)
        and np.allclose(candidate.origin, original.origin, rtol=0, atol=ORIGIN_ATOL_MM)
        and np.allclose(candidate.direction, original.direction, rtol=0, atol=DIRECTION_ATOL)
    ):
        raise ValueError(f"{what}: mapped-back grid does not coincide with the reference grid")
    return original.with_array(candidate.array)


def _check_on_grid(prediction: Volume, expected: Volume, condition: str) -> None:
    if prediction.array.shape != expected.array.shape:
        raise ValueError(
            f"{condition}: the prediction has shape {prediction.array.shape} (z, y, x) but the perturbed image "
            f"it was made from has {expected.array.shape}; a predictor must write labels on its input's grid"
        )
    if not (
        np.allclose(prediction.spacing, expected.spacing, rtol=SPACING_RTOL, atol=0)
        and np.allclose(prediction.origin, expected.origin, rtol=0, atol=ORIGIN_ATOL_MM)
        and np.allclose(prediction.direction, expected.direction, rtol=0, atol=DIRECTION_ATOL)
    ):
        raise ValueError(
            f"{condition}: the prediction's header (spacing {prediction.spacing}, origin {prediction.origin}, "
            f"direction {prediction.direction}) differs from the perturbed image's (spacing {expected.spacing}, "
            f"origin {expected.origin}, direction {expected.direction})"
        )


def _fmt_angle(degrees: float) -> str:
    text = f"{degrees:+g}"
    return text


# ----------------------------------------------------------------------------- perturbations


@dataclass(frozen=True)
class Identity:
    """The unperturbed image (condition ``original``)."""

    @property
    def condition(self) -> str:
        return "original"

    def params(self) -> dict[str, Any]:
        return {"kind": "identity"}

    def apply(self, volume: Volume, *, labels: bool = False) -> Volume:
        return volume

    def inverse(self) -> "Identity":
        return self

    def map_back(self, prediction: Volume, original: Volume) -> Volume:
        _check_on_grid(prediction, original, self.condition)
        return original.with_array(prediction.array)


@dataclass(frozen=True)
class LosslessRigid:
    """A flip or 90-degree step about the image centre: an exact index permutation.

    Parameters
    ----------
    matrix:
        Row-major 3x3 orthogonal matrix ``R`` with entries in {-1, 0, 1}, acting
        on physical (x, y, z) = (left, posterior, superior) coordinates.
    name:
        The condition name (``flip_lr``, ``rot90_si``, ``prone``, ...).
    """

    matrix: tuple[float, ...]
    name: str

    def __post_init__(self) -> None:
        r = np.asarray(self.matrix, float).reshape(3, 3)
        if not (np.allclose(r @ r.T, np.eye(3)) and np.all(np.isin(r, (-1.0, 0.0, 1.0)))):
            raise ValueError(f"{self.name}: matrix {self.matrix} is not a signed permutation")

    @classmethod
    def flip(cls, axis: str) -> "LosslessRigid":
        """Mirror the patient along ``axis`` (lr, ap or si)."""
        r = np.eye(3)
        r[AXES[axis], AXES[axis]] = -1.0
        return cls(tuple(r.ravel().tolist()), f"flip_{axis}")

    @classmethod
    def rotation(cls, axis: str, degrees: int, name: str | None = None) -> "LosslessRigid":
        """Rotate the patient by a multiple of 90 degrees about ``axis`` (lr, ap or si)."""
        if degrees % 90 != 0:
            raise ValueError(f"lossless rotations are multiples of 90 degrees, got {degrees}")
        r = _axis_rotation(AXES[axis], degrees)
        return cls(tuple(r.ravel().tolist()), name or f"rot{degrees % 360}_{axis}")

    @property
    def condition(self) -> str:
        return self.name

    @property
    def r(self) -> np.ndarray:
        return np.asarray(self.matrix, float).reshape(3, 3)

    def params(self) -> dict[str, Any]:
        return {
            "kind": "lossless_rigid",
            "matrix_lps": [[int(v) for v in row] for row in self.r],
            "det": int(round(np.linalg.det(self.r))),
            "centre": "image",
        }

    def apply(self, volume: Volume, *, labels: bool = False) -> Volume:
        """The patient moved by ``R`` about the image centre (exact, any dtype)."""
        return _move_grid(volume, self.r, image_centre(volume), self.condition)

    def inverse(self) -> "LosslessRigid":
        return LosslessRigid(tuple(self.r.T.ravel().tolist()), f"inverse({self.name})")

    def map_back(self, prediction: Volume, original: Volume) -> Volume:
        """Exact inverse index permutation onto ``original``'s grid."""
        moved = _move_grid(original, self.r, image_centre(original), self.condition, header_only=True)
        _check_on_grid(prediction, moved, self.condition)
        back = self.inverse().apply(prediction)
        return _snap_to_grid(back, original, self.condition)


def _euler_resample(
    volume: Volume, grid: Volume, r_out_to_in: np.ndarray, centre: np.ndarray, *, linear: bool, fill: float
) -> Volume:
    """Resample ``volume`` onto ``grid`` with ``p_in = c + M (p_out - c)``."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in r_out_to_in.ravel()))
    transform.SetCenter(tuple(float(v) for v in centre))
    image = volume.to_image()
    ref = sitk.Image([int(v) for v in grid.array.shape[::-1]], sitk.sitkUInt8)
    ref.SetSpacing(tuple(reversed(grid.spacing)))
    ref.SetOrigin(grid.origin)
    ref.SetDirection(grid.direction)
    if linear:
        out = sitk.Resample(image, ref, transform, sitk.sitkLinear, float(fill), sitk.sitkFloat32)
        arr = sitk.GetArrayFromImage(out)
        if np.issubdtype(volume.array.dtype, np.integer):
            info = np.iinfo(volume.array.dtype)
            arr = np.clip(np.rint(arr), info.min, info.max).astype(volume.array.dtype)
        else:
            arr = arr.astype(volume.array.dtype, copy=False)
    else:
        out = sitk.Resample(image, ref, transform, sitk.sitkNearestNeighbor, float(fill), image.GetPixelID())
        arr = sitk.GetArrayFromImage(out)
    return grid.with_array(arr) if grid.array.shape == arr.shape else Volume(arr, grid.spacing, grid.origin, grid.direction)


@dataclass(frozen=True)
class SmallRotation:
    """Rotation by a small angle about a patient axis through the image centre.

    The image is resampled (linear interpolation for CT, nearest neighbour for
    labels) onto an enlarged grid of the same spacing and direction, centred on
    the image centre, holding every rotated voxel centre; new voxels are air
    (``fill``, -1024 HU; 0 for labels).

    Parameters
    ----------
    axis:
        ``"x"`` (left-right), ``"y"`` (antero-posterior) or ``"z"`` (cranio-caudal).
    degrees:
        Angle, right-hand rule about the positive LPS axis.
    fill:
        HU of the padding.
    """

    axis: str
    degrees: float
    fill: float = AIR_HU

    def __post_init__(self) -> None:
        if self.axis not in ("x", "y", "z"):
            raise ValueError(f"rotation axis must be 'x', 'y' or 'z', got {self.axis!r}")
        if not math.isfinite(self.degrees):
            raise ValueError(f"rotation angle must be finite, got {self.degrees}")

    @property
    def condition(self) -> str:
        return f"rot_{self.axis}{_fmt_angle(self.degrees)}"

    @property
    def r(self) -> np.ndarray:
        return _axis_rotation(AXES[self.axis], self.degrees)

    def params(self) -> dict[str, Any]:
        return {
            "kind": "small_rotation",
            "axis": self.axis,
            "degrees": float(self.degrees),
            "centre": "image",
            "interpolation": "linear",
            "fill_hu": float(self.fill),
        }

    def output_grid(self, volume: Volume) -> Volume:
        """The enlarged grid (placeholder array) that holds the rotated image."""
        d = physical_matrix(volume)
        s = _spacing_xyz(volume)
        n = _size_xyz(volume)
        c = image_centre(volume)
        corners = np.array([[a, b, e] for a in (0, 1) for b in (0, 1) for e in (0, 1)], float) * (n - 1)
        phys = np.asarray(volume.origin, float) + (d @ (corners * s).T).T
        moved = c + (self.r @ (phys - c).T).T
        # extent along each index axis of the (unchanged) direction frame, in voxels
        local = (d.T @ (moved - c).T).T / s
        half = np.max(np.abs(local), axis=0)
        # a grid of n voxels centred on c reaches (n - 1) / 2 voxels either side: n >= 2 half + 1.
        # Keep the original parity along each axis: the new voxel centres then include the old
        # ones (an angle of 0 gives back the original grid exactly).
        n_new = np.ceil(2 * half + 1 - 1e-6)
        n_new = np.where((n_new - n) % 2 == 1, n_new + 1, n_new)
        n_new = np.maximum(n_new, n)
        origin = c - d @ (s * (n_new - 1) / 2.0)
        shape = tuple(int(v) for v in n_new[::-1])
        return Volume(_placeholder(shape), volume.spacing, tuple(float(v) for v in origin), volume.direction)

    def apply(self, volume: Volume, *, labels: bool = False) -> Volume:
        """Rotate: linear interpolation and -1024 HU padding, or nearest and 0 for ``labels``."""
        grid = self.output_grid(volume)
        c = image_centre(volume)
        return _euler_resample(
            volume, grid, self.r.T, c, linear=not labels, fill=0.0 if labels else self.fill
        )

    def inverse(self) -> "SmallRotation":
        return SmallRotation(self.axis, -self.degrees, self.fill)

    def map_back(self, prediction: Volume, original: Volume) -> Volume:
        """Nearest-neighbour resampling through the exact inverse onto ``original``'s grid."""
        _check_on_grid(prediction, self.output_grid(original), self.condition)
        c = image_centre(original)
        # output point p on the original grid takes the prediction at T(p) = c + R (p - c)
        back = _euler_resample(prediction, original, self.r, c, linear=False, fill=0.0)
        return original.with_array(back.array)


@dataclass(frozen=True)
class ResampleControl:
    """Every non-model step of a small rotation, without the rotation: a control condition.

    The CT goes through the rotation's own interpolation (linear, onto the enlarged grid, by
    ``degrees`` about ``axis``: the same voxel values the rotated image has) and is then taken
    back onto the original grid by the rotation's own label mapping (nearest neighbour through
    the exact inverse). The patient is back where it was; the model then sees the rotation's
    interpolated values in the unrotated pose, and its prediction is already on the original
    grid (``map_back`` is the identity). For a predictor that acts voxel by voxel (e.g. a CT
    threshold) the nearest-neighbour step commutes with the prediction, so rotation and control
    give the same labels exactly and ``rotation - control`` is the model's rotation effect; for
    a network, the nearest-neighbour step sits before the model in the control and after it in
    the rotation (positional jitter of at most half a voxel diagonal). With ``labels=True``
    (the noise floor) it is the rotation's nearest-neighbour round trip. Condition name
    ``resample_<axis><signed angle>``, e.g. ``resample_z+10`` beside ``rot_z+10``.
    """

    axis: str
    degrees: float
    fill: float = AIR_HU

    def __post_init__(self) -> None:
        SmallRotation(self.axis, self.degrees, self.fill)  # same checks
        if self.degrees == 0:
            raise ValueError("a resample control needs a non-zero angle (0 degrees does not interpolate)")
        object.__setattr__(self, "degrees", float(self.degrees))

    @property
    def rotation(self) -> SmallRotation:
        return SmallRotation(self.axis, self.degrees, self.fill)

    @property
    def condition(self) -> str:
        return f"resample_{self.axis}{_fmt_angle(self.degrees)}"

    def params(self) -> dict[str, Any]:
        return {
            "kind": "resample_control",
            "axis": self.axis,
            "degrees": float(self.degrees),
            "centre": "image",
            "interpolation": "linear forward (as the rotation), nearest neighbour back (as the rotation's prediction)",
            "fill_hu": float(self.fill),
        }

    def apply(self, volume: Volume, *, labels: bool = False) -> Volume:
        rot = self.rotation
        moved = rot.apply(volume, labels=labels)
        return rot.map_back(moved, volume)

    def inverse(self) -> "ResampleControl":
        return self

    def map_back(self, prediction: Volume, original: Volume) -> Volume:
        """The prediction is on the original grid already (identity, exact)."""
        _check_on_grid(prediction, original, self.condition)
        return original.with_array(prediction.array)


def control_for(rotation: SmallRotation) -> ResampleControl:
    """The control of a small rotation: same axis, same signed angle (:class:`ResampleControl`)."""
    return ResampleControl(rotation.axis, rotation.degrees, rotation.fill)


_ORIENT_LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


@dataclass(frozen=True)
class Reorient:
    """Header-only re-orientation: voxels and direction cosines change together.

    ``target`` names where index axes x, y, z point, one letter each (``LPS``:
    x towards the patient's left, y posterior, z superior; ``RAS``: right,
    anterior, superior; ``PIL``, ...). The patient does not move: every voxel
    keeps its physical position and value. A model that honours the header
    gives the same physical prediction.
    """

    target: str

    def __post_init__(self) -> None:
        t = self.target.upper()
        if len(t) != 3 or any(ch not in _ORIENT_LETTERS for ch in t) or len({_ORIENT_LETTERS[ch][0] for ch in t}) != 3:
            raise ValueError(f"orientation must be three letters, one of L/R, P/A, S/I each (e.g. RAS), got {self.target!r}")
        object.__setattr__(self, "target", t)

    @property
    def condition(self) -> str:
        return f"reorient_{self.target}"

    def params(self) -> dict[str, Any]:
        return {"kind": "reorient", "target": self.target, "header_only": True}

    def _target_direction(self) -> np.ndarray:
        d = np.zeros((3, 3))
        for m, ch in enumerate(self.target):
            axis, sign = _ORIENT_LETTERS[ch]
            d[axis, m] = sign
        return d

    def apply(self, volume: Volume, *, labels: bool = False) -> Volume:
        return self._apply(volume)

    def _apply(self, volume: Volume, *, header_only: bool = False) -> Volume:
        d = physical_matrix(volume)
        d_new = self._target_direction()
        # new index j relates to old index i through  D_new S_new j + o_new = D S i + o
        q = _signed_permutation(d_new.T @ d, self.condition)  # j = Q i + k (up to scale by spacing)
        s = _spacing_xyz(volume)
        s_new, n_new, k = _permuted_grid(volume, q)
        # physical position of new index 0: the old index i0 with Q i0 + k = 0
        i0 = q.T @ (-k)
        origin = np.asarray(volume.origin, float) + d @ (s * i0)
        array = _placeholder(tuple(int(v) for v in n_new[::-1])) if header_only else _permute_array(volume.array, q)
        return Volume(array, tuple(float(v) for v in s_new[::-1]), tuple(float(v) for v in origin),
                      tuple(float(v) for v in d_new.ravel()))

    def is_noop(self, volume: Volume) -> bool:
        """True when ``volume`` is stored in this orientation already (nothing would change)."""
        return bool(np.allclose(physical_matrix(volume), self._target_direction(), atol=_PERM_ATOL))

    def inverse(self) -> "Reorient":
        raise ValueError("a re-orientation's inverse depends on the original direction; use map_back")

    def map_back(self, prediction: Volume, original: Volume) -> Volume:
        """Exact inverse index permutation onto ``original``'s grid."""
        _check_on_grid(prediction, self._apply(original, header_only=True), self.condition)
        d = physical_matrix(original)
        letters = []
        for m in range(3):
            axis = int(np.argmax(np.abs(d[:, m])))
            sign = 1 if d[axis, m] > 0 else -1
            letters.append({(0, 1): "L", (0, -1): "R", (1, 1): "P", (1, -1): "A", (2, 1): "S", (2, -1): "I"}[(axis, sign)])
        back = Reorient("".join(letters)).apply(prediction)
        return _snap_to_grid(back, original, self.condition)


# ----------------------------------------------------------------------------- names


_FIXED: dict[str, Any] = {
    "original": Identity(),
    "prone": ("si", 180),
    "feet_first": ("ap", 180),
}
_SMALL_RE = re.compile(r"^rot_([xyz])([+-]\d+(?:\.\d+)?)$")
_LOSSLESS_RE = re.compile(r"^rot(90|180|270)_(lr|ap|si)$")
_FLIP_RE = re.compile(r"^flip_(lr|ap|si)$")
_REORIENT_RE = re.compile(r"^reorient_([A-Za-z]{3})$")
_CONTROL_RE = re.compile(r"^resample_([xyz])([+-]?\d+(?:\.\d+)?)$")


def parse_condition(name: str) -> Perturbation:
    """The perturbation a condition name stands for.

    ``original``; ``flip_lr|ap|si``; ``rot90|180|270_lr|ap|si``; ``prone``
    (180 degrees about the cranio-caudal axis); ``feet_first`` (180 degrees
    about the antero-posterior axis); ``rot_x|y|z+N`` / ``-N`` small angles in
    degrees (x = left-right, y = antero-posterior, z = cranio-caudal);
    ``reorient_XYZ`` header-only (e.g. ``reorient_RAS``); ``resample_x|y|z+N`` / ``-N`` the
    control of ``rot_x|y|z+N`` / ``-N`` (``resample_zN`` without a sign: ``+N``).
    """
    key = name.strip()
    if key == "original":
        return Identity()
    if key in ("prone", "feet_first"):
        axis, deg = _FIXED[key]
        return LosslessRigid.rotation(axis, deg, name=key)
    if m := _FLIP_RE.match(key):
        return LosslessRigid.flip(m.group(1))
    if m := _LOSSLESS_RE.match(key):
        return LosslessRigid.rotation(m.group(2), int(m.group(1)))
    if m := _SMALL_RE.match(key):
        deg = float(m.group(2))
        if deg == 0:
            raise ValueError(f"condition {name!r}: a 0-degree rotation is the original image")
        return SmallRotation(m.group(1), deg)
    if m := _REORIENT_RE.match(key):
        return Reorient(m.group(1))
    if m := _CONTROL_RE.match(key):
        return ResampleControl(m.group(1), float(m.group(2)))
    raise ValueError(
        f"unknown condition {name!r} (expected original, flip_lr|ap|si, rot90|180|270_lr|ap|si, prone, "
        "feet_first, rot_x|y|z+N / -N, resample_x|y|z+N / -N, reorient_XYZ)"
    )


def parse_conditions(names: str | list[str] | tuple[str, ...]) -> list[Perturbation]:
    """Parse a comma-separated string or list of condition names (duplicates removed, order kept)."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out: list[Perturbation] = []
    seen: set[str] = set()
    for n in names:
        p = parse_condition(n)
        if p.condition not in seen:
            seen.add(p.condition)
            out.append(p)
    return out


def random_small_rotations(
    rng: np.random.Generator, n: int, *, max_degrees: float = 15.0, axes: tuple[str, ...] = ("x", "y", "z")
) -> list[SmallRotation]:
    """``n`` small rotations with angles drawn uniformly in [-max, max] (rounded to 0.1 degree).

    The draw is the only random step: the returned objects are deterministic
    and record their angle. Zero angles are redrawn.
    """
    out: list[SmallRotation] = []
    while len(out) < n:
        axis = axes[int(rng.integers(len(axes)))]
        deg = round(float(rng.uniform(-max_degrees, max_degrees)), 1)
        if deg != 0:
            out.append(SmallRotation(axis, deg))
    return out
