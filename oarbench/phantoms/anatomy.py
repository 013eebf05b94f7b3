"""Synthetic paediatric thoraco-abdominal anatomy and its rasterisation to CT.

Coordinates
-----------
Anatomy is defined in *patient* coordinates, in mm, with the LPS convention of
DICOM and ITK: +x towards the patient's left, +y towards the patient's back
(posterior), +z towards the head (superior). The origin is the centre of the
body cross-section at the level of the renal hila.

The scanner (the image header's physical frame, also LPS for a supine
head-first patient) holds the patient on a couch below the body (+y). A supine
patient's patient coordinates equal the scanner coordinates minus the body
centre. A prone patient lies face down: the anatomy is rotated by 180 degrees
about the cranio-caudal (z) axis, ``(x, y) -> (-x, -y)``, while the header and
the couch stay where they are, exactly as when a prone scan is stored with a
supine header.

Arrays follow SimpleITK's ``GetArrayFromImage`` order (z, y, x).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

from oarbench.labels import DEFAULT_LABELS

__all__ = [
    "Grid",
    "Anatomy",
    "CONTRAST_PHASES",
    "build_anatomy",
    "render",
    "age_dimensions",
]

Mask = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class Grid:
    """An image grid in SimpleITK's convention.

    Attributes
    ----------
    size_xyz: voxels along x, y, z (index order of SimpleITK).
    spacing_xyz: voxel size in mm along the index axes x, y, z.
    origin: physical position (x, y, z) in mm of voxel index (0, 0, 0).
    direction: direction cosines, row-major 3x3 (columns are the index axes).
    """

    size_xyz: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def centred(
        cls,
        size_xyz: tuple[int, int, int],
        spacing_xyz: tuple[float, float, float],
        direction: tuple[float, ...],
        centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ) -> "Grid":
        """A grid whose field of view is centred on the physical point ``centre`` (mm)."""
        d = np.asarray(direction, dtype=float).reshape(3, 3)
        half = (np.asarray(size_xyz, dtype=float) - 1.0) / 2.0 * np.asarray(spacing_xyz, dtype=float)
        origin = np.asarray(centre, dtype=float) - d @ half
        return cls(tuple(int(s) for s in size_xyz), tuple(float(s) for s in spacing_xyz),
                   tuple(float(o) for o in origin), tuple(float(v) for v in d.ravel()))

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return (self.size_xyz[2], self.size_xyz[1], self.size_xyz[0])

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return (self.spacing_xyz[2], self.spacing_xyz[1], self.spacing_xyz[0])

    @property
    def matrix(self) -> np.ndarray:
        """3x3 matrix mapping an index (i, j, k) to a physical offset in mm: ``D @ diag(spacing)``."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3) * np.asarray(self.spacing_xyz)[None, :]

    def physical_coordinates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Physical x, y, z (mm, float32) of every voxel centre, each of shape (z, y, x)."""
        m = self.matrix
        nx, ny, nz = self.size_xyz
        i = np.arange(nx, dtype=np.float64)[None, None, :]
        j = np.arange(ny, dtype=np.float64)[None, :, None]
        k = np.arange(nz, dtype=np.float64)[:, None, None]
        out = []
        for row in range(3):
            c = self.origin[row] + m[row, 0] * i + m[row, 1] * j + m[row, 2] * k
            out.append(np.broadcast_to(c, self.shape_zyx).astype(np.float32))
        return out[0], out[1], out[2]

    def index_of(self, points: np.ndarray) -> np.ndarray:
        """Continuous (i, j, k) index of physical points (N, 3) in mm."""
        inv = np.linalg.inv(self.matrix)
        return (np.asarray(points, dtype=float) - np.asarray(self.origin)) @ inv.T

    def slices_for_box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Array slices (z, y, x) covering a physical axis-aligned box, or None if outside."""
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        idx = self.index_of(corners)
        first = np.floor(idx.min(axis=0)).astype(int)
        last = np.ceil(idx.max(axis=0)).astype(int) + 1
        first = np.maximum(first, 0)
        last = np.minimum(last, np.asarray(self.size_xyz))
        if np.any(last <= first):
            return None
        return (slice(first[2], last[2]), slice(first[1], last[1]), slice(first[0], last[0]))


# --------------------------------------------------------------------------- contrast


