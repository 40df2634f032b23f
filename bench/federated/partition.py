"""Clients, client sampling and local batching plans for federated runs: pure numpy functions of the seed.

The core owns all of it, so every backend trains the same clients on the same batches. Client sampling is
Poisson (each client joins a round independently), which is what the user-level DP-FedAvg accountant assumes
(McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models").
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# Stream tags: each random draw below has its own generator, so adding one never shifts another.
PARTITION_TAG = 0xC11E47
SAMPLE_TAG = 0x5A3B1E
BATCH_TAG = 0xBA7C4E


def _balanced_sizes(n: int, clients: int) -> np.ndarray:
    """`clients` sizes summing to n that differ by at most 1 (the first n % clients get one more)."""
    sizes = np.full(clients, n // clients, dtype=np.int64)
    sizes[: n % clients] += 1
    return sizes


def _class_counts(rng: np.random.Generator, size: int, p: np.ndarray, room: np.ndarray) -> np.ndarray:
    """How many examples of each class one client takes: `size` draws from p over classes with room.

    Multinomial on p renormalised over classes that still have room, capped by the room; the shortfall
    is drawn again over the classes still open, until the client is full. This is rejection sampling of
    "draw labels one at a time from p restricted to non-exhausted classes", done in a few vectorised
    passes. When p has no mass on any open class (tiny alpha), the open classes are weighted by room.
    """
    counts = np.zeros_like(room)
    need = size
    while need > 0:
        left = room - counts
        weights = np.where(left > 0, p, 0.0)
        total = weights.sum()
        if not total > 0:
            weights, total = left.astype(np.float64), float(left.sum())
        draw = rng.multinomial(need, weights / total)
        take = np.minimum(draw, left)
        counts += take
        need -= int(take.sum())
    return counts


def dirichlet_partition(labels: np.ndarray, *, clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label-skewed clients of balanced size (Hsu et al. 2019, "Measuring the Effects of Non-Identical
    Data Distribution for Federated Visual Classification"): client k's label mix is p_k ~ Dirichlet(alpha).

    From `default_rng([seed, PARTITION_TAG])`: each class's examples are shuffled once into a pool; then
    all p_k are drawn; then clients 0, 1, ... in turn take their class counts (see `_class_counts`) off
    the fronts of the pools. Sizes differ by at most 1, every example lands in exactly one client, and
    the result (sorted int64 index arrays) depends only on (labels, clients, alpha, seed).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} and dtype {labels.dtype}")
    n = len(labels)
    if not isinstance(clients, int | np.integer) or clients < 1:
        raise ValueError(f"partition.clients must be a positive integer, got {clients!r}")
    if clients > n:
        raise ValueError(f"partition.clients = {clients} is more than the {n} training examples; use at most {n}")
    if not alpha > 0:
        raise ValueError(f"partition.alpha must be positive, got {alpha!r}")
    rng = np.random.default_rng([seed, PARTITION_TAG])
    classes, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    room = np.bincount(inverse, minlength=len(classes)).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(room)[:-1]])
    pools = [rng.permutation(order[s : s + r]) for s, r in zip(starts, room)]
    mixes = rng.dirichlet(np.full(len(classes), float(alpha)), size=clients)
    taken = np.zeros(len(classes), dtype=np.int64)
    parts = []
    for size, p in zip(_balanced_sizes(n, clients), mixes):
        counts = _class_counts(rng, int(size), p, room - taken)
        picked = [pools[c][taken[c] : taken[c] + counts[c]] for c in np.flatnonzero(counts)]
        taken += counts
        parts.append(np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.zeros(0, np.int64))
    return parts


def client_id_partition(ids: np.ndarray) -> list[np.ndarray]:
    """Example indices grouped by client id (natural partitions such as EMNIST's writers), ordered by id."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"client ids must be a 1-D array, got shape {ids.shape}")
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable").astype(np.int64)
    return np.split(order, np.cumsum(counts)[:-1]) if len(ids) else []


def load_client_ids(path: str | Path, n: int) -> np.ndarray:
    """The .npy array of integer client ids named by `partition.file`, one per training example (int64)."""
    expected = f"expected a .npy file holding a 1-D integer array of {n} client ids, one per training example"
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"partition.file {str(path)!r} does not exist; {expected}")
    try:
        ids = np.load(path, allow_pickle=False)
    except Exception as exc:  # np.load raises several types (ValueError, OSError, EOFError, ...)
        raise ValueError(f"partition.file {str(path)!r} could not be loaded ({exc}); {expected}") from exc
    if not isinstance(ids, np.ndarray):
        raise ValueError(f"partition.file {str(path)!r} holds several arrays (an .npz?); {expected}")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"partition.file {str(path)!r} holds shape {ids.shape} and dtype {ids.dtype}; {expected}")
    if len(ids) != n:
        raise ValueError(f"partition.file {str(path)!r} holds {len(ids)} ids; {expected}")
    return ids.astype(np.int64)


def sample_clients(seed: int, round: int, total_clients: int, rate: float) -> np.ndarray:
    """Round `round`'s clients: each joins independently with probability `rate` (Poisson); sorted, may be empty."""
    if not 0 <= rate <= 1:
        raise ValueError(f"client sampling rate must be in [0, 1], got {rate!r}")
    rng = np.random.default_rng([seed, round, SAMPLE_TAG])
    return np.flatnonzero(rng.random(total_clients) < rate).astype(np.int64)


def client_batches(
    n_examples: int, *, epochs: int, batch_size: int, seed: int, round: int, client: int
) -> tuple[np.ndarray, np.ndarray]:
    """One client's local batching plan: per epoch a seeded permutation cut into ceil(n / B) batches.

    Returns (positions, mask), both (epochs * ceil(n / B), B): positions index the client's own example
    array; the last batch of each epoch is padded with position 0 and mask 0.
    """
    if batch_size < 1 or epochs < 0 or n_examples < 0:
        raise ValueError(
            f"need batch_size >= 1, epochs >= 0, n_examples >= 0; got {batch_size}, {epochs}, {n_examples}"
        )
    per_epoch = math.ceil(n_examples / batch_size)
    width = per_epoch * batch_size
    positions = np.zeros((epochs, width), dtype=np.int64)
    mask = np.zeros((epochs, width), dtype=np.float32)
    for epoch in range(epochs):
        positions[epoch, :n_examples] = np.random.default_rng([seed, round, client, epoch, BATCH_TAG]).permutation(
            n_examples
        )
        mask[epoch, :n_examples] = 1.0
    return positions.reshape(-1, batch_size), mask.reshape(-1, batch_size)
