"""Launchers: headless notebook runs (papermill) and, under torchrun, the process group."""

from hfmi_kit.launch.notebook import read_notebook, run_notebook

__all__ = ["read_notebook", "run_notebook"]
