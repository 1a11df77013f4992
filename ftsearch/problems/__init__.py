"""Problem types by name: the seam for what is predicted and how it is judged (see ``base``).

To add one, subclass ``ProblemType`` and list it here; ``ftsearch.catalog.TASKS`` then pairs it
with a modality under a study-file ``task:`` name.
"""

from __future__ import annotations

from ftsearch.problems.base import Evaluation, ProblemType
from ftsearch.problems.classification import SingleLabelClassification
from ftsearch.problems.multilabel import MultiLabelClassification
from ftsearch.problems.regression import Regression

PROBLEM_TYPES: dict[str, ProblemType] = {
    p.name: p for p in (SingleLabelClassification(), MultiLabelClassification(), Regression())
}

__all__ = ["PROBLEM_TYPES", "Evaluation", "ProblemType", "problem_type"]


def problem_type(name: str) -> ProblemType:
    """The registered problem type ``name``."""
    return PROBLEM_TYPES[name]
