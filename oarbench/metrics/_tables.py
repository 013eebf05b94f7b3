"""Surface-element areas on the corner grid (the reference library's definition).

Every corner of the voxel grid sees a 2x2x2 neighbourhood of voxels (2x2 in 2D).
The neighbourhood code packs the eight inside/outside bits, with the voxel at
offset ``(a, b, c)`` (array axes z, y, x) contributing ``1 << (7 - (4a + 2b + c))``
(2D: ``1 << (3 - (2a + b))``). A code other than 0 and all-ones marks a surface
element ("surfel"); its area is the area of the marching-cubes surface inside
that cell with vertices at the edge midpoints, scaled by the voxel spacing.

The triangulation of each configuration is the classic marching-cubes table of
Lorensen & Cline (SIGGRAPH 1987) as tabulated by P. Bourke ("Polygonising a
scalar field", 1994), written below in a compact form of our own. For codes
with more than four inside corners the triangulation of the complementary code
is used (the same surface seen from the other side, ambiguous faces resolved by
separating the minority corners). That rule reproduces the surface-area table of
DeepMind's surface-distance for all 256 codes at any spacing, which
tests/test_metrics_tables.py checks against the library itself.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

__all__ = ["surfel_area_table", "contour_length_table", "BOURKE_CORNERS", "CUBE_EDGES"]

# Cube corners in Bourke's numbering, as (x, y, z) in his frame. His x, y, z map to
# our array axes 0, 1, 2, i.e. corner (x, y, z) is the voxel at offset
# (a, b, c) = (x, y, z) of the 2x2x2 neighbourhood.
BOURKE_CORNERS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0),
    (0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1),
)
# The 12 cube edges as pairs of corner numbers; a triangle vertex is an edge midpoint.
CUBE_EDGES: tuple[tuple[int, int], ...] = (
    (0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6),
    (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7),
)

# Triangles for each of the 256 configurations (index = Bourke's cube index, bit i
# set when corner i is inside): three hexadecimal edge numbers per triangle;
# "-" means no surface.
_TRIANGLES = """
    - 083 019 183981 12a 08312a 92a029 2832a8a98
    3b2 0b28b0 19023b 1b219b98b 3a1ba3 0a108a8ba 3903b9ba9 98aa8b
    478 430734 019847 419471731 12a847 34730412a 92a902847 2a9297273794
    8473b2 b47b24204 90184723b 47b94b9b2921 3a13ba784 1ba14b1047b4 47890b9bab03 47b4b99ba
    954 954083 054150 854835315 12a954 30812a495 52a542402 2a5325354348
    95423b 0b208b495 05401523b 21525828b485 a3ba13954 4950818a18ba 54050b5bab03 54858aa8b
    978579 930953573 078017157 153357 978957a12 a12950530573 802825857a52 2a5253357
    7957893b2 95797292027b 23b018178157 b21b17715 958857a13a3b 5705097b010aba0 ba0b03a50807570 ba57b5
    a65 0835a6 9015a6 1831985a6 165261 165126308 965906026 598582526328
    23ba65 b08b20a65 01923b5a6 5a61929b298b 63b653513 08b0b50515b6 3b6036065059 65969bb98
    5a6478 43047365a 1905a6847 a65197173794 612651478 125526304347 847905065026 739794329596269
    3b2784a65 5a647242027b 01947823b5a6 9219b294b7b45a6 8473b53515b6 51b5b610b7b404b 059065036b63847 65969b4797b9
    a4964a 4a649a083 a01a60640 83181686461a 149124264 308129249264 024426 832824426
    a49a64b23 08228b49a4a6 3b201606461a 64161a48121b8b1 964936913b63 8b1810b61914641 3b6360064 648b68
    7a678a89a 0730a709a67a a671a7178180 a67a71173 126168189867 269291679093739 780706602 732672
    23ba68a89867 20727b09767a9a7 1801781a767a23b b21b17a61671 896867916b63136 091b67 7807063b0b60 7b6
    76b 308b76 019b76 819831b76 a126b7 12a3086b7 2902a96b7 6b72a3a83a98
    723627 708760620 276237019 162186198876 a76a17137 a7617a187108 03707a0a96a7 76a7a88a9
    684b86 36b306046 86b846901 946963931b36 6846b82a1 12a30b06b046 4b846b0292a9 a93a32943b36463
    823842462 042462 190234246438 194142246 8138618466a1 a10a06604 4634386a3039a93 a946a4
    49576b 083495b76 50154076b b76834354315 954a1276b 6b712a083495 76b54a42a402 348354325a52b76
    723762549 954086062687 362376150540 628687218485158 954a16176137 16a176107870954 40a4a503a6a737a 76a7a854a48a
    6956b9b89 36b063056095 0b805b01556b 6b3635531 12a95b9b8b56 0b306b09656912a b85b56805a52025 6b36352a3a53
    589528562382 956960062 158180568382628 156216 13616a386569896 a10a06950560 03856a a56
    b5a75b b5ab75830 5b75ab190 a75ab7981831 b12b71751 08312717572b 9759279022b7 75272b592328982
    25a235375 820852875a25 9015a35373a2 982921872a25752 135375 087071175 903935537 987597
    5845a8ab8 5045b05abb30 01984a8aba45 ab4a45b34941314 2512852b8458 04b0b345b2b151b 0250592b5458b85 9452b3
    25a352345384 5a2524420 3a235a385458019 5a2524192942 845853351 045105 845853905035 945
    4b749b9ab 0834979b79ab 1ab1b414074b 3143481a474bab4 4b79b492b912 9749b791b2b1083 b74b42240 b74b42834324
    29a279237749 9a7974a27870207 37a3a274a1a040a 1a2874 491417713 491417081871 403743 487
    9a8ab8 30939bb9a 01a0a88ab 31ab3a 12b1b99b8 30939b1292b9 02b80b 32b
    23828aa89 9a2092 23828a0181a8 1a2 138918 091 038 -""".split()


def _bourke_index(code: int) -> int:
    """Bourke's cube index for our neighbourhood code."""
    index = 0
    for corner, (a, b, c) in enumerate(BOURKE_CORNERS):
        if (code >> (7 - (4 * a + 2 * b + c))) & 1:
            index |= 1 << corner
    return index


