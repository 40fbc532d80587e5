"""Nearest-neighbour retrieval grids: each row shows a query image followed by its k nearest neighbours in
embedding space, saved as a PNG with matplotlib (Agg backend, no display needed)."""

from __future__ import annotations

import os

import numpy as np

from .probes import nearest_neighbors

__all__ = ["retrieval_mosaic", "save_retrieval_grid", "retrieval_grids"]


def retrieval_mosaic(query_images, bank_images, neighbours, *, pad=2, gap=6, pad_value=1.0):
    """One RGB mosaic (H, W, 3): row r is query r, a wider gap, then its neighbours in order.

    query_images : (Q, 3, S, S);  bank_images : (N, 3, S, S);  neighbours : (Q, k) indices into the bank.
    """
    q, _, s, _ = query_images.shape
    k = neighbours.shape[1]
    cell = s + pad
    h = q * cell + pad
    w = (k + 1) * cell + pad + gap
    out = np.full((h, w, 3), pad_value, dtype=np.float32)
    tiles = np.concatenate([query_images[:, None], bank_images[neighbours]], axis=1)  # (Q, k+1, 3, S, S)
    tiles = np.clip(tiles.transpose(0, 1, 3, 4, 2), 0.0, 1.0)  # channels last for imshow
    for c in range(k + 1):  # one column of tiles at a time (k + 1 slices, all rows at once)
        x0 = pad + c * cell + (gap if c > 0 else 0)
        rows = (pad + np.arange(q) * cell)[:, None] + np.arange(s)[None, :]
        out[rows.ravel(), x0:x0 + s] = tiles[:, c].reshape(q * s, s, 3)
    return out


def _grid_title(title, representation, k, metric):
    """The figure title: what was searched (``title``), in which representation, and how to read the rows."""
    first = title or "retrieval"
    if representation:
        first += f"  [representation: {representation}]"
    return (f"{first}\nred frame: query; to its right: its {k} nearest neighbours ({metric}), nearest first")


def save_retrieval_grid(path, query_images, query_emb, bank_images, bank_emb, *, k=8, metric="euclidean",
                        exclude_self=False, title=None, representation=None, scale=4):
    """Find the k nearest bank embeddings of each query and save the mosaic to ``path`` (PNG).

    exclude_self : the queries are the first rows of the bank and must not retrieve themselves.
    representation : what the embeddings are (e.g. "AE latent", "raw pixels"), named in the title.
    The query column is framed in red and the title says how to read a row.
    Returns the (Q, k) neighbour indices.
    """
    # The object-oriented API with the Agg canvas: no pyplot state, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nn = nearest_neighbors(query_emb, bank_emb, k, metric=metric, exclude_self=exclude_self)
    mosaic = retrieval_mosaic(query_images, bank_images, nn)
    from matplotlib.patches import Rectangle

    h, w, _ = mosaic.shape
    s = query_images.shape[-1]
    text = _grid_title(title, representation, nn.shape[1], metric)
    width_px = max(w * scale, 560)  # wide enough for the two title lines at small k
    title_px = 34
    fig = Figure(figsize=(width_px / 100, (h * scale + title_px) / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, h * scale / (h * scale + title_px)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.add_patch(Rectangle((0.5, 0.5), s + 2, h - 2, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_axis_off()
    fig.suptitle(text, fontsize=8, y=0.995)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return nn


def retrieval_grids(out_dir, train_images, train_emb, val_images, val_emb, rng, *, n_queries=8, k=8,
                    metric="euclidean", prefix="retrieval", representation=None):
    """Two grids: ``{prefix}_train.png`` (train queries, train bank, self excluded) and
    ``{prefix}_val.png`` (validation queries searched in the train bank).  Queries are drawn from ``rng``.
    ``representation`` names the embeddings in both titles.  Returns the two paths."""
    qt = rng.choice(len(train_images), size=min(n_queries, len(train_images)), replace=False)
    qv = rng.choice(len(val_images), size=min(n_queries, len(val_images)), replace=False)
    # put the train queries first in the bank so that exclude_self (query i == bank row i) applies
    rest = np.setdiff1d(np.arange(len(train_images)), qt)
    bank_order = np.concatenate([qt, rest])
    p_train = os.path.join(out_dir, f"{prefix}_train.png")
    p_val = os.path.join(out_dir, f"{prefix}_val.png")
    save_retrieval_grid(p_train, train_images[qt], train_emb[qt], train_images[bank_order], train_emb[bank_order],
                        k=k, metric=metric, exclude_self=True, title="train queries -> train set",
                        representation=representation)
    save_retrieval_grid(p_val, val_images[qv], val_emb[qv], train_images, train_emb, k=k, metric=metric,
                        title="validation queries -> train set", representation=representation)
    return p_train, p_val
