"""The tests' run parameters: ``params/test.yaml``, the tiny run every test that needs a run's
parameters starts from (tests of the params files themselves, such as tests/test_params.py, read
demo.yaml or default.yaml on purpose).

A test passes only the overrides that what it tests needs (each with a comment saying why), so
that the suite's runs differ from each other, and from the notebook and fault-injection tests,
only where they must. A plain module rather than part of ``conftest.py``: ``tests/fit_child.py``
runs as a script in its own process and imports it too, and importing it loads no torch.
The function is not named ``test_params``: pytest would collect it as a test wherever imported.
"""

from __future__ import annotations

from pathlib import Path

from nearfix_lib.core.config import Params, load_params

PROJECT = Path(__file__).resolve().parents[1]
TEST_PARAMS = "params/test.yaml"  # relative to PROJECT: what notebooks get as ``params_file``


def load_test_params(overrides: dict | str | None = None, **load_kwargs) -> Params:
    """``params/test.yaml`` with ``overrides`` (dotted keys) and ``load_params``' keywords
    (``data_root=``, ``run_dir=``, ``device=``)."""
    return load_params(PROJECT / TEST_PARAMS, overrides, **load_kwargs)
