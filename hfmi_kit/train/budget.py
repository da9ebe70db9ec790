"""The label budget of a fine-tuning run, shared by every domain, the CLI and the scorecard.

A budget is a count (``--labels 40``) or a fraction (``--label-fraction 0.25``) of a named pool
(the labelled training cases, plots, rows or years a domain offers; its test set is never in
it). :meth:`LabelBudget.pick` draws one seeded permutation of the pool and takes its prefix, so
budgets nest: with the same seed, the 10 labels of a small budget are among the 40 of a larger
one, and a label-efficiency curve compares like with like.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hfmi_kit.errors import ConfigError


@dataclass(frozen=True)
class LabelBudget:
    """How many labels of a pool a run may use: ``count``, or ``fraction`` of the pool (rounded,
    at least ``minimum``), or the whole pool when both are None."""

    count: int | None = None  # labelled examples (--labels)
    fraction: float | None = None  # share of the pool (--label-fraction), in (0, 1]
    pool: str = "labelled examples"  # what the pool holds, for messages ("field plots", "training years")
    minimum: int = 1  # the fewest examples the task can train on

    def __post_init__(self) -> None:
        if self.count is not None and (isinstance(self.count, bool) or not isinstance(self.count, int)
                                       or self.count < self.minimum):
            raise ConfigError(f"--labels must be an integer >= {self.minimum} ({self.pool}), got {self.count!r}")
        if self.fraction is not None and not (isinstance(self.fraction, (int, float)) and not isinstance(
                self.fraction, bool) and math.isfinite(self.fraction) and 0 < self.fraction <= 1):
            raise ConfigError(f"--label-fraction must lie in (0, 1], got {self.fraction!r}")

    @classmethod
    def from_options(cls, labels: int | None = None, label_fraction: float | None = None, **kw: Any) -> LabelBudget:
        """The budget the ``labels`` / ``label_fraction`` options of a task ask for (``labels``
        wins; a fraction of 1 is the whole pool)."""
        if labels is not None:
            return cls(count=labels, **kw)
        if label_fraction is not None and label_fraction != 1:
            return cls(fraction=label_fraction, **kw)
        if label_fraction is not None:
            cls(fraction=label_fraction, **kw)  # checks it
        return cls(**kw)

    @classmethod
    def counts(cls, values: Sequence[int], **kw: Any) -> list[LabelBudget]:
        """Budgets of ``values`` labels each (a label-efficiency curve's x axis)."""
        return [cls(count=int(v), **kw) for v in values]

    @classmethod
    def fractions(cls, values: Sequence[float], **kw: Any) -> list[LabelBudget]:
        """Budgets of each fraction of ``values`` of the pool (1.0: the whole pool)."""
        return [cls(fraction=float(v), **kw) for v in values]

    def options(self) -> dict[str, Any]:
        """The task options that ask for this budget: ``{"labels": n}``, ``{"label_fraction": f}``
        or ``{}`` for the whole pool (what the CLI's ``--labels`` / ``--label-fraction`` set)."""
        if self.count is not None:
            return {"labels": self.count}
        if self.fraction is not None:
            return {"label_fraction": self.fraction}
        return {}

    @property
    def value(self) -> float:
        """The budget as one number: the count, or the fraction (1.0 for the whole pool)."""
        return float(self.count if self.count is not None else self.fraction if self.fraction is not None else 1.0)

    @property
    def whole_pool(self) -> bool:
        return self.count is None and self.fraction is None

    def size(self, pool_size: float) -> int:
        """How many of ``pool_size`` examples this budget takes (a pool size may be fractional when
        it is an average, e.g. the training rows of a cross-validation fold).

        Raises:
            ConfigError: a count larger than the pool, or a pool smaller than ``minimum``.
        """
        if pool_size < self.minimum:
            raise ConfigError(f"only {pool_size} {self.pool}; at least {self.minimum} are needed")
        if self.count is not None:
            if self.count > pool_size:
                raise ConfigError(f"--labels must lie in [{self.minimum}, {pool_size}] ({self.pool}), got {self.count}")
            return self.count
        if self.fraction is not None:
            return min(pool_size, max(self.minimum, int(round(self.fraction * pool_size))))
        return pool_size

    def pick(self, pool: Sequence[Any] | np.ndarray, seed: int) -> list[Any]:
        """The examples of ``pool`` this budget uses, in pool order: the first :meth:`size` of one
        seeded permutation of the pool (so a smaller budget's pick is inside a larger one's)."""
        items = list(pool)
        n = self.size(len(items))
        order = np.random.default_rng(seed).permutation(len(items))
        return [items[i] for i in sorted(order[:n].tolist())]

    def describe(self) -> str:
        """``40 field plots``, ``25 % of the training years`` or ``all training years``."""
        if self.count is not None:
            return f"{self.count} {self.pool}"
        if self.fraction is not None:
            return f"{self.fraction:.0%} of the {self.pool}"
        return f"all {self.pool}"
