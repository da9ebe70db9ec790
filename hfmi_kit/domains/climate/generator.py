"""A synthetic coupled atmosphere / ocean-mixed-layer / sea-ice system with known physics.

The model is a two-layer energy-balance model on a regular lat-lon grid, stepped daily and
written monthly:

- near-surface air temperature ``tas`` [K]: absorbed sunlight, outgoing long-wave radiation
  ``A + B (T - 273.15)`` (Budyko), CO2 radiative forcing ``5.35 ln(C/C0)`` W m-2, exchange with
  the ocean, diffusion on the sphere and advection by a westerly flow (spectral in longitude),
  plus spatially correlated stochastic "weather" forcing;
- ocean mixed-layer temperature ``tos`` [K] (ocean only): absorbs sunlight through open water,
  exchanges heat with the air, slow heat uptake by a hidden deep ocean;
- sea-ice concentration ``siconc`` [1] (ocean only): forms when the mixed layer would cool below
  freezing (271.35 K), melts when it warms; ice raises the albedo and insulates the ocean;
- a seasonal insolation cycle (daily-mean top-of-atmosphere insolation ``rsdt`` [W m-2]), a fixed
  land/ocean mask ``sftlf`` [%], and the CO2 concentration ``co2`` [1e-6] as a scalar series.

Because the generator can be re-run from any saved state with a changed forcing, what-if
experiments have a ground truth. Output is written as CF-1.8 Zarr or NetCDF.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from hfmi_kit.errors import ConfigError

S0 = 1361.0  # solar constant [W m-2]
A_OLR, B_OLR = 203.3, 2.09  # OLR = A + B (T - 273.15) [W m-2]
T_FREEZE = 271.35  # sea-water freezing point [K]
C0_PPM = 280.0  # pre-industrial CO2 [ppm] for the forcing 5.35 ln(C/C0)
R_EARTH = 6.371e6  # [m]
DAY = 86400.0
DAYS_PER_MONTH = 30


def co2_forcing(c_ppm: np.ndarray | float) -> np.ndarray:
    """Radiative forcing of CO2, 5.35 ln(C/C0) W m-2 (Myhre et al. 1998), C0 = 280 ppm."""
    return 5.35 * np.log(np.asarray(c_ppm, dtype=np.float64) / C0_PPM)


@dataclass
class GeneratorConfig:
    """Settings of the synthetic coupled system."""

    nlat: int = 16  # latitude rows (cell centres, pole-free)
    nlon: int = 32  # longitude columns
    years: int = 40  # simulated years written out (monthly means)
    spinup_years: int = 15  # years run before output starts
    start_year: int = 2000  # calendar year of the first written month
    seed: int = 0  # seed of the weather noise and the CO2 path
    co2_levels: tuple[float, ...] = (280.0, 350.0, 420.0, 500.0, 600.0, 700.0, 850.0, 1000.0)  # ppm
    co2_hold_years: int = 1  # years between CO2 changes (a stepped path samples the response)
    noise_wm2: float = 30.0  # amplitude of the stochastic weather forcing [W m-2]
    wind_ms: float = 10.0  # peak westerly wind [m s-1]
    diffusivity: float = 2.0e6  # horizontal eddy diffusivity [m2 s-1]
    mixed_layer_m: float = 40.0  # ocean mixed-layer depth [m]
    gamma: float = 30.0  # air-sea heat exchange [W m-2 K-1]
    deep_uptake: float = 1.0  # mixed layer -> deep ocean exchange [W m-2 K-1]
    ice_heat_k: float = 6.0  # mixed-layer warming [K] equivalent to melting a full cell of ice
    steps_per_day: int = 1  # sub-steps per day
    cloud_albedo: float = 0.16  # albedo added by clouds everywhere
    # diagnosed upper-air and sub-surface fields (see :func:`level_fields`); empty: none written
    pressure_levels: tuple[float, ...] = ()  # hPa: air temperature ``ta`` on these levels (written in Pa)
    ocean_depths: tuple[float, ...] = ()  # m: ocean temperature ``thetao`` at these depths


@dataclass
class State:
    """Full model state (``deep`` is hidden: it is not written out)."""

    tas: np.ndarray
    tos: np.ndarray
    ice: np.ndarray
    deep: np.ndarray
    rng_state: dict = field(default_factory=dict)

    def copy(self) -> State:
        return State(self.tas.copy(), self.tos.copy(), self.ice.copy(), self.deep.copy(), dict(self.rng_state))


class CoupledSystem:
    """The coupled system on one grid; see the module docstring for the physics."""

    def __init__(self, cfg: GeneratorConfig) -> None:
        if cfg.nlat < 4 or cfg.nlon < 8 or cfg.nlon % 2:
            raise ConfigError(f"grid {cfg.nlat}x{cfg.nlon} too small; need nlat>=4, even nlon>=8")
        self.cfg = cfg
        dlat = 180.0 / cfg.nlat
        self.lat = -90.0 + dlat * (np.arange(cfg.nlat) + 0.5)
        self.lon = 360.0 / cfg.nlon * np.arange(cfg.nlon)
        self.phi = np.deg2rad(self.lat)[:, None]  # (lat, 1)
        self.land = land_mask(self.lat, self.lon)  # (lat, lon) bool
        self.ocean = ~self.land
        c = cfg
        self.C_atm = 1.0e7  # [J m-2 K-1]
        self.C_land = 1.5e7
        self.C_ocean = 4.1e6 * c.mixed_layer_m
        self.C_deep = 30.0 * self.C_ocean
        self.dt = DAY / c.steps_per_day
        self.u = c.wind_ms * np.cos(self.phi) * (0.4 + np.sin(2 * self.phi) ** 2)  # westerlies
        k = np.fft.rfftfreq(c.nlon, d=1.0 / c.nlon)  # zonal wavenumbers
        rcos = R_EARTH * np.cos(self.phi)  # (lat, 1)
        self.zonal = np.exp(-(c.diffusivity * (k / rcos) ** 2) * self.dt - 1j * k * self.u / rcos * self.dt)
        self.dy = R_EARTH * np.deg2rad(dlat)
        self.cos_edge = np.cos(np.deg2rad(-90.0 + dlat * np.arange(1, c.nlat)))  # (lat-1,)
        self.albedo_sfc = np.where(self.land, 0.28, 0.08)

    # -- forcing ---------------------------------------------------------------------------
    def insolation(self, day_of_year: float) -> np.ndarray:
        """Daily-mean TOA insolation (lat, 1) [W m-2] for a 360-day year."""
        decl = np.deg2rad(23.44) * np.sin(2 * np.pi * (day_of_year - 80.0) / 360.0)
        x = np.clip(-np.tan(self.phi) * np.tan(decl), -1.0, 1.0)
        h0 = np.arccos(x)
        return S0 / np.pi * (h0 * np.sin(self.phi) * np.sin(decl) + np.cos(self.phi) * np.cos(decl) * np.sin(h0))

    def co2_path(self, n_months: int, rng: np.random.Generator) -> np.ndarray:
        """A stepped CO2 path [ppm]: a random level from ``co2_levels`` every ``co2_hold_years``."""
        levels = np.asarray(self.cfg.co2_levels)
        hold = 12 * self.cfg.co2_hold_years
        out = np.empty(n_months)
        for start in range(0, n_months, hold):
            out[start : start + hold] = rng.choice(levels)
        return out

    # -- dynamics --------------------------------------------------------------------------
    def initial_state(self) -> State:
        t = 288.0 - 40.0 * np.sin(self.phi) ** 2 + np.zeros((self.cfg.nlat, self.cfg.nlon))
        return State(tas=t.copy(), tos=np.where(self.ocean, t, np.nan), ice=np.where(self.ocean, 0.0, np.nan),
                     deep=np.where(self.ocean, t, np.nan))

    def _noise(self, rng: np.random.Generator) -> np.ndarray:
        white = rng.standard_normal((self.cfg.nlat, self.cfg.nlon))
        spec = np.fft.rfft(white, axis=1)
        spec[:, 4:] = 0.0  # large-scale weather systems only
        f = np.fft.irfft(spec, n=self.cfg.nlon, axis=1)
        f = 0.25 * np.roll(f, 1, 0) + 0.5 * f + 0.25 * np.roll(f, -1, 0)
        return f / (f.std() + 1e-12)

    def _meridional_diffusion(self, T: np.ndarray) -> np.ndarray:
        flux = self.cos_edge[:, None] * (T[1:] - T[:-1]) / self.dy  # (lat-1, lon)
        div = np.zeros_like(T)
        div[:-1] += flux
        div[1:] -= flux
        return self.cfg.diffusivity * div / (self.dy * np.cos(self.phi))

    def step_day(self, s: State, day_of_year: float, forcing_wm2: float, rng: np.random.Generator,
                 noise: np.ndarray) -> None:
        c = self.cfg
        ocean = self.ocean
        Q = self.insolation(day_of_year)  # (lat, 1)
        ice = np.where(ocean, s.ice, 0.0)
        tos = np.where(ocean, s.tos, 0.0)
        albedo = self.albedo_sfc * (1 - ice) + 0.6 * ice + c.cloud_albedo
        asr = Q * (1.0 - albedo)  # absorbed at the surface
        olr = A_OLR + B_OLR * (s.tas - 273.15)
        exch = c.gamma * (tos - s.tas) * (1.0 - 0.85 * ice) * ocean  # ocean -> air
        # Air: over land it also takes the surface absorption (small land heat capacity).
        heat_air = np.where(self.land, asr, 0.4 * asr) - olr + forcing_wm2 + exch + c.noise_wm2 * noise
        C_air = np.where(self.land, self.C_land, self.C_atm)
        tas = s.tas + self.dt * (heat_air / C_air + self._meridional_diffusion(s.tas))
        spec = np.fft.rfft(tas, axis=1) * self.zonal
        s.tas = np.fft.irfft(spec, n=c.nlon, axis=1)
        # Ocean mixed layer with a hidden deep layer; sea ice as a latent-heat buffer.
        deep = np.where(ocean, s.deep, 0.0)
        uptake = c.deep_uptake * (tos - deep)
        heat_ocn = 0.6 * asr - exch - uptake
        tos_new = tos + self.dt * heat_ocn / self.C_ocean
        s.deep = np.where(ocean, deep + self.dt * uptake / self.C_deep, np.nan)
        # Freeze: cooling below freezing turns into ice; warming above freezing melts ice first.
        energy = tos_new - T_FREEZE - c.ice_heat_k * ice  # [K equivalent]
        new_ice = np.clip(-energy / c.ice_heat_k, 0.0, 1.0)
        # Under ice the mixed layer stays at freezing (cooling beyond full cover thickens the ice).
        tos_new = np.where(new_ice > 0, T_FREEZE, T_FREEZE + energy)
        s.tos = np.where(ocean, tos_new, np.nan)
        s.ice = np.where(ocean, new_ice, np.nan)

    def run(self, state: State, co2_ppm: np.ndarray, start_month: int, rng: np.random.Generator,
            record: bool = True) -> tuple[State, dict[str, np.ndarray]]:
        """Run ``len(co2_ppm)`` months from ``state`` (modified in place); return monthly means."""
        n = len(co2_ppm)
        shape = (n, self.cfg.nlat, self.cfg.nlon)
        out = {k: np.zeros(shape) for k in ("tas", "tos", "siconc", "rsdt")} if record else {}
        noise = self._noise(rng)
        for m in range(n):
            f = float(co2_forcing(co2_ppm[m]))
            month = (start_month + m) % 12
            for d in range(DAYS_PER_MONTH):
                doy = month * DAYS_PER_MONTH + d + 0.5
                for _ in range(self.cfg.steps_per_day):
                    noise = 0.7 * noise + np.sqrt(1 - 0.7**2) * self._noise(rng)  # ~3-day memory
                    self.step_day(state, doy, f, rng, noise)
                if record:
                    out["tas"][m] += state.tas / DAYS_PER_MONTH
                    out["tos"][m] += state.tos / DAYS_PER_MONTH
                    out["siconc"][m] += state.ice / DAYS_PER_MONTH
                    out["rsdt"][m] += self.insolation(doy) / DAYS_PER_MONTH
        return state, out


def land_mask(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Two idealised continents and an Antarctic-like polar cap; True = land."""
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    c1 = ((la - 40) / 35) ** 2 + ((lo - 90) / 50) ** 2 < 1.0
    c2 = ((la + 5) / 40) ** 2 + ((lo - 270) / 28) ** 2 < 1.0
    cap = la < -72
    return c1 | c2 | cap


