"""Typed run parameters loaded from YAML with ``inherit:`` and dotted overrides.

Every number of a run lives in ``params/*.yaml``; this module turns such a file into nested
dataclasses so that a typo (``class_resolutoin``) or a wrong type fails at load time with the
file and key named, instead of silently running with a default. A file may start with
``inherit: other.yaml`` (resolved beside it) and override only what differs; notebooks pass
their papermill parameters (``data_root``, ``run_dir``, ``device``, ``overrides``) through
:func:`load_params`, so a notebook run and a batch run resolve to the same object, which the
run folder records as ``params.yaml``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .baselines import BaselineParams
from .cleanup import CleanupParams
from .fusion import FusionParams
from .losses import LossParams
from .models import ModelParams
from .phantom import NoiseParams, PhantomParams
from .sampling import BalancedSamplingParams, SamplingParams
from .train import TrainParams
from .unified import UnifiedLossParams

PROJECT_MARKERS = ("pyproject.toml", "params")


@dataclass
class RunParams:
    """Where results go and what computes them."""

    name: str = "default"
    run_dir: str = ""  # empty: outputs/<name> under the project root
    device: str = "auto"  # auto = CUDA when present, else CPU; or "cpu", "cuda", "cuda:1"
    seed: int = 0


@dataclass
class DataParams:
    """Which labels to repair and with which class convention."""

    data_root: str = ""  # empty: generate the phantom data set into <run_dir>/phantom
    classes: str = "cardiac"  # built-in table name or a YAML class table (params/classes_*.yaml)
    class_keys: list[str] = field(default_factory=list)  # subset of the table; empty = all
    max_cases: int = 0  # 0 = every case found
    phantom: PhantomParams = field(default_factory=lambda: PhantomParams(n_cases=8, shape=(160, 160, 128)))


@dataclass
class PrepareParams:
    """Regions of interest and the fixed-size grids the implicit models are fitted on."""

    margin_unit: str = "mm"  # "mm" or "vox"
    heart_margin: float = 10.0  # whole-heart ROI: bounding box of all classes + this
    class_margin: float = 6.0  # per-class ROI: bounding box of the class + this
    heart_resolution: int = 256  # whole-heart ROI resampled to R^3
    class_resolution: int = 128  # per-class ROI resampled to R^3
    save_image: bool = True  # also resample the CT (linear) into the heart ROI where the case has one
    class_images: bool = False  # CT crops per class ROI too (needed only by stage1.model.appearance)
    # per class key, its own R, e.g. {Cor: 96}: a thin class whose box spans the heart loses pieces
    # on a coarse grid (training cost does not depend on R; evaluation and the saved maps do)
    class_resolution_overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.margin_unit not in ("mm", "vox"):
            raise ValueError(f"prepare.margin_unit must be 'mm' or 'vox', got {self.margin_unit!r}")
        if self.heart_resolution < 2 or self.class_resolution < 2:
            raise ValueError("prepare resolutions must be >= 2")
        for key, r in self.class_resolution_overrides.items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 2:
                raise ValueError(f"prepare.class_resolution_overrides.{key} must be an integer >= 2, got {r!r}")

    def class_resolution_for(self, key: str) -> int:
        return int(self.class_resolution_overrides.get(key, self.class_resolution))


def _coronary_overrides() -> dict:
    """Coronary: 0.7 Dice + 0.3 Focal (gamma 4) as the user asked; a thin tube's probability
    peaks below 0.5, and its pieces are a broken tree rather than islands, so a lower threshold,
    no expected-count rule (small specks still go) and bridges across gaps up to 12 mm."""
    return {"loss": {"kind": "dice_focal", "dice_weight": 0.7, "focal_weight": 0.3, "focal_gamma": 4.0},
            "threshold": 0.3,
            "cleanup": {"keep_expected": False, "min_component_mm3": 30.0, "bridge_gap_mm": 12.0}}


@dataclass
class Stage1Params:
    """Per-class repair. The defaults here are the production values (``params/default.yaml``
    is checked equal to them); the sections' own dataclasses keep library-level defaults."""

    model: ModelParams = field(default_factory=ModelParams)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(points_per_case=8192))
    loss: LossParams = field(default_factory=LossParams)
    train: TrainParams = field(default_factory=lambda: TrainParams(cases_per_batch=8, checkpoint_interval=5))
    threshold: float = 0.5
    cleanup: CleanupParams = field(default_factory=lambda: CleanupParams(min_component_mm3=10.0))
    chunk_points: int = 262_144  # points per inference chunk (bounds memory, not results)
    classes: list[str] = field(default_factory=list)  # classes `make demo` / the loop runs; empty = all
    # per class key, any of the fields above replaced (nested sections merge), e.g.
    # {"Cor": {"loss": {"kind": "dice_focal"}, "model": {"grid_sizes": [4, 8, 16, 32, 64]}}}
    overrides: dict = field(default_factory=lambda: {"Cor": _coronary_overrides()})

    def __post_init__(self) -> None:
        # every class's merged parameters are built now, so a typo in stage1.overrides.<key> fails
        # when the params load, not when that class's job starts hours into a SLURM array
        for key in self.overrides:
            self.for_class(key)

    def for_class(self, key: str) -> "Stage1Params":
        """The parameters class ``key`` runs with: these, with its overrides merged in."""
        over = self.overrides.get(key)
        if not over:
            return self
        if not isinstance(over, dict):
            raise ValueError(f"stage1.overrides.{key}: expected a mapping of fields, got {over!r}")
        if "overrides" in over or "classes" in over:
            raise ValueError(f"stage1.overrides.{key}: 'overrides'/'classes' cannot be overridden per class")
        base = {k: v for k, v in _plain(dataclasses.asdict(self)).items() if k != "overrides"}
        return _build(Stage1Params, {**_deep_merge(base, over), "overrides": {}}, f"stage1.overrides.{key}")


