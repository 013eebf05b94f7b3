/*
 * Compiled kernels of the surface-distance core (3D, numpy backend).
 *
 * Two loops that numpy can only express as many passes over temporary arrays:
 *
 *   corner_codes   the 2x2x2 neighbourhood code of every corner of a crop's voxel grid,
 *                  written into a zero-padded code map, counting the surface corners;
 *   border_index   the flat indices of the surface corners of such a map, ascending;
 *   nearest_rank   for each query corner, the first offset of an ascending list whose
 *                  corner in a target code map is a surface corner.
 *
 * They compute exactly what neighbour_codes, _surfels and the local stage of _nearest in
 * _surface.py compute (tests/test_ckernels.py checks it); _surface.py uses the numpy code where
 * this module is not built. Buffers are C-contiguous numpy arrays, checked for size here; every
 * loop runs without the GIL, so structures scored in two threads use both cores.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* A surface corner: its neighbourhood holds both foreground and background. */
#define IS_SURFACE(c) ((c) != 0 && (c) != 255)

static int check_len(const Py_buffer *b, Py_ssize_t want, Py_ssize_t itemsize, const char *name)
{
    if (b->len != want * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, expected %zd", name, b->len, want * itemsize);
        return -1;
    }
    return 0;
}

/* corner_codes(mask, nz, ny, nx, out, pz, py, px) -> number of surface corners
 *
 * mask: uint8 0/1 of shape (nz + 2, ny + 2, nx + 2): a crop of nz x ny x nx voxels with one
 *       background voxel on every side.
 * out:  uint8 of shape (nz + 1 + 2 pz, ny + 1 + 2 py, nx + 1 + 2 px), zero on entry; the code of
 *       corner (z, y, x) of the crop's corner grid goes to out[z + pz, y + py, x + px].
 * Corner p lies between voxels p - 1 and p on every axis; voxel offset (a, b, c) of its
 * neighbourhood sets bit 7 - (4a + 2b + c), as neighbour_codes in _surface.py. */
static PyObject *corner_codes(PyObject *self, PyObject *args)
{
    Py_buffer mask, out;
    Py_ssize_t nz, ny, nx, pz, py, px;
    if (!PyArg_ParseTuple(args, "y*nnnw*nnn", &mask, &nz, &ny, &nx, &out, &pz, &py, &px))
        return NULL;
    PyObject *result = NULL;
    if (nz < 1 || ny < 1 || nx < 1 || pz < 0 || py < 0 || px < 0) {
        PyErr_SetString(PyExc_ValueError, "corner_codes: sizes must be positive, pads non-negative");
        goto done;
    }
    const Py_ssize_t MY = ny + 2, MX = nx + 2;
    const Py_ssize_t OY = ny + 1 + 2 * py, OX = nx + 1 + 2 * px;
    if (check_len(&mask, (nz + 2) * MY * MX, 1, "mask") < 0
        || check_len(&out, (nz + 1 + 2 * pz) * OY * OX, 1, "code map") < 0)
        goto done;
    const uint8_t *m = (const uint8_t *)mask.buf;
    uint8_t *o = (uint8_t *)out.buf;
    Py_ssize_t count = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t z = 0; z <= nz; z++) {
        for (Py_ssize_t y = 0; y <= ny; y++) {
            const uint8_t *r00 = m + (z * MY + y) * MX;
            const uint8_t *r01 = r00 + MX;
            const uint8_t *r10 = r00 + MY * MX;
            const uint8_t *r11 = r10 + MX;
            uint8_t *row = o + ((z + pz) * OY + (y + py)) * OX + px;
            for (Py_ssize_t x = 0; x <= nx; x++) {
                unsigned c = (unsigned)(r00[x] << 7) | (unsigned)(r00[x + 1] << 6)
                           | (unsigned)(r01[x] << 5) | (unsigned)(r01[x + 1] << 4)
                           | (unsigned)(r10[x] << 3) | (unsigned)(r10[x + 1] << 2)
                           | (unsigned)(r11[x] << 1) | (unsigned)r11[x + 1];
                row[x] = (uint8_t)c;
                count += IS_SURFACE(c);
            }
        }
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(count);
done:
    PyBuffer_Release(&mask);
    PyBuffer_Release(&out);
    return result;
}

/* border_index(codes, out) -> None: the flat indices (int64, ascending) of the surface corners
 * of a code map; out must hold exactly as many as there are. */
