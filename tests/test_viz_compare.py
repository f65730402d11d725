"""Comparison figures and the browser: the right panels, class colours, no orientation slips."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from nearfix_lib.core.classes import CARDIAC  # noqa: E402
from nearfix_lib.viz import figures as viz  # noqa: E402

T = CARDIAC


def maps():
    a = np.zeros((21, 17, 13), dtype=np.uint8)
    a[4:15, 3:12, 2:10] = T["LV"].index
    a[15:19, 5:9, 4:8] = T["LAA"].index
    b = a.copy()
    b[4:6] = 0
    return {"noisy": a, "stage2": b}


def test_contours_draw_one_row_per_map_in_the_class_colours():
    fig = viz.show_contours(maps(), T, image=np.full((21, 17, 13), 300.0), centre=(10, 7, 5))
    axes = fig.get_axes()
    assert len(axes) == 6
    colours = {tuple(np.round(c, 3)) for ax in axes for coll in ax.collections
               for c in np.atleast_2d(coll.get_edgecolor())[:, :3]}
    assert tuple(np.round(np.asarray(T["LV"].colour) / 255.0, 3)) in colours
    assert axes[2].get_title().startswith("noisy: k = 5")
    plt.close(fig)


def test_surfaces_share_limits_and_survive_an_empty_mask():
    m = maps()
    fig = viz.show_surfaces({"a": m["noisy"] == 3, "b": m["stage2"] == 3, "empty": np.zeros((21, 17, 13), bool)},
                            (0.8, 1.1, 2.5), T["LV"].colour)
    axes = fig.get_axes()
    assert len(axes) == 3 and axes[0].get_xlim() == axes[2].get_xlim()
    assert len(axes[0].collections) == 1 and len(axes[2].collections) == 0
    plt.close(fig)


def test_metric_panels_one_bar_per_source_and_class():
    frame = pd.DataFrame([{"case": c, "class": k, "source": s, "dice": 0.5, "hd95": 2.0, "comp_error": 1}
                          for c in ("1", "2") for k in ("LV", "LAA") for s in ("noisy", "stage2")])
    fig = viz.plot_metric_panels(frame, T)
    axes = fig.get_axes()
    assert len(axes) == 3 and all(len(ax.patches) == 4 for ax in axes)
    plt.close(fig)


def test_browser_builds_and_follows_the_class():
    m = maps()
    box = viz.browser(lambda cid: (m, None), ["1"], T)
    controls = {getattr(c, "description", ""): c for row in box.children
                for c in (row.children if hasattr(row, "children") and not hasattr(row, "value") else [row])}
    controls["class"].value = "LAA"
    assert controls["slice"].value == viz.class_centre(m["noisy"], T, "LAA")[2]
    controls["axis"].value = 0
    assert controls["slice"].max == 20
    plt.close("all")
