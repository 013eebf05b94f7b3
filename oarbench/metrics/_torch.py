"""Surface distances with PyTorch, on the CPU or a CUDA GPU.

The same contract and the same numbers as the numpy backend
(:func:`oarbench.metrics._surface.surface_distances_cropped`):

* neighbour codes on the corner grid from shifted slices of the padded mask,
  with the bit convention of :func:`oarbench.metrics._surface.neighbour_codes`;
* surfel areas from :func:`surfel_area_table` / :func:`contour_length_table`;
* exact Euclidean distances in mm, in float64.

Distances come from an exact search on the corner grid of the crop that also
tracks *which* surfel is nearest. Squared Euclidean distance with anisotropic
spacing separates over the axes, ``min_j sum_k (s_k (j_k - i_k))^2 =
min_{j_c} [(s_c dc)^2 + min_{j_b} [(s_b db)^2 + min_{j_a} (s_a da)^2]]``:

1. along the finest axis ``a``, the nearest surfel of the other mask on the same
   line comes from running maxima of surfel positions from both ends (linear
   time, exact);
2. along the coarsest axis ``b``, a min-plus pass over shifts ``|db| <= R_b`` on
   the whole grid;
3. along the remaining axis ``c``, a min-plus over shifts ``|dc| <= R_c`` at the
   query surfels only.

The windows start at about ``_FIRST_RADIUS_MM`` mm. A source outside the window
is at least ``(R_k + 1) s_k`` away along some windowed axis ``k``, so a query
whose windowed minimum is below ``min_k (R_k + 1) s_k`` is exact. The others go
to a wider round (radius x4) or, when cheaper, to an exact brute-force search
over the whole (b, c) plane through the query; a window covering the whole
extent is exact by construction. So every distance is exact; the windows only
save work where the surfaces are close, as they are for a useful segmentation.

The nearest surfel's integer offset is carried through, and the distance is
finally recomputed as ``sqrt(sum_k (delta_k * s_k)^2)`` summed over the axes in
order, the formula of the numpy backend; both backends agree to the last bit up
to the choice among equidistant nearest surfels (a few units in the last
place, measured below 1e-14 mm).

Everything runs on the device of the inputs (or ``device``); only the sorted
results come back to the host as numpy arrays. torch is imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from oarbench.metrics._surface import SurfaceDistances, check_spacing
from oarbench.metrics._tables import contour_length_table, surfel_area_table

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["surface_distances_torch", "surface_distances_in_box", "import_torch", "label_statistics_torch", "LabelStatistics"]

INSTALL_HINT = "the torch backend needs PyTorch: pip install 'oarbench[torch]'"

# Elements of float64 scratch per chunk of the window searches (64 MiB on the
# CPU, 512 MiB on a GPU).
_CHUNK_CPU = 1 << 23
_CHUNK_CUDA = 1 << 26
# Search radius (mm) of the first window round; farther surfels need more rounds
# or the exact plane search.
_FIRST_RADIUS_MM = 8.0
# Offset marking "no source on this line" in the first pass.
_NO_SOURCE = 1 << 30


def import_torch() -> Any:
    """The torch module, or ImportError with the install hint."""
    from oarbench._optional import require

    return require("torch", "the torch backend")


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _as_bool_tensor(mask: Any, name: str, device: "torch.device") -> "torch.Tensor":
    """A boolean tensor on ``device`` from a bool / 0-1 numpy array or tensor.

    Raises ValueError for other dtypes or values, naming the argument.
    """
    torch = import_torch()
    if _is_tensor(mask):
        t = mask.detach()
        if t.is_complex():
            raise ValueError(f"{name}: expected a boolean or 0/1 array, got dtype {t.dtype}")
    else:
        arr = np.asarray(mask)
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{name}: expected a boolean or 0/1 array, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t.to(device)
    if t.dtype == torch.bool:
        return t
    if bool(((t != 0) & (t != 1)).any()):
        raise ValueError(f"{name}: expected a boolean or 0/1 array, found values other than 0 and 1")
    return t != 0


def _resolve_device(reference: Any, prediction: Any, device: str | None) -> "torch.device":
    """``device`` if given, else the device of a tensor input, else the CPU."""
    torch = import_torch()
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch sees no CUDA GPU")
        return dev
    for x in (reference, prediction):
        if _is_tensor(x):
            return x.device
    return torch.device("cpu")


def _bounding_box(mask: "torch.Tensor") -> tuple[slice, ...] | None:
    """Tightest slices holding all true voxels, or None for an empty mask."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        proj = mask.any(dim=other) if other else mask
        idx = proj.nonzero()
        if idx.numel() == 0:
            return None
        box.append(slice(int(idx[0, 0]), int(idx[-1, 0]) + 1))
    return tuple(box)


