"""Typed errors raised for user-facing problems.

Every error says which file or object is at fault and what to do about it.
"""

from __future__ import annotations


class CalomanError(Exception):
    """Base class of every error caloman raises for bad input or state."""


class BinningError(CalomanError):
    """A binning XML file is missing, unreadable or malformed."""


class ShowerFileError(CalomanError):
    """A CaloChallenge HDF5 file is missing, corrupt or inconsistent."""


class VoxelCountError(ShowerFileError):
    """The number of voxels in a file does not match the binning."""


class InvalidEnergyError(CalomanError):
    """Energies are NaN, infinite, negative or otherwise unphysical."""


class EnergyRangeError(CalomanError):
    """Requested incident energies lie outside the range a model was trained on."""


class RunDirectoryError(CalomanError):
    """A training run directory is missing files or holds corrupt ones."""


class TrainingDivergedError(CalomanError):
    """A loss became NaN or infinite during training."""


class ConfigError(CalomanError):
    """A configuration file or option is invalid."""


class ExportError(CalomanError):
    """A trained model cannot be exported as asked (or the export packages are missing)."""


class ShardError(ShowerFileError):
    """Parts of a sharded generation do not form one complete, consistent sample."""