def generate(cfg: GeneratorConfig | None = None, *, co2_ppm: np.ndarray | None = None,
             return_states: bool = False) -> xr.Dataset | tuple[xr.Dataset, list[State]]:
    """Simulate the coupled system and return a CF-1.8 ``xarray.Dataset`` of monthly means.

    Args:
        cfg: generator settings.
        co2_ppm: CO2 path [ppm], one value per written month (default: a stepped random path).
        return_states: also return the full state (hidden deep ocean included) at the start of
            every written month, to branch what-if experiments from.
    """
    cfg = cfg or GeneratorConfig()
    sys_ = CoupledSystem(cfg)
    rng = np.random.default_rng(cfg.seed)
    n = 12 * cfg.years
    if co2_ppm is None:
        co2_ppm = sys_.co2_path(n, rng)
    co2_ppm = np.asarray(co2_ppm, dtype=np.float64)
    if co2_ppm.shape != (n,):
        raise ConfigError(f"co2_ppm must have one value per month ({n}), got shape {co2_ppm.shape}")
    state = sys_.initial_state()
    sys_.run(state, np.full(12 * cfg.spinup_years, co2_ppm[0]), 0, rng, record=False)
    states: list[State] = []
    outs: dict[str, list[np.ndarray]] = {k: [] for k in ("tas", "tos", "siconc", "rsdt")}
    for m in range(n):
        if return_states:
            states.append(state.copy())
        _, o = sys_.run(state, co2_ppm[m : m + 1], m % 12, rng)
        for k in outs:
            outs[k].append(o[k][0])
    data = {k: np.stack(v) for k, v in outs.items()}
    ds = to_cf_dataset(sys_, data, co2_ppm, cfg)
    return (ds, states) if return_states else ds


