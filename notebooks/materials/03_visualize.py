# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Materials 3: candidates and the discovery loop
#
# New compositions come from element substitution in known absorbers (ABX3 halide and
# chalcogenide perovskites, double perovskites, chalcopyrites, kesterites, II-VI/III-V and
# sesquichalcogenides), kept only when pymatgen finds a charge-balanced set of oxidation states.
# The fine-tuned ensemble predicts each gap with an uncertainty; they are ranked by the expected
# Shockley–Queisser efficiency under that uncertainty. Then a simulated lab: how many
# measurements until absorbers with gaps of 1.1–1.6 eV are found, choosing with the model
# against choosing at random.

# %% tags=["parameters"]
finetuned = "runs/materials_finetune/nall/model"  # fine-tuned ensemble from 02_finetune
pretrained = "materials.tiny"  # its pretrained backbone (features for the loop): shipped, or from 01_pretrain
measured = "expt_gap"  # the measured set (bundled name or CSV)
kappa = 0.0  # rank by expected SQ + kappa * its std (> 0 favours uncertain candidates)
al_budget = 300  # measurements in the simulated loop
al_repeats = 5
seed = 0
out_dir = "runs/materials_visualize"

# %%
from pathlib import Path

from hfmi_kit.domains.materials import load_property_csv
from hfmi_kit.domains.materials.discover import (
    active_learning,
    discovery_features,
    generate_candidates,
    rank_candidates,
)
from hfmi_kit.domains.materials.plots import active_learning_curve, sq_curve

out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
table = load_property_csv(measured)
cands = generate_candidates()
print(f"{len(cands)} substituted compositions, {int(cands['charge_balanced'].sum())} charge balanced, "
      f"{int((~cands['charge_balanced']).sum())} rejected")
ranked = rank_candidates(finetuned, cands, measured=table, kappa=kappa, seed=seed)
ranked.to_csv(out / "candidates.csv", index=False)
ranked.to_parquet(out / "candidates.parquet", index=False)
cols = ["formula", "family", "prediction_ev", "uncertainty_ev", "expected_sq_pct", "p_target_window", "known",
        "measured_ev"]
ranked[cols].head(15).round(3)

# %%
sq_curve(ranked)

# %% [markdown]
# Known absorbers among the candidates: how close is the prediction to the measurement?

# %%
ranked.loc[ranked["known"], cols].round(3).head(15)

# %% [markdown]
# Literature and lab records come in as (formula, property, value, unit, source): units are
# converted (meV, an absorption edge in nm, kJ/mol ... to eV), agreeing duplicates merge with
# both sources kept, conflicting ones and unit-less values are rejected and counted. The merged
# table goes straight into the model (`in_training`: the fine-tuned model saw that composition).

# %%
import pandas as pd

from hfmi_kit.domains.materials import ingest_records, predict_table
from hfmi_kit.train import read_config

records = pd.DataFrame([
    ("Si", "band gap", 1.12, "eV", "Sze & Ng, Physics of Semiconductor Devices (2007)"),
    ("GaAs", "band gap", 1424, "meV", "Sze & Ng (2007)"),
    ("GaAs", "band_gap", 1.43, "eV", "lab notebook 12"),
    ("CdTe", "band_gap", 827, "nm", "absorption edge, lab notebook 7"),
    ("CuInSe2", "band_gap", 1.04, "eV", "Rockett & Birkmire, J. Appl. Phys. 70, R81 (1991)"),
    ("CsPbI3", "band_gap", 1.73, "eV", "Eperon et al., J. Mater. Chem. A 3, 19688 (2015)"),
    ("Cu2ZnSnS4", "band_gap", 1.5, "eV", "Ito & Nakazawa, Jpn. J. Appl. Phys. 27, 2094 (1988)"),
    ("Cu2ZnSnS4", "band_gap", 1.0, "eV", "an outlier from another lab"),
    ("Sb2Se3", "band_gap", 1.17, "", "a record without its unit"),
], columns=["formula", "property", "value", "unit", "source"])
lit = ingest_records(records)
print("rejected:", [(r["formula"], r["reason"]) for r in lit.rejected])
seen = set(read_config(finetuned)["training"]["formulas"])
pred = predict_table(finetuned, lit)
pred.insert(2, "literature_ev", lit.y)
pred["in_training"] = pred["reduced_formula"].isin(seen)
pred[["formula", "literature_ev", "prediction_ev", "uncertainty_ev", "sq_limit_pct", "source", "in_training"]].round(3)

# %% [markdown]
# The simulated discovery loop on the measured set. The model's features are the pretrained
# foundation model's embedding and its DFT-gap prediction (it never saw these measurements);
# a random forest on those features picks the next 5 compositions most likely to lie in
# 1.1–1.6 eV. Magpie features and random choice start from the same 10 measurements.

# %%
features = discovery_features(pretrained, table)
al = active_learning(features, table.y, budget=al_budget, repeats=al_repeats, seed=seed)
al.save(out / "active_learning.json")  # the dashboard reads it with candidates.csv
for k in (10, 25):
    print(f"measurements to find {k} absorbers:", {s: round(v) for s, v in al.measurements_to(k).items()})
active_learning_curve(al)
