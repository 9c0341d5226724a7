"""NeXus/NXmx metadata for simulated frames (HDF5 via h5py).

Vectors are written in the NeXus (McStas) frame: z along the beam, x along the
polarization (E-vector) direction projected off the beam, y = z x x.  Lengths in mm.

Detector layout.  One panel: data (frames, slow, fast) and one NXdetector_module
``module`` with data_origin [0, 0], data_size [slow, fast].  P > 1 panels: data
(frames, P, slow, fast) and modules ``module_<k>`` (k zero-padded to the width of P - 1,
so that readers listing groups by name meet them in panel order), each with
data_origin [k, 0, 0], data_size [1, slow, fast], and pixel_mask (P, slow, fast): the
rank-4 layout that dxtbx's NXmx writer produces and its reader slices module by module
(NXmx allows data of rank 3 or 4 and module origins of 2 or 3 indices).

Geometry chain, translations only (a reader then needs no rotation to place a pixel):
fast_pixel_direction and slow_pixel_direction (unit vectors along the panel's axes, the
pixel size as value, offset 0) depend on the module's module_offset (from the detector's
origin to the outer corner of the panel's pixel (0, 0)), which depends on
detector/transformations/origin (from the sample to the first panel's pixel (0, 0)),
which depends on ".".  The detector's own depends_on names that origin.
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


def module_names(count):
    """One NXdetector_module group name per panel: "module" for a single panel, else
    "module_<k>" for panel k of the image's panel axis, k zero-padded to one width."""
    if count == 1:
        return ["module"]
    width = len(str(count - 1))
    return [f"module_{k:0{width}d}" for k in range(count)]


def write_nxmx(entry, model, nframes, data_path="/entry/data/data"):
    """Fill an NXentry group (already created, holding ``data/data``) with NXmx metadata
    describing ``model``'s geometry: ``data/data`` is (nframes, slow, fast) for one panel,
    (nframes, panels, slow, fast) for several (see the module's docstring)."""
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
    panels = model.panels
    many = len(panels) > 1
    # one (slow, fast) mask per module, sliced by the modules' data_origin/data_size as
    # the data are; a skipped pixel gets bit 0, as dxtbx writes its masks
    masks = np.zeros((len(panels), panels[0].spixels, panels[0].fpixels), dtype=np.int32)
    for k, p in enumerate(panels):
        if p.mask is not None:
            masks[k] = np.asarray(p.mask, dtype=np.uint8) == 0
    d.create_dataset("pixel_mask", data=masks if many else masks[0], compression="gzip")
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
    # the detector sits where its first pixel's corner is: one translation from the sample;
    # each module is a further translation to its own first pixel
    first = np.real(panels[0].pix0)
    origin = M @ first * 1000.0
    olen = float(np.linalg.norm(origin))
    odir = origin / olen if olen > 0 else np.array([0.0, 0.0, 1.0])
    t = dt.create_dataset("origin", data=np.array([olen]))
    _vector_attr(t, "translation", odir)
    here = d.name + "/"
    _str(d, "depends_on", here + "transformations/origin")
    names = module_names(len(panels))
    for k, (p, name) in enumerate(zip(panels, names)):
        mod = _nx(d.create_group(name), "NXdetector_module")
        if many:   # data (frames, panels, slow, fast): the module is one panel of it
            mod.create_dataset("data_origin", data=np.array([k, 0, 0], dtype=np.int64))
            mod.create_dataset("data_size", data=np.array([1, p.spixels, p.fpixels], dtype=np.int64))
            mod.create_dataset("data_stride", data=np.array([1, 1, 1], dtype=np.int64))
        else:
            mod.create_dataset("data_origin", data=np.array([0, 0], dtype=np.int64))
            mod.create_dataset("data_size", data=np.array([p.spixels, p.fpixels], dtype=np.int64))
            mod.create_dataset("data_stride", data=np.array([1, 1], dtype=np.int64))
        offset = M @ (np.real(p.pix0) - first) * 1000.0
        olen_k = float(np.linalg.norm(offset))
        mo = mod.create_dataset("module_offset", data=np.array([olen_k]))
        _vector_attr(mo, "translation", offset / olen_k if olen_k > 0 else odir,
                     depends_on=here + "transformations/origin")
        fp = mod.create_dataset("fast_pixel_direction", data=np.array([p.pixel * 1000.0]))
        _vector_attr(fp, "translation", M @ np.real(p.fdet), depends_on=here + name + "/module_offset",
                     offset=[0.0, 0.0, 0.0])
        sp = mod.create_dataset("slow_pixel_direction", data=np.array([p.pixel * 1000.0]))
        _vector_attr(sp, "translation", M @ np.real(p.sdet), depends_on=here + name + "/module_offset",
                     offset=[0.0, 0.0, 0.0])

    smp = _nx(entry.create_group("sample"), "NXsample")
    _str(smp, "name", "simulated nanocrystal")
    st = _nx(smp.create_group("transformations"), "NXtransformations")
    omega = st.create_dataset("phi", data=np.full(nframes, crys.phi0 * RTD))
    _vector_attr(omega, "rotation", M @ crys.spindle, units="deg")
    _str(smp, "depends_on", st.name + "/phi")
    a, b, c, al, be, ga = crys.cell
    uc = smp.create_dataset("unit_cell", data=np.array([[a, b, c, al, be, ga]]))
    uc.attrs["units"] = np.bytes_("angstrom, deg")
    return entry


def write_nxmx_file(path, model, image):
    """Write one simulated frame (photons) as an NXmx HDF5 file, atomically (a temporary
    name, then a rename): ``/entry/data/data`` float32 (1, slow, fast) for one panel,
    (1, panels, slow, fast) for several, with :func:`write_nxmx`'s metadata."""
    import h5py
    from .atomic import atomic_path
    frame = np.asarray(image, dtype=np.float32)
    if frame.shape != tuple(model.shape):
        raise ValueError(f"image of shape {frame.shape} does not match the detector's {tuple(model.shape)}")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", locking=False) as fh:
            entry = fh.create_group("entry")
            data = entry.create_group("data")
            chunks = (1,) * (frame.ndim - 1) + frame.shape[-2:]     # one panel a chunk
            data.create_dataset("data", data=frame[np.newaxis], chunks=chunks, compression="gzip")
            write_nxmx(entry, model, 1, data_path=data.name + "/data")
