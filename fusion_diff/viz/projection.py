"""2-D projections of joint-space embeddings: t-SNE (scikit-learn), UMAP (if umap-learn is installed), PCA.

Rows are L2-normalised first, so Euclidean neighbourhoods are cosine neighbourhoods
(``|a - b|^2 = 2 - 2 cos(a, b)``), the geometry retrieval ranks by.
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import torch
import torch.nn.functional as F

from fusion_diff.errors import ConfigError

logger = logging.getLogger(__name__)

PROJECTIONS: tuple[str, ...] = ("auto", "tsne", "umap", "pca")
EXACT_TSNE_MAX_POINTS = 1500
MIN_POINTS_FOR_NEIGHBOUR_METHODS = 5  # below this, t-SNE / UMAP have no meaningful neighbourhoods


def umap_available() -> bool:
    return importlib.util.find_spec("umap") is not None


def resolve_projection(method: str) -> str:
    """``auto`` -> ``umap`` when umap-learn is installed, else ``tsne``; unknown names fail clearly."""
    if method not in PROJECTIONS:
        raise ConfigError(f"Unknown projection {method!r}; choose one of {list(PROJECTIONS)}.")
    if method == "auto":
        return "umap" if umap_available() else "tsne"
    if method == "umap" and not umap_available():
        raise ConfigError("Projection 'umap' needs umap-learn: `pip install umap-learn`, or use --method tsne.")
    return method


def _pca(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    out = centred @ vt[:2].T
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))  # fewer than 2 components when n or d < 2


def project_2d(points: torch.Tensor | np.ndarray, method: str = "auto", seed: int = 0) -> np.ndarray:
    """``[N, 2]`` coordinates of ``[N, d]`` embeddings, deterministic under ``seed``.

    Everything that should share one map must be projected in one call (t-SNE and UMAP have no
    out-of-sample transform). With fewer than ``MIN_POINTS_FOR_NEIGHBOUR_METHODS`` points, PCA is used.
    """
    method = resolve_projection(method)
    x = F.normalize(torch.as_tensor(np.asarray(points), dtype=torch.float32), dim=-1).numpy().astype(np.float64)
    n = len(x)
    if n < MIN_POINTS_FOR_NEIGHBOUR_METHODS and method != "pca":
        logger.warning("Only %d points: projecting with PCA instead of %s.", n, method)
        method = "pca"
    if method == "pca":
        return _pca(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
        exact = n <= EXACT_TSNE_MAX_POINTS  # O(n^2), but several times faster than Barnes-Hut at figure sizes
        tsne = TSNE(
            n_components=2,
            perplexity=perplexity,
            init="pca",
            random_state=seed,
            method="exact" if exact else "barnes_hut",
        )
        return tsne.fit_transform(x)
    import umap

    return umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed).fit_transform(x)
