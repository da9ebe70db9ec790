"""The time step of climate data (any regular step, any CF calendar) and its climatological bins."""

from __future__ import annotations

from datetime import timedelta

import cftime
import numpy as np
import pytest
import torch

from hfmi_kit.domains.climate.data import phase_means
from hfmi_kit.domains.climate.timeaxis import TimeStep, detect_step, phase_of
from hfmi_kit.errors import DataError


def _dt(start: str, n: int, step: str) -> np.ndarray:
    return np.arange(np.datetime64(start, "s"), np.datetime64(start, "s") + n * np.timedelta64(1, step[-1]) *
                     int(step[:-1]), np.timedelta64(int(step[:-1]), step[-1])).astype("datetime64[ns]")


@pytest.mark.parametrize("times, unit, n, phases, cycle", [
    (_dt("2000-01-01T00", 48, "1h"), "hour", 1, 366 * 24, "hour and day of year"),
    (_dt("2000-01-01T00", 40, "6h"), "hour", 6, 366 * 4, "hour and day of year"),
    (_dt("2000-01-01", 400, "1D"), "day", 1, 366, "day of year"),
    (_dt("2000-01-03", 100, "5D"), "day", 5, 74, "day of year"),
    (np.array([f"{2000 + i // 12}-{i % 12 + 1:02d}-16T12" for i in range(30)], "datetime64[ns]"), "month", 1, 12,
     "month"),
    (np.array([f"{2000 + i // 4}-{3 * (i % 4) + 1:02d}-01" for i in range(12)], "datetime64[ns]"), "month", 3, 4,
     "3-month season"),
    # DJF means dated mid-January, one at 12:00 (as the NCEP file the eofs package ships)
    (np.array(["1948-01-15T12", "1949-01-15", "1950-01-15", "1951-01-15"], "datetime64[ns]"), "year", 1, 1, "none"),
    (np.array([f"{1850 + 10 * i}-07-01" for i in range(5)], "datetime64[ns]"), "year", 10, 1, "none"),
])
def test_the_step_and_its_climatology_come_from_the_time_axis(times, unit, n, phases, cycle):
    step = detect_step(times)
    assert (step.unit, step.n, step.phases, step.cycle) == (unit, n, phases, cycle)
    ph = phase_of(times, step)
    assert ph.min() >= 0 and ph.max() < phases
    assert TimeStep.parse(step.label) == step


def test_calendars_numpy_lacks():
    t360 = np.array([cftime.Datetime360Day(2000 + i // 12, i % 12 + 1, 16) for i in range(24)])
    step = detect_step(t360, calendar="360_day")
    assert (step.unit, step.n, step.calendar, step.phases) == ("month", 1, "360_day", 12)
    assert list(phase_of(t360, step)[:13]) == [*range(12), 0]
    daily = np.array([cftime.Datetime360Day(2001, 1, 1) + timedelta(days=i) for i in range(400)])
    step = detect_step(daily, calendar="360_day")
    assert (step.unit, step.phases) == ("day", 360) and phase_of(daily, step)[360] == 0  # a 360-day year
    noleap = np.array([cftime.DatetimeNoLeap(2001, 2, 27) + timedelta(days=i) for i in range(4)])
    assert [x.day for x in noleap] == [27, 28, 1, 2] and detect_step(noleap, calendar="noleap").unit == "day"


def test_an_irregular_axis_is_one_line_naming_the_file_and_the_gap():
    months = np.array(["2000-01-01", "2000-02-01", "2000-04-01", "2000-05-01"], "datetime64[ns]")
    with pytest.raises(DataError, match=r"f.nc: the time axis is not regular: 2000-04-01.* follows 2000-02-01.* "
                                        r"\(index 2\); expected steps of 1 month"):
        detect_step(months, source="f.nc")
    with pytest.raises(DataError, match="f.nc: time step of 5400 s"):
        detect_step(_dt("2000-01-01T00", 4, "90m"), source="f.nc")


def test_daily_bins_are_smoothed_and_day_366_borrows_from_its_neighbours():
    t = _dt("2001-01-01", 3 * 365, "1D")  # 2001-2003: no leap day
    step = detect_step(t)
    ph = torch.from_numpy(phase_of(t, step))
    cycle = torch.from_numpy(np.cos(2 * np.pi * np.arange(t.size) / 365.0))[:, None]
    clim = phase_means(cycle, ph, step, np.arange(t.size))
    assert clim.shape == (366, 1) and torch.isfinite(clim).all()
    assert abs(float(clim[365, 0]) - float(clim[364, 0])) < 0.02  # the empty bin takes its neighbours' mean
    assert float(clim[0, 0]) > 0.9 and float(clim[182, 0]) < -0.9  # a +-15 day mean keeps the annual cycle
    monthly = TimeStep("month", 1)
    with pytest.raises(DataError, match="month 3 has no data in the training years"):
        phase_means(torch.ones(2, 1), torch.tensor([0, 1]), monthly, np.arange(2))