static PyObject *border_index(PyObject *self, PyObject *args)
{
    Py_buffer codes, out;
    if (!PyArg_ParseTuple(args, "y*w*", &codes, &out))
        return NULL;
    PyObject *result = NULL;
    if (out.len % (Py_ssize_t)sizeof(int64_t) != 0) {
        PyErr_SetString(PyExc_ValueError, "border_index: out must be int64");
        goto done;
    }
    const uint8_t *c = (const uint8_t *)codes.buf;
    int64_t *idx = (int64_t *)out.buf;
    const Py_ssize_t n = codes.len, room = out.len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t k = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        if (IS_SURFACE(c[i])) {
            if (k < room)
                idx[k] = (int64_t)i;
            k++;
        }
    }
    Py_END_ALLOW_THREADS
    if (k != room) {
        PyErr_Format(PyExc_ValueError, "border_index: %zd surface corners, room for %zd", k, room);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&codes);
    PyBuffer_Release(&out);
    return result;
}

/* nearest_rank(codes, where, offsets, out) -> None
 *
 * codes:   uint8 code map of the target surface (as corner_codes writes it);
 * where:   int64 flat indices of the query corners in the same map;
 * offsets: int64 flat offsets in that map, in the order to try them (ascending distance);
 * out:     int32, one per query: the index of the first offset at which the target map holds a
 *          surface corner, or -1 when none of them does.
 * Every index tried must lie in the map (the caller pads it by the offsets' reach); a query
 * for which that does not hold raises ValueError. */
static PyObject *nearest_rank(PyObject *self, PyObject *args)
{
    Py_buffer codes, where, offsets, out;
    if (!PyArg_ParseTuple(args, "y*y*y*w*", &codes, &where, &offsets, &out))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t n = where.len / (Py_ssize_t)sizeof(int64_t);
    const Py_ssize_t n_off = offsets.len / (Py_ssize_t)sizeof(int64_t);
    if (where.len % (Py_ssize_t)sizeof(int64_t) || offsets.len % (Py_ssize_t)sizeof(int64_t)
        || check_len(&out, n, sizeof(int32_t), "out") < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "nearest_rank: where and offsets must be int64");
        goto done;
    }
    if (n_off > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "nearest_rank: too many offsets");
        goto done;
    }
    const uint8_t *c = (const uint8_t *)codes.buf;
    const int64_t *w = (const int64_t *)where.buf;
    const int64_t *off = (const int64_t *)offsets.buf;
    int32_t *rank = (int32_t *)out.buf;
    const int64_t size = (int64_t)codes.len;
    int64_t lo = 0, hi = 0;
    for (Py_ssize_t k = 0; k < n_off; k++) {
        lo = off[k] < lo ? off[k] : lo;
        hi = off[k] > hi ? off[k] : hi;
    }
    Py_ssize_t outside = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        const int64_t q = w[i];
        if (q + lo < 0 || q + hi >= size) {
            outside = i;
            break;
        }
        int32_t r = -1;
        const uint8_t *base = c + q;
        for (Py_ssize_t k = 0; k < n_off; k++) {
            const uint8_t v = base[off[k]];
            if (IS_SURFACE(v)) {
                r = (int32_t)k;
                break;
            }
        }
        rank[i] = r;
    }
    Py_END_ALLOW_THREADS
    if (outside >= 0) {
        PyErr_Format(PyExc_ValueError, "nearest_rank: query %zd reaches outside the code map", outside);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&codes);
    PyBuffer_Release(&where);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&out);
    return result;
}


/* label_boxes(ref, pred, itemsize, nz, ny, nx, n_labels, boxes_ref, boxes_pred, counts) -> None
 *
 * One pass over two label volumes of nz x ny x nx voxels (uint8 or uint16: itemsize 1 or 2) that
 * gives every value's bounding box in each and its voxel counts.
 * boxes_ref, boxes_pred: int64, n_labels x 6, filled with (z0, z1, y0, y1, x0, x1) of value
 *     v at row v - 1 (half-open); a value that does not occur keeps z0 = -1.
 * counts: int64, 3 x (n_labels + 1): voxels of each value in ref, in pred, and in both at once.
 * A value above n_labels raises ValueError. */
