"""Simulated model predictions: a documented error model applied to reference label maps.

For one model on one case the prediction is made in this order (docs/phantoms.md):

1. **Left/right swap** (prone cases only, probability ``lr_swap_probability``): the
   reference's left and right labels (kidneys, adrenals, lungs) are exchanged, as a
   model that ignores the prone position would do.
2. **Per-structure boundary error**: with the reference's signed distance map
   ``sdf`` (mm, negative inside), the predicted structure is
   ``sdf(p - t) < m + a * field(p)``: ``t`` a rigid shift (whole voxels, drawn in mm),
   ``m`` an erosion (< 0) / dilation (> 0) margin in mm, ``field`` a smooth random
   field in [-1, 1] and ``a`` its amplitude in mm
   (``boundary_noise_mm + boundary_noise_voxels * mean in-plane spacing``: a model's
   boundary noise is of the order of its voxels). Standard deviations scale with the
   structure (``structure_scale``), with ``cross_centre_scale`` when the test centre is
   not among the model's training centres, and with ``federated_scale`` for models
   trained on several centres; the margin has a per-structure bias
   (``structure_margin_bias_mm``) plus ``cross_centre_margin_bias_mm`` across centres.
   Structures are painted largest first, so small ones stay visible. A structure never
   vanishes by accident: if its perturbed mask is empty it keeps the reference mask.
3. **Missed structures**: each structure in ``miss_structures`` is left out with
   probability ``miss_probability`` (``miss_probability_cross_centre`` across centres).
4. **False-positive kidney fragment** (nephrectomy cases, probability
   ``fp_kidney_probability``): a ball of ``fp_kidney_volume_ml`` centred at the mirror
   image of the remaining kidney's centroid across the spine's sagittal plane (the empty
   renal fossa) is labelled as the removed kidney where the prediction was background
   or bowel. The number of voxels painted is recorded.

Randomness: one :class:`numpy.random.Generator` per (model, centre, case), passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from oarbench.labels import DEFAULT_LABELS, LabelMap

__all__ = ["ErrorModel", "InjectedError", "OBSERVER_ERROR_MODEL", "simulate_case", "signed_distances"]

_SWAP_PAIRS = (("Kidney_L", "Kidney_R"), ("Glnd_Adrenal_L", "Glnd_Adrenal_R"), ("Lung_L", "Lung_R"))


@dataclass(frozen=True)
class ErrorModel:
    """Parameters of the simulated predictions (the ``[error_model]`` TOML section).

    Distances in mm, volumes in mL, probabilities in [0, 1].
    """

    shift_sd_mm: float = 1.0
    margin_sd_mm: float = 0.6
    boundary_noise_mm: float = 0.8
    boundary_noise_voxels: float = 0.5
    cross_centre_scale: float = 2.5
    cross_centre_margin_bias_mm: float = -1.0
    federated_scale: float = 1.15
    structure_scale: dict[str, float] = field(default_factory=dict)
    structure_margin_bias_mm: dict[str, float] = field(default_factory=dict)
    miss_structures: tuple[str, ...] = ("Glnd_Adrenal_L", "Glnd_Adrenal_R")
    miss_probability: float = 0.05
    miss_probability_cross_centre: float = 0.3
    fp_kidney_probability: float = 0.5
    fp_kidney_volume_ml: float = 3.0
    lr_swap_probability: float = 0.3

    def __post_init__(self) -> None:
        for name in ("miss_probability", "miss_probability_cross_centre", "fp_kidney_probability", "lr_swap_probability"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"[error_model] {name} must be in [0, 1], got {p!r}")
        for name in ("shift_sd_mm", "margin_sd_mm", "boundary_noise_mm", "boundary_noise_voxels",
                     "cross_centre_scale", "federated_scale",
                     "fp_kidney_volume_ml"):
            if getattr(self, name) < 0:
                raise ValueError(f"[error_model] {name} must be >= 0, got {getattr(self, name)!r}")
        for table in (self.structure_scale, self.structure_margin_bias_mm):
            for s in table:
                DEFAULT_LABELS.value(s)  # KeyError for unknown names
        for s in self.miss_structures:
            DEFAULT_LABELS.value(s)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<toml>") -> "ErrorModel":
        """Parameters from a parsed ``[error_model]`` table; ValueError names ``source``."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: [error_model] must be a table")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: [error_model] has unknown keys {unknown}; known: {sorted(known)}")
        kw = dict(data)
        try:
            if "miss_structures" in kw:
                kw["miss_structures"] = tuple(str(s) for s in kw["miss_structures"])
            for key in ("structure_scale", "structure_margin_bias_mm"):
                if key in kw:
                    kw[key] = {str(k): float(v) for k, v in kw[key].items()}
            return cls(**kw)
        except KeyError as exc:
            raise ValueError(f"{source}: [error_model] {exc.args[0]}") from exc
        except (TypeError, AttributeError, ValueError) as exc:
            msg = str(exc)
            raise ValueError(f"{source}: {msg if msg.startswith('[error_model]') else '[error_model] ' + msg}") from exc

    def as_dict(self) -> dict:
        return {
            "shift_sd_mm": self.shift_sd_mm,
            "margin_sd_mm": self.margin_sd_mm,
            "boundary_noise_mm": self.boundary_noise_mm,
            "boundary_noise_voxels": self.boundary_noise_voxels,
            "cross_centre_scale": self.cross_centre_scale,
            "cross_centre_margin_bias_mm": self.cross_centre_margin_bias_mm,
            "federated_scale": self.federated_scale,
            "miss_structures": list(self.miss_structures),
            "miss_probability": self.miss_probability,
            "miss_probability_cross_centre": self.miss_probability_cross_centre,
            "fp_kidney_probability": self.fp_kidney_probability,
            "fp_kidney_volume_ml": self.fp_kidney_volume_ml,
            "lr_swap_probability": self.lr_swap_probability,
            "structure_scale": dict(self.structure_scale),
            "structure_margin_bias_mm": dict(self.structure_margin_bias_mm),
        }


