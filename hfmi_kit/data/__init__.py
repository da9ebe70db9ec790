"""Format readers (CF NetCDF/Zarr) and generic sampling shared by domains."""

from hfmi_kit.data.cf import Axes, find_axes, open_cf, regrid_bilinear, write_cf

__all__ = ["Axes", "find_axes", "open_cf", "regrid_bilinear", "write_cf"]
