"""caloman: fast, faithful calorimeter shower generation on learned manifolds."""

from caloman.geometry import Binning, load_binning

__all__ = ["Binning", "load_binning", "__version__"]
__version__ = "0.1.0"