def branch(cfg: GeneratorConfig, state: State, co2_ppm: np.ndarray, start_month: int,
           seed: int) -> dict[str, np.ndarray]:
    """Run the generator from ``state`` under ``co2_ppm`` with weather seed ``seed`` (truth for what-if)."""
    sys_ = CoupledSystem(cfg)
    _, out = sys_.run(state.copy(), np.asarray(co2_ppm, dtype=np.float64), start_month,
                      np.random.default_rng(seed))
    return out


def month_starts(start_year: int, n: int) -> np.ndarray:
    """First day of ``n`` consecutive months as datetime64[ns]."""
    y, m = start_year + np.arange(n) // 12, np.arange(n) % 12 + 1
    return np.array([np.datetime64(f"{a:04d}-{b:02d}-01", "ns") for a, b in zip(y, m)])


def to_cf_dataset(sys_: CoupledSystem, data: dict[str, np.ndarray], co2_ppm: np.ndarray,
                  cfg: GeneratorConfig) -> xr.Dataset:
    """Wrap generator output in a CF-1.8 Dataset (units and standard_name on every variable)."""
    n = data["tas"].shape[0]
    time = month_starts(cfg.start_year, n)
    dims = ("time", "lat", "lon")
    sea = "area: mean where sea time: mean"
    ds = xr.Dataset(
        {
            **{v: (dims, data[v].astype("float32"), {"standard_name": sn, "long_name": ln, "units": u,
                                                      "cell_methods": cm})
               for v, (sn, ln, u, cm) in {
                   "tas": ("air_temperature", "Near-surface air temperature", "K", "time: mean"),
                   "tos": ("sea_surface_temperature", "Ocean mixed-layer temperature", "K", sea),
                   "siconc": ("sea_ice_area_fraction", "Sea-ice concentration", "1", sea),
                   "rsdt": ("toa_incoming_shortwave_flux", "TOA incident shortwave", "W m-2", "time: mean"),
               }.items()},
            "co2": (("time",), co2_ppm.astype("float32"), {
                "standard_name": "mole_fraction_of_carbon_dioxide_in_air", "long_name": "CO2 concentration",
                "units": "1e-6"}),
            "sftlf": (("lat", "lon"), (100.0 * sys_.land).astype("float32"), {
                "standard_name": "land_area_fraction", "long_name": "Land area fraction", "units": "%"}),
        },
        coords={
            "time": ("time", time, {"standard_name": "time", "long_name": "time", "axis": "T"}),
            "lat": ("lat", sys_.lat.astype("float64"), {
                "standard_name": "latitude", "long_name": "latitude", "units": "degrees_north", "axis": "Y"}),
            "lon": ("lon", sys_.lon.astype("float64"), {
                "standard_name": "longitude", "long_name": "longitude", "units": "degrees_east", "axis": "X"}),
        },
        attrs={
            "Conventions": "CF-1.8",
            "title": "hfmi_kit synthetic coupled atmosphere-ocean-sea-ice system",
            "institution": "hfmi_kit",
            "source": "hfmi_kit.domains.climate.generator (two-layer energy-balance model)",
            # no wall-clock time: the same settings write the same bytes, so the checksum a
            # checkpoint records of its data still matches when the data is made again
            "history": f"generated by hfmi_kit's coupled generator: seed={cfg.seed}, years={cfg.years}, "
                       f"grid={cfg.nlat}x{cfg.nlon}",
            "references": "Budyko 1969 OLR; Myhre et al. 1998 CO2 forcing",
            "license": "CC0-1.0 (synthetic)",
            "hfmi_generator_config": json.dumps(dataclasses.asdict(cfg)),
        },
    )
    ds = ds.assign(level_fields(data, sys_.land, cfg))
    for v in ("tos", "siconc", "thetao"):
        if v in ds:
            ds[v].encoding["_FillValue"] = np.float32(1e20)
    ds["time"].encoding.update({"units": f"days since {cfg.start_year}-01-01", "calendar": "standard"})
    return ds


