"""Open a case of a run in napari: ``nearfix view RUN_DIR CASE`` (``python -m nearfix_lib.viz.view``).

The CT and the noisy, stage2 and stage3 labels (and the truth, for the phantom) in the class
colours, side by side (``--layout grid``, default) or stacked to toggle (``--layout overlay``).
``--screenshot out.png`` saves the canvas and exits instead of opening a window (headless nodes:
run it under ``xvfb-run -a``).
"""

from __future__ import annotations

import argparse
import os
import sys

from nearfix_lib.viz.napari_viewer import napari_overlay

NO_DISPLAY = ("no display: napari needs an X server; run it under a virtual one, "
              "`xvfb-run -a python -m nearfix_lib.viz.view …` (apt-get install xvfb xauth)")


def display_available() -> bool:
    """Whether Qt can open a window here: always off Linux; on Linux only with an X or Wayland server.

    Without one, Qt aborts the whole process (a core dump, rc 134) before Python can catch
    anything, so the viewer checks first.
    """
    if not sys.platform.startswith("linux"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run folder, e.g. outputs/demo")
    ap.add_argument("case", help="case id, e.g. 1")
    ap.add_argument("--layout", choices=["grid", "overlay"], default="grid")
    ap.add_argument("--opacity", type=float, default=0.6, help="labels opacity")
    ap.add_argument("--screenshot", default="", help="save the canvas to this PNG and exit")
    args = ap.parse_args(argv)
    if not display_available():
        print(NO_DISPLAY, file=sys.stderr)
        return 2

    import napari

    viewer = napari_overlay(args.run_dir, args.case, layout=args.layout, show=True, opacity=args.opacity)
    if args.screenshot:
        save_screenshot(viewer, args.screenshot)
        return 0
    napari.run()
    return 0


def save_screenshot(viewer, path: str, canvas_only: bool = True) -> None:
    """Frame the data, write the canvas (or, ``canvas_only=False``, the whole window with its docks) to
    ``path`` and close the viewer: the ``--screenshot`` of the napari commands."""
    from qtpy.QtWidgets import QApplication

    viewer.window.resize(1400, 1000)
    QApplication.processEvents()  # let the canvas take its size before framing the data
    viewer.reset_view()
    QApplication.processEvents()
    viewer.screenshot(path, canvas_only=canvas_only, flash=False)
    viewer.close()
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
