"""Reading CSV files whose label columns are text.

pandas reads "NA", "None", "null" and "nan" as missing by default. In a label column (a task
called "NA", a coefficient called "None") those are names, not missing values: label columns
are read as text with only empty cells missing. Repeated column names, which pandas renames
silently ("x1", "x1.1"), are an error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd

__all__ = ["read_labelled_csv"]


def read_labelled_csv(
    path: str | os.PathLike[str], labels: Sequence[str], sep: str = ","
) -> pd.DataFrame:
    """The table at ``path``, with the columns ``labels`` (those present) read as text."""
    header = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False)
    names = header.iloc[0].tolist() if len(header) else []
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"{path}: column name(s) {repeated} appear more than once; which one is meant is "
            "ambiguous, so rename or drop the others"
        )
    present = [c for c in labels if c in names]
    df = pd.read_csv(path, sep=sep, dtype=dict.fromkeys(present, str))
    if present and len(df):
        text = pd.read_csv(path, sep=sep, usecols=present, dtype=str, keep_default_na=False)
        for col in present:
            df[col] = text[col].mask(text[col] == "")
    return df