#: A second observer: the same boundary model with inter-observer magnitudes and none of a
#: model's discrete errors (no missed structures, no false-positive kidney, no left/right swap).
#: Magnitudes are chosen, not fitted (docs/phantoms.md, "The second observer"): boundary
#: disagreement of a few millimetres, larger in absolute terms for the large organs (their
#: ill-defined ends) and largest for the low-contrast hollow and tubular structures, so that
#: the mean inter-observer DSC over the structures is about 0.87-0.89 with HD95 of a few mm,
#: the level reported for abdominal organs by 3 observers (mean DSC 0.89 +- 0.15, Hausdorff
#: distance 3.2 +- 1.4 mm; PMC4211895).
OBSERVER_ERROR_MODEL = ErrorModel(
    shift_sd_mm=1.0, margin_sd_mm=0.7, boundary_noise_mm=1.0, boundary_noise_voxels=0.6,
    cross_centre_scale=1.0, cross_centre_margin_bias_mm=0.0, federated_scale=1.0,
    structure_scale={
        "A_Aorta": 0.8, "Lung_L": 1.2, "Lung_R": 1.2, "Vertebrae": 1.2, "SpinalCord": 1.2,
        "Kidney_L": 1.3, "Kidney_R": 1.3, "VenaCava_I": 1.3, "Gallbladder": 1.3,
        "Liver": 1.4, "Spleen": 1.4, "Heart": 1.4,
        "Esophagus": 1.6, "Stomach": 1.6, "Glnd_Adrenal_L": 1.6, "Glnd_Adrenal_R": 1.6,
        "Pancreas": 2.2, "Duodenum": 2.4, "Bowel": 2.4,
    },
    structure_margin_bias_mm={}, miss_structures=(), miss_probability=0.0, miss_probability_cross_centre=0.0,
    fp_kidney_probability=0.0, lr_swap_probability=0.0,
)


@dataclass(frozen=True)
class InjectedError:
    """One discrete error the model injected into one prediction.

    ``error`` is ``missed`` (structure left out), ``fp_kidney`` (a fragment labelled as
    the removed kidney; ``voxels``/``volume_ml`` painted) or ``lr_swap`` (left and right
    labels exchanged; ``structure`` is empty).
    """

    model: str
    centre: str
    case: str
    error: str
    structure: str
    voxels: int
    volume_ml: float

    def as_dict(self) -> dict:
        return {"model": self.model, "centre": self.centre, "case": self.case, "error": self.error,
                "structure": self.structure, "voxels": self.voxels, "volume_ml": self.volume_ml}


