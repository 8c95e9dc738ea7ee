"""See what Context Clusters cluster: per block and head, which center each point joined.

    from projects.coc import visualize
    maps = visualize.cluster_assignments(model, images)            # every block
    m = maps[(0, 0)]                                               # stage 0, block 0
    m["assignment"][b, head]       # [H_s, W_s] center index of each point (lib.layers.cluster)
    m["similarity"][b, head]       # [H_s, W_s] similarity to that center
    fig = visualize.plot_clusters(image, maps[(0, 0)], head=1)   # the paper's figure

The maps are computed from each block's real input (the output of the blocks before it), with
the same float32 similarity and first-max assignment as the forward pass.
"""
from __future__ import annotations

import jax
import numpy as np

from projects.coc.models import ContextCluster


def cluster_assignments(model: ContextCluster, images: jax.Array,
                        blocks: list[tuple[int, int]] | None = None) -> dict[tuple[int, int], dict]:
    """``{(stage, block): Cluster.assignments(...)}`` for ``images`` (NHWC, normalised RGB).

    ``blocks`` limits the result to some ``(stage, block)`` pairs (all by default); the forward
    pass still runs up to the last one requested.
    """
    wanted = None if blocks is None else set(blocks)
    last = None if wanted is None else max(wanted)
    out = {}
    x = model.embed(images)
    for i, stage in enumerate(model.stages):
        if stage.downsample is not None:
            x = stage.downsample(x)
        for j, block in enumerate(stage.blocks):
            if wanted is None or (i, j) in wanted:
                out[(i, j)] = block.token_mixer.assignments(block.norm1(x))
            if last is not None and (i, j) >= last:
                return out
            x = block(x)
    return out


def cluster_colors(num_centers: int, seed: int = 0) -> np.ndarray:
    """``[num_centers, 3]`` distinct-looking RGB colours in [0, 1] (a shuffled HSV wheel)."""
    import matplotlib.colors as mcolors
    hues = np.random.default_rng(seed).permutation(num_centers) / max(num_centers, 1)
    hsv = np.stack([hues, np.full(num_centers, 0.85), np.full(num_centers, 0.95)], -1)
    return mcolors.hsv_to_rgb(hsv)


def plot_clusters(image: np.ndarray, maps: dict, *, sample: int = 0, head: int = 0, alpha: float = 0.5,
                  ax=None, title: str | None = None):
    """Overlay one head's clusters on ``image`` (``[H, W, 3]`` in [0, 1]): each point coloured by
    its center (upsampled to the image), each center marked with a white cross. Returns the axes."""
    import matplotlib.pyplot as plt
    assign = np.asarray(maps["assignment"][sample, head])
    centers = np.asarray(maps["centers"])
    colors = cluster_colors(len(centers))
    h, w = image.shape[:2]
    sh, sw = assign.shape
    rows = np.minimum((np.arange(h) * sh) // h, sh - 1)       # nearest point of the feature map
    cols = np.minimum((np.arange(w) * sw) // w, sw - 1)
    overlay = colors[assign[rows][:, cols]]
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(image)
    ax.imshow(overlay, alpha=alpha)
    # centers: feature-map pixel (row, col) -> image coordinates of that pixel's middle
    ax.scatter((centers[:, 1] + 0.5) * w / sw - 0.5, (centers[:, 0] + 0.5) * h / sh - 0.5, marker="x",
               c="white", s=40, linewidths=2)
    ax.set_axis_off()
    ax.set_title(title if title is not None else f"{len(centers)} centers, head {head}")
    return ax
