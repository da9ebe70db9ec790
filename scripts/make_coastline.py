"""Derive the coastline that hfmi's maps draw offline from Natural Earth's 1:110m countries.

Natural Earth (https://www.naturalearthdata.com) is in the public domain. The countries layer
(``ne_110m_admin_0_countries``) comes, without network access at run time, from the
``naturalearth_lowres`` dataset that geopandas 0.14 shipped in its wheel:

    pip download --no-deps geopandas==0.14.4 && unzip geopandas-0.14.4-py3-none-any.whl \
        'geopandas/datasets/naturalearth_lowres/*'
    pip install --target /tmp/pyshp pyshp
    PYTHONPATH=/tmp/pyshp python scripts/make_coastline.py geopandas/datasets/naturalearth_lowres/naturalearth_lowres

The land is the union of the country polygons; its boundary (land borders dissolved) is the
coastline, written as one float32 array of (lon, lat) vertices in degrees with NaN rows between
lines to ``hfmi_kit/viz/data/ne_110m_coastline.npz`` (read with ``allow_pickle=False``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import shapefile  # pyshp: needed only to run this script
from shapely.geometry import shape
from shapely.ops import unary_union

OUT = Path(__file__).resolve().parents[1] / "hfmi_kit" / "viz" / "data" / "ne_110m_coastline.npz"


def main(countries: str) -> None:
    reader = shapefile.Reader(countries)
    land = unary_union([shape(s.__geo_interface__).buffer(0) for s in reader.shapes()])
    lines = []
    for poly in getattr(land, "geoms", [land]):
        for ring in (poly.exterior, *poly.interiors):
            lines += _coast(np.asarray(ring.coords, dtype=np.float64))
    sep = np.full((1, 2), np.nan, np.float32)
    xy = np.concatenate([part for line in lines for part in (line.astype(np.float32), sep)][:-1])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, lonlat=xy, source=np.array("Natural Earth 1:110m countries (public domain), "
                                                        "land borders dissolved"))
    print(f"{OUT}: {len(lines)} lines, {len(xy)} vertices")


def _coast(ring: np.ndarray) -> list[np.ndarray]:
    """A polygon ring cut where it runs along the map's edge (the antimeridian, the south pole's
    latitude), which is not coast: the runs of coast between."""
    a, b = ring[:-1], ring[1:]
    edge = ((np.abs(a[:, 0]) > 179.99) & (np.abs(b[:, 0]) > 179.99)) | ((a[:, 1] < -89.9) & (b[:, 1] < -89.9))
    runs, start = [], 0
    for i in np.flatnonzero(edge):
        if i > start:
            runs.append(ring[start:i + 1])
        start = i + 1
    if start < len(ring) - 1:
        runs.append(ring[start:])
    return [r for r in runs if len(r) > 1]


if __name__ == "__main__":
    main(sys.argv[1])
