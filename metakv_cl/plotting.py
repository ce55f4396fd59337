"""Figures for reports and benchmarks, made and saved in one way.

Figures are drawn by matplotlib's Agg canvas directly, not through pyplot: no display is
needed, no global backend is switched, and no figure stays registered after it is saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(**kwargs: Any) -> Figure:
    """A figure with the Agg canvas attached; add axes with ``figure.subplots`` / ``add_subplot``.

    Args:
        **kwargs: passed to :class:`matplotlib.figure.Figure` (``figsize``, ``layout``, ...).

    Returns:
        The figure.
    """
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: Path, dpi: int = 110, tight: bool = False) -> Path:
    """Write ``figure`` as a PNG.

    Args:
        figure: a figure of :func:`new_figure`.
        path: where to write it.
        dpi: resolution.
        tight: crop the image to what is drawn (``bbox_inches="tight"``).

    Returns:
        ``path``.
    """
    figure.savefig(path, dpi=dpi, bbox_inches="tight" if tight else None)
    return path
