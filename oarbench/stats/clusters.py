"""The unit of analysis: scans clustered by patient.

A study may hold several CTs of one patient (follow-up scans, re-plans). Rank tests assume
independent units, so by default a patient's scans are averaged (mean per patient and
structure, after failures took their worst value) and the patient is the unit; testing per
scan is offered, with a warning when a patient has more than one scan. The patient of each
scan comes from the results table's ``patient`` column (filled from the centre's metadata
by ``oarbench evaluate``); without it every case is its own patient.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["UNITS", "ClusteringWarning", "patients_of", "aggregate_by_patient", "patient_differences",
           "warn_if_clustered"]

#: ``patient``: one value per patient (mean of its scans); ``scan``: every scan is a unit.
UNITS: tuple[str, ...] = ("patient", "scan")


class ClusteringWarning(UserWarning):
    """Scans of one patient were treated as independent units."""


def patients_of(table: pd.DataFrame, source: str = "results table") -> pd.Series:
    """The patient of each row: the ``patient`` column where given and not empty, else the case.

    Raises ``ValueError`` when one case (of one study and centre) is assigned to two patients.
    """
    case = table["case"].fillna("").astype(str).str.strip()
    if "patient" not in table.columns:
        return case.rename("patient")
    patient = table["patient"].astype("string").fillna("").str.strip()
    patient = patient.where(patient != "", case).astype(str)
    keys = [c for c in ("study", "centre") if c in table.columns]
    check = pd.DataFrame({**{k: table[k].astype(str) for k in keys}, "case": case, "patient": patient})
    n = check.groupby([*keys, "case"], sort=False)["patient"].nunique()
    if (n > 1).any():
        bad = n[n > 1].index[0]
        raise ValueError(f"{source}: case {bad[-1]!r} is assigned to more than one patient")
    return patient.rename("patient")


def aggregate_by_patient(values: Sequence[float] | np.ndarray,
                         patients: Sequence[object] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each patient's values, patients in order of first appearance.

    ``inf`` (a failed distance) in any scan makes the patient's mean ``inf``: a failure is not
    averaged away. Returns ``(means, patient ids)``.
    """
    v = np.asarray(values, dtype=float).ravel()
    p = np.asarray(patients, dtype=object).ravel()
    if v.size != p.size:
        raise ValueError(f"values and patients differ in length: {v.size} and {p.size}")
    ids = list(dict.fromkeys(p.tolist()))
    index = {k: i for i, k in enumerate(ids)}
    inv = np.fromiter((index[x] for x in p.tolist()), dtype=np.int64, count=p.size)
    counts = np.bincount(inv, minlength=len(ids)).astype(float)
    finite = np.where(np.isinf(v), 0.0, v)
    means = np.bincount(inv, weights=finite, minlength=len(ids)) / np.where(counts > 0, counts, 1.0)
    pos = np.bincount(inv, weights=(v == np.inf).astype(float), minlength=len(ids)) > 0
    neg = np.bincount(inv, weights=(v == -np.inf).astype(float), minlength=len(ids)) > 0
    means = np.where(pos, np.inf, means)
    means = np.where(neg, -np.inf, means)
    means = np.where(pos & neg, np.nan, means)
    return means, np.asarray(ids, dtype=object)


def patient_differences(differences: Sequence[float] | np.ndarray,
                        patients: Sequence[object] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-patient paired difference: the mean of the patient's per-scan differences ``a - b``.

    For finite values this is the difference of the patients' means. With failures it keeps the
    information of the patient's other scans: a scan both models failed is a tie (``inf - inf``
    = 0, :func:`~oarbench.stats.ranktests.paired_differences`) averaged in, as a DSC of 0 in
    both arms is, instead of making both patient means ``inf`` and the patient difference 0.
    A scan where one model failed (``+-inf``) makes the patient's difference infinite; failures
    on both sides in different scans (``+inf`` and ``-inf``) are a tie (0).
    Returns ``(differences, patient ids)``, patients in order of first appearance.
    """
    d, ids = aggregate_by_patient(differences, patients)
    d = np.where(np.isnan(d), 0.0, d)
    return d, ids


def warn_if_clustered(table: pd.DataFrame, unit: str, source: str = "results table") -> int:
    """Warn (:class:`ClusteringWarning`) when testing per scan while a patient has several scans.

    Returns the number of patients with more than one scan.
    """
    keys = [c for c in ("study", "centre") if c in table.columns]
    if table.empty:
        return 0
    n = table.groupby([*keys, "patient"], sort=False)["case"].nunique()
    multi = int((n > 1).sum())
    if unit == "scan" and multi:
        warnings.warn(
            f"{source}: {multi} patient(s) have more than one scan; testing per scan treats them as "
            "independent, which overstates the evidence (the default unit is the patient)",
            ClusteringWarning, stacklevel=3,
        )
    return multi