#: Mean HU per structure and contrast phase (paediatric values, rounded).
CONTRAST_PHASES: dict[str, dict[str, float]] = {
    "non_contrast": {
        "Liver": 58, "Spleen": 48, "Kidney": 32, "Glnd_Adrenal": 30, "Pancreas": 42, "Stomach": 15,
        "Duodenum": 22, "Bowel": 20, "Gallbladder": 8, "Esophagus": 42, "Heart": 42, "Lung": -820,
        "SpinalCord": 35, "A_Aorta": 42, "VenaCava_I": 40, "Vertebrae": 260,
    },
    "arterial": {
        "Liver": 75, "Spleen": 115, "Kidney": 175, "Glnd_Adrenal": 65, "Pancreas": 115, "Stomach": 18,
        "Duodenum": 55, "Bowel": 45, "Gallbladder": 10, "Esophagus": 55, "Heart": 260, "Lung": -800,
        "SpinalCord": 38, "A_Aorta": 300, "VenaCava_I": 80, "Vertebrae": 265,
    },
    "portal_venous": {
        "Liver": 115, "Spleen": 120, "Kidney": 160, "Glnd_Adrenal": 75, "Pancreas": 100, "Stomach": 20,
        "Duodenum": 65, "Bowel": 60, "Gallbladder": 10, "Esophagus": 60, "Heart": 160, "Lung": -810,
        "SpinalCord": 40, "A_Aorta": 170, "VenaCava_I": 160, "Vertebrae": 265,
    },
}
_AIR, _FAT, _MUSCLE, _CAVITY, _GAS = -1000.0, -95.0, 48.0, -35.0, -750.0
_COUCH_SHELL, _COUCH_FOAM = 150.0, -850.0


def _organ_key(name: str) -> str:
    return name[:-2] if name.endswith(("_L", "_R")) else name


# --------------------------------------------------------------------------- shapes


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix R = Rz(az) @ Ry(ay) @ Rx(ax) (angles in radians)."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Blob:
    """A deformed superellipsoid: smooth, and non-convex through bending and waves.

    In the blob's frame ``q = R^T (p - centre) / axes``, then ``qx += bend_x qz^2``,
    ``qy += bend_y qx^2``; a point is inside when
    ``|qx|^e + |qy|^e + |qz|^e < (1 + amp * mean_k cos(f_k . q + phi_k))^e``.
    """

    centre: np.ndarray  # mm, patient coordinates
    axes: np.ndarray  # semi-axes in mm
    rotation: np.ndarray  # 3x3
    exponent: float = 2.0
    bend_x: float = 0.0
    bend_y: float = 0.0
    amp: float = 0.0
    freqs: np.ndarray | None = None  # (K, 3)
    phases: np.ndarray | None = None  # (K,)

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        c = 1.0 + self.amp
        bound = np.array([c + abs(self.bend_x) * c * c, c + abs(self.bend_y) * c * c, c])
        half = np.abs(self.rotation) @ (self.axes * bound)
        return self.centre - half, self.centre + half

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        dx, dy, dz = x - self.centre[0], y - self.centre[1], z - self.centre[2]
        r = self.rotation
        qx = (r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz) / self.axes[0]
        qy = (r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz) / self.axes[1]
        qz = (r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz) / self.axes[2]
        if self.bend_x:
            qx = qx + self.bend_x * qz * qz
        if self.bend_y:
            qy = qy + self.bend_y * qx * qx
        limit = np.float32(1.0)
        if self.amp and self.freqs is not None and self.phases is not None:
            wave = np.zeros_like(qx)
            for f, ph in zip(self.freqs, self.phases):
                wave += np.cos(f[0] * qx + f[1] * qy + f[2] * qz + ph)
            limit = 1.0 + (self.amp / len(self.phases)) * wave
        if self.exponent == 2.0:
            return qx * qx + qy * qy + qz * qz < limit * limit
        e = self.exponent
        return np.abs(qx) ** e + np.abs(qy) ** e + np.abs(qz) ** e < np.abs(limit) ** e


@dataclass(frozen=True)
class Part:
    """A region of the anatomy: a conservative box (mm) and a mask function of patient x, y, z."""

    name: str
    lo: np.ndarray
    hi: np.ndarray
    inside: Mask


