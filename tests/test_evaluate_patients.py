"""Patients in the results table (from the centre's metadata) and bootstrap intervals in summary.csv."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from oarbench.cli import main
from oarbench.stats import BootstrapOptions, cluster_bootstrap_ci
from tests.test_evaluate import _case, _write


def _study(tmp_path, rng, metadata: str | None):
    for i in range(6):
        ref, pred = _case(rng, i % 3)
        _write(tmp_path / "ref" / f"case{i:02d}.nii.gz", ref)
        _write(tmp_path / "pred" / f"case{i:02d}.nii.gz", pred)
    (tmp_path / "labels.toml").write_text("[labels]\nLiver = 1\nKidney_L = 2\nKidney_R = 3\n")
    meta_line = ""
    if metadata is not None:
        (tmp_path / "meta.csv").write_text(metadata)
        meta_line = 'metadata = "meta.csv"\n'
    study = tmp_path / "study.toml"
    study.write_text(f'[study]\nname = "s"\nlabels = "labels.toml"\n\n[[centres]]\nname = "A"\nreference = "ref"\n'
                     f'{meta_line}\n[[models]]\nname = "m"\npredictions = "pred"\n')
    return study


def test_patient_column_from_metadata_and_summary_intervals(tmp_path, rng):
    # cases 0-1 are scans of patient P1, 2-3 of P2; 4 and 5 have no patient given (own patient)
    meta = "case,patient,age\ncase00,P1,5\ncase01,P1,6\ncase02,P2,7\ncase03,P2,7\ncase04,,3\n"
    study = _study(tmp_path, rng, meta)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["evaluate", str(study), "--out", str(out)])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out / "metrics.csv", dtype={"patient": str})
    by_case = table.drop_duplicates("case").set_index("case")["patient"]
    assert by_case.to_dict() == {"case00": "P1", "case01": "P1", "case02": "P2", "case03": "P2",
                                 "case04": "case04", "case05": "case05"}
    summary = pd.read_csv(out / "summary.csv").set_index("structure")
    assert (summary["n_patients"] == 4).all() and (summary["n"] == 6).all()
    liver = table[table.structure == "Liver"]
    lo, hi = cluster_bootstrap_ci(liver["dsc"].to_numpy(), liver["patient"].to_numpy(), "median", BootstrapOptions())
    assert summary.loc["Liver", "dsc_median_ci_low"] == pytest.approx(lo, rel=1e-5)
    assert summary.loc["Liver", "dsc_median_ci_high"] == pytest.approx(hi, rel=1e-5)
    for col in ("hd95_mean_ci_low", "hd95_mean_ci_high", "msd_median_ci_low"):
        assert col in summary.columns
    assert summary.loc["Liver", "dsc_median_ci_low"] <= summary.loc["Liver", "dsc_median"] <= summary.loc["Liver", "dsc_median_ci_high"]


def test_without_patient_column_every_case_is_a_patient(tmp_path, rng):
    study = _study(tmp_path, rng, "case,age\ncase00,5\n")
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["evaluate", str(study), "--out", str(out)]).exit_code == 0
    table = pd.read_csv(out / "metrics.csv")
    assert (table["patient"] == table["case"]).all()


def test_case_with_two_patients_is_an_error(tmp_path, rng):
    study = _study(tmp_path, rng, "case,patient\ncase00,P1\ncase00,P2\n")
    res = CliRunner().invoke(main, ["evaluate", str(study), "--out", str(tmp_path / "out")])
    assert res.exit_code != 0 and "meta.csv" in res.output and "two patients" in res.output
    assert "Traceback" not in res.output


def test_cluster_bootstrap_needs_three_patients():
    assert np.isnan(cluster_bootstrap_ci([1.0, 2.0, 3.0], ["a", "a", "b"], "mean")[0])
