"""The built-in shower source: a parameterised electromagnetic shower simulator.

GFlash-style (Grindhammer & Peters, hep-ex/0001020): correlated per-shower
Gamma longitudinal profiles, two-component radial profiles, energy spots,
sampling fluctuations, calibration and noise, written in the CaloChallenge
format for any cylindrical binning. A parameterisation, not Geant4; EM
(photon / electron) showers only.

* :mod:`caloman.simulation.detector` - the declarative detector tables;
* :mod:`caloman.simulation.gflash` - the physics, as pure functions;
* :mod:`caloman.simulation.energies` - incident-energy ladders and ranges;
* :mod:`caloman.simulation.simulator` - :func:`simulate_showers`, :func:`simulate_to_file`.
"""

from caloman.simulation.detector import ATLAS_LIKE, DetectorSpec, detector_for, siw_detector
from caloman.simulation.energies import ladder_energies, loguniform_energies, parse_energy_spec
from caloman.simulation.simulator import block_size, simulate_showers, simulate_to_file

__all__ = [
    "ATLAS_LIKE",
    "DetectorSpec",
    "block_size",
    "detector_for",
    "ladder_energies",
    "loguniform_energies",
    "parse_energy_spec",
    "simulate_showers",
    "simulate_to_file",
    "siw_detector",
]
