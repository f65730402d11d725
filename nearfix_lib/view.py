"""Open a case of a run in napari: ``python -m nearfix_lib.view RUN_DIR CASE``.

The CT and the original, stage-2 and stage-3 labels (and the truth, for the phantom) in the class
colours, side by side (``--layout grid``, default) or stacked to toggle (``--layout overlay``).
``--screenshot out.png`` saves the canvas and exits instead of opening a window (headless nodes:
run it under ``xvfb-run -a``).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run folder, e.g. outputs/demo")
    ap.add_argument("case", help="case id, e.g. 1")
    ap.add_argument("--layout", choices=["grid", "overlay"], default="grid")
    ap.add_argument("--opacity", type=float, default=0.6, help="labels opacity")
    ap.add_argument("--screenshot", default="", help="save the canvas to this PNG and exit")
    args = ap.parse_args(argv)

    import napari

    from .viz import napari_overlay

    viewer = napari_overlay(args.run_dir, args.case, layout=args.layout, show=True, opacity=args.opacity)
    if args.screenshot:
        from qtpy.QtWidgets import QApplication

        viewer.window.resize(1400, 1000)
        QApplication.processEvents()  # let the canvas take its size before framing the data
        viewer.reset_view()
        QApplication.processEvents()
        viewer.screenshot(args.screenshot, canvas_only=True, flash=False)
        viewer.close()
        print(f"wrote {args.screenshot}")
        return 0
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
