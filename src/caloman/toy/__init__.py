"""Known-truth experiments: LaSeR's 2-D toys (arXiv:2106.00792, sec. 4) and densities on
known manifolds for M-flows (arXiv:2003.13913).

Registries, each extended by one entry: :data:`~caloman.toy.datasets.DATASETS`
(name -> sampler), :data:`~caloman.toy.methods.METHODS` (name -> train-and-sample),
:data:`~caloman.toy.metrics.METRICS` (name -> distance). :func:`run_toy` runs one
dataset x method; ``caloman toy`` is its command line.
"""

from caloman.toy import (
           implicit_methods,  # noqa: F401  (registers ebim and pushforward)
           manifold_methods,  # noqa: F401  (registers the manifold toys' methods)
)
from caloman.toy.datasets import DATASETS, ToyDataset, register_dataset
from caloman.toy.experiment import ToyResult, full_settings, quick_settings, run_toy
from caloman.toy.methods import METHODS, MethodOutput, ToySettings, register_method
from caloman.toy.metrics import METRICS

__all__ = ["DATASETS", "METHODS", "METRICS", "MethodOutput", "ToyDataset", "ToyResult", "ToySettings",
           "full_settings", "quick_settings", "register_dataset", "register_method", "run_toy"]