LAPSE_K_PER_M, SCALE_HEIGHT_M, T_DEEP = 6.5e-3, 7000.0, 275.0


def level_fields(data: dict[str, np.ndarray], land: np.ndarray, cfg: GeneratorConfig) -> dict[str, xr.DataArray]:
    """Fields on vertical levels, diagnosed from the surface state (they add no dynamics of
    their own): air temperature ``ta`` on ``cfg.pressure_levels`` (the surface temperature
    lapsed at 6.5 K/km over the height of each level, z = 7 km ln(1000 hPa / p), its anomaly
    from the cell's mean damped as sqrt(p / 1000 hPa)), written on a ``plev`` axis in Pa as
    CMIP6 does; and ocean temperature ``thetao`` at ``cfg.ocean_depths`` (relaxing from the
    mixed layer to a 275 K deep ocean over 300 m), NaN over land and, on the shelf (ocean cells
    next to land, 100 m deep), below the sea floor."""
    out: dict[str, xr.DataArray] = {}
    if cfg.pressure_levels:
        p = np.asarray(cfg.pressure_levels, dtype=np.float64)
        tas = data["tas"].astype(np.float64)
        mean = tas.mean(axis=0, keepdims=True)
        ta = np.stack([mean + (tas - mean) * np.sqrt(q / 1000.0) - LAPSE_K_PER_M * SCALE_HEIGHT_M *
                       np.log(1000.0 / q) for q in p], axis=1)
        out["ta"] = xr.DataArray(ta.astype("float32"), dims=("time", "plev", "lat", "lon"), attrs={
            "standard_name": "air_temperature", "long_name": "Air temperature", "units": "K",
            "cell_methods": "time: mean"})
        out["plev"] = xr.DataArray(p * 100.0, dims="plev", attrs={
            "standard_name": "air_pressure", "long_name": "pressure", "units": "Pa", "positive": "down",
            "axis": "Z"})
    if cfg.ocean_depths:
        z = np.asarray(cfg.ocean_depths, dtype=np.float64)
        tos = data["tos"].astype(np.float64)
        ocean = ~land
        near = np.zeros_like(land)
        for axis, shift in ((0, 1), (0, -1), (1, 1), (1, -1)):
            near |= np.roll(land, shift, axis=axis)
        shelf = ocean & near
        th = np.stack([np.where(shelf & (d > 100.0), np.nan, T_DEEP + (tos - T_DEEP) * np.exp(-d / 300.0))
                       for d in z], axis=1)
        out["thetao"] = xr.DataArray(th.astype("float32"), dims=("time", "depth", "lat", "lon"), attrs={
            "standard_name": "sea_water_potential_temperature", "long_name": "Sea water potential temperature",
            "units": "K", "cell_methods": "area: mean where sea time: mean"})
        out["depth"] = xr.DataArray(z, dims="depth", attrs={
            "standard_name": "depth", "long_name": "depth below the sea surface", "units": "m",
            "positive": "down", "axis": "Z"})
    return out


def write_dataset(ds: xr.Dataset, path: str | Path, *, time_chunk: int = 1) -> Path:
    """Write ``ds`` as Zarr (``.zarr``) or NetCDF (``.nc``) atomically, chunked one step per chunk."""
    from hfmi_kit.data.cf import write_cf

    return write_cf(ds, path, time_chunk=time_chunk)
