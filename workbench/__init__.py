"""A research workbench for six CVPR 2024 diffusion papers, on an offline toy world and a small model zoo."""

__version__ = "0.1.0"
