"""Photovoltaic context: the Shockley–Queisser limit on pvlib's AM1.5G spectrum, and the CEC
module database's technologies and efficiencies.

The detailed-balance limit of a single-junction cell at 300 K: every photon above the gap gives
one electron (``J_sc``), the only loss is radiative recombination with the black-body dark
current ``J_0 = q 2π/(h³c²) ∫_Eg^∞ E² / (exp(E/kT) - 1) dE``, and the efficiency is the maximum
of ``V (J_sc - J_0 (exp(qV/kT) - 1))`` over ``P_in = ∫ E_λ dλ`` (ASTM G173 global tilt,
≈1000 W m⁻²). Peak: ≈33.7 % at ≈1.34 eV.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from hfmi_kit.errors import DataError

Q = 1.602176634e-19  # C
H = 6.62607015e-34  # J s
C = 2.99792458e8  # m / s
KB = 1.380649e-23  # J / K
# absorber band gaps (eV) of the CEC technologies, from the semiconductor literature
TECHNOLOGY_GAPS = {"Mono-c-Si": 1.12, "Multi-c-Si": 1.12, "CdTe": 1.45, "CIGS": 1.15, "Thin Film": 1.70}
TECHNOLOGY_ABSORBERS = {"Mono-c-Si": "Si", "Multi-c-Si": "Si", "CdTe": "CdTe", "CIGS": "CuIn0.7Ga0.3Se2",
                        "Thin Film": "Si (amorphous)"}


def _pvlib() -> Any:
    try:
        import pvlib
    except ImportError as e:
        raise ImportError("PV context needs pvlib; install it with `pip install hfmi_kit[materials]`") from e
    return pvlib


@functools.lru_cache(maxsize=1)
def am15g() -> tuple[np.ndarray, np.ndarray]:
    """(wavelength nm, global tilt irradiance W m⁻² nm⁻¹) of ASTM G173-03 as shipped by pvlib."""
    spec = _pvlib().spectrum.get_reference_spectra(standard="ASTM G173-03")
    return spec.index.to_numpy(dtype=float), spec["global"].to_numpy(dtype=float)


@functools.lru_cache(maxsize=1)
def _photon_table() -> tuple[np.ndarray, np.ndarray, float]:
    """Photon energies (eV, ascending) with the cumulative photon flux above each, and P_in."""
    lam, irr = am15g()
    flux = irr * lam * 1e-9 / (H * C)  # photons s⁻¹ m⁻² nm⁻¹
    # cumulative flux of photons with wavelength <= lam (energy >= hc/lam)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (flux[1:] + flux[:-1]) * np.diff(lam))])
    energy = H * C / (lam * 1e-9) / Q
    p_in = float(np.trapezoid(irr, lam))
    return energy[::-1], cum[::-1], p_in


def sq_limit(band_gap: Any, *, temperature: float = 300.0) -> np.ndarray:
    """Detailed-balance efficiency (fraction, 0..1) for each band gap (eV); 0 for gaps <= 0."""
    eg = np.atleast_1d(np.asarray(band_gap, dtype=float))
    if np.isnan(eg).any():
        raise DataError("sq_limit: band gap contains NaN")
    energy, cum, p_in = _photon_table()
    kt = KB * temperature / Q  # eV
    out = np.zeros_like(eg)
    jsc_all = Q * np.interp(eg, energy, cum, left=cum[0], right=0.0)  # A m⁻²; photons with E >= Eg
    ok = (eg > 0.05) & (jsc_all > 0)  # no photons above the gap (> 4.4 eV): no current
    if not ok.any():
        return out
    g, jsc = eg[ok], jsc_all[ok]
    # dark current: integrate E² exp(-E/kT) / (1 - exp(-E/kT)) from Eg to Eg + 40 kT (stable form)
    x = np.linspace(0.0, 40.0, 801)[None, :] * kt + g[:, None]  # eV
    integrand = x**2 * np.exp(-x / kt) / -np.expm1(-x / kt)
    j0 = Q * 2 * np.pi / (H**3 * C**2) * np.trapezoid(integrand, x, axis=1) * Q**3  # eV³ -> J³
    voc = kt * np.log1p(jsc / j0)
    v = np.linspace(0.0, 1.0, 2001)[None, :] * voc[:, None]
    p = v * (jsc[:, None] - j0[:, None] * np.expm1(v / kt))
    out[ok] = p.max(axis=1) / p_in
    return out


def module_technologies() -> Any:
    """CEC module database (shipped with pvlib) summarised by technology.

    Columns: modules, median and best module efficiency (% at STC = STC power / area / 1000 W m⁻²),
    the absorber and its band gap, the SQ limit at that gap and the best module as a fraction of it.
    """
    import pandas as pd

    mods = _pvlib().pvsystem.retrieve_sam("CECMod").T
    eff = pd.to_numeric(mods["STC"], errors="coerce") / pd.to_numeric(mods["A_c"], errors="coerce") / 10.0
    df = pd.DataFrame({"technology": mods["Technology"], "efficiency_pct": eff}).dropna()
    df = df[(df.efficiency_pct > 1) & (df.efficiency_pct < 40)]
    g = df.groupby("technology")["efficiency_pct"]
    out = pd.DataFrame({"modules": g.size(), "median_efficiency_pct": g.median(), "best_efficiency_pct": g.max()})
    out["absorber"] = [TECHNOLOGY_ABSORBERS.get(t, "") for t in out.index]
    out["band_gap_ev"] = [TECHNOLOGY_GAPS.get(t, np.nan) for t in out.index]
    out["sq_limit_pct"] = 100 * sq_limit(out["band_gap_ev"].fillna(0).to_numpy())
    out["best_over_sq"] = out["best_efficiency_pct"] / out["sq_limit_pct"]
    return out.sort_values("modules", ascending=False)
