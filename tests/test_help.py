"""Help, versions and the commands' first-hour mistakes (each line of output checked)."""

import re

import pytest

from conftest import HERE

import nbragg
from nbragg import cli, refine_cli
from nbragg.dataset import cli as dataset_cli
from nbragg.nbargs import _KNOWN, OWN_FLAGS


@pytest.mark.parametrize("flag", ["-h", "--help", "-help"])
def test_nbragg_help(flag, capsys):
    assert cli.main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nbragg")
    assert "-detpixels" in out and "-threads" in out


def test_every_flag_in_the_help_is_one_nbragg_reads():
    listed = set(re.findall(r"(?<![\w-])-[A-Za-z][\w]*", cli.USAGE))
    unknown = sorted(f for f in listed if f not in _KNOWN and f not in OWN_FLAGS and f not in ("-h", "-help"))
    assert not unknown, unknown


def test_versions(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"nbragg {nbragg.__version__}\n"
    with pytest.raises(SystemExit) as exc:   # argparse's own exit, as for --help
        refine_cli._parser().parse_args(["--version"])
    assert exc.value.code == 0
    assert refine_cli.main(["--version"]) == 0
    assert dataset_cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert f"nbragg-refine {nbragg.__version__}" in out and f"nbragg-dataset {nbragg.__version__}" in out


def test_refine_help_needs_no_separator(capsys):
    assert refine_cli.main(["-h"]) == 0
    assert "usage: nbragg-refine" in capsys.readouterr().out


def test_refine_errors_are_prefixed_once(capsys):
    assert refine_cli.main(["obs.img", "--refine", "cell_a"]) == 2
    err = capsys.readouterr().err
    assert err.count("nbragg-refine:") == 1 and "after '--'" in err


@pytest.mark.parametrize("opt, value", [("--workers", "-1"), ("--threads-per-worker", "0")])
def test_dataset_bad_worker_counts_are_refused(opt, value, tmp_path, capsys):
    out = tmp_path / "x.h5"
    assert dataset_cli.main([str(HERE.parent / "data" / "example_dataset.yaml"), "-o", str(out), opt, value, "--noprogress"]) == 2
    err = capsys.readouterr().err
    assert f"{opt} {value}" in err and "whole number" in err
    assert list(tmp_path.iterdir()) == []


def test_first_run_compilation_is_announced(monkeypatch, tmp_path, capsys):
    """When the first pixel has not come back after a few seconds, the command line says
    that it is compiling (a stand-in that takes longer than the notice's delay)."""
    import time
    from nbragg import engine
    real = engine.prepare

    def slow(model, **kw):
        time.sleep(0.5)
        return real(model, **kw)
    monkeypatch.setattr(engine, "prepare", slow)
    monkeypatch.setattr(cli, "COMPILE_NOTICE_S", 0.1)
    monkeypatch.chdir(tmp_path)
    args = "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 6.2 -detpixels 8 -floatfile f.bin -nonoise -nopgm"
    assert cli.main(args.split()) == 0
    assert "compiling the kernels for this machine (first run only" in capsys.readouterr().err
    monkeypatch.setattr(cli, "COMPILE_NOTICE_S", 30.0)      # rows come back well before
    assert cli.main(args.split()) == 0
    assert "compiling" not in capsys.readouterr().err
