"""Robustness: perturbations in patient coordinates, mapping back, predictors, the run.

The phantom below lives in patient (LPS) coordinates: +x = patient left, +y =
posterior. Organs are ellipsoids of distinct HU inside a 40 HU body ellipse in
air (-1024 HU); the reference label map is exactly the organs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from oarbench.io import Volume, read_volume, write_volume
from oarbench.labels import LabelMap

LABELS = LabelMap({1: "Liver", 2: "Spleen", 3: "Kidney_L", 4: "Kidney_R"})
BODY_HU = 40.0
ORGAN_HU = {1: 150.0, 2: 300.0, 3: 450.0, 4: 600.0}
# label: (centre offset from the image centre (x, y, z) mm, radii (x, y, z) mm)
ORGANS = {
    1: ((-20.0, -8.0, 0.0), (12.0, 12.0, 14.0)),  # liver: patient right, anterior
    2: ((24.0, -6.0, 2.0), (8.0, 8.0, 10.0)),  # spleen: patient left
    3: ((16.0, 16.0, -2.0), (6.0, 7.0, 10.0)),  # left kidney: left, posterior
    4: ((-16.0, 16.0, -4.0), (6.0, 7.0, 10.0)),  # right kidney: right, posterior
}

# The segmentation rule shared by the in-process and the command predictors:
# voxels brighter than 95 HU (midway between body and the dimmest organ) form
# components; each component takes the organ whose HU is nearest to its
# brightest voxel, and keeps the voxels above the midpoint between body and
# that organ. Only HU values and connectivity are used: the rule is invariant
# to any permutation of the voxels that keeps neighbours neighbours.
SEGMENT_SOURCE = '''
import numpy as np
from scipy import ndimage

def segment(arr):
    hu = {1: 150.0, 2: 300.0, 3: 450.0, 4: 600.0}
    arr = np.asarray(arr, dtype=float)
    lab, n = ndimage.label(arr > 95.0)
    out = np.zeros(arr.shape, dtype=np.uint8)
    for k, box in enumerate(ndimage.find_objects(lab), start=1):
        comp = lab[box] == k
        peak = arr[box][comp].max()
        organ = min(hu, key=lambda v: abs(hu[v] - peak))
        sel = comp & (arr[box] > (40.0 + hu[organ]) / 2.0)
        out[box][sel] = organ
    return out
'''
_ns: dict = {}
exec(SEGMENT_SOURCE, _ns)
segment = _ns["segment"]

COMMAND_SCRIPT = SEGMENT_SOURCE + '''
import sys
from pathlib import Path
import SimpleITK as sitk

def main():
    args = sys.argv[1:]
    src = Path(args[args.index("--in") + 1])
    dst = Path(args[args.index("--out") + 1])
    if "--fail" in args:
        sys.stderr.write("model crashed: CUDA out of memory (simulated)\\n")
        sys.exit(3)
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*_0000.nii.gz")):
        img = sitk.ReadImage(str(f))
        seg = sitk.GetImageFromArray(segment(sitk.GetArrayFromImage(img)))
        seg.CopyInformation(img)
        sitk.WriteImage(seg, str(dst / f.name.replace("_0000.nii.gz", ".nii.gz")), True)

main()
'''


def make_phantom(
    shape: tuple[int, int, int] = (24, 48, 56), spacing: tuple[float, float, float] = (2.0, 1.5, 1.5)
) -> tuple[Volume, Volume]:
    """(CT, reference) on an identity-direction (LPS) grid; arrays (z, y, x)."""
    nz, ny, nx = shape
    sz, sy, sx = spacing
    origin = (-100.0, 50.0, 30.0)
    z, y, x = np.meshgrid(np.arange(nz) * sz, np.arange(ny) * sy, np.arange(nx) * sx, indexing="ij")
    cx, cy, cz = (nx - 1) * sx / 2, (ny - 1) * sy / 2, (nz - 1) * sz / 2
    x, y, z = x - cx, y - cy, z - cz
    ct = np.full(shape, -1024, dtype=np.int16)
    ct[(x / 40.0) ** 2 + (y / 32.0) ** 2 <= 1.0] = int(BODY_HU)
    ref = np.zeros(shape, dtype=np.uint8)
    for label, ((ox, oy, oz), (rx, ry, rz)) in ORGANS.items():
        inside = ((x - ox) / rx) ** 2 + ((y - oy) / ry) ** 2 + ((z - oz) / rz) ** 2 <= 1.0
        ref[inside] = label
        ct[inside] = int(ORGAN_HU[label])
    direction = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    return Volume(ct, spacing, origin, direction), Volume(ref, spacing, origin, direction)


def write_case(folder: Path, case: str, ct: Volume, ref: Volume) -> tuple[Path, Path]:
    img_dir, ref_dir = folder / "images", folder / "reference"
    return write_volume(ct, img_dir / f"{case}_0000.nii.gz"), write_volume(ref, ref_dir / f"{case}.nii.gz")


class FunctionPredictor:
    """In-process predictor: ``fn(Volume) -> label array`` on the input grid."""

    def __init__(self, fn):
        self.fn = fn

    def predict(self, image_paths: list[Path], out_dir: Path) -> dict[str, Path]:
        out = {}
        for p in image_paths:
            vol = read_volume(p)
            case = Path(p).name[: -len("_0000.nii.gz")]
            out[case] = write_volume(vol.with_array(np.asarray(self.fn(vol), dtype=np.uint8)), Path(out_dir) / f"{case}.nii.gz")
        return out


def physical_side_segment(vol: Volume) -> np.ndarray:
    """HU rule, then kidneys named by the physical side of their centroid (honours the header).

    A kidney component whose centroid lies at physical x greater than the image
    centre's (patient left in LPS) is Kidney_L, else Kidney_R.
    """
    seg = segment(vol.array)
    kidneys = (seg == 3) | (seg == 4)
    out = seg.copy()
    from scipy import ndimage

    lab, n = ndimage.label(kidneys)
    d = np.asarray(vol.direction).reshape(3, 3)
    sp = np.asarray(vol.spacing[::-1])
    centre = np.asarray(vol.origin) + d @ (sp * (np.asarray(vol.array.shape[::-1]) - 1) / 2)
    for k in range(1, n + 1):
        idx_zyx = np.argwhere(lab == k).mean(axis=0)
        phys = np.asarray(vol.origin) + d @ (sp * idx_zyx[::-1])
        out[lab == k] = 3 if phys[0] > centre[0] else 4
    return out


import json
import math
import sys

import pandas as pd
import pytest
from click.testing import CliRunner

from oarbench.robustness import (
    DEFAULT_ROTATE_CONDITIONS,
    CommandPredictor,
    NnUNetModelPredictor,
    PredictorError,
    Reorient,
    SmallRotation,
    laterality_swaps,
    parse_condition,
    parse_predictor,
    random_small_rotations,
    run_robustness,
)
from oarbench.io import find_cases
from oarbench.robustness.transforms import image_centre

LOSSLESS = ["flip_lr", "flip_ap", "flip_si", "rot90_si", "rot180_si", "rot270_si", "rot90_lr", "rot180_lr",
            "rot270_lr", "rot90_ap", "rot180_ap", "rot270_ap", "prone", "feet_first"]
DIRECTIONS = {
    "LPS": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "RAS-like": (-1, 0, 0, 0, -1, 0, 0, 0, 1),
    "permuted": (0, 0, 1, 1, 0, 0, 0, 1, 0),  # index x -> physical z, y -> x, z -> y
    "permuted-flipped": (0, -1, 0, 0, 0, 1, -1, 0, 0),
}
METRICS = ["status", "dsc", "hd95", "hd", "msd", "assd", "sdsc", "ref_ml", "pred_ml", "tp", "fp", "fn"]


def index_volume(direction) -> Volume:
    """A (z, y, x) = (4, 5, 6) grid whose voxel value is its flat index, anisotropic spacing."""
    arr = np.arange(4 * 5 * 6, dtype=np.int32).reshape(4, 5, 6)
    return Volume(arr, (3.0, 2.0, 1.0), (10.0, -5.0, 7.0), tuple(float(v) for v in direction))


def physical_points(vol: Volume) -> np.ndarray:
    """Physical (x, y, z) mm of every voxel, in the array's C order; shape (N, 3)."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in vol.array.shape], indexing="ij")
    idx = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1).astype(float)
    d = np.asarray(vol.direction).reshape(3, 3)
    return np.asarray(vol.origin) + (d @ (idx * np.asarray(vol.spacing[::-1])).T).T