#define SCAN_LABELS(T)                                                                          \
    do {                                                                                        \
        const T *a = (const T *)ref.buf, *b = (const T *)pred.buf;                              \
        for (Py_ssize_t z = 0; z < nz && !bad; z++) {                                           \
            for (Py_ssize_t y = 0; y < ny && !bad; y++) {                                       \
                const Py_ssize_t row = (z * ny + y) * nx;                                       \
                for (Py_ssize_t x = 0; x < nx; x++) {                                           \
                    const unsigned va = a[row + x], vb = b[row + x];                            \
                    if (!(va | vb))                                                             \
                        continue;                                                               \
                    if (va > (unsigned)n_labels || vb > (unsigned)n_labels) {                  \
                        bad = va > vb ? va : vb;                                                \
                        break;                                                                  \
                    }                                                                           \
                    if (va) {                                                                   \
                        update_box(br + 6 * (va - 1), z, y, x);                                 \
                        n_ref[va]++;                                                            \
                        n_tp[va] += va == vb;                                                   \
                    }                                                                           \
                    if (vb) {                                                                   \
                        update_box(bp + 6 * (vb - 1), z, y, x);                                 \
                        n_pred[vb]++;                                                           \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    } while (0)

static inline void update_box(int64_t *box, int64_t z, int64_t y, int64_t x)
{
    if (box[0] < 0) {
        box[0] = z, box[1] = z + 1, box[2] = y, box[3] = y + 1, box[4] = x, box[5] = x + 1;
        return;
    }
    /* voxels come in raster order: z only grows */
    box[1] = z + 1;
    if (y < box[2]) box[2] = y;
    if (y >= box[3]) box[3] = y + 1;
    if (x < box[4]) box[4] = x;
    if (x >= box[5]) box[5] = x + 1;
}

static PyObject *label_boxes(PyObject *self, PyObject *args)
{
    Py_buffer ref, pred, boxes_ref, boxes_pred, counts;
    Py_ssize_t itemsize, nz, ny, nx, n_labels;
    if (!PyArg_ParseTuple(args, "y*y*nnnnnw*w*w*", &ref, &pred, &itemsize, &nz, &ny, &nx, &n_labels,
                          &boxes_ref, &boxes_pred, &counts))
        return NULL;
    PyObject *result = NULL;
    if ((itemsize != 1 && itemsize != 2) || nz < 0 || ny < 0 || nx < 0 || n_labels < 1
        || n_labels > (itemsize == 1 ? 255 : 65535)) {
        PyErr_SetString(PyExc_ValueError, "label_boxes: uint8 or uint16 volumes, 1 to 65535 labels");
        goto done;
    }
    if (check_len(&ref, nz * ny * nx, itemsize, "reference") < 0
        || check_len(&pred, nz * ny * nx, itemsize, "prediction") < 0
        || check_len(&boxes_ref, n_labels * 6, sizeof(int64_t), "reference boxes") < 0
        || check_len(&boxes_pred, n_labels * 6, sizeof(int64_t), "prediction boxes") < 0
        || check_len(&counts, 3 * (n_labels + 1), sizeof(int64_t), "counts") < 0)
        goto done;
    int64_t *br = (int64_t *)boxes_ref.buf, *bp = (int64_t *)boxes_pred.buf;
    int64_t *n_ref = (int64_t *)counts.buf, *n_pred = n_ref + n_labels + 1, *n_tp = n_pred + n_labels + 1;
    for (Py_ssize_t k = 0; k < n_labels * 6; k++)
        br[k] = bp[k] = -1;
    for (Py_ssize_t k = 0; k < 3 * (n_labels + 1); k++)
        n_ref[k] = 0;
    unsigned bad = 0;
    Py_BEGIN_ALLOW_THREADS
    if (itemsize == 1)
        SCAN_LABELS(uint8_t);
    else
        SCAN_LABELS(uint16_t);
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_Format(PyExc_ValueError, "label_boxes: value %u is above the %zd labels", bad, n_labels);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&ref);
    PyBuffer_Release(&pred);
    PyBuffer_Release(&boxes_ref);
    PyBuffer_Release(&boxes_pred);
    PyBuffer_Release(&counts);
    return result;
}

static PyMethodDef methods[] = {
    {"label_boxes", label_boxes, METH_VARARGS, "Bounding boxes and voxel counts of every label value."},
    {"corner_codes", corner_codes, METH_VARARGS, "Neighbourhood codes of a padded crop's corner grid."},
    {"border_index", border_index, METH_VARARGS, "Flat indices of the surface corners of a code map."},
    {"nearest_rank", nearest_rank, METH_VARARGS, "First offset at which each query meets the target surface."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "oarbench.metrics._ckernels",
    "Compiled kernels of the surface-distance core (see _surface.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__ckernels(void)
{
    return PyModule_Create(&module);
}