def _tube(path_x: Callable, path_y: Callable, radius: Callable, z0: float, z1: float, rmax: float,
          xr: tuple[float, float], yr: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, Mask]:
    """A tube along z between z0 and z1 with a centreline and radius that vary with z (mm)."""

    def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        cx, cy, rr = path_x(z), path_y(z), radius(z)
        return ((x - cx) ** 2 + (y - cy) ** 2 < rr * rr) & (z >= z0) & (z <= z1)

    lo = np.array([xr[0] - rmax, yr[0] - rmax, z0])
    hi = np.array([xr[1] + rmax, yr[1] + rmax, z1])
    return lo, hi, inside


# --------------------------------------------------------------------------- anatomy


def age_dimensions(age: float) -> tuple[float, float, float]:
    """Nominal body half-width W (lateral), half-depth D (antero-posterior) and template
    half-length H (cranio-caudal) in mm for an age in years (0 to 18)."""
    t = min(max(age, 0.0), 18.0) / 18.0
    width = 100.0 + 190.0 * t**0.75  # lateral body width at the renal level, mm
    w_half = width / 2.0
    d_half = w_half * (0.80 - 0.12 * t)
    h_half = (150.0 + 220.0 * t**0.8) / 2.0
    return w_half, d_half, h_half


@dataclass(frozen=True)
class Anatomy:
    """One patient's anatomy in patient coordinates (mm).

    ``structures`` are painted in order (later ones win where they overlap);
    ``tissue`` holds the unlabelled regions used for HU (body, fat, muscle, gas).
    ``kidney_centres`` are the kidney centres (mm), also for a removed kidney.
    """

    W: float
    D: float
    H: float
    structures: tuple[Part, ...]
    tissue: dict[str, Part]
    kidney_centres: dict[str, np.ndarray]
    body_offset: np.ndarray  # body centre in scanner coordinates (x, y, z), mm
    couch_top: float  # scanner y of the couch surface, mm
    gas_freqs: np.ndarray  # (K, 3) mm^-1, random field of bowel gas pockets
    gas_phases: np.ndarray  # (K,)


