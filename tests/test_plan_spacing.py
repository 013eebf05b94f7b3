"""The federation's target spacing: the finest site's grid, or nnU-Net's median over all cases.

The oracle for "a site's own target" is nnU-Net's planner run on that site's
fingerprint alone (``pooled`` with one site): the ``finest`` policy must give the
same target for that site, and the element-wise minimum of such targets for several.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nnunetv2")

from oarbench.train.federated import SITE_CASES_KEY, merge_site_messages, nnunet_plans  # noqa: E402


def _body(spacings, shapes):
    fp = {"spacings": [list(map(float, s)) for s in spacings], "shapes_after_crop": [list(s) for s in shapes],
          "foreground_intensity_properties_per_channel": {"0": {
              "mean": 0.0, "median": 0.0, "std": 100.0, "min": -500.0, "max": 500.0,
              "percentile_00_5": -400.0, "percentile_99_5": 400.0}},
          "median_relative_size_after_cropping": 1.0, "oarbench_orientation": "LPS"}
    return {"fingerprint": fp, "num_cases": len(spacings),
            "dataset": {"labels": {"background": 0, "liver": 1}, "channel_names": {"0": "CT"},
                        "file_ending": ".nii.gz"}}


# centre A: 2.8 mm pixels, 4 mm slices; centre B: 4 mm pixels, 6 mm slices, the same body (the demo's two grids)
A = _body([(4.0, 2.8, 2.8)] * 2, [(40, 128, 128)] * 2)
B = _body([(6.0, 4.0, 4.0)] * 2, [(27, 80, 80)] * 2)


def _plans(bodies, spacing, configuration="2d"):
    merged, header = merge_site_messages(bodies)
    return nnunet_plans(merged, header, configuration=configuration, width="tiny", spacing=spacing)


def test_merge_records_whose_cases_in_order():
    merged, _ = merge_site_messages({"B": B, "A": A})
    assert merged[SITE_CASES_KEY] == [["A", 2], ["B", 2]]
    assert merged["spacings"][:2] == A["fingerprint"]["spacings"]


def test_finest_plans_at_the_finer_site_pooled_between():
    finest = _plans({"A": A, "B": B}, "finest")
    pooled = _plans({"A": A, "B": B}, "pooled")
    assert np.allclose(pooled["configurations"]["2d"]["spacing"], [3.4, 3.4])  # nnU-Net's median of 2.8 and 4
    assert np.allclose(finest["configurations"]["2d"]["spacing"], [2.8, 2.8])
    assert np.allclose(finest["configurations"]["3d_fullres"]["spacing"], [4.0, 2.8, 2.8])
    record = finest["oarbench_target_spacing"]
    assert record["policy"] == "finest" and np.allclose(record["target"], [4.0, 2.8, 2.8])
    assert np.allclose(record["sites"]["A"], [4.0, 2.8, 2.8]) and np.allclose(record["sites"]["B"], [6.0, 4.0, 4.0])
    assert "oarbench_target_spacing" not in pooled
    # the plans of the finer site alone: same spacing and patch as the federation's
    alone = _plans({"A": A}, "pooled")
    assert finest["configurations"]["2d"]["patch_size"] == alone["configurations"]["2d"]["patch_size"]


def test_finest_follows_nnunets_own_rule_per_site_anisotropic():
    # thick slices with few of them: nnU-Net takes the 10th percentile of the slice spacing, not the median
    thick = _body([(5.0, 0.8, 0.8), (5.0, 0.8, 0.8), (3.0, 0.8, 0.8), (5.0, 0.8, 0.8), (5.0, 0.8, 0.8)],
                  [(30, 400, 400)] * 5)
    fine = _body([(1.0, 1.5, 1.5)] * 3, [(200, 220, 220)] * 3)
    def target(plans):  # the fullres target spacing in the images' own axis order (plans list it transposed)
        return np.array(plans["configurations"]["3d_fullres"]["spacing"])[plans["transpose_backward"]]

    own = {s: target(_plans({s: b}, "pooled", "3d_fullres")) for s, b in (("T", thick), ("F", fine))}
    assert own["T"][0] < 5.0  # the anisotropy rule acted: not the median
    finest = _plans({"T": thick, "F": fine}, "finest", "3d_fullres")
    assert np.allclose(finest["oarbench_target_spacing"]["sites"]["T"], own["T"])
    assert np.allclose(finest["oarbench_target_spacing"]["sites"]["F"], own["F"])
    assert np.allclose(target(finest), np.minimum(own["T"], own["F"]))
    # a federation of one site plans exactly as that site alone
    one = _plans({"T": thick}, "finest", "3d_fullres")
    assert one["configurations"]["3d_fullres"] == _plans({"T": thick}, "pooled", "3d_fullres")["configurations"][
        "3d_fullres"]


def test_bad_policy_and_unattributed_cases_are_refused():
    merged, header = merge_site_messages({"A": A, "B": B})
    with pytest.raises(ValueError, match="plan spacing must be one of finest, pooled"):
        nnunet_plans(merged, header, configuration="2d", width="tiny", spacing="median")
    del merged[SITE_CASES_KEY]
    with pytest.raises(ValueError, match="does not say which cases are whose"):
        nnunet_plans(merged, header, configuration="2d", width="tiny", spacing="finest")
