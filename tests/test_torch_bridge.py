"""The PyTorch bridge (nbragg.torch): the image as a torch function whose backward is
nbragg's adjoint, checked against finite differences (gradcheck), against
nbragg.gradient, and in a short fit."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nbragg  # noqa: E402
import nbragg.torch as nt  # noqa: E402
from nbragg.response import expected_signal  # noqa: E402

from conftest import HERE  # noqa: E402

TRI = ("-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1 -distance 100 -pixel 0.4 "
       "-detpixels {n} -oversample {o} -polar 0.3")
SMOOTH = ["cell_a", "misset_z", "Na", "distance", "beam_x", "beam_y"]


def _exp(n=12, o=2, extra=""):
    return nbragg.Experiment.from_nanobragg_args(TRI.format(n=n, o=o) + " " + extra, warn=lambda m: None)


def _quiet(m):
    pass


def _tensors(exp, names, requires_grad=True):
    values = nbragg.get_params(exp, names)
    return {n: torch.tensor(values[n], dtype=torch.float64, requires_grad=requires_grad) for n in names}


def _with_grid(exp, seed=0):
    grid = np.random.default_rng(seed).uniform(50.0, 150.0, (11, 11, 11))
    return exp.replace(structure=exp.structure.replace(Fhkl=grid, hkl_origin=(-5, -5, -5), hkl_count=grid.size))


def _close(a, b, rtol=1e-12):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert np.all(np.abs(a - b) <= rtol * np.max(np.abs(b))), (a, b)


def test_import_nbragg_does_not_import_torch():
    code = "import nbragg, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=HERE.parent)


def test_missing_torch_is_one_clear_error():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import nbragg.torch\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=HERE.parent).stdout
    assert "pip install torch" in out and "nbragg[torch]" in out, out


def test_forward_is_simulate_in_the_params_dtype():
    exp = _exp()
    p = {"cell_a": torch.tensor(70.3, dtype=torch.float64), "misset_z": torch.tensor(3.2, dtype=torch.float64)}
    img = nt.simulate(exp, p, warn=_quiet)
    want = nbragg.simulate(nbragg.set_params(exp, {"cell_a": 70.3, "misset_z": 3.2}), warn=_quiet).image
    assert img.dtype == torch.float64 and img.shape == (12, 12) and not img.requires_grad
    assert np.array_equal(img.numpy(), want)
    img32 = nt.simulate(exp, {n: v.float().requires_grad_() for n, v in p.items()}, warn=_quiet)
    assert img32.dtype == torch.float32 and img32.requires_grad
    img32.sum().backward()
    # no parameters: the experiment's own image
    assert np.array_equal(nt.simulate(exp, {}, warn=_quiet).numpy(), nbragg.simulate(exp, warn=_quiet).image)


@pytest.mark.parametrize("o", [1, 2])
def test_gradcheck_cell_misset_N_distance_beam_centre(o):
    # a 6x6 image (8x8 with oversample 2), divided by its brightest pixel so that the
    # absolute tolerance is relative to the image's scale; eps 1e-6 (Angstrom, degrees,
    # cells, mm) sits in a wide window where finite differences hold 1e-6 (3e-5 to 1e-7)
    exp = _exp(n=6 if o == 1 else 8, o=o)
    peak = float(nbragg.simulate(exp, warn=_quiet).image.max())
    inputs = tuple(_tensors(exp, SMOOTH).values())

    def image(*values):
        return nt.simulate(exp, dict(zip(SMOOTH, values)), warn=_quiet) / peak

    assert torch.autograd.gradcheck(image, inputs, eps=1e-6, atol=1e-6, rtol=1e-6, fast_mode=o == 2)


def test_gradients_equal_nbragg_gradient_with_Fhkl():
    exp = _with_grid(_exp(n=10))
    names = SMOOTH + ["cell_gamma", "wavelength", "polar"]
    p = _tensors(exp, names)
    p["Fhkl"] = torch.tensor(exp.structure.Fhkl, requires_grad=True)
    img = nt.simulate(exp, p, warn=_quiet)
    w = np.random.default_rng(1).uniform(-1.0, 1.0, img.shape)
    img.backward(torch.from_numpy(w))
    want = nbragg.gradient(exp, names + ["Fhkl"], upstream=w)
    for n in names:
        _close(p[n].grad.item(), want[n])
    assert p["Fhkl"].grad.shape == (11, 11, 11) and np.any(want["Fhkl"] != 0)
    _close(p["Fhkl"].grad.numpy(), want["Fhkl"])


def test_gradcheck_Fhkl():
    exp = _with_grid(_exp(n=6, o=1))
    F = torch.tensor(exp.structure.Fhkl, requires_grad=True)
    peak = float(nbragg.simulate(exp, warn=_quiet).image.max())
    assert torch.autograd.gradcheck(lambda f: nt.simulate(exp, {"Fhkl": f}, warn=_quiet) / peak, (F,),
                                    eps=1e-6, atol=1e-6, rtol=1e-6, fast_mode=True)


def test_only_tensors_that_require_grad_get_gradients():
    exp = _exp(n=8)
    p = _tensors(exp, ["cell_a", "distance"])
    p["Na"] = torch.tensor(5.0, dtype=torch.float64)          # a fixed value: no gradient
    (nt.simulate(exp, p, warn=_quiet) ** 2).sum().backward()
    assert p["Na"].grad is None and p["cell_a"].grad is not None and p["distance"].grad is not None


def test_errors():
    exp = _exp(n=8)
    with pytest.raises(nbragg.ParameterError, match="unknown parameter 'cell_q'"):
        nt.simulate(exp, {"cell_q": torch.tensor(1.0)})
    with pytest.raises(nbragg.ParameterError, match="0-d tensor"):
        nt.simulate(exp, {"cell_a": torch.tensor([70.0])}, warn=_quiet)
    with pytest.raises(nbragg.ParameterError, match="detected=True"):
        nt.simulate(exp.replace(response=nbragg.Response(gain=2.0)), {"gain": torch.tensor(2.0)})
    with pytest.raises(nbragg.ParameterError, match="no structure-factor grid"):
        nt.simulate(exp, {"Fhkl": torch.ones(3, 3, 3)}, warn=_quiet)
    with pytest.raises(nbragg.ParameterError, match="leading axis of 2"):
        nt.simulate([exp, exp], {"cell_a": torch.ones(3)}, warn=_quiet)
    with pytest.raises(nbragg.ParameterError, match="unknown parameter"):
        nt.Simulator(exp, ["misset_q"])
    with pytest.raises(nbragg.ParameterError, match="init names 'Na'"):
        nt.Simulator(exp, ["cell_a"], init={"Na": 4.0})


def test_batch_of_experiments():
    exps = [_exp(n=8), nbragg.set_params(_exp(n=8), {"misset_x": 12.0})]
    misset = torch.tensor([3.0, 3.5], dtype=torch.float64, requires_grad=True)
    cell = torch.tensor(70.0, dtype=torch.float64, requires_grad=True)      # shared by both
    imgs = nt.simulate(exps, {"misset_z": misset, "cell_a": cell}, warn=_quiet)
    assert imgs.shape == (2, 8, 8)
    w = np.random.default_rng(2).uniform(0.5, 1.5, imgs.shape)
    imgs.backward(torch.from_numpy(w))
    grads = []
    for i, (e, m) in enumerate(zip(exps, (3.0, 3.5))):
        e = nbragg.set_params(e, {"misset_z": m, "cell_a": 70.0})
        assert np.array_equal(imgs[i].detach().numpy(), nbragg.simulate(e, warn=_quiet).image)
        grads.append(nbragg.gradient(e, ["misset_z", "cell_a"], upstream=w[i]))
    _close(misset.grad.numpy(), [g["misset_z"] for g in grads])
    _close(cell.grad.item(), grads[0]["cell_a"] + grads[1]["cell_a"])


def test_detected_signal_and_response_parameters():
    response = nbragg.Response(psf="gauss", psf_fwhm=500.0, gain=2.0, adc=10.0)
    exp = _exp(n=10).replace(response=response)
    names = ["distance", "misset_z", "psf_fwhm", "gain", "adc"]
    p = _tensors(exp, names)
    sig = nt.simulate(exp, p, detected=True, warn=_quiet)
    photons = nbragg.simulate(exp, warn=_quiet).image
    assert np.array_equal(sig.detach().numpy(), expected_signal(photons, response, exp.detector.pixel_size))
    w = np.random.default_rng(3).uniform(-1.0, 1.0, sig.shape)
    sig.backward(torch.from_numpy(w))
    want = nbragg.gradient(exp, names, upstream=w, detected=True)
    for n in names:
        _close(p[n].grad.item(), want[n])
    with pytest.raises(nbragg.ParameterError, match="needs a detector response"):
        nt.simulate(_exp(n=8), {}, detected=True)


def test_simulator_module():
    exp = _exp(n=8)
    sim = nt.Simulator(exp, ["cell_a", "Na", "distance"], init={"Na": 6.0}, warn=_quiet)
    assert [n for n, _ in sim.named_parameters()] == ["params.cell_a", "params.Na", "params.distance"]
    assert all(p.dtype == torch.float64 and p.requires_grad for p in sim.parameters())
    assert sim.params["cell_a"].item() == 70.0 and sim.params["Na"].item() == 6.0
    img = sim()
    assert np.array_equal(img.detach().numpy(), nbragg.simulate(sim.experiment(), warn=_quiet).image)
    assert sim.experiment().crystal.Na == 6.0
    img.sum().backward()
    assert all(p.grad is not None for p in sim.parameters())
    # a batch: one value per experiment
    batch = nt.Simulator([exp, nbragg.set_params(exp, {"Na": 4.0})], ["Na"], warn=_quiet)
    assert batch.params["Na"].tolist() == [5.0, 4.0] and batch().shape == (2, 8, 8)
    assert [e.crystal.Na for e in batch.experiment()] == [5.0, 4.0]


def test_cuda_backend_with_host_tensors():
    """backend="cuda" (Numba's CUDA simulator in the tests, see conftest.py): the same image
    and gradients, returned on the tensors' device."""
    exp = _exp(n=3, o=1)
    try:
        nbragg.engine.check_backend("cuda")
    except nbragg.BackendError as exc:
        pytest.skip(str(exc))
    p = _tensors(exp, ["cell_a", "distance"])
    img = nt.simulate(exp, p, backend="cuda", warn=_quiet)
    assert img.device.type == "cpu"
    _close(img.detach().numpy(), nbragg.simulate(exp, warn=_quiet).image)
    img.sum().backward()
    want = nbragg.gradient(exp, list(p), upstream=np.ones(img.shape))
    for n in p:
        _close(p[n].grad.item(), want[n], rtol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")
def test_cuda_tensors_run_on_the_gpu_and_stay_there():
    exp = _exp(n=8)
    p = {n: v.detach().cuda().requires_grad_() for n, v in _tensors(exp, ["cell_a", "distance"]).items()}
    img = nt.simulate(exp, p, warn=_quiet)
    assert img.device.type == "cuda"
    _close(img.detach().cpu().numpy(), nbragg.simulate(exp, warn=_quiet).image)
    img.sum().backward()
    want = nbragg.gradient(exp, ["cell_a", "distance"], upstream=np.ones(img.shape))
    for n in p:
        assert p[n].grad.device.type == "cuda"
        _close(p[n].grad.item(), want[n], rtol=1e-10)


def test_adam_fit_recovers_the_truth():
    """misset_z, Na and distance started 0.15 deg, 0.6 cells and 1 mm off, fitted with Adam
    to a noise-free image made at the truth (so the minimum is the truth): each comes back
    to within 1/100 or less of its starting offset (Adam's last steps stay within about 3e-4
    of the truth here)."""
    exp = _exp(n=16, o=2)
    names = ["misset_z", "Na", "distance"]
    truth = nbragg.get_params(exp, names)
    target = torch.from_numpy(nbragg.simulate(exp, warn=_quiet).image)
    scale = target.max()
    start = {"misset_z": 3.15, "Na": 5.6, "distance": 101.0}
    unit = {"misset_z": 0.1, "Na": 0.5, "distance": 1.0}     # Adam's steps are the same size in each
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)

    def values():
        return {n: start[n] + unit[n] * x[i] for i, n in enumerate(names)}

    opt = torch.optim.Adam([x], lr=0.1)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.99)
    for step in range(150):
        opt.zero_grad()
        loss = ((nt.simulate(exp, values(), warn=_quiet) - target) / scale).pow(2).mean()
        loss.backward()
        if step == 0:
            first = loss.item()
        opt.step()
        sched.step()
    got = {n: float(v.detach()) for n, v in values().items()}
    assert loss.item() < 1e-6 * first
    assert abs(got["misset_z"] - truth["misset_z"]) < 1e-3, got
    assert abs(got["Na"] - truth["Na"]) < 2e-3, got
    assert abs(got["distance"] - truth["distance"]) < 2e-3, got


def test_panels_and_their_geometry():
    """A detector of four panels: the image is (panels, slow, fast) and the panel and
    group geometry's gradients through the bridge are nbragg's."""
    from nbragg.bench import tiled
    exp = tiled(_exp(n=12), 2)
    panels = exp.detector.panels
    root = nbragg.PanelGroup(children=(0, 1, nbragg.PanelGroup(children=(2, 3), name="low",
                                                                origin=panels[2].origin)),
                             origin=panels[0].origin)
    exp = exp.replace(detector=exp.detector.replace(groups=root))
    names = ["panel_shift_x[1]", "group_rot_z[low]", "group_shift_z[root]"]
    p = _tensors(exp, names)
    img = nt.simulate(exp, p, warn=_quiet)
    assert tuple(img.shape) == (4, 6, 6)
    w = np.random.default_rng(2).uniform(-1.0, 1.0, img.shape)
    img.backward(torch.from_numpy(w))
    want = nbragg.gradient(exp, names, upstream=w)
    for n in names:
        _close(p[n].grad.item(), want[n])
