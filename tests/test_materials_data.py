"""Materials: formula parsing and bad input, property tables, literature ingestion, the SQ limit,
the CEC module context, candidate generation and the active-learning simulation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pymatgen")
pytest.importorskip("pvlib")

from hfmi_kit.domains.materials import chem, tables
from hfmi_kit.domains.materials.discover import active_learning, generate_candidates
from hfmi_kit.domains.materials.pv import module_technologies, sq_limit
from hfmi_kit.errors import DataError


def test_parse_formula_fractions_and_reduced_formula():
    p = chem.parse_formula(" CsPb(I0.5Br0.5)3 ")
    assert p.elements == ("Br", "I", "Cs", "Pb")  # Z order
    assert np.isclose(sum(p.fractions), 1.0)
    assert np.isclose(p.fractions[p.elements.index("I")], 1.5 / 5)
    assert chem.parse_formula("Fe4O6").reduced == chem.parse_formula("Fe2O3").reduced == "Fe2O3"
    enc = chem.encode([chem.parse_formula("CdTe"), chem.parse_formula("Cu2ZnSnS4")])
    assert enc["elements"].shape == (2, 4) and enc["padding"][0].tolist() == [False, False, True, True]


@pytest.mark.parametrize(("formula", "needle"), [
    ("Xx2O", "unknown element"), ("MAPbI3", "unknown element"), ("Fe-1O", "negative"), ("Fe0O2", "zero amount"),
    ("", "empty"), ("H2O(s)", "cannot be parsed"), (None, "empty"), ("Og2", "unknown element"),
])
def test_parse_formula_rejects_bad_input_with_reason(formula, needle):
    with pytest.raises(DataError, match=needle):
        chem.parse_formula(formula)


def test_magpie_features_are_weighted_statistics():
    names = chem.magpie_feature_names()
    X = chem.magpie_features([chem.parse_formula("NaCl"), chem.parse_formula("Na")])
    assert X.shape == (2, len(names)) and np.isfinite(X).all()
    z_mean = names.index("mean_Number")
    z_range = names.index("range_Number")
    assert X[0, z_mean] == pytest.approx((11 + 17) / 2) and X[0, z_range] == pytest.approx(6)
    assert X[1, z_range] == 0


def test_bundled_sets_load_without_rejections():
    t = tables.load_property_csv("expt_gap", strict=True)
    assert len(t) == 4604 and t.unit == "eV" and len(t.sha256) == 64
    assert 0.9 < t.y.mean() < 1.1 and (t.y == 0).mean() > 0.5  # metals are half of it


def test_csv_bad_rows_are_counted_not_dropped(tmp_path):
    f = tmp_path / "gaps.csv"
    pd.DataFrame({"formula": ["GaAs", "Xx2O", "CdTe", "ZnO", "ZnO", "Si", "CsPbI3", "SiO2"],
                  "gap": ["1.42", "2.0", "abc", "3.3", "3.4", "nan", "-1", "9.0"]}).to_csv(f, index=False)
    t = tables.load_property_csv(f, target="gap")
    assert t.formula == ["GaAs", "ZnO", "SiO2"]  # ZnO: duplicates within 0.1 eV merge
    assert t.value[1] == pytest.approx(3.35)
    reasons = " | ".join(r["reason"] for r in t.rejected)
    assert len(t.rejected) == 4
    for needle in ("unknown element", "not a number", "is below 0", "not a finite number"):
        assert needle in reasons
    assert {r["row"] for r in t.rejected} == {3, 4, 7, 8}
    with pytest.raises(DataError, match="4 row"):
        tables.load_property_csv(f, target="gap", strict=True)
    with pytest.raises(DataError, match="missing column"):
        tables.load_property_csv(f)  # no 'target' column
    pd.DataFrame({"formula": ["ZnO", "ZnO"], "target": [3.3, 2.0]}).to_csv(f, index=False)
    with pytest.raises(DataError, match="no usable rows"):
        tables.load_property_csv(f)  # both conflicting rows rejected, nothing left


def test_ingest_records_converts_units_and_keeps_provenance(tmp_path):
    lit = pd.DataFrame({
        "formula": ["GaAs", "GaAs", "CdTe", "Si", "ZnO", "InP", "Ge", "GaN", "GaN"],
        "property": ["band gap", "band_gap", "band_gap", "band_gap", "efficiency", "band_gap", "band_gap",
                     "band_gap", "band_gap"],
        "value": ["1.42", "1430", "867", "1.12", "20", "1.34", "0.66", "3.4", "2.1"],
        "unit": ["eV", "meV", "nm", "", "%", "kJ/mol", "eV", "eV", "eV"],
        "source": ["paper A", "lab B", "paper C", "paper D", "paper E", "paper F", "", "paper G", "paper H"],
    })
    t = tables.ingest_records(lit)
    got = dict(zip(t.formula, t.value))
    assert got["GaAs"] == pytest.approx(1.425) and t.source[t.formula.index("GaAs")] == "paper A; lab B"
    assert got["CdTe"] == pytest.approx(1239.84 / 867, rel=1e-4)
    reasons = {r["formula"]: r["reason"] for r in t.rejected}
    assert "no unit" in reasons["Si"] and "not 'band_gap'" in reasons["ZnO"]
    assert "provenance" in reasons["Ge"] and "conflicting" in reasons["GaN"]
    assert "kJ/mol" not in reasons.get("InP", "") and got["InP"] == pytest.approx(1.34 / 96.485, rel=1e-3)
    with pytest.raises(DataError, match="missing column"):
        tables.ingest_records(lit.drop(columns="unit"))


def test_sq_limit_matches_the_detailed_balance_literature():
    g = np.linspace(0.5, 3.0, 251)
    eff = sq_limit(g)
    assert 0.333 < eff.max() < 0.340  # 33.7 % (Rühle 2016, AM1.5G)
    assert 1.30 <= g[eff.argmax()] <= 1.40
    assert sq_limit([0.0])[0] == 0 and sq_limit([5.0])[0] == 0
    assert sq_limit([1.1])[0] > sq_limit([2.0])[0] > 0.2
    with pytest.raises(DataError, match="NaN"):
        sq_limit([np.nan])


def test_cec_module_context():
    tech = module_technologies()
    assert {"Mono-c-Si", "CdTe", "CIGS"} <= set(tech.index)
    assert (tech["best_efficiency_pct"] < tech["sq_limit_pct"]).all()  # no module beats the SQ limit
    assert tech.loc["Mono-c-Si", "modules"] > 1000 and 15 < tech.loc["Mono-c-Si", "median_efficiency_pct"] < 25


def test_candidates_are_substitutions_checked_for_charge_balance():
    c = generate_candidates()
    assert {"CsPbI3", "CsSnBr3", "Cs2AgBiBr6", "CuInSe2", "BaZrS3"} <= set(c["formula"])
    assert c["reduced_formula"].is_unique
    assert c["charge_balanced"].sum() < len(c)  # some substitutions are rejected
    assert not chem.charge_balanced("CsPb2I3") and chem.charge_balanced("Cu2ZnSnS4")
    assert c.loc[c.formula == "CsPbI2Br", "charge_balanced"].item()


def test_active_learning_finds_absorbers_faster_than_random():
    t = tables.load_property_csv("expt_gap")
    X = chem.magpie_features(t.parsed)
    res = active_learning({"magpie": X}, t.y, budget=80, initial=10, batch=10, repeats=2, trees=50)
    assert res.hits["magpie"].shape == (2, 80)
    found = {k: v[:, -1].mean() for k, v in res.hits.items()}
    assert found["magpie"] > 1.5 * found["random"], found


def test_the_error_by_chemistry_plot_shows_every_baseline_of_the_table():
    """The random forest (often the strongest at few labels) is drawn beside the model."""
    pytest.importorskip("holoviews")
    import pandas as pd

    from hfmi_kit.domains.materials.plots import error_by_chemistry

    f = pd.DataFrame({"chemistry": ["oxide", "oxide", "halide"], "target_ev": [1.0, 2.0, 3.0],
                      "prediction_ev": [1.5, 2.0, 2.0], "prediction_rf_ev": [1.0, 2.5, 3.0],
                      "prediction_dummy_ev": [2.0, 2.0, 2.0], "uncertainty_ev": [0.1, 0.1, 0.1]})
    bars = error_by_chemistry(f)
    assert set(bars.dimension_values("method")) == {"model", "random forest (Magpie)", "mean predictor"}


def test_the_sq_plot_places_candidates_where_the_table_ranks_them():
    """Points at the expected SQ efficiency (the ranking's value, as in the table), not at the SQ
    value of the predicted gap; the gap's error bar stops at 0 eV."""
    pytest.importorskip("holoviews")
    import holoviews as hv
    import pandas as pd

    from hfmi_kit.domains.materials.plots import sq_curve

    c = pd.DataFrame({"formula": ["NaCl", "CdTe"], "prediction_ev": [0.2, 1.4], "uncertainty_ev": [0.5, 0.3],
                      "sq_limit_pct": [10.0, 33.0], "expected_sq_pct": [8.0, 31.0], "sq_std_pct": [3.0, 1.0]})
    plot = sq_curve(c)
    (pts,) = [e for e in plot if isinstance(e, hv.Scatter)]
    assert list(pts.dimension_values(1)) == [8.0, 31.0]
    gap_bars, sq_bars = [e for e in plot if isinstance(e, hv.ErrorBars)]
    assert list(gap_bars.dimension_values("gap_minus")) == [0.2, 0.3]  # 0.2 eV - 0.5 eV would be below 0
    assert list(gap_bars.dimension_values("gap_plus")) == [0.5, 0.3]
    assert list(sq_bars.dimension_values("sq_std")) == [3.0, 1.0]
