"""Scores the long-term-memory retrievers share (M+, see the reference spec §4).

* :func:`mean_sigmoid_scores`: M+'s retrieval score of every stored key for one prompt,
  ``s_j = mean_i sigmoid(q_i . k_j)`` (no scaling).
* :func:`oldest_first`: the order in which M+ places retrieved entries before the pool's vectors.
"""

from __future__ import annotations

import torch

from memkit.errors import InputError

__all__ = ["DEFAULT_BLOCK_ROWS", "mean_sigmoid_scores", "oldest_first"]

#: Rows of ``keys`` scored at a time by :func:`mean_sigmoid_scores`.
DEFAULT_BLOCK_ROWS = 16_384


def mean_sigmoid_scores(
    queries: torch.Tensor, keys: torch.Tensor, *, block_rows: int = DEFAULT_BLOCK_ROWS
) -> torch.Tensor:
    """M+'s retrieval score of each key: the mean over queries of ``sigmoid(q . k)``.

    Computed in float32 on the device of ``keys``, ``block_rows`` keys at a time, so the
    ``[q, block_rows]`` intermediate bounds the memory however many keys there are (M+ holds
    about 150k per layer).

    Args:
        queries: ``[q, k]`` query vectors (one per prompt token), any floating dtype; ``q >= 1``.
        keys: ``[m, k]`` key vectors, any floating dtype; ``m`` may be 0.
        block_rows: how many keys to score at once (``> 0``).

    Returns:
        ``[m]`` float32 scores in ``[0, 1]``, aligned with the rows of ``keys``.
    """
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise InputError(
            f"queries [q, k] and keys [m, k] must share k; got {list(queries.shape)} and {list(keys.shape)}"
        )
    if queries.shape[0] == 0:
        raise InputError("mean_sigmoid_scores needs at least one query")
    if block_rows <= 0:
        raise InputError(f"block_rows must be positive, got {block_rows}")
    q = queries.to(device=keys.device, dtype=torch.float32)
    m = int(keys.shape[0])
    out = torch.empty(m, dtype=torch.float32, device=keys.device)
    for start in range(0, m, block_rows):
        block = keys[start : start + block_rows].to(torch.float32)
        # [b, k] @ [k, q] -> [b, q]; sigmoid in place, then the mean over queries.
        out[start : start + block.shape[0]] = torch.sigmoid_(block @ q.T).mean(dim=1)
    return out


def oldest_first(ids: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
    """``ids`` reordered by age, oldest (largest age) first; equal ages keep their given order.

    Args:
        ids: ``[c]`` entry ids (any dtype).
        ages: ``[c]`` their ages (any real dtype), aligned with ``ids``.

    Returns:
        ``[c]`` the same ids, sorted by ``ages`` descending with a stable sort.
    """
    if ids.dim() != 1 or ages.dim() != 1 or ids.shape[0] != ages.shape[0]:
        raise InputError(
            f"ids [c] and ages [c] must be aligned 1-D tensors; got {list(ids.shape)} and {list(ages.shape)}"
        )
    order = torch.sort(ages.to(ids.device), descending=True, stable=True).indices
    return ids[order]
