"""All structures of a multi-label case in one pass.

One ``find_objects`` pass over each label volume gives every structure's
bounding box; per-structure work (overlap counts, surface distances) then runs
only inside the union of the two boxes, which is exact: outside it both masks
are empty.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Mapping

import numpy as np

from oarbench.labels import LabelMap
from oarbench.metrics import _kernels
from oarbench.metrics._clinical import APL_CONVENTIONS, added_path_length, centroid_distance, volumetric_similarity
from oarbench.metrics._overlap import dice_from_counts
from oarbench.metrics._surface import (
    SurfaceDistances,
    assd,
    check_pair,
    hausdorff,
    msd,
    surface_dice,
    surface_distances_cropped,
)

__all__ = [
    "StructureResult",
    "evaluate_labels",
    "STATUSES",
    "RESULT_COLUMNS",
    "resolve_backend",
]

#: Status of a structure in a case (docs/metrics.md, "Empty masks").
STATUSES = ("ok", "missed", "hallucinated", "absent", "missing")

#: Columns of a :class:`StructureResult` row, in table order.
RESULT_COLUMNS = (
    "label", "structure", "status", "dsc", "hd95", "hd", "msd", "assd", "sdsc",
    "ref_ml", "pred_ml", "tp", "fp", "fn",
    "tolerance_mm", "vs", "centroid_mm", "apl_mm", "apl_mm_per_slice", "spacing_max_mm",
    "spacing_inplane_max_mm",
)


@dataclass(frozen=True)
class StructureResult:
    """Metrics of one structure in one case.

    Distances in mm, volumes in mL, ``tp``/``fp``/``fn`` in voxels. ``sdsc`` is
    the surface Dice and ``apl_mm`` the added path length (per axial slice,
    summed; ``apl_mm_per_slice`` divided by the slices holding reference
    contour), both at ``tolerance_mm`` (the structure's own tolerance, or the
    global one). ``vs`` is the volumetric similarity, ``centroid_mm`` the
    distance between the centres of mass, ``spacing_max_mm`` the coarsest
    voxel spacing of the case (a surface-Dice tolerance below it is not
    resolved) and ``spacing_inplane_max_mm`` the coarsest in-plane spacing
    (axes 1 and 2; an APL tolerance below it is not resolved).
    """

    label: int
    structure: str
    status: str
    dsc: float
    hd95: float
    hd: float
    msd: float
    assd: float
    sdsc: float
    ref_ml: float
    pred_ml: float
    tp: int
    fp: int
    fn: int
    tolerance_mm: float = math.nan
    vs: float = math.nan
    centroid_mm: float = math.nan
    apl_mm: float = math.nan
    apl_mm_per_slice: float = math.nan
    spacing_max_mm: float = math.nan
    spacing_inplane_max_mm: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


SurfaceBackend = Callable[[np.ndarray, np.ndarray, tuple[float, ...]], SurfaceDistances]


def _cuda_driver_present() -> bool:
    # Cheap check before importing torch: no NVIDIA driver, no CUDA.
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def resolve_backend(backend: str = "auto", device: str | None = None) -> tuple[str, str]:
    """(backend, device) actually used.

    ``auto`` picks ``torch`` on CUDA when torch sees a GPU, else ``numpy``;
    ``numpy`` runs on the CPU; ``torch`` runs on ``device`` (default: CUDA when
    available, else CPU).
    """
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'torch', got {backend!r}")
    if device not in (None, "auto", "cpu") and not str(device).startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if backend == "numpy":
        if device not in (None, "auto", "cpu"):
            raise ValueError(f"the numpy backend runs on the CPU only, not on {device!r}")
        return "numpy", "cpu"
    want_cuda = device not in (None, "auto", "cpu")
    if backend == "auto" and device in (None, "auto") and not _cuda_driver_present():
        return "numpy", "cpu"
    if backend == "auto" and device == "cpu":
        return "numpy", "cpu"
    from oarbench._optional import MissingDependencyError, require

    try:
        torch = require("torch", "the torch backend")
    except MissingDependencyError:
        if backend == "auto" and not want_cuda:
            return "numpy", "cpu"
        raise
    has_cuda = torch.cuda.is_available()
    if want_cuda and not has_cuda:
        raise ValueError(f"device {device!r} requested but torch sees no CUDA GPU")
    if backend == "auto":
        return ("torch", "cuda") if has_cuda else ("numpy", "cpu")
    if device in (None, "auto"):
        return "torch", "cuda" if has_cuda else "cpu"
    return "torch", str(device)


def _surface_backend(backend: str, device: str) -> SurfaceBackend:
    if backend == "numpy":
        # each structure's crop is the union of its two boxes
        return functools.partial(surface_distances_cropped, tight=True)
    # The torch backend receives crops that are already boolean tensors on the device.
    from oarbench.metrics._torch import surface_distances_in_box

    return surface_distances_in_box


def _as_label_map(labels: Any) -> LabelMap:
    """A :class:`LabelMap` from a LabelMap or an unambiguous plain mapping.

    ``{1: "Liver"}`` (value -> name) and nnU-Net's ``{"Liver": 1}`` (name ->
    value, ``"background": 0`` dropped) are both accepted.
    """
    if isinstance(labels, LabelMap):
        return labels
    hint = (
        "pass a LabelMap, a {value: name} mapping such as {1: 'Liver'}, "
        "or a {name: value} mapping such as {'Liver': 1}"
    )
    if not isinstance(labels, Mapping):
        raise TypeError(f"labels: {hint}; got {type(labels).__name__}")

    def is_int(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

    items = list(labels.items())
    if all(is_int(k) and isinstance(v, str) for k, v in items):
        return LabelMap({int(k): v for k, v in items if int(k) != 0})
    if all(isinstance(k, str) and is_int(v) for k, v in items):
        return LabelMap({int(v): k for k, v in items if int(v) != 0})
    raise TypeError(f"labels: {hint}; got a mapping of {sorted({type(k).__name__ for k, _ in items})} "
                    f"to {sorted({type(v).__name__ for _, v in items})}")


def _unexpected_values(a: np.ndarray, labels: LabelMap) -> list[int]:
    """Non-zero values of ``a`` that are not in ``labels`` (error path only)."""
    return [int(v) for v in np.unique(a) if v != 0 and not labels.known(int(v))]


def _shown(values: list[Any], limit: int = 10) -> str:
    def one(v: Any) -> str:
        if isinstance(v, float):
            return str(int(v)) if v.is_integer() else f"{v:g}"
        return str(v)

    text = ", ".join(one(v) for v in values[:limit])
    return text + (f" ... ({len(values)} values)" if len(values) > limit else "")


def _as_label_array(arr: Any, name: str, labels: LabelMap) -> np.ndarray:
    """The label array (integer-valued floats as unsigned integers), refused unless every value is 0 or
    in ``labels``.

    The values are checked before anything is allocated per value (find_objects
    allocates one entry per value up to the largest one present).
    """
    if type(arr).__module__.startswith("torch"):
        arr = arr.detach().cpu().numpy()
    a = np.asarray(arr)
    if a.dtype == np.bool_:
        return a.view(np.uint8)
    if a.dtype.kind == "f":
        n_nan = int(np.count_nonzero(np.isnan(a)))
        if n_nan:
            raise ValueError(f"{name}: {n_nan} voxel(s) are NaN; a label image must hold integers")
        finite = np.isfinite(a)
        if not np.all(finite) or np.any(a != np.round(a)):
            bad = np.unique(a[~finite | (a != np.round(a))])
            raise ValueError(f"{name}: label values must be integers, found non-integer values {_shown([float(v) for v in bad])}")
    elif a.dtype.kind not in "iu":
        raise ValueError(f"{name}: label image must hold integers, got dtype {a.dtype}")
    if a.size == 0:
        return a.astype(np.uint8)
    hi = a.max()
    if a.dtype.kind != "u":
        lo = a.min()
        if lo < 0:
            raise ValueError(f"{name}: label values must be >= 0, found {lo:g}")
    # values a --structures subset leaves out are known (ignored), not errors
    max_known = max(labels.max_value, max(labels.ignored, default=0))
    if hi > max_known:
        if a.dtype.kind == "f":
            bad_f = [float(v) for v in np.unique(a) if v != 0 and not (v <= max_known and labels.known(int(v)))]
            raise ValueError(f"{name}: label values [{_shown(bad_f)}] are not in the label map "
                             f"(known: {_shown(labels.values, 40)})")
        raise ValueError(f"{name}: label values [{_shown(_unexpected_values(a, labels))}] are not in the "
                         f"label map (known: {_shown(labels.values, 40)})")
    if a.dtype.kind == "f":
        return a.astype(np.min_scalar_type(int(hi)))
    return a


def _union(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _empty_result(label: int, name: str, status: str, ref_ml: float, pred_ml: float, fp: int, fn: int) -> StructureResult:
    if status == "absent":
        nan = math.nan
        return StructureResult(label, name, status, nan, nan, nan, nan, nan, nan, 0.0, 0.0, 0, 0, 0)
    inf = math.inf
    return StructureResult(label, name, status, 0.0, inf, inf, inf, inf, 0.0, ref_ml, pred_ml, 0, fp, fn)


def evaluate_labels(
    reference: Any,
    prediction: Any,
    spacing: Any,
    labels: LabelMap | Mapping[Any, Any],
    *,
    tolerance_mm: float = 2.0,
    backend: str = "auto",
    device: str | None = None,
    threads: int | None = None,
    tolerances: Mapping[str, float] | None = None,
    apl_convention: str = "exact",
) -> list[StructureResult]:
    """Metrics of every structure of ``labels`` in one multi-label case.

    Parameters
    ----------
    reference, prediction:
        Integer label arrays of the same shape, axes (z, y, x) (2D: (y, x)),
        0 = background. Values must be >= 0 and present in ``labels``.
    spacing:
        Voxel size in mm along the array axes.
    labels:
        Which value is which structure; one row per entry, in value order. A
        :class:`~oarbench.labels.LabelMap`, ``{value: name}`` or nnU-Net's
        ``{name: value}`` (``"background": 0`` is dropped); anything else
        raises TypeError.
    tolerance_mm:
        Tolerance in mm of the surface Dice (``sdsc``) and the added path
        length (``apl_mm``).
    tolerances:
        Per-structure tolerances in mm (structure name -> mm), overriding
        ``tolerance_mm`` for those structures.
    apl_convention:
        ``exact`` or ``platipy`` (see :func:`oarbench.metrics.added_path_length`).
    backend, device:
        See :func:`resolve_backend`.
    threads:
        Structures scored in parallel threads (numpy backend, default: up to
        2, the cores of a small machine; torch backend on a GPU, default 2,
        each thread with a CUDA stream of its own; torch on the CPU: 1).
        1 = no threads. The results do not depend on it.

    Returns
    -------
    list of StructureResult
        One per structure, status per docs/metrics.md: ``ok``, ``missed``
        (reference only), ``hallucinated`` (prediction only) or ``absent``
        (neither).
    """
    labels = _as_label_map(labels)
    ref = _as_label_array(reference, "reference", labels)
    pred = _as_label_array(prediction, "prediction", labels)
    sp = check_pair(ref, pred, spacing)
    tol = _tolerances(labels, tolerance_mm, tolerances)
    if apl_convention not in APL_CONVENTIONS:
        raise ValueError(f"APL convention must be one of {', '.join(APL_CONVENTIONS)}, got {apl_convention!r}")
    backend, device = resolve_backend(backend, device)
    surface = _surface_backend(backend, device)

    if backend == "torch":
        return _evaluate_on_device(ref, pred, sp, labels, (tol, apl_convention), surface, device, threads)
    n_threads = _threads(threads)
    with ThreadPoolExecutor(n_threads) if n_threads > 1 else contextlib.nullcontext() as pool:
        # find_objects, the compiled kernels and the array work of each structure release the GIL.
        scanned = _label_boxes(ref, pred, max(labels.max_value, max(labels.ignored, default=0)))
        if scanned is not None:
            return _evaluate_boxes(ref, pred, *scanned[:2], sp, labels, (tol, apl_convention), surface, pool,
                                   scanned[2])
        from scipy import ndimage

        if pool is None:
            ref_boxes, pred_boxes = ndimage.find_objects(ref), ndimage.find_objects(pred)
        else:
            ref_boxes, pred_boxes = pool.map(ndimage.find_objects, (ref, pred))
        return _evaluate_boxes(ref, pred, ref_boxes, pred_boxes, sp, labels, (tol, apl_convention), surface, pool)


def _label_boxes(ref: np.ndarray, pred: np.ndarray, n_labels: int) -> tuple[list, list, tuple] | None:
    """Every value's bounding box in each volume (as ``ndimage.find_objects`` gives them) and the
    voxel counts of each value (reference, prediction, both), in one compiled pass over the two
    volumes; None where the compiled kernels are not built or the volumes are not both uint8 or
    both uint16 (the caller then uses ``find_objects`` and counts inside the crops)."""
    kernels = _kernels.ckernels
    if kernels is None or ref.dtype != pred.dtype or ref.dtype not in (np.uint8, np.uint16) or n_labels < 1:
        return None
    if n_labels > np.iinfo(ref.dtype).max:
        return None
    shape3 = (1,) * (3 - ref.ndim) + ref.shape
    boxes = np.empty((2, n_labels, 6), dtype=np.int64)
    counts = np.empty((3, n_labels + 1), dtype=np.int64)
    kernels.label_boxes(np.ascontiguousarray(ref), np.ascontiguousarray(pred), ref.dtype.itemsize, *shape3,
                        n_labels, boxes[0], boxes[1], counts)
    skip = 3 - ref.ndim

    def as_slices(rows: np.ndarray) -> list:
        return [None if row[0] < 0 else tuple(slice(int(row[2 * k]), int(row[2 * k + 1])) for k in range(skip, 3))
                for row in rows]

    return as_slices(boxes[0]), as_slices(boxes[1]), (counts[0], counts[1], counts[2])


def _tolerances(labels: LabelMap, default: float, per_structure: Mapping[str, float] | None) -> dict[str, float]:
    """The tolerance of every structure: its own where given, else ``default``; checked."""
    out = {}
    given = dict(per_structure or {})
    unknown = sorted(set(given) - set(labels.names))
    if unknown:
        raise ValueError(f"tolerances given for structures not in the label map: {', '.join(unknown)}")
    for _, name in labels:
        t = float(given.get(name, default))
        if not (t >= 0 and math.isfinite(t)):
            raise ValueError(f"tolerance must be a finite number >= 0 mm, got {t} for {name}")
        out[name] = t
    return out


def _host(x: Any) -> np.ndarray:
    """A crop as a numpy array (torch crops are copied from the device)."""
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy()
    return x


def _evaluate_on_device(
    ref: np.ndarray,
    pred: np.ndarray,
    sp: tuple[float, ...],
    labels: LabelMap,
    scoring: tuple[dict[str, float], str],  # (tolerance per structure, APL convention)
    surface: SurfaceBackend,
    device: str,
    threads: int | None,
) -> list[StructureResult]:
    """The torch backend: both volumes uploaded once, boxes and counts on the device.

    Crops never leave the device. On a GPU, structures are scored by up to
    ``threads`` host threads (default 2, the fastest measured on an H200 with 16
    cores: docs/performance.md), each queueing its kernels on a CUDA
    stream of its own, so that one structure's kernel launches overlap
    another's synchronisations; on the CPU one after another.
    """
    from oarbench.metrics._torch import import_torch, label_statistics_torch

    torch = import_torch()
    dev = torch.device(device)
    ref_t = torch.from_numpy(np.ascontiguousarray(ref)).to(dev)
    pred_t = torch.from_numpy(np.ascontiguousarray(pred)).to(dev)
    stats = label_statistics_torch(ref_t, pred_t)  # ends with copies to the host: uploads are complete
    counts = (stats.n_ref, stats.n_pred, stats.tp)
    n_threads = (2 if threads is None else _threads(threads)) if dev.type == "cuda" else 1
    if n_threads == 1:
        return _evaluate_boxes(ref_t, pred_t, stats.ref_boxes, stats.pred_boxes, sp, labels, scoring,
                               surface, None, counts)

    local = threading.local()

    def on_own_stream(r: Any, p: Any, spacing: tuple[float, ...]) -> SurfaceDistances:
        if not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream(device=dev)
        local.stream.wait_stream(torch.cuda.default_stream(dev))  # the crops were cut on the default stream
        with torch.cuda.stream(local.stream):
            return surface(r, p, spacing)  # ends with copies to the host, which synchronise the stream

    with ThreadPoolExecutor(n_threads) as pool:
        return _evaluate_boxes(ref_t, pred_t, stats.ref_boxes, stats.pred_boxes, sp, labels, scoring,
                               on_own_stream, pool, counts)


def _threads(threads: int | None) -> int:
    if threads is None:
        return min(2, os.cpu_count() or 1)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return threads


def _box_size(boxes: list, value: int) -> int:
    box = boxes[value - 1] if value <= len(boxes) else None
    return 0 if box is None else int(np.prod([s.stop - s.start for s in box]))


def _evaluate_boxes(
    ref: np.ndarray,
    pred: np.ndarray,
    ref_boxes: list,
    pred_boxes: list,
    sp: tuple[float, ...],
    labels: LabelMap,
    scoring: tuple[dict[str, float], str],  # (tolerance per structure, APL convention)
    surface: SurfaceBackend,
    pool: ThreadPoolExecutor | None,
    counts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> list[StructureResult]:
    """Score every structure inside its box.

    ``counts`` (voxels of each value in the reference, in the prediction, and
    in both; indexed by value) skips counting inside the crops, as the device
    path has them already; ``ref``/``pred`` are then tensors on that device.
    """
    for name, boxes in (("reference", ref_boxes), ("prediction", pred_boxes)):
        unknown = [v + 1 for v, box in enumerate(boxes) if box is not None and not labels.known(v + 1)]
        if unknown:
            raise ValueError(
                f"{name}: label values [{_shown(unknown)}] are not in the label map (known: {_shown(labels.values, 40)})"
            )

    voxel_ml = float(np.prod(sp)) / 1000.0
    tolerances, apl_convention = scoring
    coarsest = float(max(sp))
    coarsest_inplane = float(max(sp[1:])) if len(sp) == 3 else coarsest

    def one(value: int, name: str) -> StructureResult:
        rbox = ref_boxes[value - 1] if value <= len(ref_boxes) else None
        pbox = pred_boxes[value - 1] if value <= len(pred_boxes) else None
        box = _union(rbox, pbox)
        tol = tolerances[name]
        extra = dict(tolerance_mm=tol, spacing_max_mm=coarsest, spacing_inplane_max_mm=coarsest_inplane)
        if box is None:
            return replace(_empty_result(value, name, "absent", 0.0, 0.0, 0, 0), **extra)
        r = ref[box] == value
        p = pred[box] == value
        if counts is None:
            n_ref = int(np.count_nonzero(r))
            n_pred = int(np.count_nonzero(p))
        else:
            n_ref, n_pred = (int(c[value]) if value < len(c) else 0 for c in counts[:2])
        if n_pred == 0 or n_ref == 0:
            status = "missed" if n_pred == 0 else "hallucinated"
            apl = added_path_length(_host(r), _host(p), sp, tol, apl_convention)
            return replace(_empty_result(value, name, status, n_ref * voxel_ml, n_pred * voxel_ml, n_pred, n_ref),
                           vs=0.0, centroid_mm=math.inf, apl_mm=apl.apl_mm,
                           apl_mm_per_slice=apl.apl_mm_per_slice, **extra)
        tp = int(np.count_nonzero(r & p)) if counts is None else int(counts[2][value])
        sd = surface(r, p, sp)
        rh, ph = _host(r), _host(p)
        apl = added_path_length(rh, ph, sp, tol, apl_convention)
        return StructureResult(
            label=value,
            structure=name,
            status="ok",
            dsc=dice_from_counts(tp, n_ref, n_pred),
            hd95=hausdorff(sd, 95.0),
            hd=hausdorff(sd, 100.0),
            msd=msd(sd),
            assd=assd(sd),
            sdsc=surface_dice(sd, tol),
            ref_ml=n_ref * voxel_ml,
            pred_ml=n_pred * voxel_ml,
            tp=tp,
            fp=n_pred - tp,
            fn=n_ref - tp,
            vs=volumetric_similarity(n_ref, n_pred),
            centroid_mm=centroid_distance(rh, ph, sp),
            apl_mm=apl.apl_mm,
            apl_mm_per_slice=apl.apl_mm_per_slice,
            **extra,
        )

    if pool is None:
        return [one(value, name) for value, name in labels]
    # Largest structures first, so that the two threads finish together.
    order = sorted(labels, key=lambda vn: -_box_size(ref_boxes, vn[0]))
    done = dict(zip((v for v, _ in order), pool.map(lambda vn: one(*vn), order)))
    return [done[value] for value, _ in labels]

