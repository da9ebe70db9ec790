"""A generator of forest landscapes with known biomass, written in the formats real data come in.

Trees are simulated one by one: stems per pixel from a stand-density field, diameters from a
stand-age field, heights from a height-diameter curve, wood densities from a species-mix field.
Above-ground biomass follows Chave et al. (2014), ``AGB [kg] = 0.0673 (rho D^2 H)^0.976``
(``rho`` g cm-3, ``D`` cm, ``H`` m); carbon is 0.47 of it. The sensors see the forest the way
real ones do:

- optical (Sentinel-2-like blue, red, NIR, SWIR reflectance, 20 m, UTM): the canopy fraction
  ``1 - exp(-AGB / 80)`` mixes soil and leaf spectra, so reflectance saturates in dense forest;
  clouds are declared nodata;
- radar (Sentinel-1-like VV, VH backscatter in dB, ~40 m, geographic lat/lon): a water-cloud
  model ``s0 = s_veg (1 - t) + s_soil t``, ``t = exp(-2 B AGB / cos(theta))``, with 4-look speckle;
  it saturates at a few hundred Mg/ha;
- airborne lidar (LAS 1.4 points in flight strips, UTM): ground returns on the terrain and canopy
  returns below the local top height, with classification codes;
- field plots (CSV): square plots (default 1 ha, 100 m x 100 m, the size of biomass reference
  plots such as GEO-TREES'; a 20 m pixel's biomass is dominated by which few trees stand in it)
  with every tree's diameter, height, wood density and stem position, at geographic coordinates;
- a CO2 station (CSV): the real Mauna Loa record (statsmodels) as the atmospheric background plus
  a local biospheric seasonal cycle.

Two epochs four years apart: trees grow, clear-cuts and a fire remove biomass, so the true change
(sources and sinks) is known. Truth maps are written next to the sensors for evaluation only.

A region has a forest type (``FOREST_TYPES``: the species mix, the height-diameter curve's
asymptote, the stem density) and a season of acquisition (``SEASONS``: the share of leaves on the
deciduous, broadleaf trees, whose bare crowns look like bark and soil to the optical sensor; the
soil moisture the radar sees), so that regions for pretraining and for a transfer test differ the
way real landscapes do. The defaults (mixed forest, summer) give the generator's original regions.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hfmi_kit.errors import ConfigError

CARBON_FRACTION = 0.47  # IPCC default carbon fraction of dry wood


@dataclass(frozen=True)
class ForestType:
    """A forest type: ``mix_shift`` moves the conifer..broadleaf mix (logit; + broadleaf: denser
    wood), ``height_max_m`` is the height-diameter curve's asymptote, ``density_scale`` scales the
    stems per pixel."""

    mix_shift: float = 0.0
    height_max_m: float = 38.0
    density_scale: float = 1.0


@dataclass(frozen=True)
class Season:
    """A season of acquisition: ``leaf_on`` is the share of leaves on deciduous (broadleaf) crowns,
    ``moisture_shift`` moves the soil moisture (logit) the radar sees."""

    leaf_on: float = 1.0
    moisture_shift: float = 0.0


FOREST_TYPES: dict[str, ForestType] = {
    "mixed": ForestType(),
    "conifer": ForestType(mix_shift=-3.0, height_max_m=44.0, density_scale=1.3),  # spruce, fir: tall, light wood
    "broadleaf": ForestType(mix_shift=3.0, height_max_m=32.0, density_scale=0.8),  # beech, oak: dense wood
}
SEASONS: dict[str, Season] = {
    "summer": Season(),
    "spring": Season(leaf_on=0.5, moisture_shift=0.5),
    "winter": Season(leaf_on=0.05, moisture_shift=1.0),
}
_BARK = np.array([0.04, 0.06, 0.18, 0.22])  # blue, red, NIR, SWIR of bare crowns (bark, branches)


def chave_agb_kg(d_cm: Any, h_m: Any, rho: Any) -> np.ndarray:
    """Above-ground biomass of trees [kg], Chave et al. (2014) pantropical model with height."""
    return 0.0673 * (np.asarray(rho) * np.asarray(d_cm) ** 2 * np.asarray(h_m)) ** 0.976


@dataclass
class LandscapeConfig:
    """Settings of a generated region."""

    size: int = 128  # pixels per side at the 20 m reference resolution
    resolution_m: float = 20.0  # reference pixel size [m]
    epsg: int = 32633  # UTM zone 33N (central Europe)
    origin: tuple[float, float] = (500000.0, 5400000.0)  # upper-left corner (easting, northing) [m]
    epochs: tuple[int, ...] = (1997, 2001)  # years of the two acquisitions (within the Mauna Loa record)
    plots: int = 300  # permanent field plots, measured at every epoch
    plot_size_m: float = 100.0  # side of a square plot: 1 ha, the size of biomass reference plots
    cloud_fraction: float = 0.2  # share of optical pixels under clouds
    lidar_strips: int = 2  # flight strips (each ~18 % of the width)
    lidar_density: float = 0.08  # lidar returns per m2
    seed: int = 0
    forest: str = "mixed"  # a key of FOREST_TYPES
    season: str = "summer"  # a key of SEASONS


def _smooth_field(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal((n, n)), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-12)


@dataclass
class Trees:
    """Every tree of the region: pixel index (row * size + col), diameter, height, wood density."""

    pixel: np.ndarray
    d_cm: np.ndarray
    h_m: np.ndarray
    rho: np.ndarray

    def agb_map(self, size: int, area_ha: float) -> np.ndarray:
        """Biomass per pixel [Mg/ha]."""
        kg = np.bincount(self.pixel, weights=chave_agb_kg(self.d_cm, self.h_m, self.rho), minlength=size * size)
        return (kg / 1000.0 / area_ha).reshape(size, size)

    def top_height(self, size: int) -> np.ndarray:
        """Tallest tree per pixel [m] (0 where no tree)."""
        top = np.zeros(size * size)
        np.maximum.at(top, self.pixel, self.h_m)
        return top.reshape(size, size)


def simulate_trees(cfg: LandscapeConfig, rng: np.random.Generator) -> tuple[Trees, dict[str, np.ndarray]]:
    """Epoch-1 trees and the stand fields (forest mask, age, species mix, terrain)."""
    n, ft = cfg.size, FOREST_TYPES[cfg.forest]
    age = 1 / (1 + np.exp(-1.5 * _smooth_field(rng, n, 6)))  # 0..1 stand development
    forest = _smooth_field(rng, n, 10) > -0.6  # ~70 % forest, fields and clearings elsewhere
    density = np.where(forest, np.clip(6 + 3 * _smooth_field(rng, n, 4) + 10 * (1 - age), 1, 25)
                       * ft.density_scale, 0.0)
    mix = 1 / (1 + np.exp(-(_smooth_field(rng, n, 8) + ft.mix_shift)))  # conifer (light) .. broadleaf (dense wood)
    terrain = 300 + 40 * _smooth_field(rng, n, 20)
    counts = rng.poisson(density).ravel()
    pixel = np.repeat(np.arange(n * n), counts)
    a = age.ravel()[pixel]
    d = np.exp(rng.normal(np.log(8 + 32 * a), 0.25))
    h = 1.3 + ft.height_max_m * (1 - np.exp(-0.045 * d)) * np.exp(rng.normal(0, 0.1, d.size))
    rho = np.clip(rng.normal(0.42 + 0.25 * mix.ravel()[pixel], 0.05), 0.25, 0.9)
    return Trees(pixel, d, h, rho), {"forest": forest, "age": age, "mix": mix, "terrain": terrain}


def next_epoch(trees: Trees, cfg: LandscapeConfig, rng: np.random.Generator,
               years: int) -> tuple[Trees, np.ndarray]:
    """Growth over ``years`` and disturbances (two clear-cuts, one fire); returns the disturbance map."""
    n = cfg.size
    dist = np.zeros((n, n), dtype=np.int8)  # 0 none, 1 clear-cut, 2 fire
    for code, count, frac in ((1, 2, 0.12), (2, 1, 0.2)):
        for _ in range(count):
            w = int(n * frac)
            r, c = rng.integers(0, n - w, size=2)
            dist[r:r + w, c:c + w] = code
    dp = dist.ravel()[trees.pixel]
    keep = (dp == 0) | ((dp == 2) & (rng.random(dp.size) < 0.4))
    growth = 1 + years * rng.uniform(0.005, 0.02, dp.size)  # diameter growth per year
    d = trees.d_cm * growth
    h = 1.3 + (trees.h_m - 1.3) * growth ** 0.6
    return Trees(trees.pixel[keep], d[keep], h[keep], trees.rho[keep]), dist


def _transform(cfg: LandscapeConfig) -> Any:
    from rasterio.transform import from_origin

    return from_origin(cfg.origin[0], cfg.origin[1], cfg.resolution_m, cfg.resolution_m)


def write_geotiff(path: Path, data: np.ndarray, *, crs: Any, transform: Any, nodata: float | None,
                  band_names: list[str], units: str, description: str, cog: bool = False) -> Path:
    """Write (bands, rows, cols) float32 as GeoTIFF (or cloud-optimised GeoTIFF), atomically."""
    import rasterio

    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    profile = {"driver": "COG" if cog else "GTiff", "width": data.shape[2], "height": data.shape[1],
               "count": data.shape[0], "dtype": "float32", "crs": crs, "transform": transform, "nodata": nodata}
    if not cog:
        profile.update(tiled=True, blockxsize=64, blockysize=64, compress="deflate")
    else:
        profile.update(compress="deflate", blocksize=256, overview_resampling="average")
    try:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)
            for i, name in enumerate(band_names, start=1):
                dst.set_band_description(i, name)
                dst.update_tags(i, units=units)
            dst.update_tags(DESCRIPTION=description, units=units)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _optical(agb: np.ndarray, rng: np.random.Generator, cfg: LandscapeConfig, mix: np.ndarray) -> np.ndarray:
    fc = 1 - np.exp(-agb / 80.0)  # canopy fraction
    soil = np.array([0.08, 0.12, 0.25, 0.30])[:, None, None]
    leaf = np.array([0.02, 0.03, 0.45, 0.12])[:, None, None]
    bare = (1 - SEASONS[cfg.season].leaf_on) * mix[None]  # deciduous crowns without leaves
    leaf = leaf * (1 - bare) + _BARK[:, None, None] * bare
    refl = soil * (1 - fc) + leaf * fc + rng.normal(0, 0.008, (4, *agb.shape))
    clouds = _smooth_field(rng, cfg.size, 5) > np.quantile(_smooth_field(rng, cfg.size, 5), 1 - cfg.cloud_fraction)
    return np.where(clouds[None], -9999.0, np.clip(refl, 0.001, 1.0))


def _radar(agb: np.ndarray, moisture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    theta = np.deg2rad(38.0)
    t = np.exp(-2 * 0.004 * agb / np.cos(theta))
    out = []
    for s_veg, s_soil in ((0.12, 0.05), (0.03, 0.008)):  # VV, VH (linear power)
        s0 = s_veg * (1 - t) + s_soil * (0.6 + 0.8 * moisture) * t
        s0 = s0 * rng.gamma(4.0, 1 / 4.0, s0.shape)  # 4-look speckle
        out.append(10 * np.log10(s0))
    return np.stack(out)


def _to_geographic(data: np.ndarray, cfg: LandscapeConfig, res_deg: float) -> tuple[np.ndarray, Any, Any]:
    """Resample a UTM stack onto a geographic (EPSG:4326) grid of ``res_deg`` degrees."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.warp import Resampling, reproject, transform_bounds

    src_crs = rasterio.crs.CRS.from_epsg(cfg.epsg)
    dst_crs = rasterio.crs.CRS.from_epsg(4326)
    n = cfg.size
    left, bottom, right, top = transform_bounds(src_crs, dst_crs, cfg.origin[0], cfg.origin[1] - n * cfg.resolution_m,
                                                cfg.origin[0] + n * cfg.resolution_m, cfg.origin[1])
    w, h = int(np.ceil((right - left) / res_deg)), int(np.ceil((top - bottom) / res_deg))
    dst_t = from_origin(left, top, res_deg, res_deg)
    out = np.full((data.shape[0], h, w), -9999.0, dtype=np.float32)
    for b in range(data.shape[0]):
        reproject(data[b].astype(np.float32), out[b], src_transform=_transform(cfg), src_crs=src_crs,
                  dst_transform=dst_t, dst_crs=dst_crs, resampling=Resampling.average, src_nodata=-9999.0,
                  dst_nodata=-9999.0)
    return out, dst_t, dst_crs


