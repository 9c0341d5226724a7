"""Every mode of the pixel walk takes the image's value from the same code, so the
tangent pass (image and Jacobian together) and the adjoint's replay return the forward
kernel's image bit for bit.  Refinement and datasets rely on it: they take the image from
the derivative pass, and an objective must not depend on which pass ran first."""

import shutil

import numpy as np
import pytest

import test_gradient_paths as paths
import test_gradients as main
from conftest import GOLDEN, rows_as_panels
from nbragg.kernels.cpu import fast_path
from nbragg.engine import adjoint_image, build_model, render, tangent_image
from nbragg.nbargs import parse_nanobragg_args
from nbragg.params import input_tangent

HKL_NEAREST = main.TRI.replace("-default_F 100", "-hkl tri.hkl").replace("-N 5", "-N 2").replace(
    "-pixel 0.4", "-pixel 0.1") + " -polar 0.3 -nointerpolate"
EXTRA = {
    "hkl_nearest": HKL_NEAREST,
    "hkl_nearest_mosaic": HKL_NEAREST + " -mosaic 0.5 -mosaic_dom 9",     # the vector passes with a grid
    "thick_layers": main.TRI + paths.THICK + " -water 0.01",
    "mosaic_phi": main.TRI + " -mosaic 1 -mosaic_dom 7 -phi 1 -osc 2 -phisteps 2 -water 0.01",
}
CONFIGS = {**main.CONFIGS, **paths.CONFIGS, **EXTRA}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("onepass")
    shutil.copy(GOLDEN / "interpolate_N2" / "tri.hkl", d)
    return d


def _model(name, inputs, panels=None):
    exp = parse_nanobragg_args(CONFIGS[name].split(), cwd=str(inputs), warn=lambda m: None).experiment
    return build_model(exp, warn=lambda m: None, panels=panels)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tangent_and_replay_images_are_the_forward_image(name, inputs):
    model = _model(name, inputs)
    image, _ = render(model)
    assert image.max() > 0
    if name.startswith("hkl_nearest"):
        assert fast_path(model.scene)
    d = np.array([input_tangent(model, n) for n in ("cell_a", "distance")])
    _, timage = tangent_image(model, d)
    np.testing.assert_array_equal(timage, image)
    # the adjoint returns its image as well: where it replays the walk, the forward's bit
    # for bit; its fast sweep takes the polarization and capture factors from their
    # derivative twins, equal to rounding
    _, _, aimage = adjoint_image(model, np.ones(image.shape), want_image=True)
    if fast_path(model.scene):
        np.testing.assert_allclose(aimage, image, rtol=1e-14, atol=0)
    else:
        np.testing.assert_array_equal(aimage, image)


def test_tangent_image_on_panels_is_the_forward_image(inputs):
    model = _model("e_divergence_dispersion", inputs, panels=rows_as_panels(2))
    image, _ = render(model)
    _, timage = tangent_image(model, np.array([input_tangent(model, "distance")]))
    assert timage.shape == image.shape == (2, 8, 16)
    np.testing.assert_array_equal(timage, image)