def value_at(vol: Volume, points: np.ndarray) -> np.ndarray:
    """Voxel values at physical points that must fall exactly on voxel centres."""
    d = np.asarray(vol.direction).reshape(3, 3)
    idx = (np.linalg.inv(d) @ (points - np.asarray(vol.origin)).T).T / np.asarray(vol.spacing[::-1])
    rounded = np.rint(idx)
    assert np.allclose(idx, rounded, atol=1e-6), "point is not on a voxel centre"
    ix = rounded.astype(int)
    assert np.all(ix >= 0) and np.all(ix < np.asarray(vol.array.shape[::-1])), "point outside the grid"
    return vol.array[ix[:, 2], ix[:, 1], ix[:, 0]]


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("dname", list(DIRECTIONS))
@pytest.mark.parametrize("name", LOSSLESS + ["reorient_RAS", "reorient_PIL", "reorient_LPS"])
def test_lossless_round_trip_is_identity_and_moves_the_patient(name, dname):
    vol = index_volume(DIRECTIONS[dname])
    pert = parse_condition(name)
    out = pert.apply(vol)
    # exact inverse: every voxel back where it was, header identical
    back = pert.map_back(out, vol)
    assert np.array_equal(back.array, vol.array)
    assert back.spacing == vol.spacing and back.origin == vol.origin and back.direction == vol.direction
    # a permutation: the same multiset of values
    assert np.array_equal(np.sort(out.array.ravel()), vol.array.ravel())
    # physical meaning: the voxel at p is found at T(p) = c + R (p - c) in the perturbed image
    # (header-only re-orientation: R = identity, the patient does not move)
    r = np.eye(3) if isinstance(pert, Reorient) else pert.r
    c = image_centre(vol)
    pts = physical_points(vol)
    moved = c + (r @ (pts - c).T).T
    assert np.array_equal(value_at(out, moved), vol.array.ravel())
    if not isinstance(pert, Reorient):
        assert out.direction == vol.direction  # the header frame stays: the patient appears moved


