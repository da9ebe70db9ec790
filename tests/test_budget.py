"""The label budget every domain, the CLI and the scorecard share: one seeded picker whose
budgets nest, with the sizes and messages each domain had."""

from __future__ import annotations

import numpy as np
import pytest

from hfmi_kit.errors import ConfigError
from hfmi_kit.train.budget import LabelBudget


def test_budgets_nest_and_round_as_each_domain_did():
    pool = [f"P{i:04d}" for i in range(57)]
    for seed in range(5):
        small = LabelBudget(count=10).pick(pool, seed)
        large = LabelBudget(count=40).pick(pool, seed)
        assert len(small) == 10 and set(small) <= set(large) and small == sorted(small)
        frac = LabelBudget(fraction=0.25).pick(pool, seed)
        assert set(frac) <= set(large) and len(frac) == round(0.25 * 57)
    assert LabelBudget().pick(pool, 3) == pool and LabelBudget.from_options(None, 1.0).whole_pool
    assert LabelBudget(fraction=0.01, minimum=2).size(57) == 2  # never below the task's minimum
    assert LabelBudget(fraction=0.25).size(12.6) == 3  # a fold's average training rows


def test_the_picks_equal_those_the_domains_made_before():
    # radiology's choose_cases, carbon's and materials' prefix of one permutation: the same
    # labelled cases for every seed and budget, so their figures do not move
    for n in (5, 12, 60):
        pool = np.arange(100, 100 + n)
        for k in range(1, n + 1, 3):
            for seed in range(4):
                old_rad = [pool[i] for i in sorted(np.random.default_rng(seed).permutation(len(pool))[:k])]
                old_carbon = sorted(np.random.default_rng(seed).permutation(pool)[:k].tolist())
                new = LabelBudget(count=k).pick(pool, seed)
                assert new == old_rad == old_carbon


@pytest.mark.parametrize("kw, needle", [({"count": 0, "minimum": 2}, "--labels must be an integer >= 2"),
                                        ({"count": True}, "--labels"), ({"fraction": 0.0}, "--label-fraction"),
                                        ({"fraction": 1.5}, "--label-fraction"),
                                        ({"fraction": float("nan")}, "--label-fraction")])
def test_bad_budgets_name_the_flag(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        LabelBudget(**kw)


def test_a_count_larger_than_the_pool_says_what_the_pool_is():
    with pytest.raises(ConfigError, match=r"--labels must lie in \[2, 6\] \(field plots\), got 9"):
        LabelBudget(count=9, minimum=2, pool="field plots").pick(list(range(6)), 0)
    assert LabelBudget(count=9, pool="field plots").describe() == "9 field plots"


def test_a_budget_is_the_options_a_task_takes_and_one_number_for_the_curve():
    assert [b.options() for b in LabelBudget.counts([10, 30])] == [{"labels": 10}, {"labels": 30}]
    assert LabelBudget.fractions([0.25])[0].options() == {"label_fraction": 0.25}
    assert LabelBudget().options() == {} and LabelBudget().value == 1.0
    assert [b.value for b in LabelBudget.counts([10, 30])] == [10.0, 30.0]
    with pytest.raises(ConfigError, match="--labels"):
        LabelBudget.counts([0])
