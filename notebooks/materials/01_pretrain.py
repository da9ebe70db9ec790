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
# # Materials 1: learn chemistry from 100,000 computed compositions
#
# The large computed set is the Materials Project's DFT band gaps (Matbench `mp_gap`, bundled:
# 106,113 rows). Every composition becomes a set of (element, atomic fraction) tokens on the
# shared backbone. Pretraining has two stages: **masked elements** (hide some elements, keep
# their amounts, predict which element sat there) and **supervised DFT gaps** with the masked
# loss kept on. Every composition of the experimental set that we fine-tune on later is removed
# first, so no test composition is ever seen here.

# %% tags=["parameters"]
data_path = "mp_gap"  # bundled set name or a CSV with 'formula' and a value column
data = ""  # old spelling of data_path (kept so that `-p data ...` still works)
target = ""  # value column of a CSV (empty: 'target')
exclude = "expt_gap"  # compositions to leave out (the fine-tuning set)
max_rows = 0  # use a random subset of this many rows (0: all)
config = "tiny"  # model size
steps = 3000  # masked-element steps (the recipe of the shipped materials.tiny; about 4 min on 2 cores)
supervised_steps = 3000  # DFT-gap steps (0: skip the stage; about 6 min on 2 cores)
seed = 0
out_dir = "runs/materials_pretrain"

# %%
import json
from pathlib import Path

import pandas as pd

from hfmi_kit.domains.materials import load_property_csv, pretrain
from hfmi_kit.domains.materials.plots import element_map
from hfmi_kit.domains.materials.tasks import guess_masked_element
from hfmi_kit.train import load_pretrained
from hfmi_kit.viz.core import loss_curve

out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
data_path = data or data_path
table = load_property_csv(data_path, target=target or None, duplicates="keep")
frame = table.to_frame()
if max_rows and max_rows < len(frame):
    frame = frame.sample(max_rows, random_state=seed)
    data_path = str(out / "pretrain_subset.csv")
    frame.rename(columns={"value_eV": "target"})[["formula", "target"]].to_csv(data_path, index=False)
    target = ""
print(f"{len(frame)} rows, {frame['reduced_formula'].nunique()} distinct compositions; rejected rows: "
      f"{len(table.rejected)}")
frame.describe()

# %% [markdown]
# How many elements a composition has, and which elements are most common:

# %%
n_el = pd.Series([len(p.elements) for p in table.parsed]).value_counts().sort_index()
common = pd.Series([e for p in table.parsed for e in p.elements]).value_counts().head(15)
pd.DataFrame({"compositions with n elements": n_el}).T, pd.DataFrame({"most common elements": common}).T

# %%
ckpt = pretrain(data=data_path, out=out, target=target or None, exclude=exclude or None, config=config, steps=steps,
                supervised_steps=supervised_steps, seed=seed)
metrics = json.loads((out / "metrics.json").read_text())
metrics

# %%
loss_curve(out / "stage1_mlm" / "metrics.jsonl", keys=("loss", "mlm_accuracy"))

# %% [markdown]
# What did it learn? Hide one element and ask for it back; then look at the element embeddings:
# elements of one periodic-table group should sit together although the model was never told
# the periodic table.

# %%
net = load_pretrained(ckpt)
for formula, hide in [("CsPbI3", "Pb"), ("CsPbI3", "I"), ("Cu2ZnSnS4", "Zn"), ("GaAs", "Ga"), ("Fe2O3", "O")]:
    guesses = ", ".join(f"{s} {p:.2f}" for s, p in guess_masked_element(net, formula, hide))
    print(f"{formula:10s} hide {hide:2s} -> {guesses}")

# %%
element_map(net)
