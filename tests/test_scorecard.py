"""The label-efficiency scorecard: the small budget end to end for every domain (real runs), the
summary's verdicts, bad arguments."""

from __future__ import annotations

import csv
import math

import pytest

from hfmi_kit.errors import ConfigError
from hfmi_kit.scorecard import COLUMNS, run_scorecard, summarise

CLASSICAL = {"climate": "damped_persistence", "radiology": "unet_same_cases", "carbon": "rf", "materials": "rf"}


def _rows(pre: list[float], scr: list[float]) -> list[dict]:
    return [{"domain": "carbon", "task": "biomass", "label_budget": 20, "method": m, "seed": i, "metric": "rmse_mg_ha",
             "value": v} for m, vs in (("pretrained", pre), ("scratch", scr)) for i, v in enumerate(vs)]


def test_summary_verdicts_use_the_spread():
    assert "better (+20)" in summarise(_rows([50, 51, 49], [70, 71, 69]))  # lower RMSE is better
    assert "worse" in summarise(_rows([70, 71, 69], [50, 51, 49]))
    assert "within spread" in summarise(_rows([50, 60, 40], [55, 65, 45]))
    assert "50 ± 1 (3)" in summarise(_rows([50, 51, 49], [70, 71, 69]))


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="--budget"):
        run_scorecard(tmp_path, budget="huge")
    with pytest.raises(ConfigError, match="at least 3 seeds"):
        run_scorecard(tmp_path, seeds=(0, 1))
    with pytest.raises(ConfigError, match="unknown domains"):
        run_scorecard(tmp_path, domains=["astronomy"])


def test_small_scorecard_of_every_domain(small_scorecard):
    tmp_path = small_scorecard  # hfmi scorecard --budget small --out DIR (conftest)
    rows = list(csv.DictReader(open(tmp_path / "scorecard.csv", encoding="utf-8")))
    assert rows and tuple(rows[0]) == COLUMNS
    for domain, classical in CLASSICAL.items():
        dr = [r for r in rows if r["domain"] == domain]
        budgets = {r["label_budget"] for r in dr}
        assert len(budgets) >= 2, domain
        for b in budgets:
            for method in ("pretrained", "scratch", classical):
                seeds = {r["seed"] for r in dr if r["label_budget"] == b and r["method"] == method}
                assert seeds == {"0", "1", "2"}, (domain, b, method, seeds)
        assert all(math.isfinite(float(r["value"])) for r in dr)
        assert len({r["metric"] for r in dr}) == 1
    # different seeds are different runs, not copies
    pre = [float(r["value"]) for r in rows if r["domain"] == "materials" and r["method"] == "pretrained"]
    assert len(set(pre)) > 1
    md = (tmp_path / "scorecard.md").read_text()
    for domain in CLASSICAL:
        assert f"## {domain}" in md
    assert (tmp_path / "label_efficiency.html").stat().st_size > 100_000  # standalone: Bokeh inlined
    assert (tmp_path / "runs" / "radiology" / "pretrained_n1_s2" / "model" / "config.json").is_file()
    assert "Budget `small`" in md and "unet_all_cases" in md
    # the all-case U-Net does not depend on the budget: trained once per seed, its rows repeated
    runs = tmp_path / "runs" / "radiology"
    assert (runs / "pretrained_n1_s0" / "train_unet").is_dir()
    assert not (runs / "pretrained_n3_s0" / "train_unet").exists()
    assert (runs / "pretrained_n3_s0" / "train_unet_same").is_dir()  # the same-budget U-Net: at every budget
    unet = {(r["label_budget"], r["seed"]): r["value"] for r in rows if r["method"] == "unet_all_cases"}
    assert {unet[("1", s)] for s in "012"} == {unet[("3", s)] for s in "012"}
