"""NeXus/NXmx metadata for simulated frames (HDF5 via h5py).

Vectors are written in the NeXus (McStas) frame: z along the beam, x along the
polarization (E-vector) direction projected off the beam, y = z x x.  Lengths in mm.
"""

from __future__ import annotations

import datetime

import numpy as np

from ..units import RTD


def lab_to_mcstas(model):
    """3x3 rotation taking nbragg lab vectors to the McStas frame of the NeXus standard."""
    z = np.asarray(model.detector.beam, dtype=float)
    p = np.asarray(model.detector.polar, dtype=float)
    x = p - z * float(p @ z)
    if np.linalg.norm(x) < 1e-9:
        x = np.cross([0.0, 1.0, 0.0], z)
        if np.linalg.norm(x) < 1e-9:
            x = np.cross([1.0, 0.0, 0.0], z)
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    return np.array([x, y, z])


def _str(group, name, value):
    group.create_dataset(name, data=np.bytes_(str(value)))


def _vector_attr(ds, kind, vector, depends_on=".", offset=None, units="mm"):
    ds.attrs["transformation_type"] = np.bytes_(kind)
    ds.attrs["vector"] = np.asarray(vector, dtype=float)
    ds.attrs["depends_on"] = np.bytes_(depends_on)
    ds.attrs["units"] = np.bytes_(units)
    if offset is not None:
        ds.attrs["offset"] = np.asarray(offset, dtype=float)
        ds.attrs["offset_units"] = np.bytes_("mm")


def _nx(group, cls):
    group.attrs["NX_class"] = np.bytes_(cls)
    return group


def write_nxmx(entry, model, nframes, data_path="/entry/data/data"):
    """Fill an NXentry group (already created, holding ``data/data``) with NXmx metadata
    describing ``model``'s geometry."""
    det = model.detector
    crys = model.crystal
    M = lab_to_mcstas(model)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    _nx(entry, "NXentry")
    _str(entry, "definition", "NXmx")
    _str(entry, "start_time", now)
    _str(entry, "end_time_estimated", now)
    data = entry["data"]
    _nx(data, "NXdata")
    data.attrs["signal"] = np.bytes_("data")

    src = _nx(entry.create_group("source"), "NXsource")
    _str(src, "name", "nbragg simulation")
    _str(src, "type", "Synchrotron X-ray Source")
    _str(src, "probe", "x-ray")

    inst = _nx(entry.create_group("instrument"), "NXinstrument")
    _str(inst, "name", "nbragg simulated beamline")
    beam = _nx(inst.create_group("beam"), "NXbeam")
    w = beam.create_dataset("incident_wavelength", data=model.wavelength * 1e10)
    w.attrs["units"] = np.bytes_("angstrom")
    fl = beam.create_dataset("total_flux", data=model.fluence)
    fl.attrs["units"] = np.bytes_("photons/m^2")
    pol = beam.create_dataset("incident_polarization_stokes",
                              data=np.tile([1.0, model.experiment.beam.polarization, 0.0, 0.0], (nframes, 1)))
    pol.attrs["units"] = np.bytes_("")
    sz = beam.create_dataset("incident_beam_size", data=np.array([0.1, 0.1]))
    sz.attrs["units"] = np.bytes_("mm")

    d = _nx(inst.create_group("detector"), "NXdetector")
    _str(d, "description", "nbragg simulated pixel detector (" + det.convention + " convention)")
    _str(d, "type", "pixel")
    _str(d, "sensor_material", "Si")
    th = d.create_dataset("sensor_thickness", data=det.thick * 1000.0)
    th.attrs["units"] = np.bytes_("mm")
    d.create_dataset("saturation_value", data=np.int64(65535))
    d.create_dataset("bit_depth_readout", data=np.int64(16))
    d.create_dataset("pixel_mask", data=np.zeros((det.spixels, det.fpixels), dtype=np.int32),
                     compression="gzip")
    d.create_dataset("distance_derived", data=np.bool_(True))
    d.create_dataset("underload_value", data=np.int64(-1))
    dist = d.create_dataset("distance", data=det.distance * 1000.0)
    dist.attrs["units"] = np.bytes_("mm")
    bx = d.create_dataset("beam_center_x", data=det.Fbeam / det.pixel)
    bx.attrs["units"] = np.bytes_("pixel")
    by = d.create_dataset("beam_center_y", data=det.Sbeam / det.pixel)
    by.attrs["units"] = np.bytes_("pixel")
    for name in ("x_pixel_size", "y_pixel_size"):
        p = d.create_dataset(name, data=det.pixel * 1000.0)
        p.attrs["units"] = np.bytes_("mm")
    ct = d.create_dataset("count_time", data=1.0)
    ct.attrs["units"] = np.bytes_("s")
    d["data"] = entry.file[data_path]
    dt = _nx(d.create_group("transformations"), "NXtransformations")
    # the detector sits where its first pixel's corner is: one translation from the sample
    origin = M @ det.pix0 * 1000.0
    olen = float(np.linalg.norm(origin))
    odir = origin / olen if olen > 0 else np.array([0.0, 0.0, 1.0])
    t = dt.create_dataset("origin", data=np.array([olen]))
    _vector_attr(t, "translation", odir)
    _str(d, "depends_on", "/entry/instrument/detector/transformations/origin")
    mod = _nx(d.create_group("module"), "NXdetector_module")
    mod.create_dataset("data_origin", data=np.array([0, 0], dtype=np.int64))
    mod.create_dataset("data_size", data=np.array([det.spixels, det.fpixels], dtype=np.int64))
    mod.create_dataset("data_stride", data=np.array([1, 1], dtype=np.int64))
    fast = M @ det.fdet
    slow = M @ det.sdet
    mo = mod.create_dataset("module_offset", data=np.array([0.0]))
    _vector_attr(mo, "translation", odir, depends_on="/entry/instrument/detector/transformations/origin")
    fp = mod.create_dataset("fast_pixel_direction", data=np.array([det.pixel * 1000.0]))
    _vector_attr(fp, "translation", fast, depends_on="/entry/instrument/detector/module/module_offset",
                 offset=[0.0, 0.0, 0.0])
    sp = mod.create_dataset("slow_pixel_direction", data=np.array([det.pixel * 1000.0]))
    _vector_attr(sp, "translation", slow, depends_on="/entry/instrument/detector/module/module_offset",
                 offset=[0.0, 0.0, 0.0])

    smp = _nx(entry.create_group("sample"), "NXsample")
    _str(smp, "name", "simulated nanocrystal")
    st = _nx(smp.create_group("transformations"), "NXtransformations")
    omega = st.create_dataset("phi", data=np.full(nframes, crys.phi0 * RTD))
    _vector_attr(omega, "rotation", M @ crys.spindle, units="deg")
    _str(smp, "depends_on", "/entry/sample/transformations/phi")
    a, b, c, al, be, ga = crys.cell
    uc = smp.create_dataset("unit_cell", data=np.array([[a, b, c, al, be, ga]]))
    uc.attrs["units"] = np.bytes_("angstrom, deg")
    return entry
