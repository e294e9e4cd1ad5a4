"""sparsealign: sparse preference optimisation (SparsePO, MaPO, FPO) and the DPO family.

Importing the package is cheap; torch and transformers load only when a submodule that needs them is used.
"""

__version__ = "0.1.0"