@pytest.mark.parametrize("dname", list(DIRECTIONS))
def test_flip_lr_swaps_patient_left_and_right(dname):
    vol = index_volume(DIRECTIONS[dname])
    out = parse_condition("flip_lr").apply(vol)
    pts = physical_points(vol)
    # the voxels furthest to the patient's left (max x in LPS) ...
    left = pts[:, 0] == pts[:, 0].max()
    # ... are found, after the flip, at the mirrored position on the patient's right
    mirrored = pts[left].copy()
    mirrored[:, 0] = pts[:, 0].min()
    assert np.array_equal(value_at(out, mirrored), vol.array.ravel()[left])


def test_rotation_algebra():
    vol = index_volume(DIRECTIONS["permuted"])
    r90 = parse_condition("rot90_si")
    four = vol
    for _ in range(4):
        four = r90.apply(four)
    assert np.array_equal(four.array, vol.array) and np.allclose(four.origin, vol.origin)
    assert np.array_equal(parse_condition("rot270_si").apply(r90.apply(vol)).array, vol.array)
    assert np.array_equal(parse_condition("prone").apply(vol).array, parse_condition("rot180_si").apply(vol).array)
    assert np.array_equal(parse_condition("feet_first").apply(vol).array, parse_condition("rot180_ap").apply(vol).array)
    flip = parse_condition("flip_ap")
    assert np.array_equal(flip.apply(flip.apply(vol)).array, vol.array)
    # a 180-degree turn is two flips: prone = flip_lr then flip_ap
    two = parse_condition("flip_ap").apply(parse_condition("flip_lr").apply(vol))
    assert np.array_equal(two.array, parse_condition("prone").apply(vol).array)
    assert r90.inverse().apply(r90.apply(vol)).array.tolist() == vol.array.tolist()
    # a 90-degree step about LR on an anisotropic grid swaps the y and z spacings with the axes
    rl = parse_condition("rot90_lr").apply(index_volume(DIRECTIONS["LPS"]))
    assert rl.array.shape == (5, 4, 6) and rl.spacing == (2.0, 3.0, 1.0)


def test_oblique_direction_is_refused_for_lossless_steps():
    t = math.radians(20)
    d = (math.cos(t), -math.sin(t), 0.0, math.sin(t), math.cos(t), 0.0, 0.0, 0.0, 1.0)
    vol = index_volume(d)
    with pytest.raises(ValueError, match="not axis-aligned"):
        parse_condition("flip_lr").apply(vol)
    # small angles resample and so accept any direction
    assert parse_condition("rot_z+5").apply(vol).array.size > 0


def test_small_rotation_grid_and_padding():
    ct, _ = make_phantom((8, 20, 30), (2.0, 1.5, 1.0))
    ct = ct.with_array(np.full(ct.array.shape, 100, dtype=np.int16))
    # angle 0 gives the original grid back exactly (the parity rule of the enlarged grid)
    same = SmallRotation("z", 0.0).apply(ct)
    assert same.array.shape == ct.array.shape and np.allclose(same.origin, ct.origin)
    assert np.array_equal(same.array, ct.array)
    rot = SmallRotation("z", 10.0)
    out = rot.apply(ct)
    assert out.array.dtype == np.int16 and out.spacing == ct.spacing and out.direction == ct.direction
    # every rotated voxel centre lies inside the enlarged grid: the x-y extent in mm of the
    # rotated 20x30-voxel box (29 mm x 28.5 mm between voxel centres) is
    # w' = 29 cos10 + 28.5 sin10 = 33.51 mm (x), h' = 29 sin10 + 28.5 cos10 = 33.10 mm (y)
    w = 29 * math.cos(math.radians(10)) + 28.5 * math.sin(math.radians(10))
    h = 29 * math.sin(math.radians(10)) + 28.5 * math.cos(math.radians(10))
    nx, ny = out.array.shape[2], out.array.shape[1]
    assert (nx - 1) * 1.0 >= w and (ny - 1) * 1.5 >= h
    # ... with at most two voxels of slack per axis (ceil + parity)
    assert (nx - 1) * 1.0 < w + 2 * 1.0 and (ny - 1) * 1.5 < h + 2 * 1.5
    assert np.allclose(image_centre(out), image_centre(ct))
    # corners of the enlarged grid are air, and no voxel of the rotated image is lost:
    # the sum of HU above air is preserved up to interpolation (within 2 %)
    assert out.array[0, 0, 0] == -1024
    excess = (out.array.astype(float) + 1024).sum() * np.prod(out.spacing)
    assert excess == pytest.approx((ct.array.astype(float) + 1024).sum() * np.prod(ct.spacing), rel=0.02)


def test_small_rotation_moves_a_blob_where_the_rotation_says():
    _, ref = make_phantom()
    rot = SmallRotation("z", 15.0)
    out = rot.apply(ref, labels=True)
    for label in (1, 3):
        def centroid(vol):
            pts = physical_points(vol)[vol.array.ravel() == label]
            return pts.mean(axis=0)
        c = image_centre(ref)
        expected = c + rot.r @ (centroid(ref) - c)
        # nearest-neighbour resampling moves a centroid by far less than a voxel
        assert np.linalg.norm(centroid(out) - expected) < 0.5


def test_random_small_rotations_come_only_from_the_generator():
    a = random_small_rotations(np.random.default_rng(7), 5)
    b = random_small_rotations(np.random.default_rng(7), 5)
    assert a == b and all(0 < abs(p.degrees) <= 15 for p in a)
    assert json.loads(json.dumps(a[0].params()))["degrees"] == a[0].degrees


