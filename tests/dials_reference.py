"""A slow, plainly written reference for DIALS detector hierarchies, for tests only.

It takes a parsed DIALS experiment-list JSON dict (``json.load`` of an ``.expt``
file) and returns, for every entry of the file's ``detector`` list, the lab-frame
geometry of its panels in the order of that detector's ``panels`` list.  It shares
no code with nbragg's reader and none with dxtbx: plain Python loops over 3-vectors,
numpy only for storage.

The rule (established by reading cctbx/dxtbx, src/dxtbx/model/virtual_panel.h
(VirtualPanelFrame), panel.h/panel_data.h, detector.h (Detector::Node) and
boost_python/detector.cc + boost_python/panel.cc (the from_dict/to_dict code))
---------------------------------------------------------------------------------

Frames.  Every hierarchy node (the root group, inner groups, panels) owns a
*local frame* (f_loc, s_loc, o_loc) read from its JSON ``fast_axis``,
``slow_axis`` and ``origin`` (mm).  If any of those three keys is missing the
local frame is the default f_loc = (1,0,0), s_loc = (0,1,0), o_loc = (0,0,0).
On reading, f_loc and s_loc are each divided by their own length; they are NOT
made orthogonal to each other (dxtbx only asserts that the raw dot product
f.s is below 1e-7 -- a signed test, so a negative dot product passes).  The
local origin is used as given.  For a node in the hierarchy the JSON numbers are
local (relative to the parent), never lab-frame values; ``to_dict`` writes the
local frame back.

Parent frame.  A node's parent frame is its parent's lab frame (F, S, O): again
F and S are each normalised, and the parent normal is N = F x S (cross product,
not re-normalised).  The root group's parent frame is the lab itself:
F = (1,0,0), S = (0,1,0), N = (0,0,1), O = (0,0,0); i.e. the root's numbers
are lab-frame values.

Composition.  With P = [F | S | N] (the 3x3 matrix whose columns are F, S, N),
a node's lab frame is

    f_lab = P f_loc  = f_loc.x F + f_loc.y S + f_loc.z N
    s_lab = P s_loc  = s_loc.x F + s_loc.y S + s_loc.z N
    o_lab = O + P o_loc = O + o_loc.x F + o_loc.y S + o_loc.z N

applied recursively from the root down to each panel (the z component of a
local origin or axis is along the parent's normal, so it matters when panels
sit off the parent's plane, e.g. the I23 barrel).  The panel's lab normal is
n_lab = f_lab x s_lab (not re-normalised; it is a unit vector whenever f and s
are orthonormal).

Indices.  A hierarchy node with a ``"panel": k`` key is a leaf and stands for
``panels[k]`` of the same detector dict; all other keys of such a leaf are
ignored and the panel's own dict supplies its local frame.  A node without
``"panel"`` is a group; its children are listed in ``"children"``.  The root
must be a group.  Every panel index must appear exactly once.  The order of the
returned panels is the order of the ``panels`` list (the flat panel index used
everywhere else in DIALS), whatever the depth-first order of the tree.

No hierarchy.  If a detector dict has no ``"hierarchy"`` key, each panel's
parent is the lab, so its lab frame is its own JSON frame with the two axes
normalised (origin unchanged).  A trivial hierarchy (root with identity axes at
the origin) gives the same result.

Only geometry is composed; image_size and pixel_size are copied from the panel
dicts as given (pixel_size in mm, [fast, slow]; image_size in pixels,
[fast, slow]).
"""

import math

import numpy as np

LAB_F = (1.0, 0.0, 0.0)
LAB_S = (0.0, 1.0, 0.0)
LAB_O = (0.0, 0.0, 0.0)

DOT_TOLERANCE = 1e-7  # dxtbx's (signed) orthogonality assertion on the raw axes


def _vec(x):
    if len(x) != 3:
        raise ValueError("expected a 3-vector, got %r" % (x,))
    return (float(x[0]), float(x[1]), float(x[2]))


def _length(v):
    return math.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])


def _unit(v):
    n = _length(v)
    if not n > 0.0:
        raise ValueError("zero-length axis %r" % (v,))
    return (v[0] / n, v[1] / n, v[2] / n)


