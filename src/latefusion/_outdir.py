"""Writing a set of output files into a directory all at once.

Every file is written into a staging directory inside the output directory, and moved into
place only when all of them are complete: an error or an interrupt never leaves a half-written
output, nor a mix of this run's files with an earlier run's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["write_outputs"]


def write_outputs(
    out_dir: str | os.PathLike[str], names: Sequence[str], write: Callable[[Path], None]
) -> dict[str, Path]:
    """Call ``write(staging)``, then move the files it made into ``out_dir`` (created if needed).

    ``names`` are every file this kind of output may hold. One that ``write`` did not make this
    time (``posterior.nc`` after a run without the Bayesian model) is removed from ``out_dir``,
    since it would be read as this run's. Returns the paths written, by name.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    blocked = [n for n in names if (out / n).exists() and not (out / n).is_file()]
    if blocked:
        raise ValueError(f"cannot write into {out}: {blocked} exist and are not files")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".latefusion-", dir=out))
    try:
        write(staging)
        paths = {}
        for name in names:
            if (staging / name).is_file():
                os.replace(staging / name, out / name)
                paths[name] = out / name
            elif (out / name).is_file():
                (out / name).unlink()
        return paths
    finally:
        shutil.rmtree(staging, ignore_errors=True)