def test_parse_condition_names_and_errors():
    assert parse_condition("rot_z+10").condition == "rot_z+10"
    assert parse_condition("rot_x-5").params()["degrees"] == -5.0
    assert parse_condition("prone").params()["matrix_lps"] == [[-1, 0, 0], [0, -1, 0], [0, 0, 1]]
    assert parse_condition("feet_first").params()["matrix_lps"] == [[-1, 0, 0], [0, 1, 0], [0, 0, -1]]
    # rot90_si turns patient-left (+x) towards posterior (+y), right-hand rule about +z (superior)
    assert parse_condition("rot90_si").params()["matrix_lps"] == [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    for bad in ("flip_xy", "rot45_si", "rot_z+0", "reorient_LLS", "upside_down"):
        with pytest.raises(ValueError):
            parse_condition(bad)


# ----------------------------------------------------------------------------- laterality


def test_laterality_swap_rule():
    ref = np.zeros((1, 4, 8), np.uint8)
    ref[0, :, 0:3] = 4  # right kidney on the patient's right (low x in LPS)
    ref[0, :, 5:8] = 3
    swapped = np.where(ref == 3, 4, np.where(ref == 4, 3, 0)).astype(np.uint8)
    assert laterality_swaps(ref, swapped, LABELS) == {"Kidney_L": True, "Kidney_R": True}
    assert laterality_swaps(ref, ref, LABELS) == {"Kidney_L": False, "Kidney_R": False}
    # one side swapped only (both predicted labels on the left kidney): not a swap of the pair,
    # and no label covers more than half of both kidneys
    both_left = np.where(ref == 4, 0, ref).astype(np.uint8)
    both_left[0, :2, 5:8] = 4
    assert laterality_swaps(ref, both_left, LABELS)["Kidney_L"] is False
    # nephrectomy (empty reference side), remaining kidney labelled correctly: not flagged
    no_left = np.where(ref == 3, 0, ref).astype(np.uint8)
    assert laterality_swaps(no_left, ref, LABELS) == {"Kidney_L": False, "Kidney_R": False}


def test_laterality_errors_same_side_and_wrong_side():
    from oarbench.robustness.run import laterality_errors

    ref = np.zeros((1, 4, 8), np.uint8)
    ref[0, :, 0:3] = 4  # right kidney (12 voxels)
    ref[0, :, 5:8] = 3  # left kidney (12 voxels)
    # both kidneys labelled left: Kidney_L covers 12/12 of each side -> same_side
    both_left = np.where(ref > 0, 3, 0).astype(np.uint8)
    assert laterality_errors(ref, both_left, LABELS) == {"Kidney_L": "same_side", "Kidney_R": "same_side"}
    assert laterality_swaps(ref, both_left, LABELS) == {"Kidney_L": True, "Kidney_R": True}
    # the swap is still a swap
    swapped = np.where(ref == 3, 4, np.where(ref == 4, 3, 0)).astype(np.uint8)
    assert laterality_errors(ref, swapped, LABELS)["Kidney_R"] == "swap"
    # left nephrectomy: the remaining right kidney predicted as Kidney_L -> wrong_side (the
    # earlier rule needed both reference sides and missed it)
    no_left = np.where(ref == 3, 0, ref).astype(np.uint8)
    wrong = np.where(no_left == 4, 3, 0).astype(np.uint8)
    assert laterality_errors(no_left, wrong, LABELS) == {"Kidney_L": "wrong_side", "Kidney_R": "wrong_side"}
    # half of it labelled each way (6 / 12, not more than half): not flagged
    half = wrong.copy()
    half[0, :2, 0:3] = 4
    assert laterality_errors(no_left, half, LABELS)["Kidney_R"] == ""


# ----------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def phantom_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    ct, ref = make_phantom()
    write_case(root, "P001", ct, ref)
    # the same patient stored RAS-like with permuted axes: the header changes, not the patient
    ras = Reorient("ASR")
    write_case(root, "P002", ras.apply(ct), ras.apply(ref))
    return root / "images", root / "reference"


def rows_by(table, condition):
    sub = table[table["condition"] == condition].sort_values(["case", "label"])
    return sub[METRICS].reset_index(drop=True)


def test_invariant_predictor_lossless_conditions_give_identical_metrics(phantom_dirs):
    images, reference = phantom_dirs
    conds = LOSSLESS + ["reorient_RAS"]
    res = run_robustness(images, reference, FunctionPredictor(lambda v: segment(v.array)), conds, LABELS)
    orig = rows_by(res.table, "original")
    # the HU rule reproduces the reference exactly on the unperturbed phantom
    assert (orig["dsc"] == 1.0).all() and (orig["hd"] == 0.0).all()
    for cond in conds:
        pd.testing.assert_frame_equal(rows_by(res.table, cond), orig, check_exact=True)
    assert not res.table["laterality_swap"].any()
    params = json.loads(res.table[res.table["condition"] == "flip_lr"]["params"].iloc[0])
    assert params["matrix_lps"] == [[-1, 0, 0], [0, 1, 0], [0, 0, 1]]
    s = res.summary
    assert set(s["condition"]) == set(conds)
    assert (s["median_delta_dsc"] == 0).all() and (s["worst_delta_hd95"] == 0).all()
    assert (s["n_laterality_swaps"] == 0).all() and (s["n_pairs_dsc"] == 2).all()


def test_invariant_predictor_small_angles_stay_within_the_noise_floor(phantom_dirs):
    images, reference = phantom_dirs
    conds = ["rot_z+10", "rot_z-10", "rot_x+5", "rot_y-15"]
    res = run_robustness(images, reference, FunctionPredictor(lambda v: segment(v.array)), conds, LABELS)
    # every small angle gets its control (same axis, same signed angle)
    controls = ["resample_z+10", "resample_z-10", "resample_x+5", "resample_y-15"]
    assert set(res.table["condition"]) == {"original", *conds, *controls}
    s = res.summary.set_index(["structure", "condition"])
    for cond, ctrl in (("rot_z+10", "resample_z+10"), ("rot_z-10", "resample_z-10"), ("rot_x+5", "resample_x+5")):
        for structure in s.index.get_level_values(0).unique():
            assert s.loc[(structure, cond), "control_condition"] == ctrl
            assert s.loc[(structure, cond), "control_median_delta_dsc"] == s.loc[(structure, ctrl), "median_delta_dsc"]
    floor = res.noise_floor
    floor = floor[floor["condition"].isin(conds)]
    assert set(floor["condition"]) == set(conds) and len(floor) == len(conds) * 2 * len(LABELS)
    # the noise floor is a genuine loss: nearest neighbour there and back is not exact
    assert (floor["dsc"] < 1).any() and (floor["dsc"] > 0.8).all()
    # Tolerance, derived: nearest neighbour places each boundary within half a voxel
    # diagonal d/2 of where it was; the HU rule on a linearly interpolated image keeps a
    # point when the interpolated indicator of its organ exceeds 0.5, which also places the
    # boundary within d/2 (between the two voxel centres that straddle it). Both round trips
    # share the same nearest-neighbour way back, so their boundaries differ by at most d
    # (voxel diagonal sqrt(2^2 + 1.5^2 + 1.5^2) = 2.92 mm): HD95 may grow by at most d.
    # For DSC, a boundary shift of at most d/2 per side changes at most a shell of volume
    # A d/2 per side; for the smallest organ (kidney, radii 6, 7, 10 mm: Thomsen's formula
    # gives A = 729 mm^2, V = 4/3 pi 6 7 10 = 1759 mm^3) DSC moves by at most
    # A d / (4 V) = 0.30. That worst case needs every boundary voxel shifted by the full
    # d/2 in the same direction; a per-row bound of 0.30 is checked, and (a regression guard,
    # not a derived bound) the mean gap must stay under a tenth of it.
    d = math.sqrt(2.0**2 + 1.5**2 + 1.5**2)
    key = ["condition", "case", "structure"]
    merged = res.table[res.table["condition"].isin(conds)].merge(floor, on=key, suffixes=("", "_floor"))
    assert len(merged) == len(floor)
    assert (merged["hd95"] <= merged["hd95_floor"] + d + 1e-9).all()
    assert (merged["dsc"] >= merged["dsc_floor"] - 0.30).all()
    assert (merged["dsc_floor"] - merged["dsc"]).mean() <= 0.030
    assert set(res.summary["median_floor_dsc"].notna()) == {True}


def test_resample_control_shares_the_rotations_steps_and_maps_back_exactly(phantom_dirs):
    from oarbench.robustness import ResampleControl, SmallRotation

    images, reference = phantom_dirs
    case = sorted(find_cases(images, images=True))[0]
    img = read_volume(find_cases(images, images=True)[case])
    ctrl = parse_condition("resample_z+10")
    assert isinstance(ctrl, ResampleControl) and ctrl.condition == "resample_z+10"
    assert parse_condition("resample_z10") == ctrl and parse_condition("resample_z-10").degrees == -10.0
    out = ctrl.apply(img)
    # the patient does not move: same grid and header
    assert out.array.shape == img.array.shape and out.spacing == img.spacing and out.origin == img.origin
    assert not np.array_equal(out.array, img.array)
    # the rotation's own CT interpolation, taken back by the rotation's own label mapping: the
    # control's voxels are exactly the rotated image's interpolated values, rearranged
    rot_img = SmallRotation("z", 10).apply(img)
    np.testing.assert_array_equal(out.array, SmallRotation("z", 10).map_back(rot_img, img).array)
    assert set(np.unique(out.array)) <= set(np.unique(rot_img.array))
    # linear interpolation lowers the spread inside an organ (blur), which the control shares
    assert np.std(out.array.astype(float)) < np.std(img.array.astype(float))
    # mapping back is the identity
    pred = img.with_array((img.array > 0).astype(np.uint8))
    assert np.array_equal(ctrl.map_back(pred, img).array, pred.array)


def voxelwise(arr):
    """A CT threshold per organ, voxel by voxel (no neighbours): no rotation effect at all."""
    arr = np.asarray(arr, dtype=float)
    out = np.zeros(arr.shape, dtype=np.uint8)
    for organ, hu in sorted(ORGAN_HU.items(), key=lambda kv: kv[1]):
        out[arr > (hu + (hu - 150.0 if organ > 1 else 40.0)) / 2.0] = organ
    return out


def test_rotation_minus_control_is_zero_for_a_predictor_without_rotation_effect(phantom_dirs):
    # A predictor that acts voxel by voxel commutes with the nearest-neighbour mapping, so the
    # rotation (interpolate, predict, map the labels back) and its control (interpolate, map
    # back, predict) give the same labels: every metric of every case and structure is equal,
    # tolerance 0. The earlier control (two linear interpolations, labels never resampled)
    # differed for the same predictor.
    from oarbench.robustness import SmallRotation
    from oarbench.robustness.transforms import _euler_resample

    images, reference = phantom_dirs
    conds = ["rot_z+10", "rot_x+5", "rot_y-15"]
    res = run_robustness(images, reference, FunctionPredictor(lambda v: voxelwise(v.array)), conds, LABELS)
    assert (rows_by(res.table, "original")["dsc"] > 0.9).all()
    moved = False
    for cond in conds:
        ctrl = "resample_" + cond[len("rot_"):]
        pd.testing.assert_frame_equal(rows_by(res.table, cond), rows_by(res.table, ctrl), check_exact=True)
        moved |= bool((rows_by(res.table, cond)["dsc"] < rows_by(res.table, "original")["dsc"]).any())
    assert moved  # the rotation did cost something: all of it is interpolation and label mapping
    s = res.summary.set_index(["structure", "condition"])
    for cond in conds:
        for structure in LABELS.names:
            row = s.loc[(structure, cond)]
            assert row["control_condition"] == "resample_" + cond[len("rot_"):]
            assert row["n_pairs_effect_dsc"] == 2 and row["model_effect_dsc"] == 0.0
            assert row["model_effect_hd95"] == 0.0
            assert row["control_median_delta_dsc"] == row["median_delta_dsc"]
    # the earlier control for the same predictor: not zero
    case = "P001"
    img = read_volume(images / f"{case}_0000.nii.gz")
    ref = read_volume(reference / f"{case}.nii.gz")
    rot = SmallRotation("z", 10)
    twice = _euler_resample(rot.apply(img), img, rot.r, image_centre(img), linear=True, fill=-1024.0)
    old = voxelwise(twice.array)
    new = voxelwise(rot.map_back(rot.apply(img), ref).array)
    assert not np.array_equal(old, new)


def test_model_effect_of_a_rotation_sensitive_predictor(phantom_dirs):
    # An atlas (the reference wherever the input shows the patient) has a pure rotation effect:
    # its control leaves the atlas aligned, the rotation does not. Six cases for an interval.
    images, reference = phantom_dirs
    ref = read_volume(reference / "P001.nii.gz")
    img_map = {f"C{i}": images / "P001_0000.nii.gz" for i in range(6)}
    ref_map = {f"C{i}": reference / "P001.nii.gz" for i in range(6)}

    def atlas(vol):
        out = np.zeros(vol.array.shape, np.uint8)
        off = [(a - b) // 2 for a, b in zip(vol.array.shape, ref.array.shape)]
        out[off[0]:off[0] + ref.array.shape[0], off[1]:off[1] + ref.array.shape[1],
            off[2]:off[2] + ref.array.shape[2]] = ref.array
        return out

    res = run_robustness(img_map, ref_map, FunctionPredictor(atlas), ["rot_z+10"], LABELS)
    s = res.summary.set_index(["structure", "condition"])
    liver = s.loc[("Liver", "rot_z+10")]
    # the atlas ignores the image: under the control (patient unmoved) it is the reference itself
    ctrl = rows_by(res.table, "resample_z+10")
    assert (ctrl["dsc"] == 1.0).all()
    # six identical cases: the effect is one value, and its exact interval (coverage 1 - 2/64) is that value
    assert liver["n_pairs_effect_dsc"] == 6 and liver["model_effect_ci_level"] == pytest.approx(1 - 2 / 64)
    assert liver["model_effect_dsc"] < -0.1
    assert liver["model_effect_dsc_ci_low"] == liver["model_effect_dsc_ci_high"] == liver["model_effect_dsc"]
    t = res.table[res.table["structure"] == "Liver"].set_index(["condition", "case"])["dsc"]
    effect = (t["rot_z+10"] - t["resample_z+10"]).to_numpy()
    assert np.all(effect == effect[0]) and liver["model_effect_dsc"] == effect[0]


def test_atlas_predictor_degrades_under_flips_and_swaps_kidneys(phantom_dirs):
    images, reference = phantom_dirs
    ref_arrays = {p.name.replace(".nii.gz", ""): read_volume(p).array for p in reference.iterdir()}

    def atlas(vol):  # the original reference whatever the input shows (same array shape)
        for arr in ref_arrays.values():
            if arr.shape == vol.array.shape:
                return arr
        raise AssertionError("no atlas of this shape")

    res = run_robustness(images, {"P001": reference / "P001.nii.gz"}, FunctionPredictor(atlas),
                         ["flip_lr", "flip_ap"], LABELS)
    orig = res.table[res.table["condition"] == "original"]
    assert (orig["dsc"] == 1.0).all()
    flip = res.table[res.table["condition"] == "flip_lr"].set_index("structure")
    # the liver (centre 20 mm right of the mid-plane, radius 12 mm) mirrored to the left
    # does not overlap the true liver at all
    assert flip.loc["Liver", "dsc"] == 0.0
    # each atlas kidney now covers the other kidney: a laterality swap on both rows
    assert flip.loc["Kidney_L", "laterality_swap"] and flip.loc["Kidney_R", "laterality_swap"]
    s = res.summary.set_index(["condition", "structure"])
    assert s.loc[("flip_lr", "Kidney_L"), "n_laterality_swaps"] == 1
    assert s.loc[("flip_lr", "Liver"), "median_delta_dsc"] == -1.0
    assert s.loc[("flip_ap", "Liver"), "median_delta_dsc"] < -0.3


def test_header_honouring_predictor_ignores_reorientation_but_sees_flips(phantom_dirs):
    images, reference = phantom_dirs
    conds = ["reorient_RAS", "reorient_PIL", "reorient_SLA", "flip_lr"]
    res = run_robustness(images, reference, FunctionPredictor(physical_side_segment), conds, LABELS)
    orig = rows_by(res.table, "original")
    assert (orig["dsc"] == 1.0).all()
    for cond in conds[:3]:
        pd.testing.assert_frame_equal(rows_by(res.table, cond), orig, check_exact=True)
    flip = res.table[res.table["condition"] == "flip_lr"]
    kid = flip[flip["structure"].str.startswith("Kidney")]
    assert kid["laterality_swap"].all() and (kid["dsc"] == 0.0).all()
    assert (flip[flip["structure"] == "Liver"]["dsc"] == 1.0).all()
    # an array-side predictor (left half of the array = Kidney_L) is changed by re-orientation
    def array_side(vol):
        seg = segment(vol.array)
        kid = (seg == 3) | (seg == 4)
        half = np.zeros(seg.shape, bool)
        half[..., seg.shape[-1] // 2:] = True
        seg[kid & half] = 3
        seg[kid & ~half] = 4
        return seg
    res2 = run_robustness(images, {"P001": reference / "P001.nii.gz"}, FunctionPredictor(array_side),
                          ["reorient_RAS"], LABELS)
    t = res2.table.set_index(["condition", "structure"])
    assert t.loc[("original", "Kidney_L"), "dsc"] == 1.0
    assert t.loc[("reorient_RAS", "Kidney_L"), "laterality_swap"]


@pytest.fixture()
def script(tmp_path):
    path = tmp_path / "hu_model.py"
    path.write_text(COMMAND_SCRIPT)
    return path


def test_command_predictor_matches_in_process_and_writes_files(phantom_dirs, script, tmp_path):
    images, reference = phantom_dirs
    pred = parse_predictor(f"command:{sys.executable} {script} --in {{input}} --out {{output}}")
    assert isinstance(pred, CommandPredictor)
    out = tmp_path / "out"
    res = run_robustness(images, reference, pred, "flip_lr,rot90_si,rot_z+10", LABELS, out)
    ref_res = run_robustness(images, reference, FunctionPredictor(lambda v: segment(v.array)),
                             "flip_lr,rot90_si,rot_z+10", LABELS)
    pd.testing.assert_frame_equal(res.table, ref_res.table)
    for name in ("robustness.csv", "noise_floor.csv", "robustness_summary.csv"):
        assert (out / name).is_file()
    back = pd.read_csv(out / "robustness.csv")
    assert list(back.columns[:5]) == ["study", "centre", "model", "condition", "case"]
    assert "laterality_swap" in back.columns and "params" in back.columns


def test_command_predictor_failure_shows_stderr(phantom_dirs, script, tmp_path):
    images, _ = phantom_dirs
    pred = CommandPredictor(f"{sys.executable} {script} --in {{input}} --out {{output}} --fail")
    with pytest.raises(PredictorError, match=r"status 3(.|\n)*CUDA out of memory"):
        pred.predict(sorted(images.iterdir()), tmp_path / "o")
    with pytest.raises(ValueError, match="must contain"):
        CommandPredictor("tool --in {input}")
    with pytest.raises(PredictorError, match="not found"):
        CommandPredictor("no-such-tool-xyz {input} {output}").predict(sorted(images.iterdir()), tmp_path / "o2")
    # a tool that exits 0 but writes nothing
    empty = CommandPredictor(f"{sys.executable} -c pass {{input}} {{output}}")
    with pytest.raises(PredictorError, match="no label file"):
        empty.predict(sorted(images.iterdir()), tmp_path / "o3")


def test_parse_predictor(tmp_path):
    model = tmp_path / "Dataset1__nnUNetPlans__3d_fullres"
    model.mkdir()
    (model / "plans.json").write_text("{}")
    (model / "dataset.json").write_text("{}")
    p = parse_predictor(f"nnunet:{model}:0", device="cpu", use_mirroring=False)
    assert isinstance(p, NnUNetModelPredictor) and p.folds == (0,) and p.model_folder == model
    assert p.use_mirroring is False
    assert parse_predictor(f"nnunet:{model}").folds is None
    assert parse_predictor(f"nnunet:{model}:0,1").folds == (0, 1)
    assert parse_predictor(f"nnunet:{model}:all").folds == ("all",)
    for bad in ("torch:/x", "nnunet:", "just-a-string", f"nnunet:{tmp_path / 'missing'}"):
        with pytest.raises(ValueError):
            parse_predictor(bad)
    with pytest.raises(ValueError, match="device"):
        parse_predictor(f"nnunet:{model}", device="tpu")


def test_prediction_on_the_wrong_grid_is_an_error(phantom_dirs):
    images, reference = phantom_dirs

    def shifted(vol):
        return segment(vol.array)

    class WrongGrid(FunctionPredictor):
        def predict(self, image_paths, out_dir):
            out = {}
            for p in image_paths:
                vol = read_volume(p)
                bad = Volume(segment(vol.array), vol.spacing, tuple(o + 5.0 for o in vol.origin), vol.direction)
                out[p.name[:-12]] = write_volume(bad, Path(out_dir) / p.name.replace("_0000", ""))
            return out

    with pytest.raises(ValueError, match="header"):
        run_robustness(images, reference, WrongGrid(shifted), ["flip_lr"], LABELS)


# ----------------------------------------------------------------------------- CLI


def test_cli_rotate_default_set(phantom_dirs, script, tmp_path):
    from oarbench.cli import main

    images, reference = phantom_dirs
    out = tmp_path / "cli"
    spec = f"command:{sys.executable} {script} --in {{input}} --out {{output}}"
    result = CliRunner().invoke(main, ["robustness", "--rotate", "--images", str(images), "--reference",
                                       str(reference), "--predictor", spec, "--out", str(out),
                                       "--labels", str(_labels_toml(tmp_path))])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "robustness.csv")
    # + the controls, one per signed angle
    assert set(table["condition"]) == {"original", *DEFAULT_ROTATE_CONDITIONS, "resample_z+10", "resample_z-10"}
    summary = pd.read_csv(out / "robustness_summary.csv")
    lossless = summary[~summary["condition"].str.startswith(("rot_", "resample_"))]
    assert (lossless["median_delta_dsc"] == 0).all() and (summary["n_laterality_swaps"] == 0).all()
    floor = pd.read_csv(out / "noise_floor.csv")
    assert set(floor["condition"]) == {"rot_z+10", "rot_z-10", "resample_z+10", "resample_z-10"}
    # errors: neither --rotate nor --conditions; a failing model
    r2 = CliRunner().invoke(main, ["robustness", "--images", str(images), "--reference", str(reference),
                                   "--predictor", spec, "--out", str(out)])
    assert r2.exit_code != 0 and "--rotate" in r2.output
    r3 = CliRunner().invoke(main, ["robustness", "--conditions", "flip_lr", "--images", str(images), "--reference",
                                   str(reference), "--predictor", spec + " --fail", "--out", str(tmp_path / "x")])
    assert r3.exit_code != 0 and "CUDA out of memory" in r3.output


def test_cli_study_file(phantom_dirs, script, tmp_path):
    from oarbench.cli import main

    images, reference = phantom_dirs
    toml = tmp_path / "study.toml"
    toml.write_text(f"""
[study]
name = "mini"

[[centres]]
name = "A"
images = "{images}"
reference = "{reference}"

[[models]]
name = "hu"
predictions = "preds/{{model}}/{{centre}}"

[robustness]
conditions = ["flip_ap"]

[robustness.predictors]
hu = "command:{sys.executable} {script} --in {{input}} --out {{output}}"
""")
    out = tmp_path / "sout"
    result = CliRunner().invoke(main, ["robustness", "--study", str(toml), "--model", "hu", "--labels",
                                       str(_labels_toml(tmp_path)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "robustness.csv")
    assert set(table["condition"]) == {"original", "flip_ap"}
    assert set(table["study"]) == {"mini"} and set(table["centre"]) == {"A"} and set(table["model"]) == {"hu"}
    assert (table["dsc"] == 1.0).all()


def _labels_toml(tmp_path):
    p = tmp_path / "labels.toml"
    p.write_text("[labels]\nLiver = 1\nSpleen = 2\nKidney_L = 3\nKidney_R = 4\n")
    return p


def test_saved_mapped_back_predictions_are_on_the_reference_grid(phantom_dirs, tmp_path):
    # The invariant predictor's prediction, mapped back after a flip, equals the reference
    # voxel for voxel (its original prediction reproduces the reference exactly, above).
    images, reference = phantom_dirs
    pattern = str(tmp_path / "{model}" / "{centre}" / "{condition}")
    run_robustness(images, reference, FunctionPredictor(lambda v: segment(v.array)), ["flip_lr", "rot90_si"],
                   LABELS, centre="A", model="hu", save_predictions=pattern)
    for cond in ("flip_lr", "rot90_si"):
        for case in ("P001", "P002"):
            saved = read_volume(tmp_path / "hu" / "A" / cond / f"{case}.nii.gz")
            ref = read_volume(reference / f"{case}.nii.gz")
            assert saved.spacing == ref.spacing and saved.direction == ref.direction
            np.testing.assert_array_equal(saved.array, ref.array)
    assert not (tmp_path / "hu" / "A" / "original").exists()
    with pytest.raises(ValueError, match="condition"):
        run_robustness(images, reference, FunctionPredictor(lambda v: segment(v.array)), ["flip_lr"], LABELS,
                       save_predictions=str(tmp_path / "flat"))


def test_noop_reorientation_is_skipped_with_a_warning_and_said(phantom_dirs, tmp_path):
    from oarbench.robustness import RobustnessWarning

    images, reference = phantom_dirs
    # P001 is stored LPS already: reorient_LPS would change nothing for it; P002 (ASR) changes
    with pytest.warns(RobustnessWarning, match="reorient_LPS skipped for case P001"):
        res = run_robustness(images, reference, FunctionPredictor(lambda v: segment(v.array)), ["reorient_LPS"],
                             LABELS, out_dir=tmp_path / "rob")
    assert list(res.skipped["case"]) == ["P001"] and "stored as LPS" in res.skipped["reason"].iloc[0]
    ran = res.table[res.table["condition"] == "reorient_LPS"]
    assert set(ran["case"]) == {"P002"}
    assert (res.summary[res.summary["condition"] == "reorient_LPS"]["n_skipped"] == 1).all()
    written = pd.read_csv(tmp_path / "rob" / "robustness_skipped.csv")
    assert list(written["case"]) == ["P001"]
