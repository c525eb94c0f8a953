"""The Grindhammer-Peters shower parameterisation (GFlash), as pure functions.

G. Grindhammer and S. Peters, "The Parameterized Simulation of Electromagnetic
Showers in Homogeneous and Sampling Calorimeters", hep-ex/0001020. Constants
were checked against Geant4's GFlash (``GVFlashHomoShowerTuning``,
``GFlashSamplingShowerTuning``, ``GFlashSamplingShowerParameterisation``).

Units: depth t in radiation lengths X0, radius in Moliere radii R_M, energy E
in GeV, y = E / E_c, Z the (effective) atomic number. Every function takes
and returns arrays (broadcasting), holds no state and draws random numbers
only from the generator it is given.

Longitudinal profile of one shower: a Gamma distribution in t,
``dE/dt = E (beta t)^(alpha-1) beta exp(-beta t) / Gamma(alpha)``, with the
depth of the maximum T = (alpha - 1) / beta. Per shower, ln T and ln alpha
are drawn jointly normal. Radial profile at relative depth tau:
``f(r) = p 2 r R_C^2 / (r^2 + R_C^2)^2 + (1 - p) 2 r R_T^2 / (r^2 + R_T^2)^2``.

Two differences from the issue text, both following the paper and Geant4:
the ln T / ln alpha correlation is ``0.705 - 0.023 ln y`` (falling with
energy), and for individual showers the relative depth tau is measured from
the shower's own centre of gravity (:func:`relative_depth`), which reduces to
t / T for the average shower. ``k4 = 0.3585 + 0.0421 ln E`` follows the paper;
Geant4's tuning class has 0.0412 (a 0.6 % change of k4 at 1 TeV).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammainc, gammaln

# -- homogeneous media: average profile (hep-ex/0001020, sec. 2.1) -----------------------------------------
T_AVERAGE_OFFSET = -0.858               # T = ln y - 0.858
ALPHA_AVERAGE = (0.21, 0.492, 2.38)     # alpha = a1 + (a2 + a3 / Z) ln y

# -- homogeneous media: per-shower fluctuations (sec. 2.2) -------------------------------------------------
LOG_T_MEAN_OFFSET = -0.812              # <ln T> = ln(ln y - 0.812)
LOG_ALPHA_MEAN = (0.81, 0.458, 2.26)    # <ln alpha> = ln(a1 + (a2 + a3 / Z) ln y)
SIGMA_LOG_T = (-1.4, 1.26)              # sigma(ln T) = 1 / (s1 + s2 ln y)
SIGMA_LOG_ALPHA = (-0.58, 0.86)         # sigma(ln alpha) = 1 / (s1 + s2 ln y)
CORRELATION = (0.705, -0.023)           # rho(ln T, ln alpha) = r1 + r2 ln y

# -- sampling calorimeters: per-shower fluctuations (sec. 3; GFlashSamplingShowerTuning) -------------------
SAMPLING_LOG_T_SHIFT = (-0.55, -0.69)   # <ln T> = ln(exp<ln T_hom> + t1 / F_S + t2 (1 - e_hat))
SAMPLING_LOG_ALPHA_SHIFT = -0.476       # <ln alpha> = ln(exp<ln alpha_hom> + a1 / F_S)
SAMPLING_SIGMA_LOG_T = (-2.5, 1.25)
SAMPLING_SIGMA_LOG_ALPHA = (-0.82, 0.79)
SAMPLING_CORRELATION = (0.784, -0.023)

# -- energy spots (sec. 2.4 and 3.4) ------------------------------------------------------------------------
SPOT_T = (0.698, 0.00212)               # T_spot = T (t1 + t2 Z)
SPOT_ALPHA = (0.639, 0.00334)           # alpha_spot = alpha (a1 + a2 Z)
SPOT_COUNT = (93.0, 0.876)              # N_spot = n1 ln(Z) E^n2
SAMPLING_SPOT_T = (0.813, 0.0019)
SAMPLING_SPOT_ALPHA = (0.844, 0.0026)
SAMPLING_SPOT_COUNT = (10.3, 0.959)     # N_spot = n1 / c_S E^n2, c_S the stochastic term in sqrt(GeV)

# -- radial profile, homogeneous media (sec. 2.3) -----------------------------------------------------------
CORE_RADIUS = (0.0251, 0.00319, 0.1162, -0.000381)   # R_C = z1 + z2 tau; z1 = c1 + c2 ln E, z2 = c3 + c4 Z
TAIL_RADIUS = (0.659, -0.00309, 0.645, -2.59, 0.3585, 0.0421)
# R_T = k1 [exp(k3 (tau - k2)) + exp(k4 (tau - k2))]; k1 = t1 + t2 Z, k2, k3, k4 = t5 + t6 ln E
CORE_WEIGHT = (2.632, -0.00094, 0.401, 0.00187, 1.313, -0.0686)
# p = p1 exp((p2 - tau)/p3 - exp((p2 - tau)/p3)); p1 = c1 + c2 Z, p2 = c3 + c4 Z, p3 = c5 + c6 ln E

# -- radial profile, sampling corrections (sec. 3.3) --------------------------------------------------------
SAMPLING_CORE_RADIUS = (-0.0203, 0.0397)   # R_C += c1 (1 - e_hat) + c2 / F_S exp(-tau)
SAMPLING_TAIL_RADIUS = (-0.14, -0.495)     # R_T += t1 (1 - e_hat) + t2 / F_S exp(-tau)
SAMPLING_CORE_WEIGHT = (0.348, -0.642)     # p += (1 - e_hat) (c1 + c2 / F_S exp(-(tau - 1)^2))

# -- guards (ours / Geant4's) ---------------------------------------------------------------------------------
#: Largest sigma(ln T), sigma(ln alpha): the fitted 1 / (s1 + s2 ln y) diverges at small ln y (at y ~ 3 for
#: homogeneous media, y ~ 7 for sampling ones) and turns negative below; Geant4 caps both at 0.5.
MAX_LOG_SIGMA = 0.5
#: Energy (GeV) below which the simulator holds the fluctuation widths at their values at this energy.
#: Extrapolated below ~1 GeV the widths reach the 0.5 cap and produce a tail of showers with alpha near 1,
#: whose centre of gravity T alpha / (alpha - 1) lies beyond 15 X0 (2 % of 256 MeV showers in the
#: dataset-1 medium, against 0.4 % at 1 GeV); a 256 MeV shower is not that long.
WIDTH_FREEZE_GEV = 1.0
#: Smallest mean T and alpha - 1 fed to the logarithms, for y so small that ln y - 0.812 <= 0.
MIN_MEAN_T = 0.1
MIN_MEAN_ALPHA = 1.1
#: Per-shower floors: alpha > 1 keeps a maximum inside the medium, T >= 0.5 X0 keeps beta finite.
MIN_ALPHA = 1.1
MIN_T = 0.5
#: Smallest per-shower slope beta = (alpha - 1) / T in 1/X0. A shower cannot die out more slowly than its most
#: penetrating photons are absorbed: the photon attenuation length in lead peaks at ~24 g/cm^2 (~3.8 X0,
#: near 3.5 MeV; PDG review "Passage of particles through matter", photon attenuation figure), beta ~ 0.26.
#: Without the floor, the lower tail of the fitted fluctuations below ~2 GeV (alpha near 1 at small T) gives
#: profiles with 10-20 X0 decay lengths (6 % of 256 MeV showers have beta < 0.2; the median is 0.5-0.6).
MIN_BETA = 0.25
#: Smallest radii (R_M) and the core weight range, against unphysical extrapolation of the fits.
MIN_RADIUS = 1e-3


@dataclass(frozen=True)
class SamplingTerms:
    """What a sampling calorimeter adds to the homogeneous parameterisation:
    the sampling frequency F_S = X0_eff / (d_passive + d_active) and
    e_hat = 1 / (1 + 0.007 (Z_passive - Z_active))."""

    sampling_frequency: float
    e_hat: float


@dataclass(frozen=True)
class LongitudinalFluctuations:
    """Parameters of the joint normal of (ln T, ln alpha), arrays of one shape."""

    mean_log_t: np.ndarray
    sigma_log_t: np.ndarray
    mean_log_alpha: np.ndarray
    sigma_log_alpha: np.ndarray
    correlation: np.ndarray


# ---------------------------------------------------------------------------------------------------------
# longitudinal profile
# ---------------------------------------------------------------------------------------------------------
def log_y(energy_gev: np.ndarray, critical_energy_mev: float) -> np.ndarray:
    """ln y = ln(E / E_c), energy in GeV, critical energy in MeV."""
    return np.log(np.asarray(energy_gev, dtype=np.float64) * 1e3 / critical_energy_mev)


def average_shower_maximum(ln_y: np.ndarray) -> np.ndarray:
    """Depth of the maximum of the average profile in X0: T = ln y - 0.858."""
    return np.asarray(ln_y) + T_AVERAGE_OFFSET


def average_alpha(ln_y: np.ndarray, z: float) -> np.ndarray:
    """Shape parameter of the average profile: alpha = 0.21 + (0.492 + 2.38 / Z) ln y."""
    a1, a2, a3 = ALPHA_AVERAGE
    return a1 + (a2 + a3 / z) * np.asarray(ln_y)


def _inverse_linear_sigma(ln_y: np.ndarray, coefficients: tuple[float, float]) -> np.ndarray:
    denominator = coefficients[0] + coefficients[1] * np.asarray(ln_y)
    # Below 1 / MAX_LOG_SIGMA (including the divergence and negative values) use the cap.
    safe = np.where(denominator > 1.0 / MAX_LOG_SIGMA, denominator, 1.0 / MAX_LOG_SIGMA)
    return 1.0 / safe


def longitudinal_fluctuations(ln_y: np.ndarray, z: float, sampling: SamplingTerms | None = None, *,
                              min_ln_y_for_widths: float | None = None) -> LongitudinalFluctuations:
    """Mean, width and correlation of (ln T, ln alpha) for individual showers.

    Homogeneous media (``sampling=None``): <ln T> = ln(ln y - 0.812),
    <ln alpha> = ln(0.81 + (0.458 + 2.26/Z) ln y), sigma(ln T) = 1/(-1.4 + 1.26 ln y),
    sigma(ln alpha) = 1/(-0.58 + 0.86 ln y), rho = 0.705 - 0.023 ln y.
    Sampling calorimeters shift the means by the sampling frequency and e_hat
    and use their own widths and correlation (hep-ex/0001020, sec. 3).
    Guards: sigmas are capped at 0.5 (Geant4), mean T and alpha floored at 0.1
    and 1.1; with ``min_ln_y_for_widths`` the widths and the correlation are
    evaluated at max(ln y, that value), i.e. held constant below it (see
    :data:`WIDTH_FREEZE_GEV`).
    """
    ln_y = np.asarray(ln_y, dtype=np.float64)
    width_ln_y = ln_y if min_ln_y_for_widths is None else np.maximum(ln_y, min_ln_y_for_widths)
    a1, a2, a3 = LOG_ALPHA_MEAN
    mean_t = np.maximum(ln_y + LOG_T_MEAN_OFFSET, MIN_MEAN_T)
    mean_alpha = np.maximum(a1 + (a2 + a3 / z) * ln_y, MIN_MEAN_ALPHA)
    if sampling is None:
        sigmas_t, sigmas_alpha, rho = SIGMA_LOG_T, SIGMA_LOG_ALPHA, CORRELATION
    else:
        t1, t2 = SAMPLING_LOG_T_SHIFT
        mean_t = np.maximum(mean_t + t1 / sampling.sampling_frequency + t2 * (1.0 - sampling.e_hat), MIN_MEAN_T)
        mean_alpha = np.maximum(mean_alpha + SAMPLING_LOG_ALPHA_SHIFT / sampling.sampling_frequency,
                                MIN_MEAN_ALPHA)
        sigmas_t, sigmas_alpha, rho = SAMPLING_SIGMA_LOG_T, SAMPLING_SIGMA_LOG_ALPHA, SAMPLING_CORRELATION
    return LongitudinalFluctuations(
        mean_log_t=np.log(mean_t),
        sigma_log_t=_inverse_linear_sigma(width_ln_y, sigmas_t),
        mean_log_alpha=np.log(mean_alpha),
        sigma_log_alpha=_inverse_linear_sigma(width_ln_y, sigmas_alpha),
        correlation=np.clip(rho[0] + rho[1] * width_ln_y, -0.99, 0.99),
    )


def sample_longitudinal(fluctuations: LongitudinalFluctuations, rng: np.random.Generator
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Draw per-shower (T, alpha), each of the fluctuations' shape.

    Two standard normals z1, z2 give correlated ln T and ln alpha through
    sqrt((1 + rho)/2) z1 +- sqrt((1 - rho)/2) z2 (as in GFlash). Floors:
    T >= 0.5 X0, alpha >= 1.1 and alpha >= 1 + 0.25 T (slope beta >= 0.25 / X0,
    see :data:`MIN_BETA`).
    """
    shape = np.shape(fluctuations.mean_log_t)
    z1 = rng.standard_normal(shape)
    z2 = rng.standard_normal(shape)
    c1 = np.sqrt((1.0 + fluctuations.correlation) / 2.0)
    c2 = np.sqrt((1.0 - fluctuations.correlation) / 2.0)
    t = np.exp(fluctuations.mean_log_t + fluctuations.sigma_log_t * (c1 * z1 + c2 * z2))
    alpha = np.exp(fluctuations.mean_log_alpha + fluctuations.sigma_log_alpha * (c1 * z1 - c2 * z2))
    t = np.maximum(t, MIN_T)
    return t, np.maximum(alpha, np.maximum(MIN_ALPHA, 1.0 + MIN_BETA * t))


