"""Segmentation metrics: Dice, surface distances (HD, HD95, MSD, ASSD, surface Dice), added
path length, volumetric similarity, centroid distance.

Definitions are DeepMind surface-distance's (docs/metrics.md): surface elements on
the corner grid weighted by area, exact Euclidean distances, the weighted
percentile rule for HD95. Arrays are (z, y, x) with spacing in mm in the same order.

Compute once, derive many::

    from oarbench.metrics import compute_surface_distances, hd95, msd, surface_dice
    sd = compute_surface_distances(reference, prediction, spacing=(2.5, 0.8, 0.8))
    hd95(sd), msd(sd), surface_dice(sd, tolerance_mm=2.0)

or for a whole label map, :func:`evaluate_labels`.
"""

from oarbench.metrics._clinical import (
    APL_CONVENTIONS,
    AddedPathLength,
    added_path_length,
    centroid_distance,
    contour_pixels,
    RESOLUTION_LIMITS,
    resolution_limit,
    resolution_warning,
    volumetric_similarity,
)
from oarbench.metrics._multilabel import (
    RESULT_COLUMNS,
    STATUSES,
    StructureResult,
    evaluate_labels,
    resolve_backend,
)
from oarbench.metrics._kernels import surface_kernel
from oarbench.metrics._overlap import dice, overlap_counts
from oarbench.metrics._surface import (
    SurfaceDistances,
    assd,
    compute_surface_distances,
    directed_means,
    hausdorff,
    hd,
    hd95,
    msd,
    neighbour_codes,
    surface_dice,
    surface_overlap,
)
from oarbench.metrics._tables import contour_length_table, surfel_area_table

__all__ = [
    "APL_CONVENTIONS",
    "AddedPathLength",
    "added_path_length",
    "centroid_distance",
    "contour_pixels",
    "resolution_warning",
    "resolution_limit",
    "RESOLUTION_LIMITS",
    "volumetric_similarity",
    "SurfaceDistances",
    "StructureResult",
    "RESULT_COLUMNS",
    "STATUSES",
    "compute_surface_distances",
    "evaluate_labels",
    "resolve_backend",
    "surface_kernel",
    "dice",
    "overlap_counts",
    "hausdorff",
    "hd",
    "hd95",
    "msd",
    "assd",
    "directed_means",
    "surface_dice",
    "surface_overlap",
    "neighbour_codes",
    "surfel_area_table",
    "contour_length_table",
]
