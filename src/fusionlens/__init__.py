"""fusionlens: explain (LMD) and prune (AlterMOMA) multi-sensor fusion perception networks."""

from fusionlens.decompose import Decomposition, decompose

__version__ = "0.1.0"
__all__ = ["decompose", "Decomposition", "__version__"]