def _dot(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _cross(a, b):
    return (
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    )


def _local_frame(node):
    """The (fast, slow, origin) a node's JSON dict defines, axes normalised."""
    if "fast_axis" in node and "slow_axis" in node and "origin" in node:
        f = _vec(node["fast_axis"])
        s = _vec(node["slow_axis"])
        o = _vec(node["origin"])
    else:
        f, s, o = LAB_F, LAB_S, LAB_O
    if _dot(f, s) >= DOT_TOLERANCE:
        raise ValueError("fast and slow axes are not orthogonal: %r %r" % (f, s))
    return _unit(f), _unit(s), o


def _compose(parent, local):
    """Lab frame of a node from its parent's lab frame and its own local frame."""
    pf = _unit(parent[0])
    ps = _unit(parent[1])
    po = parent[2]
    pn = _cross(pf, ps)
    lf, ls, lo = local
    out = []
    for v in (lf, ls, lo):
        w = [0.0, 0.0, 0.0]
        for i in range(3):
            w[i] = pf[i] * v[0] + ps[i] * v[1] + pn[i] * v[2]
        out.append(w)
    f_lab = tuple(out[0])
    s_lab = tuple(out[1])
    o_lab = tuple(po[i] + out[2][i] for i in range(3))
    return f_lab, s_lab, o_lab


def _panel_record(panel, frame):
    f, s, o = frame
    return {
        "name": panel.get("name", ""),
        "origin": np.array(o, dtype=float),
        "fast_axis": np.array(f, dtype=float),
        "slow_axis": np.array(s, dtype=float),
        "normal": np.array(_cross(f, s), dtype=float),
        "image_size": tuple(int(x) for x in panel["image_size"]),
        "pixel_size": tuple(float(x) for x in panel["pixel_size"]),
    }


def detector_panels(detector):
    """Lab-frame panels of one detector dict, in the order of its ``panels`` list."""
    panels = detector["panels"]
    lab = LAB_F, LAB_S, LAB_O
    frames = [None] * len(panels)

    if "hierarchy" not in detector:
        for k, panel in enumerate(panels):
            frames[k] = _compose(lab, _local_frame(panel))
    else:
        root = detector["hierarchy"]
        if "panel" in root:
            raise ValueError("the hierarchy root must be a group, not a panel")
        root_frame = _compose(lab, _local_frame(root))
        # explicit stack of (group dict, that group's lab frame)
        stack = [(root, root_frame)]
        while stack:
            group, group_frame = stack.pop()
            for child in group.get("children", []):
                if "panel" in child:
                    k = int(child["panel"])
                    if not 0 <= k < len(panels):
                        raise ValueError("panel index %d out of range" % k)
                    if frames[k] is not None:
                        raise ValueError("panel %d appears twice in the hierarchy" % k)
                    frames[k] = _compose(group_frame, _local_frame(panels[k]))
                else:
                    stack.append((child, _compose(group_frame, _local_frame(child))))
        missing = [k for k, fr in enumerate(frames) if fr is None]
        if missing:
            raise ValueError("panels %r are not in the hierarchy" % (missing,))

    return [_panel_record(panels[k], frames[k]) for k in range(len(panels))]


def lab_panels(experiment_list):
    """For each entry of ``experiment_list['detector']``, its list of lab-frame panels.

    Each panel is a dict with ``origin`` (mm), ``fast_axis``, ``slow_axis``,
    ``normal`` (numpy 3-vectors), ``image_size`` (fast, slow) in pixels and
    ``pixel_size`` (fast, slow) in mm, plus ``name``.
    """
    return [detector_panels(d) for d in experiment_list.get("detector", [])]


# --------------------------------------------------------------------------- checks


def _close(a, b, tol):
    return all(abs(float(x) - float(y)) <= tol for x, y in zip(a, b))


def self_check(tol=1e-12):
    """Checks of the composer itself; raises AssertionError on failure.

    1. A detector with no hierarchy: each panel's lab origin is its own origin and
       its lab axes are its own axes (normalised), normal = fast x slow.
    2. The same panels under a trivial hierarchy (identity root at the origin)
       give the same numbers.
    3. A two-level hierarchy with rotated, non-unit local axes, using the frames
       and expected lab values of dxtbx's own test (tests/model/test_detector2.py,
       test_get_valid_D_matrix), with the panels listed in a permuted order so the
       ``"panel"`` index mapping is exercised.
    """
    plain_panels = [
        {
            "name": "a",
            "fast_axis": [2.0, 0.0, 0.0],
            "slow_axis": [0.0, -3.0, 0.0],
            "origin": [-10.0, 20.0, -100.0],
            "image_size": [100, 200],
            "pixel_size": [0.1, 0.1],
        },
        {
            "name": "b",
            "fast_axis": [0.0, 0.6, 0.8],
            "slow_axis": [1.0, 0.0, 0.0],
            "origin": [1.5, -2.5, 3.5],
            "image_size": [10, 20],
            "pixel_size": [0.075, 0.075],
        },
    ]
    expected = [
        ((-10.0, 20.0, -100.0), (1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, -1.0)),
        ((1.5, -2.5, 3.5), (0.0, 0.6, 0.8), (1.0, 0.0, 0.0), (0.0, 0.8, -0.6)),
    ]
    trivial_root = {
        "fast_axis": [1.0, 0.0, 0.0],
        "slow_axis": [0.0, 1.0, 0.0],
        "origin": [0.0, 0.0, 0.0],
        "children": [{"panel": 0}, {"panel": 1}],
    }
    for det in ({"panels": plain_panels}, {"panels": plain_panels, "hierarchy": trivial_root}):
        got = detector_panels(det)
        assert len(got) == 2
        for p, src, (o, f, s, n) in zip(got, plain_panels, expected):
            assert _close(p["origin"], src["origin"], tol), p
            assert _close(p["origin"], o, tol), p
            assert _close(p["fast_axis"], f, tol), p
            assert _close(p["slow_axis"], s, tol), p
            assert _close(p["normal"], n, tol), p
            assert p["image_size"] == tuple(src["image_size"])
            assert p["pixel_size"] == tuple(src["pixel_size"])

    def frame(f, s, o):
        return {"fast_axis": list(f), "slow_axis": list(s), "origin": list(o)}

    size = {"image_size": [10, 10], "pixel_size": [0.1, 0.1]}
    p1 = dict(name="p1", **frame((1, -1, 0), (1, 1, 0), (5, 0, 10)), **size)
    p2 = dict(name="p2", **frame((1, 1, 0), (-1, 1, 0), (0, 5, -10)), **size)
    p3 = dict(name="p3", **frame((1, -1, 0), (1, 1, 0), (0, 5, -10)), **size)
    p4 = dict(name="p4", **frame((1, 1, 0), (-1, 1, 0), (5, 0, 10)), **size)
    order = [p3, p1, p4, p2]  # panels list order differs from tree order
    idx = {p["name"]: i for i, p in enumerate(order)}
    tree = dict(
        name="root",
        children=[
            dict(
                name="q1",
                children=[{"panel": idx["p1"]}, {"panel": idx["p2"]}],
                **frame((1, 1, 0), (-1, 1, 0), (10, 10, 0)),
            ),
            dict(
                name="q2",
                children=[{"panel": idx["p3"]}, {"panel": idx["p4"]}],
                **frame((1, -1, 0), (1, 1, 0), (20, 20, 0)),
            ),
        ],
        **frame((1, 0, 0), (0, 1, 0), (0, 0, 100)),
    )
    h = math.sqrt(5.0**2 / 2)
    want = {
        "p1": ((10 + h, 10 + h, 110), (1, 0, 0), (0, 1, 0)),
        "p2": ((10 - h, 10 + h, 90), (0, 1, 0), (-1, 0, 0)),
        "p3": ((20 + h, 20 + h, 90), (0, -1, 0), (1, 0, 0)),
        "p4": ((20 + h, 20 - h, 110), (1, 0, 0), (0, 1, 0)),
    }
    got = detector_panels({"panels": order, "hierarchy": tree})
    assert [p["name"] for p in got] == ["p3", "p1", "p4", "p2"]
    for p in got:
        o, f, s = want[p["name"]]
        assert _close(p["origin"], o, 1e-7), p
        assert _close(p["fast_axis"], f, 1e-7), p
        assert _close(p["slow_axis"], s, 1e-7), p
        assert _close(p["normal"], _cross(f, s), 1e-7), p
    return True


if __name__ == "__main__":
    import json
    import sys

    self_check()
    for path in sys.argv[1:]:
        with open(path) as fh:
            el = json.load(fh)
        for i, det in enumerate(lab_panels(el)):
            print("%s detector %d: %d panels" % (path, i, len(det)))
            for k, p in enumerate(det[:3]):
                print("  %3d %-16s origin %s fast %s slow %s" % (
                    k, p["name"], np.round(p["origin"], 4),
                    np.round(p["fast_axis"], 5), np.round(p["slow_axis"], 5)))
    print("self_check passed")
