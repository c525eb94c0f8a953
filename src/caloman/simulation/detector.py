"""The simulated detectors: one small declarative table per binning family.

Everything the shower simulator knows about a calorimeter lives here: the
materials (PDG values), the sampling structure they form (from which the
effective Z, X0, Moliere radius and critical energy follow, Grindhammer &
Peters, hep-ex/0001020, section 3), the depth interval of every readout layer
in radiation lengths, the energy resolution terms, the upstream material and
the readout noise. Radial and angular bin edges are *not* here: they come
from the binning XML, so any cylindrical binning of a known family works.

Two families are defined:

* ``ATLAS_LIKE`` (dataset-1 photon and pion binnings): a lead / liquid-argon
  accordion calorimeter at small |eta| followed by the first tile-calorimeter
  samplings, layer ids as in ATLAS (0 presampler, 1 strips, 2 middle, 3 back,
  12-14 tile barrel). It is ATLAS-*like*, not the ATLAS geometry: the depths are
  rounded literature values.
* ``siw_detector(n_layers)`` (datasets 2 and 3): the Geant4 ``Par04`` example
  the CaloChallenge used, tungsten 1.4 mm + silicon 0.3 mm, two such pairs
  per readout layer, 45 readout layers.

Units: lengths in mm, depths in radiation lengths (X0) of the calorimeter's
effective medium, energies in MeV unless a name says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from caloman.errors import BinningError
from caloman.geometry import Binning, load_binning

#: Rossi's scale energy E_s in MeV, as used by the PDG for R_M = E_s X0 / E_c.
SCALE_ENERGY_MEV = 21.2052


@dataclass(frozen=True)
class Material:
    """A pure material, values from the PDG "Atomic and nuclear properties of
    materials" tables (pdg.lbl.gov/AtomicNuclearProperties); E_c is the PDG
    critical energy for electrons."""

    name: str
    z: float                     # atomic number
    a: float                     # atomic mass, g/mol
    density: float               # g/cm^3
    radiation_length_mm: float   # X0
    critical_energy_mev: float   # E_c (electrons)
    moliere_radius_mm: float     # R_M


LEAD = Material("Pb", z=82, a=207.2, density=11.35, radiation_length_mm=5.612,
                critical_energy_mev=7.43, moliere_radius_mm=16.02)            # PDG, lead
LIQUID_ARGON = Material("LAr", z=18, a=39.948, density=1.396, radiation_length_mm=140.0,
                        critical_energy_mev=32.84, moliere_radius_mm=90.43)   # PDG, liquid argon
TUNGSTEN = Material("W", z=74, a=183.84, density=19.3, radiation_length_mm=3.504,
                    critical_energy_mev=7.97, moliere_radius_mm=9.327)        # PDG, tungsten
SILICON = Material("Si", z=14, a=28.0855, density=2.329, radiation_length_mm=93.70,
                   critical_energy_mev=40.19, moliere_radius_mm=49.44)        # PDG, silicon


@dataclass(frozen=True)
class SamplingStructure:
    """A periodic passive / active stack and the effective medium it forms.

    Mixture rules of Grindhammer & Peters (hep-ex/0001020, eqs. for Z_eff,
    X0_eff, R_M,eff, E_c,eff), written with thickness fractions v_i:
    Z_eff = sum w_i Z_i (w_i mass fractions), 1/X0 = sum v_i / X0_i,
    1/R_M = sum v_i / R_M,i, E_c = X0 sum v_i E_c,i / X0_i. The sampling
    frequency F_S = X0_eff / (d_passive + d_active) and
    e_hat = 1 / (1 + 0.007 (Z_passive - Z_active)) enter the sampling
    corrections of the shower parameters.
    """

    passive: Material
    passive_mm: float
    active: Material
    active_mm: float

    @property
    def period_mm(self) -> float:
        return self.passive_mm + self.active_mm

    def _volume_fractions(self) -> tuple[float, float]:
        return self.passive_mm / self.period_mm, self.active_mm / self.period_mm

    @cached_property
    def z_eff(self) -> float:
        mp = self.passive_mm * self.passive.density
        ma = self.active_mm * self.active.density
        return (mp * self.passive.z + ma * self.active.z) / (mp + ma)

    @cached_property
    def radiation_length_mm(self) -> float:
        vp, va = self._volume_fractions()
        return 1.0 / (vp / self.passive.radiation_length_mm + va / self.active.radiation_length_mm)

    @cached_property
    def moliere_radius_mm(self) -> float:
        vp, va = self._volume_fractions()
        return 1.0 / (vp / self.passive.moliere_radius_mm + va / self.active.moliere_radius_mm)

    @cached_property
    def critical_energy_mev(self) -> float:
        vp, va = self._volume_fractions()
        return self.radiation_length_mm * (vp * self.passive.critical_energy_mev / self.passive.radiation_length_mm
                                           + va * self.active.critical_energy_mev / self.active.radiation_length_mm)

    @cached_property
    def sampling_frequency(self) -> float:
        """F_S = X0_eff / (d_passive + d_active): samplings per radiation length."""
        return self.radiation_length_mm / self.period_mm

    @cached_property
    def e_hat(self) -> float:
        """e/mip ratio estimate 1 / (1 + 0.007 (Z_passive - Z_active)) (hep-ex/0001020)."""
        return 1.0 / (1.0 + 0.007 * (self.passive.z - self.active.z))


@dataclass(frozen=True)
class LayerSpec:
    """Depth interval [depth_start, depth_end) of one readout layer, in X0 of the
    effective medium measured from the front of all material (upstream
    included), and, where it differs from the detector's, the layer's own
    stochastic (sampling) term in sqrt(GeV)."""

    layer_id: int
    depth_start: float
    depth_end: float
    stochastic_term: float | None = None
    note: str = ""

    @property
    def thickness(self) -> float:
        return self.depth_end - self.depth_start


@dataclass(frozen=True)
class DetectorSpec:
    """A simulated calorimeter: effective medium, layers, resolution and noise.

    ``upstream_x0`` is dead material in front of the first layer (the shower
    starts at depth 0, its front). With ``upstream_recovered`` the energy
    deposited there is added to the first layer, as a presampler-based
    upstream correction restores it on average; otherwise it is lost. Gaps
    between layer intervals and everything behind the last layer are lost.
    Lateral leakage beyond a layer's outermost r edge is lost.
    """

    name: str
    medium: SamplingStructure
    layers: tuple[LayerSpec, ...]
    upstream_x0: float
    upstream_recovered: bool
    stochastic_term: float        # sampling term c_S in sqrt(GeV): sigma_E / E = c_S / sqrt(E / GeV)
    constant_term: float          # relative, applied per shower
    noise_mev: float              # Gaussian readout noise per voxel (sigma, MeV), added last, output clipped at 0
    energy_scale: float = 1.0     # calibration factor applied to every voxel
    source: str = ""

    def stochastic_term_of(self, layer_id: int) -> float:
        """The sampling term of one layer (its own, or the detector's)."""
        own = self.layer(layer_id).stochastic_term
        return self.stochastic_term if own is None else own

    def layer(self, layer_id: int) -> LayerSpec:
        for spec in self.layers:
            if spec.layer_id == layer_id:
                return spec
        raise BinningError(
            f"detector '{self.name}' has no layer {layer_id}; the binning needs a detector table with that layer "
            "(see caloman.simulation.detector)")

    @property
    def depth_end(self) -> float:
        return max(spec.depth_end for spec in self.layers)

    def describe(self) -> str:
        m = self.medium
        return (f"{self.name}: {m.passive.name} {m.passive_mm} mm / {m.active.name} {m.active_mm} mm, "
                f"Z_eff {m.z_eff:.1f}, X0 {m.radiation_length_mm:.2f} mm, R_M {m.moliere_radius_mm:.2f} mm, "
                f"E_c {m.critical_energy_mev:.2f} MeV, F_S {m.sampling_frequency:.2f}, e_hat {m.e_hat:.3f}")


# -- dataset 1: ATLAS-like lead / liquid argon barrel at |eta| ~ 0.2 ----------------------------------------
#: ATLAS EM barrel accordion for |eta| < 0.8: 1.53 mm lead absorbers, 2 x 2.1 mm liquid-argon gaps per
#: absorber (ATLAS Collaboration, JINST 3 (2008) S08003, ch. 5). The 2 x 0.2 mm steel cladding, glue and
#: kapton electrodes are neglected. Effective medium: X0 ~ 19 mm, R_M ~ 40 mm.
ATLAS_LAR_BARREL = SamplingStructure(passive=LEAD, passive_mm=1.53, active=LIQUID_ARGON, active_mm=4.2)

ATLAS_LIKE = DetectorSpec(
    name="atlas-like-lar-barrel",
    medium=ATLAS_LAR_BARREL,
    layers=(
        # Presampler (11 mm LAr, ~0.1 X0) behind ~2 X0 of inner detector, solenoid and cryostat at small |eta|
        # (material budget in JINST 3 S08003, ch. 5); the upstream energy is recovered into this layer, so its
        # resolution term (our choice: 20 %/sqrt(E)) is that of an upstream correction, worse than the accordion's.
        LayerSpec(0, 2.0, 2.5, stochastic_term=0.20, note="presampler + recovered upstream energy"),
        # Strips ~4.5 X0, middle ~16 X0, back ~2 X0 at small |eta| (accordion depths, JINST 3 S08003, ch. 5).
        LayerSpec(1, 2.5, 7.0, note="EM barrel strips, 4.5 X0"),
        LayerSpec(2, 7.0, 23.0, note="EM barrel middle, 16 X0"),
        LayerSpec(3, 23.0, 25.0, note="EM barrel back, 2 X0"),
        # Cryostat back wall (~1.5 X0, dead) then the tile barrel samplings A, BC, D (~1.5, 4.1, 1.8 lambda at
        # eta = 0, JINST 3 S08003, ch. 5) expressed in X0 of the effective medium (1 lambda ~ 9.5 X0 of
        # iron-scintillator); their coarse sampling is modelled by a 50 %/sqrt(E) stochastic term (our choice).
        LayerSpec(12, 26.5, 41.0, stochastic_term=0.50, note="tile barrel A (TileBar0)"),
        LayerSpec(13, 41.0, 80.0, stochastic_term=0.50, note="tile barrel BC (TileBar1)"),
        LayerSpec(14, 80.0, 97.0, stochastic_term=0.50, note="tile barrel D (TileBar2)"),
    ),
    upstream_x0=2.0,
    upstream_recovered=True,
    # ATLAS EM calorimeter design resolution 10 %/sqrt(E) (+) 0.7 % (JINST 3 S08003, Table 1.1).
    stochastic_term=0.10,
    constant_term=0.007,
    # Readout noise sigma 0.05 MeV per voxel: 5 % of the 1 MeV threshold the evaluation applies (20 sigma, it never
    # crosses it), so every thresholded feature is unaffected. Not the ATLAS electronics (tens of MeV per cell),
    # which the CaloChallenge Geant4 files do not contain either: a stand-in for the sub-threshold floor of a
    # readout, so that raw voxels the shower missed are not all exactly zero and downstream code must cope.
    # Voxel energies are continuous without it (every spot's energy fluctuates, see the simulator).
    noise_mev=0.05,
    source="ATLAS-like (JINST 3 (2008) S08003), materials PDG; a parameterised detector, not the ATLAS geometry",
)


# -- datasets 2 and 3: the Par04 silicon-tungsten sampling calorimeter -------------------------------------
#: Geant4 example Par04 (CaloChallenge datasets 2/3): 1.4 mm W + 0.3 mm Si per physical layer
#: (examples/extended/parameterisations/Par04/examplePar04.mac). Effective medium: X0 ~ 4.2 mm, R_M ~ 10.9 mm.
PAR04_SIW = SamplingStructure(passive=TUNGSTEN, passive_mm=1.4, active=SILICON, active_mm=0.3)

#: Physical W/Si pairs per readout layer (Par04 readout cells of 3.4 mm along the shower axis).
PAR04_PAIRS_PER_READOUT_LAYER = 2

#: CALICE Si-W ECAL physics prototype: 16.5 %/sqrt(E) (+) 1.1 % (NIM A 608 (2009) 372).
SIW_STOCHASTIC_TERM = 0.165
SIW_CONSTANT_TERM = 0.011


def siw_detector(n_layers: int = 45) -> DetectorSpec:
    """A uniform Si-W sampling calorimeter of ``n_layers`` readout layers, each
    two W/Si pairs deep (~0.81 X0), starting at depth 0 (no upstream material)."""
    if n_layers < 1:
        raise BinningError(f"a sampling calorimeter needs at least one layer, got {n_layers}")
    step = PAR04_PAIRS_PER_READOUT_LAYER * PAR04_SIW.period_mm / PAR04_SIW.radiation_length_mm
    layers = tuple(LayerSpec(i, i * step, (i + 1) * step, note="2 x (1.4 mm W + 0.3 mm Si)")
                   for i in range(n_layers))
    return DetectorSpec(
        name=f"par04-siw-{n_layers}",
        medium=PAR04_SIW,
        layers=layers,
        upstream_x0=0.0,
        upstream_recovered=False,
        stochastic_term=SIW_STOCHASTIC_TERM,
        constant_term=SIW_CONSTANT_TERM,
        # 5 % of the 15.15 keV datasets-2/3 evaluation threshold.
        noise_mev=0.05 * 0.5e-3 / 0.033,
        source="Geant4 example Par04 (CaloChallenge datasets 2/3), materials PDG, resolution CALICE SiW ECAL",
    )


#: Detector used for each built-in binning name.
DETECTORS_BY_BINNING = {
    "ds1-photons": ATLAS_LIKE,
    "ds1-pions": ATLAS_LIKE,
    "ds2": siw_detector(45),
    "ds3": siw_detector(45),
}


def detector_for(binning: str | Binning) -> DetectorSpec:
    """The detector table for a binning: by built-in name, otherwise by family
    (photon / pion binnings -> ATLAS-like, others -> a Si-W stack with one
    readout layer per binning layer). Raises :class:`BinningError` when a layer
    holding voxels has no depth interval in the table."""
    binning = load_binning(binning)
    if binning.name in DETECTORS_BY_BINNING:
        detector = DETECTORS_BY_BINNING[binning.name]
    elif binning.is_dataset1:
        detector = ATLAS_LIKE
    else:
        detector = siw_detector(len(binning.layers))
    for layer_id in binning.relevant_layers:
        detector.layer(layer_id)  # raises with a clear message when missing
    return detector
