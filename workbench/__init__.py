"""MoE Workbench: a Jupyter-native research workbench for DeepSeek-style MoE + MLA models."""

__version__ = "0.1.0"
