"""What a data set looks like before anything is repaired (notebook 00).

Per case: grid, spacing, per-class voxel fractions and 26-connected component counts against
the class table's expectation; and, where ``ground_truth/`` exists (the phantom), the noisy
labels' scores against the truth — the baseline every later stage has to beat.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from nearfix_lib.core.classes import ClassTable
from nearfix_lib.core.io import LoadedCase
from nearfix_lib.core.metrics import at_expected_fraction, component_counts
from nearfix_lib.core.scores import score_labels, scores_frame


@dataclass
class Survey:
    cases: pd.DataFrame  # one row per case: shape, spacing, orientation
    fractions: pd.DataFrame  # case x class voxel fraction (%)
    components: pd.DataFrame  # case x class component count
    at_expected: pd.DataFrame  # per class: expected count and fraction of cases at it
    scores: pd.DataFrame  # the noisy labels against the truth (cases with one), see core.scores


def survey(cases: Iterable[LoadedCase], table: ClassTable) -> Survey:
    """Stream over the cases (one in memory at a time) and tabulate what they hold."""
    import nibabel as nib

    rows, fractions, components, scores = [], {}, {}, []
    for case in cases:
        labels = case.label.array
        rows.append({
            "case": case.case_id,
            "shape": "x".join(map(str, labels.shape)),
            "spacing_mm": " x ".join(f"{s:.2f}" for s in case.label.spacing),
            "orientation": "".join(nib.aff2axcodes(case.label.affine)),
            "image": case.image is not None,
            "truth": case.truth is not None,
        })
        counts = np.bincount(labels.ravel(), minlength=table.max_index + 1)
        fractions[case.case_id] = {c.key: 100.0 * counts[c.index] / labels.size for c in table}
        components[case.case_id] = component_counts(labels, table)
        if case.truth is not None:
            scores += score_labels(case.case_id, "noisy", "truth", labels, case.truth.array, case.label.spacing, table)
    comp = pd.DataFrame.from_dict(components, orient="index")
    comp.index.name = "case"
    frac = pd.DataFrame.from_dict(fractions, orient="index")
    frac.index.name = "case"
    at_exp = at_expected_fraction(list(components.values()), table)
    expected = pd.DataFrame({
        "expected": [c.expected_components for c in table],
        "at_expected_%": [100.0 * at_exp[c.key] for c in table],
        "mean_count": [comp[c.key].mean() if c.key in comp else np.nan for c in table],
    }, index=pd.Index(table.keys, name="key"))
    return Survey(pd.DataFrame(rows).set_index("case"), frac, comp, expected, scores_frame(scores))
