"""The energy-per-layer model p(E_0, ..., E_{L-1} | E_inc): CaloFlow's Flow I
(Krause & Shih 2021, section 4.1), used by CaloMan's per-layer variant and
meant to be reused by a CaloFlow model.

The layer energies are encoded by
:class:`caloman.preprocessing.LayerEnergyEncoding` (u-variables in logit space,
within +-13.82) and modelled by a :class:`ConditionalFlow` whose splines act
on [-14, 14] (CaloFlow's tail bound). The owner encodes the incident energy
into the condition (CaloMan: log E_inc scaled to [0, 1]) and turns sampled
features back into MeV with the same encoding, which conserves energy by
construction. Coupling transforms replace CaloFlow's MADE blocks so sampling
needs one network pass per transform.
"""

from __future__ import annotations

from torch import Tensor, nn

from caloman.models.flows import ConditionalFlow

#: Spline (co)domain for logit-space u-variables: logit(1 - 1e-6) = 13.82 (CaloFlow's B = 14).
LOGIT_BOUND = 14.0


class LayerEnergyModel(nn.Module):
    """A conditional flow over the L encoded layer energies.

    Arguments:
        n_layers: L, the number of layers holding voxels.
        context: size of the condition (1: the scaled incident energy).
        transforms, hidden, bins, hypernet: see :class:`ConditionalFlow`.
    """

    def __init__(self, n_layers: int, context: int = 1, transforms: int = 4, hidden: tuple[int, ...] = (64, 64),
                 bins: int = 8, hypernet: str = "mlp") -> None:
        super().__init__()
        self.n_layers = n_layers
        self.flow = ConditionalFlow(n_layers, context, transforms=transforms, hidden=hidden, bins=bins,
                                    bound=LOGIT_BOUND, hypernet=hypernet)

    def log_prob(self, features: Tensor, condition: Tensor) -> Tensor:
        """log p(features | condition), shape (n,), for encoded energies (n, L) and condition (n, c)."""
        return self.flow.log_prob(features, condition)

    def loss(self, features: Tensor, condition: Tensor) -> Tensor:
        """Mean negative log-likelihood of a batch."""
        return -self.log_prob(features, condition).mean()

    def sample(self, condition: Tensor) -> Tensor:
        """Encoded layer energies (n, L), one per row of condition (n, c)."""
        return self.flow.sample(condition)

    def from_noise(self, noise: Tensor, condition: Tensor) -> Tensor:
        """Encoded layer energies (n, L) for standard-normal base noise (n, L) and condition (n, c)."""
        return self.flow.transform_inverse(noise, condition)
