"""The refinement modes the apps offer, as ``Refiner.refine`` options (no torch import).

- ``"full"``: the whole cascade, as in CascadePSP (global step at L, then full-resolution tiles);
- ``"fast"``: the global step only, enlarged to full size; it corrects whole regions and keeps the
  coarse mask within a reduced pixel of its boundary (``engine.refine.results.keep_unseen``);
- ``"local"``: the full-resolution tiles only, on the coarse mask as it is (``skip_global``, our
  deviation): for masks already right at the global step's pixel size, where the global step can
  only erase detail (docs/RESULTS.md, IDRiD at 4K).
"""
from __future__ import annotations

from .errors import FineMaskError

REFINE_MODES: dict[str, dict[str, bool]] = {
    "full": {"fast": False, "skip_global": False},
    "fast": {"fast": True, "skip_global": False},
    "local": {"fast": False, "skip_global": True},
}

#: The mode every front end starts with: the one that held "never worse than its input" on every
#: test set with the shipped refiner (bench/refine_quality.py, docs/RESULTS.md); "full" and
#: "local" lowered some sets' scores with the light model.
DEFAULT_MODE = "fast"

#: One line per mode, for help texts.
MODE_HELP = {
    "full": "global step at reduced size, then full-resolution tiles",
    "fast": "global step only (quicker, coarser boundaries)",
    "local": "full-resolution tiles only, on the mask as it is",
}


def mode_options(mode: str) -> dict[str, bool]:
    """The ``fast`` / ``skip_global`` options of ``mode``; FineMaskError for an unknown mode."""
    if mode not in REFINE_MODES:
        raise FineMaskError(f"refinement mode must be one of {', '.join(REFINE_MODES)}, got {mode!r}")
    return dict(REFINE_MODES[mode])
