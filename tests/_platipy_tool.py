"""Run by the Python of the separate platipy environment (platipy 0.7.2 pins pydicom 2), never
imported by the test suite: write an RTSTRUCT from masks with platipy, or read one with platipy.

    python _platipy_tool.py write CT_DIR MASKS.npz OUT.dcm   # masks: name -> bool array (z, y, x)
    python _platipy_tool.py read CT_DIR RTSTRUCT.dcm OUT.npz
"""

import sys

import numpy as np
import SimpleITK as sitk
from platipy.dicom.io.nifti_to_rtstruct import convert_nifti
from platipy.dicom.io.rtstruct_to_nifti import (read_dicom_image, read_dicom_struct_file,
                                                transform_point_set_from_dicom_struct)


def main(argv):
    mode, ct_dir, src, dst = argv
    image = read_dicom_image(ct_dir)
    if mode == "write":
        masks = {}
        with np.load(src) as data:
            for name in data.files:
                img = sitk.GetImageFromArray(data[name].astype(np.uint8))
                img.CopyInformation(image)
                masks[name] = img
        convert_nifti(ct_dir, masks, dst)
    elif mode == "read":
        structs, names = transform_point_set_from_dicom_struct(image, read_dicom_struct_file(src))
        np.savez_compressed(dst, **{n: sitk.GetArrayFromImage(s).astype(bool) for n, s in zip(names, structs)})
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