_PAD_MM = 12.0  # band around each structure where its signed distance is computed


@dataclass(frozen=True)
class _SDF:
    slices: tuple[slice, slice, slice]
    sdf: np.ndarray  # float32 mm, negative inside, on the padded box


def signed_distances(labels: np.ndarray, spacing_zyx: tuple[float, float, float],
                     label_map: LabelMap = DEFAULT_LABELS) -> dict[int, _SDF]:
    """Signed distance maps (mm, negative inside) of each present label, in a padded box.

    Computed once per case and shared by all simulated models.
    """
    out: dict[int, _SDF] = {}
    pad = [int(np.ceil(_PAD_MM / s)) + 1 for s in spacing_zyx]
    objects = ndimage.find_objects(labels, max_label=label_map.max_value)
    for value, _ in label_map:
        box = objects[value - 1] if value - 1 < len(objects) else None
        if box is None:
            continue
        sl = tuple(slice(max(b.start - p, 0), min(b.stop + p, n)) for b, p, n in zip(box, pad, labels.shape))
        mask = labels[sl] == value
        outside = ndimage.distance_transform_edt(~mask, sampling=spacing_zyx)
        inside = ndimage.distance_transform_edt(mask, sampling=spacing_zyx)
        out[value] = _SDF(sl, (outside - inside).astype(np.float32))
    return out


def _smooth_field(shape: tuple[int, ...], spacing_zyx, rng: np.random.Generator, k: int = 4,
                  wavelength_mm: float = 25.0) -> np.ndarray:
    """A smooth random field in [-1, 1] (mean of k random plane waves)."""
    grids = [np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing_zyx)]
    f = np.zeros(shape, dtype=np.float32)
    for _ in range(k):
        d = rng.normal(size=3)
        d *= (2 * np.pi / wavelength_mm) * rng.uniform(0.7, 1.4) / np.linalg.norm(d)
        phase = rng.uniform(0, 2 * np.pi)
        arg = (d[0] * grids[0])[:, None, None] + (d[1] * grids[1])[None, :, None] + (d[2] * grids[2])[None, None, :]
        f += np.cos(arg + phase)
    return f / k


def _swap_lr(labels: np.ndarray, label_map: LabelMap) -> np.ndarray:
    lut = np.arange(256, dtype=np.uint8)
    for a, b in _SWAP_PAIRS:
        va, vb = label_map.value(a), label_map.value(b)
        lut[va], lut[vb] = vb, va
    return lut[labels]


