"""hfmi_kit: a notebook-first research environment for scientific foundation models."""

__version__ = "0.1.0"

from hfmi_kit.train.pretrained import load_pretrained, save_pretrained

__all__ = ["__version__", "load_pretrained", "save_pretrained"]
