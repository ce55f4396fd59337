"""The figure helper: PNGs written without pyplot."""

import matplotlib.pyplot as plt

from metakv_cl.plotting import new_figure, save_figure


def test_figures_are_saved_as_png_without_registering_with_pyplot(tmp_path):
    open_before = plt.get_fignums()
    figure = new_figure(figsize=(2, 2))
    figure.subplots().plot([0, 1], [1, 0])
    path = save_figure(figure, tmp_path / "line.png", tight=True)
    assert path == tmp_path / "line.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.get_fignums() == open_before