SUPERVISION_GRIDS = ("original", "roi")


def _unified_train() -> TrainParams:
    """F_theta sees every case each epoch; it needs more epochs and a faster start than stage 1."""
    return TrainParams(epochs=1500, cases_per_batch=8, lr=3e-3, lr_latent=3e-3, lr_step_epochs=500,
                       eval_interval=50, checkpoint_interval=10)


def _latent_only_train() -> TrainParams:
    return TrainParams(epochs=150, cases_per_batch=1, lr=0.0, lr_latent=1e-2, lr_step_epochs=0,
                       eval_interval=50, checkpoint_interval=50, select="last")


@dataclass
class Stage3Params:
    model: ModelParams = field(default_factory=ModelParams)
    sampling: BalancedSamplingParams = field(default_factory=BalancedSamplingParams)
    # 1/f_c^1 on top of balanced sampling starves the large classes; 0.5 tempers it
    loss: UnifiedLossParams = field(default_factory=lambda: UnifiedLossParams(class_weight_power=0.5))
    train: TrainParams = field(default_factory=_unified_train)
    # t_c is chosen among these on the training cases (Dice of P_c >= t_c against L^ref)
    threshold_candidates: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    chunk_points: int = 262_144
    new_case_train: TrainParams = field(default_factory=_latent_only_train)  # latent-only fit of a new case
    compare_distillation: bool = True  # notebook 04 also fits without distillation, to show the difference
    # Where the heads learn L^ref: "original" = the original voxels inside the whole-heart box (no
    # resampling of the labels; memory grows with the box), "roi" = the heart_resolution^3 grid
    # (bounded memory per case, but a grid coarser than the image loses thin structures: on the
    # demo the round trip alone costs the coronaries 0.04 Dice).
    supervision: str = "original"

    def __post_init__(self) -> None:
        if self.supervision not in SUPERVISION_GRIDS:
            raise ValueError(f"stage3.supervision must be one of {list(SUPERVISION_GRIDS)}, got {self.supervision!r}")


@dataclass
class Params:
    run: RunParams = field(default_factory=RunParams)
    data: DataParams = field(default_factory=DataParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    stage1: Stage1Params = field(default_factory=Stage1Params)
    stage2: FusionParams = field(default_factory=FusionParams)
    stage3: Stage3Params = field(default_factory=Stage3Params)
    baselines: BaselineParams = field(default_factory=BaselineParams)
    source: str = ""  # the YAML file these came from (informational)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)


__all__ = ["Params", "RunParams", "DataParams", "PrepareParams", "Stage1Params", "Stage3Params", "PhantomParams",
           "NoiseParams", "load_params", "project_root", "resolve_path"]


# -- loading ----------------------------------------------------------------------------------

def project_root(start: Path | None = None) -> Path:
    """The repository root (folder with pyproject.toml and params/), searched upwards from cwd.

    Notebooks run with cwd = notebooks/ in JupyterLab and cwd = repository root under
    papermill; both find the same root, so relative paths in params mean the same thing.
    """
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if all((folder / m).exists() for m in PROJECT_MARKERS):
            return folder
    return Path.cwd().resolve()


def resolve_path(path: str | Path, root: Path | None = None) -> Path:
    """Absolute paths stay; relative ones are taken from cwd if they exist there, else the root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (root or project_root()) / p


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ValueError(f"{path}: inherit cycle through {[str(s) for s in seen]}")
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    parent = data.pop("inherit", None)
    if parent:
        base = _read_yaml_chain(path.parent / parent, (*seen, path))
        data = _deep_merge(base, data)
    return data


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """``{"prepare.class_resolution": 64}`` or nested dicts; values may be YAML strings."""
    out = dict(data)
    for dotted, value in (overrides or {}).items():
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else value
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = _deep_merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


def _build(cls, data: Any, where: str):
    """Build dataclass ``cls`` from a mapping, checking keys and converting types."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{where}: cannot convert {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValueError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def mapping_parameter(value: dict | str | None, name: str) -> dict:
    """A dict notebook parameter as a dict: papermill's ``-p`` hands every value over as text.

    Accepts a mapping, its YAML or JSON text, or an empty value; anything else is a one-line
    ``ValueError`` naming the parameter.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0]
            raise ValueError(f"parameter {name}: not valid YAML/JSON ({first}): {value!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"parameter {name}: expected a mapping such as '{{\"data.max_cases\": 2}}', got {value!r}")
    return value


def load_params(params_file: str | Path = "params/default.yaml", overrides: dict | None = None,
                *, data_root: str | None = None, run_dir: str | None = None,
                device: str | None = None) -> Params:
    """Resolve a params file (with its ``inherit`` chain), overrides and notebook parameters.

    ``data_root``/``run_dir``/``device`` given as non-empty strings win over the file (they are
    the papermill parameters every notebook has); ``overrides`` takes dotted keys, as a dict or
    as its YAML/JSON text (what ``papermill -p overrides '{...}'`` passes).
    """
    path = resolve_path(params_file)
    data = _read_yaml_chain(path)
    data = _apply_overrides(data, mapping_parameter(overrides, "overrides"))
    for dotted, value in (("data.data_root", data_root), ("run.run_dir", run_dir),
                          ("run.device", device)):
        if value:
            data = _apply_overrides(data, {dotted: str(value)})
    data["source"] = str(path)
    return _build(Params, data, str(path))


def params_from_yaml_text(text: str) -> Params:
    """Rebuild :class:`Params` from a run folder's ``params.yaml`` (no inheritance there)."""
    return _build(Params, yaml.safe_load(text) or {}, "params.yaml")