@lru_cache(maxsize=1)
def _triangle_normals() -> tuple[np.ndarray, ...]:
    """Per code, the normals (rows) of its triangles in voxel units: half the cross product of
    two edges, the same for every spacing. Exact whatever the order of operations: vertices lie
    on multiples of 1/2, so every value is a multiple of 1/8."""
    corners = np.asarray(BOURKE_CORNERS, dtype=np.float64)
    midpoints = corners[np.asarray(CUBE_EDGES)].mean(axis=1)  # (12, 3): the vertex on each edge
    normals = []
    for code in range(256):
        packed = _TRIANGLES[_bourke_index(255 - code if bin(code).count("1") > 4 else code)]
        if packed == "-":
            normals.append(np.zeros((0, 3)))
            continue
        tri = midpoints[[int(ch, 16) for ch in packed]].reshape(-1, 3, 3)
        normals.append(0.5 * np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]))
    return tuple(normals)


@lru_cache(maxsize=64)
def _surfel_area_table_cached(spacing: tuple[float, float, float]) -> np.ndarray:
    s = np.asarray(spacing, dtype=np.float64)
    faces = np.array([s[1] * s[2], s[0] * s[2], s[0] * s[1]])
    table = np.zeros(256, dtype=np.float64)
    for code, normals in enumerate(_triangle_normals()):
        area = 0.0
        for n in normals:
            # Each normal component scaled by the area of its face of the voxel.
            area += float(np.linalg.norm(n * faces))
        table[code] = area
    table.flags.writeable = False
    return table


def surfel_area_table(spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Area in mm^2 of the surface element for each of the 256 3D codes.

    ``spacing_mm`` is in array axis order (z, y, x). The returned array is
    read-only and cached per spacing.
    """
    return _surfel_area_table_cached(tuple(float(v) for v in spacing_mm))


@lru_cache(maxsize=64)
def _contour_length_table_cached(spacing: tuple[float, float]) -> np.ndarray:
    s0, s1 = spacing
    # Segment joining the midpoints of the two edges that meet at one corner
    # (written as the reference library rounds it, so the tables agree bit for bit).
    corner_cut = 0.5 * math.sqrt(s0**2 + s1**2)
    table = np.zeros(16, dtype=np.float64)
    for code in range(16):
        bits = [(code >> (3 - (2 * a + b))) & 1 for a in (0, 1) for b in (0, 1)]
        n_in = sum(bits)
        if n_in in (1, 3):
            table[code] = corner_cut
        elif n_in == 2:
            (a00, a01, a10, a11) = bits
            if a00 == a01:  # rows differ: the segment runs along axis 1
                table[code] = s1
            elif a00 == a10:  # columns differ: the segment runs along axis 0
                table[code] = s0
            else:  # diagonal (saddle): two corner cuts
                table[code] = 2.0 * corner_cut
    table.flags.writeable = False
    return table


def contour_length_table(spacing_mm: tuple[float, float]) -> np.ndarray:
    """Length in mm of the contour element for each of the 16 2D codes (axes y, x)."""
    return _contour_length_table_cached(tuple(float(v) for v in spacing_mm))
