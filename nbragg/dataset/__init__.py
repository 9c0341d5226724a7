"""Many simulated images in HDF5 (NeXus/NXmx), resumable, on Dask when wanted.

A spec (YAML or JSON) names a base experiment, how parameters vary from frame to frame,
how many frames, and what to store::

    seed: 1234
    images: 100
    shard_size: 25                  # frames per shard file
    base: "-cell 79 79 38 90 90 90 -default_F 100 -N 10 -lambda 1 -distance 100 -detpixels 256"
    vary:
      orientation: uniform          # a random rotation, uniform over SO(3), before the misset
      cell_a: {jitter: 0.01}        # normal, relative sd around the base value
      Na: {integers: [5, 15]}       # uniform integers, inclusive
      wavelength: {uniform: [0.98, 1.02]}
      distance: {normal: [100, 1]}
      fluence: {loguniform: [1e28, 1e30]}
    outputs:
      float: true                   # photons, float32
      counts: uint16                # Poisson counts (uint16, uint32, or none)
      jacobian: [cell_a, Na]        # optional dI/dtheta images per frame
    compression: bitshuffle         # bitshuffle (hdf5plugin), gzip, or none
    response:                       # optional: counts become the detector's pixel values
      psf: gauss
      psf_fwhm: {uniform: [50, 150]}   # microns; numbers may vary like parameters
      gain: 1.0
      readout: {uniform: [1, 4]}
      calibration: 0.02
    background:                     # optional: amorphous materials (nbragg.Material fields)
      - table: water                # a shipped table, or a file relative to the spec
        thickness: {uniform: [0.001, 0.005]}   # mm; thickness and scale may vary
      - {table: air, thickness: 30}

``base`` is a nanoBragg command line (a string or a list); file names in it are relative
to the spec's folder.  Any scalar parameter of :mod:`nbragg.params` can vary, as a fixed
number, ``{uniform: [lo, hi]}``, ``{normal: [mean, sd]}``, ``{jitter: relative_sd}``,
``{loguniform: [lo, hi]}``, ``{integers: [lo, hi]}`` or ``{choice: [...]}``.  ``cell_jitter:
r`` jitters a, b and c together.  ``response`` takes the fields of
:class:`nbragg.Response` (its numbers may vary in the same ways, except jitter; ``bits``
follows ``outputs.counts``, the noise seed follows (seed, i)): the stored counts are then
the detector's pixel values, the photons the noiseless target, and each drawn response
number is a parameter of the table, named ``response_<field>``.  ``background`` lists
:class:`nbragg.Material` fields per material; a drawn thickness or scale is a parameter of
the table, named as in :mod:`nbragg.params` (``background_thickness_<i>``,
``background_scale_<i>``).  Frame i's parameters and noise come from generators
seeded by (seed, i), so the content does not depend on the number of workers, on the
order frames finish in, or on interruptions.

Layout: OUTPUT.h5 is a master file whose /entry/data/data (and parameter table) are
virtual datasets over the shard files OUTPUT_shard00000.h5, ... beside it.  Each shard is
a complete NXmx file: /entry/data/data (one frame per chunk, compressed), instrument,
beam, detector and sample groups for the base geometry, and /entry/nbragg with one
dataset per varied parameter (frame order), the orientations, and a ``completed`` mask.

Crash safety: every frame is committed on its own -- its images and parameters written
to a staging file that is renamed into OUTPUT.parts/ only when complete -- and a shard is
assembled (to a temporary name, then renamed) once all its frames are staged.  A killed
run loses at most the frames being computed; running the same command again continues
and produces the same frames and parameters as an uninterrupted run.
"""

from .cli import main
from .frames import base_experiment, frame_experiment, frame_parameters, frame_response, simulate_frame
from .layout import (assemble_shard, open_dataset, read_frame, read_parameters, read_reflections, stage_frame,
                     write_master)
from .schedule import generate, make_shard
from .spec import COUNT_TYPES, DIST_KINDS, DatasetError, DatasetSpec, load_spec

open = open_dataset   # nbragg.dataset.open(path): the dataset, with its compression filters loaded

__all__ = ["COUNT_TYPES", "DIST_KINDS", "DatasetError", "DatasetSpec", "assemble_shard", "base_experiment",
           "frame_experiment", "frame_parameters", "frame_response", "generate", "load_spec", "main", "make_shard", "read_frame",
           "read_parameters", "read_reflections", "simulate_frame", "stage_frame", "write_master"]
