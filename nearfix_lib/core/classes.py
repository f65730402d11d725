"""The class table: the one place where a label index is bound to an anatomical class.

Every other module asks a :class:`ClassTable` for indices, colours, priorities, expected
component counts and attachment rules, so a data set with other indices (or a subset of the
classes, e.g. the 3-class heart/aorta/PA labels of ``ts_chest``) only needs another table,
never a code change. When each script or module keeps its own copy of the index list, two
copies drift apart and a class is silently read as another (e.g. the coronaries as the
pulmonary veins); one table that every module asks is why that cannot happen here.

Tables load from a YAML list of records (``ClassTable.from_yaml``) or from the built-in
cardiac table below (``CARDIAC``), whose indices are those of the Public Cardiac CT Dataset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml


@dataclass(frozen=True)
class Attachment:
    """A rule "this class must lie on ``targets``".

    ``max_mm == 0`` means every component must touch (26-neighbour contact) one of the targets;
    ``max_mm > 0`` means every component must come within that many millimetres of them.
    """

    targets: tuple[str, ...]
    max_mm: float = 0.0


@dataclass(frozen=True)
class LabelClass:
    """One foreground class of the label map (background 0 is implicit, never listed)."""

    index: int
    key: str
    name: str
    colour: tuple[int, int, int]
    priority: int  # fusion priority: 1 wins over every other class
    expected_components: int  # 26-connected components a clean case has
    attachment: Attachment | None = None


@dataclass(frozen=True)
class ClassTable:
    """An ordered, validated set of :class:`LabelClass` records."""

    classes: tuple[LabelClass, ...]
    _by_key: dict = field(init=False, repr=False, compare=False)
    _by_index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("class table is empty")
        keys = [c.key for c in self.classes]
        indices = [c.index for c in self.classes]
        priorities = [c.priority for c in self.classes]
        columns: list[tuple[str, list[Any]]] = [("key", keys), ("index", indices), ("priority", priorities)]
        for what, values in columns:  # keys are str, indices and priorities int
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"class table: duplicate {what} {dup}")
        if min(indices) < 1:
            raise ValueError("class table: index 0 is background and cannot be a class")
        if max(indices) > 255:
            raise ValueError("class table: indices above 255 are not supported")
        for c in self.classes:
            if c.attachment is not None:
                unknown = [t for t in c.attachment.targets if t not in keys]
                if unknown:
                    raise ValueError(f"class table: {c.key} attaches to unknown classes {unknown}")
            if c.expected_components < 1:
                raise ValueError(f"class table: {c.key} expects < 1 component")
        object.__setattr__(self, "_by_key", {c.key: c for c in self.classes})
        object.__setattr__(self, "_by_index", {c.index: c for c in self.classes})

    # -- lookup -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self):
        return iter(self.classes)

    def __getitem__(self, key: str) -> LabelClass:
        """Class by key (``table["Cor"]``); a helpful error lists the keys that exist."""
        try:
            return self._by_key[key]
        except KeyError:
            raise KeyError(f"unknown class key {key!r}; known: {self.keys}") from None

    def by_index(self, index: int) -> LabelClass:
        try:
            return self._by_index[int(index)]
        except KeyError:
            raise KeyError(f"unknown class index {index}; known: {self.indices}") from None

    def resolve(self, cls: int | str) -> LabelClass:
        """A class from its index (int or digit string, as papermill passes ``-p cls 9``) or key."""
        if isinstance(cls, (int, np.integer)) or (isinstance(cls, str) and cls.isdigit()):
            return self.by_index(int(cls))
        return self[cls]

    @property
    def keys(self) -> list[str]:
        return [c.key for c in self.classes]

    @property
    def indices(self) -> list[int]:
        return [c.index for c in self.classes]

    @property
    def max_index(self) -> int:
        return max(self.indices)

    def by_priority(self) -> list[LabelClass]:
        """Classes from the one that wins (priority 1) to the one that yields to all others."""
        return sorted(self.classes, key=lambda c: c.priority)

    # -- derived arrays -----------------------------------------------------------------
    def colour_lut(self) -> np.ndarray:
        """(max_index + 1, 4) RGBA floats in [0, 1]; background and gaps are transparent."""
        lut = np.zeros((self.max_index + 1, 4), dtype=np.float32)
        for c in self.classes:
            lut[c.index, :3] = np.asarray(c.colour, dtype=np.float32) / 255.0
            lut[c.index, 3] = 1.0
        return lut

    def valid_values(self) -> np.ndarray:
        """Label values a map may hold: 0 and every class index."""
        return np.array([0, *self.indices], dtype=np.int64)

    # -- derivation and serialisation ----------------------------------------------------
    def subset(self, keys: Sequence[str]) -> ClassTable:
        """The listed classes only; attachment rules to dropped classes are dropped too."""
        keep = [self[k] for k in keys]
        kept = set(keys)
        out = []
        for c in keep:
            att = c.attachment
            if att is not None:
                targets = tuple(t for t in att.targets if t in kept)
                att = Attachment(targets, att.max_mm) if targets else None
            out.append(replace(c, attachment=att))
        return ClassTable(tuple(out))

    def to_records(self) -> list[dict]:
        recs = []
        for c in self.classes:
            rec = {
                "index": c.index,
                "key": c.key,
                "name": c.name,
                "colour": list(c.colour),
                "priority": c.priority,
                "expected_components": c.expected_components,
            }
            if c.attachment is not None:
                rec["attach_to"] = list(c.attachment.targets)
                rec["attach_max_mm"] = c.attachment.max_mm
            recs.append(rec)
        return recs

    @classmethod
    def from_records(cls, records: Iterable[dict]) -> ClassTable:
        allowed = {"index", "key", "name", "colour", "priority", "expected_components",
                   "attach_to", "attach_max_mm"}
        out = []
        for rec in records:
            extra = set(rec) - allowed
            if extra:
                raise ValueError(f"class record {rec.get('key', rec)}: unknown fields {sorted(extra)}")
            att = None
            if rec.get("attach_to"):
                att = Attachment(tuple(rec["attach_to"]), float(rec.get("attach_max_mm", 0.0)))
            colour = tuple(int(v) for v in rec["colour"])
            if len(colour) != 3 or not all(0 <= v <= 255 for v in colour):
                raise ValueError(f"class {rec['key']}: colour must be three integers 0..255")
            out.append(LabelClass(
                index=int(rec["index"]), key=str(rec["key"]), name=str(rec["name"]),
                colour=colour, priority=int(rec["priority"]),
                expected_components=int(rec.get("expected_components", 1)), attachment=att,
            ))
        return cls(tuple(out))

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClassTable:
        with open(path) as fh:
            data = yaml.safe_load(fh)
        records = data["classes"] if isinstance(data, dict) else data
        try:
            return cls.from_records(records)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: invalid class table: {err}") from None

    def to_yaml(self, path: str | Path) -> None:
        with open(path, "w") as fh:
            yaml.safe_dump({"classes": self.to_records()}, fh, sort_keys=False)


# The Public Cardiac CT Dataset convention (STACOM 2025): priorities, expected component counts
# and attachment rules are explained beside the table in cardiac.yaml.
CARDIAC = ClassTable.from_yaml(Path(__file__).with_name("cardiac.yaml"))


def load_table(spec: str | Path | None, keep: Sequence[str] | None = None,
               root: Path | None = None) -> ClassTable:
    """The table a run uses: ``"cardiac"``/empty (built-in) or a YAML file, optionally a subset."""
    if spec in (None, "", "cardiac"):
        table = CARDIAC
    else:
        path = Path(spec)
        if not path.is_absolute() and root is not None and not path.exists():
            path = root / path
        table = ClassTable.from_yaml(path)
    return table.subset(keep) if keep else table


def class_centre(labels: np.ndarray, table: ClassTable, key: str | None = None) -> tuple[int, int, int]:
    """Voxel at the centre of mass of a class (or of all foreground): where to cut slices."""
    mask = labels == table[key].index if key else labels > 0
    if not mask.any():
        return tuple(s // 2 for s in labels.shape)
    return tuple(int(round(c)) for c in np.argwhere(mask).mean(axis=0))  # type: ignore[return-value]
