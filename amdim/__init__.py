"""AMDIM (Bachman, Hjelm, Buchwalter, NeurIPS 2019) in pure PyTorch.

This package is the method and its single-process trainer. It imports neither Ray nor MLflow at
module level, so it runs and is measured on a machine that has only torch.
"""

__version__ = "0.1.0"
