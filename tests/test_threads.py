"""Images do not depend on the number of threads, bit for bit."""

import numba
import pytest

import nbragg
from nbragg.nbargs import parse_nanobragg_args

ARGS = [
    "-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1.0 -distance 100 -pixel 0.1 "
    "-detpixels 96 -mosaic 1.5 -mosaic_dom 6 -phi 2 -osc 2 -phisteps 2 -oversample 2",
    "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 4 -distance 100 -pixel 0.1 -detpixels 80 "
    "-hdivrange 6 -vdivrange 4 -hdivsteps 3 -vdivsteps 3 -dispersion 5 -dispsteps 3 -water 0.1 -roi 5 70 3 77",
]


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs at least 2 threads")
@pytest.mark.parametrize("args", ARGS)
def test_one_and_two_threads_identical(args):
    exp = parse_nanobragg_args(args.split(), warn=lambda m: None).experiment
    one = nbragg.simulate(exp, threads=1, warn=lambda m: None).image
    two = nbragg.simulate(exp, threads=2, warn=lambda m: None).image
    assert one.tobytes() == two.tobytes()
    assert one.max() > 0
