"""The time step of a climate dataset and the phase of each step in the climatological cycle.

A dataset's step is read from its time axis, whatever the calendar (``standard``, ``noleap``,
``360_day``: numpy datetimes or cftime objects): ``n`` hours, days, months or years, and it must
be regular (every step the same; months and years counted on the calendar, hours and days in
seconds). The step decides the climatology the anomalies are taken from:

- hourly to 12-hourly: by hour of day and day of year (``24 / n`` x days-of-year bins);
- daily to 15-daily: by day of year (``days / n`` bins);
- monthly (1, 2, 3, 4 or 6 months): by month or season of year (``12 / n`` bins);
- annual or longer (or months that do not divide the year): none (one bin).

Day-of-year bins have few samples (one per year), so their means are smoothed over +-15 days
(a circular running mean, as WeatherBench 2 smooths its climatology); day 366 exists only in
leap years and borrows from its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hfmi_kit.errors import DataError

_DAY = 86400
SMOOTH_DAYS = 15  # half-width of the day-of-year smoothing


@dataclass(frozen=True)
class TimeStep:
    """A regular time step: ``n`` ``unit`` (hour, day, month, year) on ``calendar``."""

    unit: str
    n: int
    calendar: str = "standard"

    @property
    def label(self) -> str:
        """``1 month``, ``6 hours``, ``1 year``: how the checkpoint and outputs name the step."""
        return f"{self.n} {self.unit}{'s' if self.n != 1 else ''}"

    @property
    def year_days(self) -> int:
        return 360 if self.calendar == "360_day" else 366

    @property
    def phases(self) -> int:
        """How many climatological bins a year has at this step (1: no cycle)."""
        if self.unit == "hour":
            return self.year_days * (24 // self.n)
        if self.unit == "day":
            return -(-self.year_days // self.n)
        if self.unit == "month" and 12 % self.n == 0:
            return 12 // self.n
        return 1

    @property
    def cycle(self) -> str:
        """What the climatology resolves: ``hour and day of year``, ``day of year``, ``month``..."""
        if self.unit == "hour":
            return "hour and day of year"
        if self.unit == "day":
            return "day of year"
        if self.phases > 1:
            return "month" if self.n == 1 else f"{self.n}-month season"
        return "none"

    @property
    def smooth_bins(self) -> int:
        """Half-width of the day-of-year smoothing in bins (0: the bins are not smoothed)."""
        return -(-SMOOTH_DAYS // self.n) if self.unit == "day" else SMOOTH_DAYS if self.unit == "hour" else 0

    @classmethod
    def parse(cls, label: str, calendar: str = "standard") -> TimeStep:
        """The step a checkpoint recorded (``1 month``, ``6 hours``)."""
        n, unit = label.split()
        return cls(unit=unit.rstrip("s"), n=int(n), calendar=calendar)


def calendar_fields(time: np.ndarray) -> dict[str, np.ndarray]:
    """Year, month (1-12), day of year (1-366 or 1-360) and hour of every time (datetime64 or
    cftime objects)."""
    t = np.asarray(time)
    if np.issubdtype(t.dtype, np.datetime64):
        y = t.astype("datetime64[Y]")
        return {"year": y.astype(int) + 1970, "month": t.astype("datetime64[M]").astype(int) % 12 + 1,
                "dayofyear": (t.astype("datetime64[D]") - y.astype("datetime64[D]")).astype(int) + 1,
                "hour": (t.astype("datetime64[h]") - t.astype("datetime64[D]")).astype(int)}
    return {"year": np.array([x.year for x in t]), "month": np.array([x.month for x in t]),
            "dayofyear": np.array([x.dayofyr for x in t]), "hour": np.array([x.hour for x in t])}


def _seconds(time: np.ndarray) -> np.ndarray:
    t = np.asarray(time)
    if np.issubdtype(t.dtype, np.datetime64):
        return t.astype("datetime64[s]").astype(np.int64)
    return np.array([(x - t[0]).total_seconds() for x in t], dtype=np.int64)


def detect_step(time: np.ndarray, *, calendar: str = "standard", source: str = "dataset") -> TimeStep:
    """The regular step of ``time`` (at least 2 increasing times).

    Raises:
        DataError: naming ``source``: steps of different lengths (a gap, a missing month), or
            a step that is not a whole number of hours, days, months or years.
    """
    f = calendar_fields(time)
    months = f["year"] * 12 + f["month"] - 1
    dm = np.diff(months)
    secs = np.diff(_seconds(time))

    def irregular(i: int, what: str) -> DataError:
        return DataError(f"{source}: the time axis is not regular: {time[i + 1]} follows {time[i]} (index {i + 1}); "
                         f"expected steps of {what} as between the first two times")

    first = int(secs[0])
    # calendar steps first: months and years vary in seconds but not on the calendar
    same_day = np.all(f["dayofyear"] == f["dayofyear"][0]) and np.all(f["hour"] == f["hour"][0])
    if dm[0] >= 12 and dm[0] % 12 == 0 and (same_day or first >= 360 * _DAY):
        bad = np.flatnonzero(dm != dm[0])
        if bad.size:
            raise irregular(int(bad[0]), f"{dm[0] // 12} year(s)")
        return TimeStep("year", int(dm[0] // 12), calendar)
    if dm[0] >= 1 and first >= 28 * _DAY:
        bad = np.flatnonzero(dm != dm[0])
        if bad.size:
            raise irregular(int(bad[0]), f"{dm[0]} month(s)")
        return TimeStep("month", int(dm[0]), calendar)
    bad = np.flatnonzero(secs != first)
    if first % _DAY == 0:
        if bad.size:
            raise irregular(int(bad[0]), f"{first // _DAY} day(s)")
        return TimeStep("day", first // _DAY, calendar)
    if first % 3600 == 0 and 24 % (first // 3600) == 0:
        if bad.size:
            raise irregular(int(bad[0]), f"{first // 3600} hour(s)")
        return TimeStep("hour", first // 3600, calendar)
    raise DataError(f"{source}: time step of {first} s between the first two times is not a whole number of hours "
                    "dividing a day, days, months or years")


def phase_of(time: np.ndarray, step: TimeStep) -> np.ndarray:
    """(T,) the climatological bin of each time, in [0, ``step.phases``)."""
    f = calendar_fields(time)
    if step.unit == "hour":
        per = 24 // step.n
        return (f["dayofyear"] - 1) * per + f["hour"] // step.n
    if step.unit == "day":
        return (f["dayofyear"] - 1) // step.n
    if step.phases > 1:
        return (f["month"] - 1) // step.n
    return np.zeros(len(f["year"]), dtype=np.int64)
