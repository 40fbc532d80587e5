"""Figures of the toy suite say what they show: retrieval grids name the representation and mark the query
column; the ProtoNCE table has no unexplained nan."""

import numpy as np

from refssl.eval.retrieval import save_retrieval_grid


def test_retrieval_grid_names_the_representation_and_frames_the_query_column(tmp_path, monkeypatch):
    import matplotlib.figure
    import matplotlib.image as mpimg

    titles = []
    orig = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                        lambda self, t, **kw: titles.append(t) or orig(self, t, **kw))
    rng = np.random.default_rng(0)
    s, scale = 16, 4
    imgs = np.full((12, 3, s, s), 0.5)  # grey tiles: any saturated red in the PNG is the frame
    emb = rng.normal(size=(12, 5))
    path = tmp_path / "g.png"
    save_retrieval_grid(str(path), imgs[:3], emb[:3], imgs, emb, k=4, title="validation queries -> train set",
                        representation="raw pixels", scale=scale)
    assert "raw pixels" in titles[0] and "query" in titles[0] and "4 nearest" in titles[0]
    png = mpimg.imread(path)[..., :3]
    red = (png[..., 0] > 0.8) & (png[..., 1] < 0.3) & (png[..., 2] < 0.3)
    cols = np.nonzero(red.any(axis=0))[0]
    assert cols.size > 0, "no red frame"
    assert cols.max() - cols.min() < (s + 4) * scale  # one column wide
    grey = (np.abs(png[40:] - 0.5) < 0.05).all(axis=-1).any(axis=0)  # below the title (34 px)
    assert grey[cols.max() + 1:].any() and not grey[:cols.min()].any()  # neighbours right of it, nothing left