def neighbour_codes_torch(mask: "torch.Tensor") -> "torch.Tensor":
    """Corner-grid neighbour codes (uint8, shape ``mask.shape + 1``) on the mask's device.

    Same convention as :func:`oarbench.metrics._surface.neighbour_codes`: voxel
    offset ``(a, b, c)`` of the 2x2x2 neighbourhood sets bit ``7 - (4a + 2b + c)``
    (2D: ``3 - (2a + b)``); voxels outside the array count as background.
    """
    torch = import_torch()
    nd = mask.ndim
    padded = torch.zeros(tuple(s + 2 for s in mask.shape), dtype=torch.uint8, device=mask.device)
    padded[tuple(slice(1, -1) for _ in range(nd))] = mask
    out_shape = tuple(s + 1 for s in mask.shape)
    codes = torch.zeros(out_shape, dtype=torch.uint8, device=mask.device)
    nbits = 2**nd
    for offset in np.ndindex(*(2,) * nd):
        bit = nbits - 1 - sum(o << (nd - 1 - k) for k, o in enumerate(offset))
        window = padded[tuple(slice(o, o + s) for o, s in zip(offset, out_shape))]
        codes.add_(window, alpha=1 << bit)  # one kernel: codes += window * 2^bit
    return codes


def _chunk_elements(device: "torch.device") -> int:
    return _CHUNK_CUDA if device.type == "cuda" else _CHUNK_CPU


def _nearest_on_lines(sources: "torch.Tensor", axis: int) -> "torch.Tensor":
    """Signed offset along ``axis`` to the nearest source on the same line.

    Running maxima of source positions from both ends give the previous and the
    next source; ties take the previous one. Lines without a source get the
    sentinel ``_NO_SOURCE``. int32; fastest when ``axis`` is the last, contiguous one.
    """
    torch = import_torch()
    n = sources.shape[axis]
    dtype = torch.int32
    big = _NO_SOURCE
    shape = [1] * sources.ndim
    shape[axis] = n
    pos = torch.arange(n, device=sources.device, dtype=dtype).reshape(shape)
    s = sources.to(dtype)
    # prev + 1 of the last source at or before i (0: none), n - next of the first at or after i (0: none).
    prev1 = (s * (pos + 1)).cummax(dim=axis).values
    next1 = (s * (n - pos)).flip(axis).cummax(dim=axis).values.flip(axis)
    d_prev = torch.where(prev1 > 0, pos + 1 - prev1, big)
    d_next = torch.where(next1 > 0, (n - pos) - next1, big)
    offset = torch.where(d_prev <= d_next, -d_prev, d_next)
    return torch.where(offset == -big, big, offset)


def _window_radii(rho: float, axes: list[int], shape: tuple[int, ...], spacing: tuple[float, ...]) -> dict[int, int]:
    """Half-widths (voxels) of a search window of about ``rho`` mm, capped at the extents."""
    return {k: min(shape[k] - 1, int(np.ceil(rho / spacing[k]))) for k in axes}


