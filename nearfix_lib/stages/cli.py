"""The ``nearfix`` command: one entry point for what each has its own ``python -m`` module.

::

    nearfix phantom OUT [--cases N --shape I J K ...]    # = python -m nearfix_lib.phantom
    nearfix pipeline --params P [--run-dir D --jobs N]   # = python -m nearfix_lib.stages.pipeline
    nearfix stage3 --params P [--run-dir D]              # = python -m nearfix_lib.stages.stage3
    nearfix view RUN CASE [--layout overlay ...]         # = python -m nearfix_lib.viz.view
    nearfix page RUN [--out docs/experiments/NAME.md]    # an experiment page from a run's CSVs

Every subcommand hands the rest of the command line to that module's ``main``, so the options and
their help are the module's own. Under torchrun use the module form,
``torchrun --nproc_per_node=K -m nearfix_lib.stages.stage3 ...`` (torchrun starts a module or a
script, not a console script).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from nearfix_lib import __version__
from nearfix_lib.phantom import dataset
from nearfix_lib.stages import pages, pipeline, stage3
from nearfix_lib.viz import view

COMMANDS: dict[str, tuple[Callable[..., int], str]] = {
    "phantom": (dataset.main, "write a phantom data root (segmentations/, images/, ground_truth/)"),
    "pipeline": (pipeline.main, "run every notebook of a run in order through papermill"),
    "stage3": (stage3.main, "fit the unified model (the module form runs under torchrun)"),
    "view": (view.main, "open a case of a run in napari"),
    "page": (pages.main, "write a run's experiment page (Markdown) from its CSVs"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: nearfix {{{','.join(COMMANDS)}}} ...", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "nearfix COMMAND --help shows the command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"nearfix {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"nearfix: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return COMMANDS[command][0](rest, prog=f"nearfix {command}")


if __name__ == "__main__":
    sys.exit(main())