def build_anatomy(age: float, rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy. Every random draw happens here, in a fixed order,
    so nephrectomy and patient position (applied at rendering) never change the rest."""
    W0, D0, H0 = age_dimensions(age)
    W = W0 * rng.uniform(0.93, 1.07)
    D = D0 * rng.uniform(0.95, 1.05)
    H = H0 * rng.uniform(0.95, 1.05)
    t = min(max(age, 0.0), 18.0) / 18.0
    fat = W * rng.uniform(0.04, 0.09)
    wall = max(3.0, W * 0.035)

    def jitter(scale: float = 0.025) -> np.ndarray:
        return rng.normal(0.0, scale, 3)

    def waves(k: int = 5, fmin: float = 1.5, fmax: float = 3.5) -> tuple[np.ndarray, np.ndarray]:
        dirs = rng.normal(size=(k, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        freqs = dirs * rng.uniform(fmin, fmax, (k, 1))
        return freqs, rng.uniform(0, 2 * np.pi, k)

    def blob(c_n, a_n, angles, *, e=2.0, bend_x=0.0, bend_y=0.0, amp=0.12, min_mm=3.0) -> Blob:
        c = (np.asarray(c_n, float) + jitter()) * np.array([W, D, H])
        a = np.asarray(a_n, float) * rng.uniform(0.9, 1.1, 3) * np.array([W, D, H])
        a = np.maximum(a, min_mm)
        ang = np.asarray(angles, float) + rng.normal(0.0, 0.06, 3)
        f, ph = waves()
        return Blob(c, a, _rotation(*ang), e, bend_x * rng.uniform(0.8, 1.2), bend_y * rng.uniform(0.8, 1.2), amp, f, ph)

    # Diaphragm: two domes, lower posteriorly (costophrenic recesses).
    dome_r = 0.36 + rng.normal(0, 0.025)
    dome_l = dome_r - 0.05 + rng.normal(0, 0.015)
    gap = 2.0  # diaphragm thickness, mm

    def dome(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u, v = x / W, y / D
        return H * (np.maximum(dome_r - 1.1 * (u + 0.42) ** 2, dome_l - 1.1 * (u - 0.42) ** 2) - 0.25 * v)

    def below(b: Blob) -> Mask:
        return lambda x, y, z: b.inside(x, y, z) & (z < dome(x, y) - gap)

    def above(b: Blob) -> Mask:
        return lambda x, y, z: b.inside(x, y, z) & (z > dome(x, y) + gap)

    parts: list[Part] = []

    def add(name: str, lo, hi, fn: Mask) -> None:
        parts.append(Part(name, np.asarray(lo, float), np.asarray(hi, float), fn))

    def add_blob(name: str, b: Blob, fn: Mask | None = None) -> None:
        lo, hi = b.box()
        add(name, lo, hi, fn or b.inside)

    # Body outline (superellipse, flatter back), fat, muscle wall, paraspinal muscles.
    e_body = 2.3 + rng.uniform(-0.1, 0.3)

    def body_fn(shrink: float) -> Mask:
        def inside(x, y, z):
            taper = 1.0 - 0.05 * np.clip(z / H, 0.0, 1.5)
            a, b = W * taper - shrink, D - shrink
            return np.abs(x / a) ** e_body + np.abs(y / b) ** e_body < 1.0
        return inside

    big = np.array([W, D, 1e6])
    tissue = {
        "body": Part("body", -big, big, body_fn(0.0)),
        "muscle": Part("muscle", -big, big, body_fn(fat)),
        "cavity": Part("cavity", -big, big, body_fn(fat + wall)),
        "paraspinal": Part("paraspinal", np.array([-0.24 * W, 0.55 * D, -1e6]), np.array([0.24 * W, D, 1e6]),
                           lambda x, y, z: (np.abs(x) < 0.24 * W) & (y > 0.55 * D)),
    }

    # Bowel: smoothed random field (random Fourier features) in the lower abdomen.
    bf, bph = waves(k=10, fmin=0.05, fmax=0.11)  # cycles per mm scale set below
    bf = bf / (0.25 + 0.35 * t)  # finer loops in small children (mm^-1 scaled)
    bowel_top = H * (0.02 + rng.normal(0, 0.02))
    bowel_thr = 0.05 + rng.uniform(-0.05, 0.05)

    def bowel(x, y, z):
        f = np.zeros_like(x)
        for fr, ph in zip(bf, bph):
            f += np.cos(fr[0] * x + fr[1] * y + fr[2] * z + ph)
        f /= len(bph)
        region = ((x / (0.78 * W)) ** 2 + ((y + 0.15 * D) / (0.62 * D)) ** 2 < 1.0) & (z < bowel_top) & (z > -1.15 * H)
        return region & (f > bowel_thr - 0.08 * np.clip((bowel_top - z) / H, 0, 1))

    add("Bowel", [-0.78 * W, -0.77 * D, -1.15 * H], [0.78 * W, 0.47 * D, bowel_top], bowel)

    stomach = blob([0.33, -0.22, 0.16], [0.24, 0.3, 0.2], [0.0, 0.3, -0.4], bend_y=-0.5, amp=0.12)
    add_blob("Stomach", stomach, below(stomach))
    liver = blob([-0.33, -0.08, 0.16], [0.58, 0.68, 0.27], [0.0, -0.15, 0.25], e=2.4, bend_y=0.25, amp=0.10)
    add_blob("Liver", liver, below(liver))
    gall = blob([-0.32, -0.42, -0.02], [0.075, 0.11, 0.11], [0.5, 0.2, 0.3], bend_x=0.2, amp=0.08)
    add_blob("Gallbladder", gall)
    spleen = blob([0.6, 0.32, 0.14], [0.18, 0.36, 0.2], [0.0, 0.0, 0.6], bend_y=-0.6, amp=0.10)
    add_blob("Spleen", spleen, below(spleen))

    kid: dict[str, Blob] = {}
    for side, sgn, wz in (("L", 1.0, -0.08), ("R", -1.0, -0.14)):
        k = blob([sgn * 0.33, 0.4, wz], [0.17 + 0.04 * (1 - t), 0.2, 0.26], [0.0, sgn * 0.2, sgn * 0.5],
                 bend_x=-0.35 * sgn, amp=0.06)
        kid[side] = k
    add_blob("Kidney_L", kid["L"])
    add_blob("Kidney_R", kid["R"])

    pancreas = blob([0.12, 0.04, 0.06], [0.38, 0.1, 0.075], [0.0, 0.1, 0.3], bend_y=-0.6, amp=0.15)
    add_blob("Pancreas", pancreas)

    # Duodenum: a C-loop (part of a torus in the x-z plane) around the pancreatic head, open medially.
    duo_c = (np.array([-0.2, 0.05, -0.01]) + jitter(0.02)) * np.array([W, D, H])
    duo_R = max(0.1 * W, 8.0)
    duo_r = max(0.045 * W, 3.0)

    def duodenum(x, y, z):
        dx, dz = x - duo_c[0], z - duo_c[2]
        rho = np.sqrt(dx * dx + dz * dz)
        ring = (rho - duo_R) ** 2 + (y - duo_c[1]) ** 2 < duo_r * duo_r
        return ring & ~((dx > 0) & (np.abs(dz) < 0.75 * rho))

    ext = duo_R + duo_r
    add("Duodenum", duo_c - [ext, duo_r, ext], duo_c + [ext, duo_r, ext], duodenum)

    # Vessels along z.
    ao_r = max(0.055 * W, 3.0)
    ao_bif = H * (-0.62 + rng.normal(0, 0.03))
    ao_x0, ao_y0 = 0.04 * W, 0.2 * D
    lo, hi, ao = _tube(lambda z: ao_x0 + 0.07 * W * np.clip(z / H - 0.3, 0, 1),
                       lambda z: ao_y0 + 0.12 * D * np.clip(z / H - 0.3, 0, 1),
                       lambda z: ao_r, ao_bif, 1.6 * H, ao_r, (ao_x0, ao_x0 + 0.07 * W), (ao_y0, ao_y0 + 0.12 * D))
    add("A_Aorta", lo, hi, ao)
    ivc_r = max(0.05 * W, 3.0)
    ivc_x, ivc_y = -0.13 * W, 0.17 * D
    lo, hi, ivc = _tube(lambda z: ivc_x, lambda z: ivc_y - 0.1 * D * np.clip(z / H, 0, 1), lambda z: ivc_r,
                        H * -0.7, H * 0.55, ivc_r, (ivc_x, ivc_x), (ivc_y - 0.1 * D, ivc_y))
    add("VenaCava_I", lo, hi, ivc)

    # Lungs above the diaphragm, narrowing towards the apex.
    e_lung = 2.6
    for name, sgn in (("Lung_R", -1.0), ("Lung_L", 1.0)):
        lc = np.array([sgn * 0.47 * W, 0.05 * D]) + rng.normal(0, 0.01, 2) * [W, D]
        la = np.array([0.4 * W, 0.78 * D]) * rng.uniform(0.95, 1.05, 2)

        def lung(x, y, z, lc=lc, la=la):
            s = 1.0 - 0.3 * np.clip(z / H - 0.5, 0, 1.5)
            return (np.abs((x - lc[0]) / (la[0] * s)) ** e_lung + np.abs((y - lc[1]) / (la[1] * s)) ** e_lung < 1.0) & (
                z > dome(x, y) + gap)

        zlo = H * (min(dome_r, dome_l) - 1.1 * 0.9**2 - 0.3)
        add(name, [lc[0] - la[0], lc[1] - la[1], zlo], [lc[0] + la[0], lc[1] + la[1], 2.5 * H], lung)

    heart = blob([0.08, -0.3, 0.66], [0.34, 0.38, 0.26], [0.3, 0.0, -0.5], amp=0.06)
    add_blob("Heart", heart, above(heart))

    eso_r = max(0.04 * W, 2.5)
    ex0, ey0 = 0.02 * W, 0.22 * D
    lo, hi, eso = _tube(lambda z: ex0 + 0.12 * W * np.clip((0.75 * H - z) / (0.5 * H), 0, 1),
                        lambda z: ey0 - 0.3 * D * np.clip((0.75 * H - z) / (0.5 * H), 0, 1),
                        lambda z: eso_r, H * 0.26, 1.6 * H, eso_r, (ex0, ex0 + 0.12 * W), (ey0 - 0.3 * D, ey0))
    add("Esophagus", lo, hi, eso)

    # Vertebral column: bodies separated by discs plus a posterior arch around the canal.
    vb_c = np.array([0.0, 0.48 * D])
    vb_a = np.array([0.13 * W, 0.15 * D])
    canal_y = vb_c[1] + vb_a[1] + max(0.06 * W, 3.5)
    canal_r = max(0.06 * W, 3.5)
    arch_r = canal_r + max(0.04 * W, 2.5)
    period = 2.0 * H / 11.0  # about T8..L5 across the template
    phase0 = rng.uniform(0, period)
    disc = 0.22 - 0.08 * t  # fraction of each segment that is disc (thicker in infants)

    def vertebrae(x, y, z):
        seg = np.mod(z - phase0, period) / period
        bone_level = seg > disc
        bodies = ((x - vb_c[0]) / vb_a[0]) ** 2 + ((y - vb_c[1]) / vb_a[1]) ** 2 < 1.0
        rr = x * x + (y - canal_y) ** 2
        arch = (rr < arch_r * arch_r) & (rr > canal_r * canal_r)
        spinous = (np.abs(x) < 0.3 * arch_r) & (y > canal_y) & (y < canal_y + 2.6 * arch_r)
        return bone_level & (bodies | arch | spinous)

    add("Vertebrae", [-max(vb_a[0], arch_r), vb_c[1] - vb_a[1], -1e6], [max(vb_a[0], arch_r), canal_y + 2.6 * arch_r, 1e6],
        vertebrae)
    cord_r = max(0.65 * canal_r, 2.0)
    conus = H * (-0.05 - 0.25 * (1 - t) + rng.normal(0, 0.02))  # lower in infants
    lo, hi, cord = _tube(lambda z: 0.0, lambda z: canal_y, lambda z: cord_r, conus, 1.6 * H, cord_r, (0, 0), (canal_y, canal_y))
    add("SpinalCord", lo, hi, cord)

    # Adrenals last: small, painted over their neighbours.
    for side, sgn in (("L", 1.0), ("R", -1.0)):
        kc = kid[side].centre
        top = kc[2] + kid[side].axes[2] * 0.9
        c_n = np.array([kc[0] / W - sgn * 0.07, kc[1] / D - 0.12, top / H + 0.05])
        b = blob(c_n, [0.055, 0.11, 0.08], [0.0, 0.0, sgn * 0.6], bend_y=0.8, amp=0.1, min_mm=2.5)
        add_blob(f"Glnd_Adrenal_{side}", b)

    gas_freqs, gas_phases = waves(k=6, fmin=0.12, fmax=0.3)  # mm^-1: pockets of a few mm
    body_offset = np.array([rng.normal(0, 4.0), rng.normal(0, 4.0), rng.normal(0, 0.05 * H)])
    couch_top = body_offset[1] + D + rng.uniform(0.5, 3.0)
    return Anatomy(W, D, H, tuple(parts), tissue, {s: kid[s].centre.copy() for s in ("L", "R")}, body_offset,
                   couch_top, gas_freqs, gas_phases)


# --------------------------------------------------------------------------- rendering


def _to_scanner(points: np.ndarray, anatomy: Anatomy, prone: bool) -> np.ndarray:
    p = np.array(points, dtype=float)
    if prone:
        p[:, 0] *= -1.0
        p[:, 1] *= -1.0
    return p + anatomy.body_offset


def patient_to_scanner(points: np.ndarray, anatomy: Anatomy, prone: bool) -> np.ndarray:
    """Map patient points (N, 3) in mm to scanner (header physical) coordinates."""
    return _to_scanner(np.atleast_2d(points), anatomy, prone)


def render(
    anatomy: Anatomy,
    grid: Grid,
    *,
    phase: str,
    noise_hu: float,
    blur_mm: float,
    rng: np.random.Generator,
    nephrectomy: str = "none",
    prone: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise an anatomy on a grid.

    Returns
    -------
    (ct, labels): int16 HU and uint8 label values of :data:`DEFAULT_LABELS`, both (z, y, x).
    The removed kidney (``nephrectomy`` = "left"/"right") is left out of both; its fossa keeps
    the tissue around it (retroperitoneal fat/soft tissue, or bowel that fills it).
    """
    if phase not in CONTRAST_PHASES:
        raise ValueError(f"unknown contrast phase {phase!r}; expected one of {sorted(CONTRAST_PHASES)}")
    if nephrectomy not in ("none", "left", "right"):
        raise ValueError(f"nephrectomy must be none/left/right, got {nephrectomy!r}")
    hu_table = CONTRAST_PHASES[phase]
    xs, ys, zs = grid.physical_coordinates()
    sgn = -1.0 if prone else 1.0
    xp = sgn * (xs - np.float32(anatomy.body_offset[0]))
    yp = sgn * (ys - np.float32(anatomy.body_offset[1]))
    zp = zs - np.float32(anatomy.body_offset[2])
    del zs

    shape = grid.shape_zyx
    hu = np.full(shape, _AIR, dtype=np.float32)
    # Couch in scanner coordinates: a carbon-fibre shell around foam, below the patient.
    couch_half = 0.9 * max(anatomy.W * 1.5, 150.0)
    curve = anatomy.couch_top - 12.0 * (np.abs(xs) / couch_half) ** 2
    in_couch = (ys > curve) & (ys < curve + 30.0) & (np.abs(xs) < couch_half)
    hu[in_couch] = _COUCH_FOAM
    hu[in_couch & ((ys < curve + 4.0) | (ys > curve + 26.0))] = _COUCH_SHELL
    del xs, curve, in_couch

    t = anatomy.tissue
    body = t["body"].inside(xp, yp, zp)
    hu[body] = _FAT
    hu[t["muscle"].inside(xp, yp, zp)] = _MUSCLE
    cavity = t["cavity"].inside(xp, yp, zp) & ~t["paraspinal"].inside(xp, yp, zp)
    hu[cavity] = _CAVITY

    labels = np.zeros(shape, dtype=np.uint8)
    removed = {"left": "Kidney_L", "right": "Kidney_R"}.get(nephrectomy)
    for part in anatomy.structures:
        if part.name == removed:
            continue
        corners = np.array([[a, b, c] for a in (part.lo[0], part.hi[0]) for b in (part.lo[1], part.hi[1])
                            for c in (part.lo[2], part.hi[2])])
        sc = _to_scanner(corners, anatomy, prone)
        sl = grid.slices_for_box(sc.min(axis=0), sc.max(axis=0))
        if sl is None:
            continue
        # Organs stay inside the body wall; the spine and cord inside the body.
        allowed = body[sl] if part.name in ("Vertebrae", "SpinalCord") else cavity[sl]
        m = part.inside(xp[sl], yp[sl], zp[sl]) & allowed
        labels[sl][m] = DEFAULT_LABELS.value(part.name)

    # Make sure the adrenals have at least one voxel when their centre lies in the field of view
    # (tiny infant glands on coarse grids): paint the voxel nearest the gland's box centre.
    for part in anatomy.structures:
        if not part.name.startswith("Glnd_Adrenal"):
            continue
        value = DEFAULT_LABELS.value(part.name)
        if not np.any(labels == value):
            centre = _to_scanner(((part.lo + part.hi) / 2.0)[None, :], anatomy, prone)
            idx = np.rint(grid.index_of(centre)[0]).astype(int)
            if np.all(idx >= 0) and np.all(idx < np.asarray(grid.size_xyz)):
                labels[idx[2], idx[1], idx[0]] = value

    lut = np.full(256, np.nan, dtype=np.float32)
    for value, name in DEFAULT_LABELS:
        lut[value] = hu_table[_organ_key(name)]
    lab = labels > 0
    hu[lab] = lut[labels[lab]]

    # Gas: top of the stomach (non-dependent side, i.e. up in the scanner, whatever the position)
    # and pockets in the bowel from a second random field.
    stomach = labels == DEFAULT_LABELS.value("Stomach")
    if stomach.any():
        cut = np.percentile(ys[stomach], 18.0)
        hu[stomach & (ys < cut)] = _GAS
    bowel = labels == DEFAULT_LABELS.value("Bowel")
    if bowel.any():
        g = np.zeros(int(bowel.sum()), dtype=np.float32)
        bx, by, bz = xp[bowel], yp[bowel], zp[bowel]
        for f, ph in zip(anatomy.gas_freqs, anatomy.gas_phases):
            g += np.cos(f[0] * bx + f[1] * by + f[2] * bz + ph)
        gas = np.zeros_like(bowel)
        gas[bowel] = g / len(anatomy.gas_phases) > 0.35
        hu[gas] = _GAS

    # Partial-volume blur (Gaussian, sigma in mm) then quantum noise.
    if blur_mm > 0:
        sigma = [blur_mm / s for s in grid.spacing_zyx]
        hu = ndimage.gaussian_filter(hu, sigma=sigma, mode="nearest")
    if noise_hu > 0:
        hu += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return ct, labels