def _lidar(path: Path, trees: Trees, fields: dict[str, np.ndarray], cfg: LandscapeConfig,
           rng: np.random.Generator) -> Path:
    import laspy

    n, res = cfg.size, cfg.resolution_m
    top = trees.top_height(n)
    width = n * res
    xs, ys, zs, cls = [], [], [], []
    for k in range(cfg.lidar_strips):
        x0 = (k + 0.5) * width / cfg.lidar_strips - 0.09 * width
        area = 0.18 * width * width
        m = rng.poisson(cfg.lidar_density * area)
        x = rng.uniform(x0, x0 + 0.18 * width, m)
        y = rng.uniform(0, width, m)
        col, row = (x // res).astype(int).clip(0, n - 1), (y // res).astype(int).clip(0, n - 1)
        ground = fields["terrain"][row, col]
        h = top[row, col]
        canopy = (h > 2) & (rng.random(m) < 0.7)
        z = np.where(canopy, ground + h * rng.beta(5, 1.5, m), ground + rng.normal(0, 0.05, m))
        xs.append(cfg.origin[0] + x)
        ys.append(cfg.origin[1] - y)
        zs.append(z)
        cls.append(np.where(canopy, 5, 2))  # ASPRS: 5 high vegetation, 2 ground
    header = laspy.LasHeader(point_format=6, version="1.4")
    # a fixed file creation date (laspy's default is today's): the same region made again is the
    # same bytes, so the checksum a checkpoint records of it still matches
    header.creation_date = datetime.date(2024, 7, 1)
    header.offsets = [cfg.origin[0], cfg.origin[1] - width, 0.0]
    header.scales = [0.01, 0.01, 0.01]
    from pyproj import CRS

    header.add_crs(CRS.from_epsg(cfg.epsg))
    las = laspy.LasData(header)
    las.x, las.y, las.z = np.concatenate(xs), np.concatenate(ys), np.concatenate(zs)
    las.classification = np.concatenate(cls).astype(np.uint8)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    las.write(str(tmp))
    tmp.replace(path)
    return path


def _station(cfg: LandscapeConfig, mean_agb: float, rng: np.random.Generator) -> Any:
    """Monthly CO2 at a regional station: Mauna Loa background + a local biospheric cycle."""
    import pandas as pd
    import statsmodels.api as sm

    ml = sm.datasets.co2.load_pandas().data["co2"].interpolate().resample("MS").mean()
    ml = ml[(ml.index.year >= cfg.epochs[0] - 2) & (ml.index.year <= cfg.epochs[-1])]
    amp = 2.0 + 0.02 * mean_agb  # stronger summer drawdown over more productive vegetation [ppm]
    local = -amp * np.cos(2 * np.pi * (ml.index.month.to_numpy() - 1.5) / 12 - np.pi) + rng.normal(0, 0.3, len(ml))
    return pd.DataFrame({"date": ml.index.strftime("%Y-%m-%d"), "co2_ppm": np.round(ml.to_numpy() + local, 2),
                         "background_ppm": np.round(ml.to_numpy(), 2), "station": "HFMI-synthetic tower",
                         "source": "background: Mauna Loa weekly record (statsmodels co2 dataset)"})


def generate_region(out_dir: str | Path, cfg: LandscapeConfig | None = None) -> Path:
    """Write a region: ``region.json``, per epoch ``optical.tif``, ``radar.tif``, ``lidar.laz``,
    ``plots.csv`` + ``trees.csv``, ``station_co2.csv`` and ``truth/`` maps. Returns the folder."""
    import pandas as pd
    import rasterio

    cfg = cfg or LandscapeConfig()
    if cfg.size % 32 or cfg.size < 64:
        raise ConfigError(f"LandscapeConfig.size must be a multiple of 32 and >= 64, got {cfg.size}")
    if len(cfg.epochs) != 2 or cfg.epochs[1] <= cfg.epochs[0]:
        raise ConfigError(f"LandscapeConfig.epochs must be two increasing years, got {cfg.epochs}")
    for key, table in (("forest", FOREST_TYPES), ("season", SEASONS)):
        if getattr(cfg, key) not in table:
            raise ConfigError(f"LandscapeConfig.{key}={getattr(cfg, key)!r}: expected one of {sorted(table)}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    area_ha = cfg.resolution_m**2 / 1e4
    trees1, fields = simulate_trees(cfg, rng)
    trees2, disturbance = next_epoch(trees1, cfg, rng, cfg.epochs[1] - cfg.epochs[0])
    crs = rasterio.crs.CRS.from_epsg(cfg.epsg)
    tr = _transform(cfg)
    n = cfg.size
    k = int(round(cfg.plot_size_m / cfg.resolution_m))
    if k < 1 or abs(k * cfg.resolution_m - cfg.plot_size_m) > 1e-6:
        raise ConfigError(f"LandscapeConfig.plot_size_m={cfg.plot_size_m} must be a whole number of "
                          f"{cfg.resolution_m} m pixels")
    slots = (n // k) ** 2  # plots sit on a lattice of k x k pixel cells, never overlapping
    if not 1 <= cfg.plots <= slots // 2:
        raise ConfigError(f"LandscapeConfig.plots={cfg.plots}: a {n}x{n} px region holds 1..{slots // 2} plots of "
                          f"{cfg.plot_size_m:g} m (at most half of its {slots} plot cells)")
    slot = rng.choice(slots, size=cfg.plots, replace=False)
    plot_r0, plot_c0 = (slot // (n // k)) * k, (slot % (n // k)) * k  # upper-left pixel of each plot
    owner = np.full((n, n), -1)
    for j, (r0, c0) in enumerate(zip(plot_r0, plot_c0)):
        owner[r0:r0 + k, c0:c0 + k] = j
    plot_rows, tree_rows, agb_maps = [], [], []
    from pyproj import Transformer

    to_geo = Transformer.from_crs(cfg.epsg, 4326, always_xy=True)
    moisture = 1 / (1 + np.exp(-(_smooth_field(rng, n, 12) + SEASONS[cfg.season].moisture_shift)))
    res = cfg.resolution_m
    for e, (year, trees) in enumerate(zip(cfg.epochs, (trees1, trees2))):
        d = root / f"epoch{e + 1}"
        agb = trees.agb_map(n, area_ha)
        agb_maps.append(agb)
        write_geotiff(d / "optical.tif", _optical(agb, rng, cfg, fields["mix"]), crs=crs, transform=tr, nodata=-9999.0,
                      band_names=["blue", "red", "nir", "swir"], units="reflectance",
                      description=f"synthetic Sentinel-2-like surface reflectance {year}")
        radar, rt, rcrs = _to_geographic(_radar(agb, moisture, rng), cfg, 0.0005)
        write_geotiff(d / "radar.tif", radar, crs=rcrs, transform=rt, nodata=-9999.0, band_names=["vv", "vh"],
                      units="dB", description=f"synthetic Sentinel-1-like backscatter {year}")
        _lidar(d / "lidar.laz", trees, fields, cfg, rng)
        write_geotiff(root / "truth" / f"agb_epoch{e + 1}.tif", agb, crs=crs, transform=tr, nodata=-9999.0,
                      band_names=["agb"], units="Mg ha-1", description=f"true above-ground biomass {year}")
        for j, (r0, c0) in enumerate(zip(plot_r0, plot_c0)):
            x, y = cfg.origin[0] + (c0 + k / 2) * res, cfg.origin[1] - (r0 + k / 2) * res
            lon, lat = to_geo.transform(x, y)
            plot_rows.append({"plot_id": f"P{j:04d}", "epoch": year, "lon": round(lon, 7), "lat": round(lat, 7),
                              "size_m": cfg.plot_size_m})
        tr_, tc_ = np.divmod(trees.pixel, n)
        sel = np.flatnonzero(owner[tr_, tc_] >= 0)
        j = owner[tr_[sel], tc_[sel]]
        # stem position east and north of the plot's south-west corner, anywhere in the tree's pixel
        xm = (tc_[sel] - plot_c0[j] + rng.uniform(0.05, 0.95, sel.size)) * res
        ym = (plot_r0[j] + k - 1 - tr_[sel] + rng.uniform(0.05, 0.95, sel.size)) * res
        for i, jj, xx, yy in zip(sel, j, xm, ym):
            tree_rows.append({"plot_id": f"P{jj:04d}", "epoch": year,
                              "dbh_cm": round(float(trees.d_cm[i]), 1),
                              "height_m": round(float(trees.h_m[i]), 1),
                              "wood_density_g_cm3": round(float(trees.rho[i]), 3),
                              "x_m": round(float(xx), 1), "y_m": round(float(yy), 1)})
    write_geotiff(root / "truth" / "disturbance.tif", disturbance.astype(np.float32), crs=crs, transform=tr,
                  nodata=None, band_names=["disturbance"], units="1",
                  description="0 none, 1 clear-cut, 2 fire between the epochs")
    pd.DataFrame(plot_rows).to_csv(root / "plots.csv", index=False)
    pd.DataFrame(tree_rows).to_csv(root / "trees.csv", index=False)
    _station(cfg, float(agb_maps[0].mean()), rng).to_csv(root / "station_co2.csv", index=False)
    from hfmi_kit.domains.carbon.sources import DEFAULT_SOURCES, sources_json

    meta = {
        "name": f"synthetic region {cfg.seed}", "epochs": list(cfg.epochs),
        "sources": sources_json(list(DEFAULT_SOURCES)),
        "grid": {"crs": f"EPSG:{cfg.epsg}", "resolution_m": cfg.resolution_m},
        "description": "generated forest landscape with known biomass (hfmi_kit carbon generator)",
        "licence": "CC0 (generated)", "generator": dataclasses.asdict(cfg),
        "truth": {"agb": [f"truth/agb_epoch{e + 1}.tif" for e in range(len(cfg.epochs))]},
    }
    (root / "region.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return root