def gamma_profile_cdf(depth: np.ndarray, t_max: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Fraction of a Gamma profile (maximum t_max, shape alpha) deposited before
    ``depth`` (X0): P(alpha, beta t) with beta = (alpha - 1) / t_max."""
    beta = (np.asarray(alpha) - 1.0) / np.asarray(t_max)
    return gammainc(alpha, beta * np.maximum(depth, 0.0))


def gamma_profile_pdf(depth: np.ndarray, t_max: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(1/E) dE/dt of a Gamma profile in 1/X0."""
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = (alpha - 1.0) / np.asarray(t_max)
    x = beta * np.maximum(depth, 0.0)
    with np.errstate(divide="ignore"):
        return np.exp((alpha - 1.0) * np.log(x) - x - gammaln(alpha)) * beta


def spot_profile(t_max: np.ndarray, alpha: np.ndarray, z: float, sampling: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Maximum and shape of the spot-number profile: T_spot = T (0.698 + 0.00212 Z),
    alpha_spot = alpha (0.639 + 0.00334 Z); for sampling calorimeters
    (0.813 + 0.0019 Z) and (0.844 + 0.0026 Z). alpha_spot is floored at 1.1."""
    (t1, t2), (a1, a2) = (SAMPLING_SPOT_T, SAMPLING_SPOT_ALPHA) if sampling else (SPOT_T, SPOT_ALPHA)
    return np.asarray(t_max) * (t1 + t2 * z), np.maximum(np.asarray(alpha) * (a1 + a2 * z), MIN_ALPHA)


def spot_count(energy_gev: np.ndarray, z: float, stochastic_term: float | None = None) -> np.ndarray:
    """Expected number of energy spots per shower (float).

    Homogeneous: N = 93 ln(Z) E^0.876; sampling calorimeters with stochastic
    term c_S (sqrt(GeV)): N = 10.3 / c_S E^0.959 (as Geant4's sampling model).
    """
    e = np.asarray(energy_gev, dtype=np.float64)
    if stochastic_term is None:
        n1, n2 = SPOT_COUNT
        return n1 * np.log(z) * e ** n2
    n1, n2 = SAMPLING_SPOT_COUNT
    return n1 / stochastic_term * e ** n2


# ---------------------------------------------------------------------------------------------------------
# radial profile
# ---------------------------------------------------------------------------------------------------------
def relative_depth(depth: np.ndarray, t_max: np.ndarray, alpha: np.ndarray,
                   mean_alpha: np.ndarray) -> np.ndarray:
    """tau of an individual shower at ``depth`` (X0).

    The paper measures tau from the shower's own centre of gravity
    <t>_i = T_i alpha_i / (alpha_i - 1), scaled so that the average shower has
    tau = t / T: tau = t / <t>_i * a / (a - 1) with a = exp<ln alpha>.
    """
    centre = np.asarray(t_max) * np.asarray(alpha) / (np.asarray(alpha) - 1.0)
    a = np.asarray(mean_alpha)
    return np.asarray(depth) / centre * a / (a - 1.0)


def radial_parameters(tau: np.ndarray, energy_gev: np.ndarray, z: float,
                      sampling: SamplingTerms | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Core radius R_C, tail radius R_T (both in R_M) and core weight p at tau.

    Guards: radii >= 1e-3 R_M, p clipped to [0, 1] (the fitted p exceeds 1 at
    some depths once the sampling correction is added).
    """
    tau = np.asarray(tau, dtype=np.float64)
    ln_e = np.log(np.asarray(energy_gev, dtype=np.float64))
    c1, c2, c3, c4 = CORE_RADIUS
    core = (c1 + c2 * ln_e) + (c3 + c4 * z) * tau
    t1, t2, k2, k3, t5, t6 = TAIL_RADIUS
    k1, k4 = t1 + t2 * z, t5 + t6 * ln_e
    tail = k1 * (np.exp(k3 * (tau - k2)) + np.exp(k4 * (tau - k2)))
    w1, w2, w3, w4, w5, w6 = CORE_WEIGHT
    p1, p2, p3 = w1 + w2 * z, w3 + w4 * z, w5 + w6 * ln_e
    x = (p2 - tau) / p3
    weight = p1 * np.exp(x - np.exp(x))
    if sampling is not None:
        inv_fs, one_minus_e = 1.0 / sampling.sampling_frequency, 1.0 - sampling.e_hat
        core = core + SAMPLING_CORE_RADIUS[0] * one_minus_e + SAMPLING_CORE_RADIUS[1] * inv_fs * np.exp(-tau)
        tail = tail + SAMPLING_TAIL_RADIUS[0] * one_minus_e + SAMPLING_TAIL_RADIUS[1] * inv_fs * np.exp(-tau)
        weight = weight + one_minus_e * (SAMPLING_CORE_WEIGHT[0]
                                         + SAMPLING_CORE_WEIGHT[1] * inv_fs * np.exp(-(tau - 1.0) ** 2))
    return np.maximum(core, MIN_RADIUS), np.maximum(tail, MIN_RADIUS), np.clip(weight, 0.0, 1.0)


def radial_cdf(radius: np.ndarray, core_radius: np.ndarray, tail_radius: np.ndarray,
               core_weight: np.ndarray) -> np.ndarray:
    """Fraction of the energy within ``radius`` (R_M) of the axis:
    F(r) = p r^2 / (r^2 + R_C^2) + (1 - p) r^2 / (r^2 + R_T^2)."""
    r2 = np.square(radius)
    return core_weight * r2 / (r2 + np.square(core_radius)) + (1.0 - core_weight) * r2 / (r2 + np.square(tail_radius))


def sample_radius(u_component: np.ndarray, u_radius: np.ndarray, core_radius: np.ndarray,
                  tail_radius: np.ndarray, core_weight: np.ndarray) -> np.ndarray:
    """Radius (R_M) by inversion from two uniforms: the component is the core when
    u_component < p, then r = R sqrt(u / (1 - u))."""
    scale = np.where(u_component < core_weight, core_radius, tail_radius)
    return scale * np.sqrt(u_radius / (1.0 - u_radius))