def _safe_radius(radii: dict[int, int], shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    """Distance (mm) below which a window search is exact.

    A source outside the window differs by at least ``radii[k] + 1`` voxels
    along some windowed axis ``k``, so it lies at least ``(radii[k] + 1) *
    spacing[k]`` away; axes searched over their whole extent impose nothing.
    """
    bounds = [(r + 1) * spacing[k] for k, r in radii.items() if r < shape[k] - 1]
    return min(bounds) if bounds else float("inf")


def _grid_window_pass(
    values: "torch.Tensor", axis: int, radius: int, step: float
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Min-plus along ``axis`` over shifts ``|t| <= radius`` on the whole grid.

    Returns ``best[i] = min_t values[i + t] + (step * t)^2`` and the winning
    shift ``t`` (int32). Ties keep the smallest ``|t|`` (then the negative one):
    the window's candidates are taken in the order 0, -1, +1, -2, +2, ... and
    ``min`` returns the first minimal one. One reduction over a sliding-window
    view per chunk of the grid, instead of a pass per shift.
    """
    torch = import_torch()
    dev = values.device
    order = [0] + [t for k in range(1, radius + 1) for t in (-k, k)]
    shifts = torch.tensor(order, dtype=torch.int64, device=dev)
    penalty = (shifts.to(torch.float64) * step) ** 2
    taps = (shifts + radius)  # position of shift t in the window [i - radius, i + radius]
    pad_shape = list(values.shape)
    pad_shape[axis] = radius
    pad = torch.full(pad_shape, float("inf"), dtype=values.dtype, device=dev)
    padded = torch.cat([pad, values, pad], dim=axis)
    best = torch.empty_like(values)
    shift = torch.empty(values.shape, dtype=torch.int32, device=dev)
    # Chunks along another axis bound the (chunk x window) scratch.
    along = 0 if axis != 0 else 1
    per_slice = int(np.prod(values.shape)) // values.shape[along] * len(order)
    step_n = max(1, _chunk_elements(dev) // max(1, per_slice))
    for start in range(0, values.shape[along], step_n):
        n = min(step_n, values.shape[along] - start)
        window = padded.narrow(along, start, n).unfold(axis, 2 * radius + 1, 1)
        cand = window.index_select(-1, taps) + penalty
        b, arg = cand.min(dim=-1)
        best.narrow(along, start, n).copy_(b)
        shift.narrow(along, start, n).copy_(shifts[arg])
    return best, shift


def _query_window_pass(
    values: "torch.Tensor", queries: "torch.Tensor", axis: int, radius: int, step: float
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """For each query corner, ``min_t values[q + t e_axis] + (step * t)^2`` over ``|t| <= radius``.

    Returns the minimum (float64; inf if none) and the winning shift (int64).
    Chunked over the queries to bound memory.
    """
    torch = import_torch()
    dev = values.device
    n = values.shape[axis]
    flat = values.reshape(-1)
    stride = values.stride(axis)
    shifts = torch.arange(-radius, radius + 1, device=dev, dtype=torch.int64)
    penalty = (shifts.to(torch.float64) * step) ** 2
    base = torch.zeros(len(queries), dtype=torch.int64, device=dev)
    for k in range(values.ndim):
        base += queries[:, k] * values.stride(k)
    pos = queries[:, axis]
    best = torch.empty(len(queries), dtype=torch.float64, device=dev)
    arg = torch.empty(len(queries), dtype=torch.int64, device=dev)
    per_chunk = max(1, _chunk_elements(dev) // len(shifts))
    for start in range(0, len(queries), per_chunk):
        stop = min(len(queries), start + per_chunk)
        where = pos[start:stop, None] + shifts[None, :]
        inside = (where >= 0) & (where < n)
        index = base[start:stop, None] + shifts[None, :] * stride
        cost = (flat[torch.where(inside, index, 0)] + penalty).masked_fill_(~inside, float("inf"))
        b, a = cost.min(dim=1)
        best[start:stop] = b
        arg[start:stop] = shifts[a]
    return best, arg


def _exact_plane_search(
    values: "torch.Tensor", queries: "torch.Tensor", axes: list[int], spacing: tuple[float, ...]
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Brute-force min over the whole plane (or line) spanned by ``axes`` through each query.

    ``min_j values[j] + sum_{k in axes} (s_k (j_k - q_k))^2`` with ``j`` equal to
    ``q`` off ``axes``. Returns the minimum and the offsets (queries x len(axes),
    int64). Chunked over the queries.
    """
    torch = import_torch()
    dev = values.device
    nd = values.ndim
    sizes = [values.shape[k] for k in axes]
    plane = int(np.prod(sizes))
    # Offsets of every plane cell relative to the plane's origin, and per-axis coordinates.
    coords = torch.stack(
        torch.meshgrid(*[torch.arange(s, device=dev, dtype=torch.int64) for s in sizes], indexing="ij"), dim=-1
    ).reshape(plane, len(axes))
    cell_offset = sum(coords[:, i] * values.stride(k) for i, k in enumerate(axes))
    base = torch.zeros(len(queries), dtype=torch.int64, device=dev)
    for k in range(nd):
        if k not in axes:
            base += queries[:, k] * values.stride(k)
    flat = values.reshape(-1)
    best = torch.empty(len(queries), dtype=torch.float64, device=dev)
    offsets = torch.empty((len(queries), len(axes)), dtype=torch.int64, device=dev)
    per_chunk = max(1, _chunk_elements(dev) // plane)
    for start in range(0, len(queries), per_chunk):
        stop = min(len(queries), start + per_chunk)
        q = queries[start:stop]
        cost = flat[base[start:stop, None] + cell_offset[None, :]]
        for i, k in enumerate(axes):
            d = (coords[None, :, i] - q[:, k, None]).to(torch.float64) * spacing[k]
            cost = cost + d * d
        b, a = cost.min(dim=1)
        best[start:stop] = b
        offsets[start:stop] = coords[a] - q[:, axes]
    return best, offsets


def _nearest_offsets(
    queries: "torch.Tensor", sources: "torch.Tensor", spacing: tuple[float, ...]
) -> "torch.Tensor":
    """Integer offset (M x ndim, int64) from each query corner to its nearest source corner.

    ``queries`` are corner indices (M x ndim); ``sources`` a boolean corner grid
    with at least one true element. Exact for Euclidean distance with the given
    anisotropic spacing (see the module docstring).
    """
    torch = import_torch()
    nd = sources.ndim
    # Pass 1 (exact, linear) along the finest axis, where windows would be widest;
    # in 3D the grid pass along the coarsest axis (fewest window taps). Work in a
    # layout (b, c, a) with a last and contiguous (fast running maxima).
    by_spacing = sorted(range(nd), key=lambda k: (spacing[k], -sources.shape[k], k))
    perm = by_spacing[::-1] if nd == 3 else [by_spacing[1], by_spacing[0]]
    sources = sources.permute(perm).contiguous()
    queries = queries[:, perm]
    spacing = tuple(spacing[k] for k in perm)
    shape = tuple(sources.shape)
    dev = sources.device
    a = nd - 1
    if nd == 3:
        b, c = 0, 1
        windowed = [b, c]
    else:
        b, c = None, 0
        windowed = [c]

    off_a = _nearest_on_lines(sources, a)
    f = off_a.to(torch.float64) * spacing[a]
    f = torch.where(off_a == _NO_SOURCE, float("inf"), f * f).contiguous()
    off_a_flat = off_a.reshape(-1)
    n_grid = int(np.prod(shape))

    result = torch.empty((len(queries), nd), dtype=torch.int64, device=dev)
    todo = torch.arange(len(queries), device=dev)
    rho = _FIRST_RADIUS_MM
    strides = [int(np.prod(shape[k + 1 :])) for k in range(nd)]
    while len(todo):
        radii = _window_radii(rho, windowed, shape, spacing)
        window_cost = (n_grid * (2 * radii[b] + 1) * 5 if b is not None else 0) + len(todo) * (2 * radii[c] + 1) * 5
        exact_cost = len(todo) * int(np.prod([shape[k] for k in windowed])) * 4
        q = queries[todo]
        if exact_cost <= window_cost:
            _, offs = _exact_plane_search(f, q, windowed, spacing)
            for i, k in enumerate(windowed):
                result[todo, k] = offs[:, i]
            land = q.clone()
            for i, k in enumerate(windowed):
                land[:, k] += offs[:, i]
            result[todo, a] = off_a_flat[sum(land[:, k] * strides[k] for k in range(nd))].to(torch.int64)
            break
        if b is not None:
            g, shift_b = _grid_window_pass(f, b, radii[b], spacing[b])
        else:
            g, shift_b = f, None
        best, t_c = _query_window_pass(g, q, c, radii[c], spacing[c])
        safe = _safe_radius(radii, shape, spacing)
        resolved = best < safe * safe * (1.0 - 1e-9) if np.isfinite(safe) else torch.ones_like(best, dtype=torch.bool)
        land = q.clone()
        land[:, c] += t_c
        if shift_b is not None:
            t_b = shift_b.reshape(-1)[sum(land[:, k] * strides[k] for k in range(nd))].to(torch.int64)
            land[:, b] += t_b
        t_a = off_a_flat[sum(land[:, k] * strides[k] for k in range(nd))].to(torch.int64)
        land[:, a] += t_a
        if bool(resolved.all()):  # the usual case: one synchronisation instead of three
            result[todo] = land - q
            break
        done = todo[resolved]
        result[done] = (land - q)[resolved]
        todo = todo[~resolved]
        rho *= 4.0
    inverse = [perm.index(k) for k in range(nd)]
    return result[:, inverse]


def _distances(offsets: "torch.Tensor", spacing: tuple[float, ...]) -> "torch.Tensor":
    """sqrt(sum_k (delta_k * s_k)^2), summed over the axes in order (float64)."""
    torch = import_torch()
    d = offsets[:, 0].to(torch.float64) * spacing[0]
    total = d * d
    for k in range(1, len(spacing)):
        d = offsets[:, k].to(torch.float64) * spacing[k]
        total = total + d * d
    return torch.sqrt(total)


def _sorted(distances: "torch.Tensor", areas: "torch.Tensor") -> tuple[np.ndarray, np.ndarray]:
    """Sort by distance, ties by area (``np.lexsort((areas, distances))``); to numpy."""
    torch = import_torch()
    by_area = torch.sort(areas, stable=True).indices
    order = by_area[torch.sort(distances[by_area], stable=True).indices]
    return distances[order].cpu().numpy(), areas[order].cpu().numpy()


def surface_distances_torch(
    reference: Any, prediction: Any, spacing: Any, device: str | None = None
) -> SurfaceDistances:
    """Surface distances of two masks, both ways, computed with torch.

    Parameters
    ----------
    reference, prediction:
        Boolean (or 0/1) masks of the same 2D or 3D shape, axes (z, y, x)
        (2D: (y, x)); numpy arrays or torch tensors.
    spacing:
        Voxel size in mm along the same axes.
    device:
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Default: the device of a tensor
        input (so CUDA tensors stay on their GPU), else the CPU.

    Returns
    -------
    SurfaceDistances
        Sorted distances (mm) and surfel areas (mm^2; mm in 2D) as float64 numpy
        arrays, equal to the numpy backend's (see the module docstring).
    """
    torch = import_torch()
    dev = _resolve_device(reference, prediction, device)
    ref = _as_bool_tensor(reference, "reference", dev)
    pred = _as_bool_tensor(prediction, "prediction", dev)
    if ref.shape != pred.shape:
        raise ValueError(f"reference shape {tuple(ref.shape)} differs from prediction shape {tuple(pred.shape)}")
    if ref.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got {ref.ndim}D with shape {tuple(ref.shape)}")
    sp = check_spacing(spacing, ref.ndim)
    box = _bounding_box(ref | pred)
    if box is None:
        empty = np.zeros(0)
        return SurfaceDistances(empty, empty, empty, empty)
    return surface_distances_in_box(ref[box], pred[box], sp)


@lru_cache(maxsize=64)
def _area_table(spacing: tuple[float, ...], device: str) -> "torch.Tensor":
    """Surfel areas (3D) or contour lengths (2D) by neighbour code, on ``device``."""
    torch = import_torch()
    table = contour_length_table(spacing) if len(spacing) == 2 else surfel_area_table(spacing)
    return torch.as_tensor(np.array(table), dtype=torch.float64, device=torch.device(device))


def surface_distances_in_box(ref: "torch.Tensor", pred: "torch.Tensor", sp: tuple[float, ...]) -> SurfaceDistances:
    """:func:`surface_distances_torch` of two boolean tensors already cut to a box.

    No checks: ``ref`` and ``pred`` are boolean tensors of one shape on one
    device, ``sp`` a checked spacing. The box need not be tight; a tight one
    (the union of both masks' boxes) is fastest.
    """
    empty = np.zeros(0)
    table = _area_table(sp, str(ref.device))
    full = len(table) - 1
    surfel_grids = []
    surfel_idx = []
    surfel_areas = []
    for mask in (ref, pred):
        codes = neighbour_codes_torch(mask)
        border = (codes != 0) & (codes != full)
        idx = border.nonzero()
        surfel_grids.append(border)
        surfel_idx.append(idx)
        surfel_areas.append(table[codes[tuple(idx.T)].long()])

    out = []
    for this, other in ((0, 1), (1, 0)):
        idx, areas = surfel_idx[this], surfel_areas[this]
        if len(idx) == 0:
            out += [empty, empty]
            continue
        if len(surfel_idx[other]) == 0:
            out += [np.full(len(idx), np.inf), np.sort(areas.cpu().numpy(), kind="stable")]
            continue
        offsets = _nearest_offsets(idx, surfel_grids[other], sp)
        out += list(_sorted(_distances(offsets, sp), areas))
    return SurfaceDistances(*out)


# --------------------------------------------------------------------------------------
# Multi-label statistics on the device: one upload of both volumes, every structure's
# bounding box and voxel counts from a few histogram passes.


@dataclass(frozen=True)
class LabelStatistics:
    """Per-label bounding boxes and voxel counts of a reference/prediction pair.

    ``ref_boxes[v - 1]`` / ``pred_boxes[v - 1]`` follow :func:`scipy.ndimage.find_objects`
    (None where value ``v`` is absent); ``n_ref[v]``, ``n_pred[v]`` and ``tp[v]`` are
    voxel counts of value ``v`` (index 0: background).
    """

    ref_boxes: list
    pred_boxes: list
    n_ref: np.ndarray
    n_pred: np.ndarray
    tp: np.ndarray


def _boxes_from_projections(projections: list[np.ndarray], n_values: int) -> list:
    """find_objects-style boxes from per-axis (extent x values) voxel counts."""
    first_last = []
    for counts in projections:
        present = counts > 0
        any_v = present.any(axis=0)
        first = np.argmax(present, axis=0)
        last = counts.shape[0] - 1 - np.argmax(present[::-1], axis=0)
        first_last.append((any_v, first, last))
    boxes: list = []
    for v in range(1, n_values):
        if not first_last[0][0][v]:
            boxes.append(None)
            continue
        boxes.append(tuple(slice(int(f[v]), int(l_[v]) + 1) for _, f, l_ in first_last))
    # find_objects' list ends at the largest value present
    while boxes and boxes[-1] is None:
        boxes.pop()
    return boxes


def label_statistics_torch(reference: "torch.Tensor", prediction: "torch.Tensor") -> LabelStatistics:
    """Boxes and counts of every label value of two integer label tensors on one device.

    One histogram of ``(ref, pred)`` value pairs gives the voxel counts and the
    true positives of every value; one histogram of ``(index along axis, value)``
    per axis and volume gives the bounding boxes. Exact (integer counts); the
    volumes never leave the device, only the small histograms do.
    """
    torch = import_torch()
    n_values = int(torch.maximum(reference.max(), prediction.max())) + 1
    # int32 is exact here: every histogram index is below extent * n_values^2 < 2^31.
    wide = torch.int32 if max(reference.shape) * n_values * n_values < 2**31 else torch.int64
    ref = reference.to(wide)
    pred = prediction.to(wide)
    pairs = torch.bincount((ref * n_values + pred).reshape(-1), minlength=n_values * n_values)
    pairs = pairs.reshape(n_values, n_values).cpu().numpy()
    n_ref, n_pred, tp = pairs.sum(axis=1), pairs.sum(axis=0), np.diagonal(pairs).copy()
    boxes = []
    for vol in (ref, pred):
        projections = []
        for axis in range(vol.ndim):
            extent = vol.shape[axis]
            shape = [1] * vol.ndim
            shape[axis] = extent
            index = torch.arange(extent, device=vol.device, dtype=wide).reshape(shape) * n_values
            hist = torch.bincount((vol + index).reshape(-1), minlength=extent * n_values)
            projections.append(hist.reshape(extent, n_values).cpu().numpy())
        boxes.append(_boxes_from_projections(projections, n_values))
    return LabelStatistics(boxes[0], boxes[1], n_ref, n_pred, tp)