def simulate_case(
    reference: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    direction: tuple[float, ...],
    *,
    model: str,
    centre: str,
    case: str,
    in_domain: bool,
    federated: bool,
    nephrectomy: str,
    prone: bool,
    params: ErrorModel,
    rng: np.random.Generator,
    sdfs: dict[int, _SDF] | None = None,
    label_map: LabelMap = DEFAULT_LABELS,
) -> tuple[np.ndarray, list[InjectedError]]:
    """One simulated prediction (uint8, z, y, x, on the reference grid) and its injected errors.

    ``direction`` (row-major 3x3, SimpleITK) locates the patient's left-right axis for the
    false-positive fragment. All draws happen in a fixed order whatever the outcome, so
    changing one probability does not reshuffle the other errors.
    """
    inj: list[InjectedError] = []
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    voxel_mm = float(np.mean(spacing_zyx[1:]))  # mean in-plane voxel size
    scale = (1.0 if in_domain else params.cross_centre_scale) * (params.federated_scale if federated else 1.0)

    swap = bool(rng.random() < params.lr_swap_probability) and prone
    source = _swap_lr(reference, label_map) if swap else reference
    if swap:
        inj.append(InjectedError(model, centre, case, "lr_swap", "", 0, 0.0))
    if sdfs is None or swap:
        sdfs = signed_distances(source, spacing_zyx, label_map)

    pred = np.zeros_like(reference, dtype=np.uint8)
    # Largest structures first so that small ones are painted last.
    order = sorted(sdfs, key=lambda v: -int(np.count_nonzero(sdfs[v].sdf < 0)))
    missed_draws = {v: rng.random() for v, _ in label_map}
    drawn: dict[int, tuple[np.ndarray, float, float, int]] = {}
    for value, name in label_map:
        # Every structure's parameters are drawn, present or not, in label order.
        s = scale * params.structure_scale.get(name, 1.0)
        shift_mm = rng.normal(0.0, params.shift_sd_mm * s, 3)
        margin = params.structure_margin_bias_mm.get(name, 0.0) + rng.normal(0.0, params.margin_sd_mm * s)
        if not in_domain:
            margin += params.cross_centre_margin_bias_mm
        amp = (params.boundary_noise_mm + params.boundary_noise_voxels * voxel_mm) * s
        drawn[value] = (shift_mm, margin, amp, int(rng.integers(0, 2**31 - 1)))
    limit = _PAD_MM - 1.0
    for value in order:
        shift_mm, margin, amp, field_seed = drawn[value]
        entry = sdfs[value]
        amp = min(amp, limit / 2.0)
        margin = float(np.clip(margin, -limit + amp, limit - amp))
        shift_mm = np.clip(shift_mm, -limit / 2.0, limit / 2.0)
        shift_vox = np.rint(shift_mm / np.asarray(spacing_zyx)).astype(int)
        sdf = entry.sdf
        # sdf(p - t): shifting the array by +t voxels moves the structure by +t.
        shifted = ndimage.shift(sdf, shift_vox, order=0, mode="nearest") if np.any(shift_vox) else sdf
        thr = margin + amp * _smooth_field(sdf.shape, spacing_zyx, np.random.default_rng(field_seed)) if amp > 0 else margin
        m = shifted < thr
        if not m.any():
            m = sdf < 0
        pred[entry.slices][m] = value
    for value in order:  # a structure covered by smaller ones keeps its reference voxels
        if not np.any(pred[sdfs[value].slices] == value):
            pred[sdfs[value].slices][sdfs[value].sdf < 0] = value

    for value, name in label_map:
        if name in params.miss_structures:
            p = params.miss_probability if in_domain else params.miss_probability_cross_centre
            if missed_draws[value] < p and np.any(pred == value):
                pred[pred == value] = 0
                inj.append(InjectedError(model, centre, case, "missed", name, 0, 0.0))

    fp_draw = rng.random()
    if nephrectomy in ("left", "right") and fp_draw < params.fp_kidney_probability:
        absent = label_map.value("Kidney_L" if nephrectomy == "left" else "Kidney_R")
        present = label_map.value("Kidney_R" if nephrectomy == "left" else "Kidney_L")
        ball = _fp_ball(reference, spacing_zyx, direction, present, label_map.value("Vertebrae"),
                        params.fp_kidney_volume_ml)
        if ball is not None:
            paint = ball & ((pred == 0) | (pred == label_map.value("Bowel")))
            n = int(paint.sum())
            if n:
                pred[paint] = absent
                inj.append(InjectedError(model, centre, case, "fp_kidney", label_map.name(absent), n, n * voxel_ml))
    return pred, inj


def _fp_ball(reference: np.ndarray, spacing_zyx, direction, present: int, spine: int,
             volume_ml: float) -> np.ndarray | None:
    """Ball of ``volume_ml`` at the mirror image of the remaining kidney across the spine.

    The mirror plane is perpendicular to the image axis that carries the physical x
    (patient left-right, prone or supine) and passes through the spine's centroid.
    """
    kid = np.argwhere(reference == present)
    bone = np.argwhere(reference == spine)
    if len(kid) == 0 or len(bone) == 0 or volume_ml <= 0:
        return None
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    # image axis (x=0, y=1, z=2 of SimpleITK) that is most aligned with physical x
    lr_axis_xyz = int(np.argmax(np.abs(d[0, :])))
    lr_axis = 2 - lr_axis_xyz  # in (z, y, x) array order
    c = kid.mean(axis=0)
    c[lr_axis] = 2.0 * bone.mean(axis=0)[lr_axis] - c[lr_axis]
    radius = (3.0 * volume_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    sp = np.asarray(spacing_zyx, dtype=float)
    zz, yy, xx = (np.arange(n, dtype=np.float32) * s for n, s in zip(reference.shape, sp))
    cz, cy, cx = c * sp
    dist2 = (zz[:, None, None] - cz) ** 2 + (yy[None, :, None] - cy) ** 2 + (xx[None, None, :] - cx) ** 2
    return dist2 <= radius * radius
