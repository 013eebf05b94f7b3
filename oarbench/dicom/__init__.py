"""DICOM RT in and out (docs/dicom.md).

* :mod:`oarbench.dicom.discover`: walk a folder tree, group images by series, pair RTSTRUCTs;
* :mod:`oarbench.dicom.ct`: a CT series -> HU volume with the exact header geometry;
* :mod:`oarbench.dicom.rtstruct`: contours <-> label maps (inclusion, holes, planes);
* :mod:`oarbench.dicom.names`: ROI names -> TG-263 names (aliases, Dutch and German spellings);
* :mod:`oarbench.dicom.importer`: the whole import into an nnU-Net v2 raw dataset;
* :mod:`oarbench.dicom.export`: label maps -> RTSTRUCT (pydicom) and DICOM-SEG (highdicom);
* :mod:`oarbench.dicom.phantoms`: the synthetic study written as DICOM.

pydicom, highdicom and scikit-image are the optional ``dicom`` extra
(``pip install 'oarbench[dicom]'``); they are imported when first needed.
"""

from oarbench.dicom.export import build_rtstruct, build_seg, export_predictions, write_ct_series
from oarbench.dicom.importer import ImportOptions, ImportResult, import_dicom
from oarbench.dicom.names import NameResolver, clinical_name, load_aliases

__all__ = [
    "ImportOptions",
    "ImportResult",
    "NameResolver",
    "build_rtstruct",
    "build_seg",
    "clinical_name",
    "export_predictions",
    "import_dicom",
    "load_aliases",
    "write_ct_series",
]
