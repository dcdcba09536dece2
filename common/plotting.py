"""Matplotlib for report figures, headless: one place to get ``pyplot`` and to save a figure.

Every layer that writes a PNG (the server's capacity plot, the simulations' experiment and
benchmark figures) uses these, so none has to import a layer above it for plotting.
"""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, out: str | Path, dpi: int = 90) -> Path:
    """Lay out ``fig``, write it to ``out`` (parents created), close it; returns the path."""
    out = Path(out)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    pyplot().close(fig)
    return out
