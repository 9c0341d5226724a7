"""Physical constants and unit helpers.  Everything inside the package is SI."""

import math

#: Thomson cross-section r_e^2 in m^2 (the value nanoBragg.c uses)
R_E_SQR = 7.94079248018965e-30
#: Avogadro's number (nanoBragg.c's value)
AVOGADRO = 6.02214179e23
#: hc in eV*Angstrom, as used by nanoBragg.c to turn -energy into a wavelength
HC_EV_ANGSTROM = 12398.42
#: nanoBragg.c's default fluence in photons/m^2
DEFAULT_FLUENCE = 125932015286227086360700780544.0
#: forward-scattering structure factor and molecular weight of water (background model)
WATER_F = 2.57
WATER_MW = 18.0

ANGSTROM = 1e-10
MM = 1e-3
UM = 1e-6
RTD = 180.0 * (1.0 / math.pi)  # degrees per radian, computed as nanoBragg.c does
DTR = 1.0 / RTD


def deg2rad(x):
    """Degrees to radians, dividing by RTD exactly as nanoBragg.c does (``atof()/RTD``)."""
    return x / RTD


def energy_to_wavelength(ev):
    """Photon energy in eV to wavelength in Angstrom."""
    return HC_EV_ANGSTROM / ev
