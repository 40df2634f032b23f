"""The federated training loop of one run, owned by the core (DP-FedAvg; McMahan et al. 2018).

Each round: Poisson-sample clients, let the backend train each one locally from the global model on the core's
batching plan, clip and aggregate the model deltas with noise (adaptive clipping, Andrew et al. 2021), and apply
the server optimizer. Only the local training runs in the backend; everything that decides what is computed
(partition, sampling, batches, aggregation, server update, evaluation) is numpy, identical for every backend.
"""

from __future__ import annotations

import math
import time
from typing import Protocol

import numpy as np

from bench.backend import Backend, Diverged
from bench.data.prepare import Dataset
from bench.federated.aggregation import AggregatorState, aggregate, init_server_state, server_step
from bench.federated.partition import (
    client_batches,
    client_id_partition,
    dirichlet_partition,
    load_client_ids,
    sample_clients,
)
from bench.models import build_spec, init_params
from bench.spec import RunSpec

NOISE_TAG = 0x4E015E  # separates the aggregation noise stream from the other per-round draws

Params = dict[str, np.ndarray]


class EventSink(Protocol):
    def emit(self, event: str, **fields: object) -> None: ...


def partition(run: RunSpec, labels: np.ndarray) -> list[np.ndarray]:
    """Each client's training-example indices, from the run's seed: the same for every backend."""
    spec = run.federated.partition
    if spec.kind == "dirichlet":
        return dirichlet_partition(labels, clients=spec.clients, alpha=spec.alpha, seed=run.seed)
    return client_id_partition(load_client_ids(spec.file, len(labels)))


def local_training(
    backend: Backend, run: RunSpec, data: Dataset, params: Params, indices: np.ndarray, rnd: int, client: int
):
    """One client's (delta, stats, seconds): its batches gathered by the core, trained by the backend."""
    positions, mask = client_batches(
        len(indices), epochs=run.train.epochs, batch_size=run.train.batch_size, seed=run.seed, round=rnd, client=client
    )
    rows = indices[positions] if len(indices) else np.zeros(positions.shape, np.int64)
    backend.set_params(params)
    t = time.perf_counter()
    stats = backend.local_train(data.x_train[rows], data.y_train[rows], mask)
    seconds = time.perf_counter() - t
    trained = backend.params()
    return {k: np.asarray(trained[k], np.float32) - params[k] for k in params}, stats, seconds


def _finite(params: Params) -> bool:
    return all(np.isfinite(v).all() for v in params.values())


def train_federated(run: RunSpec, data: Dataset, backend: Backend, events: EventSink, evaluate, peak_memory_mb) -> None:
    """Run every round, emitting a "round" event each; `evaluate(backend)` gives (test loss, test accuracy)."""
    fed, dp = run.federated, run.dp
    spec = build_spec(run.model, data.input_shape, data.num_classes)
    params = {k: np.asarray(v, np.float32) for k, v in init_params(spec, run.seed).items()}
    t0 = time.perf_counter()
    backend.build(run, spec, params, physical_batch_size=run.train.batch_size)
    events.emit("built", seconds=time.perf_counter() - t0, versions=backend.versions())
    clients = partition(run, data.y_train)
    state = AggregatorState(clip_norm=dp.max_grad_norm)
    server = init_server_state(params, fed.server_optimizer)
    for rnd in range(fed.rounds):
        round_start = time.perf_counter()
        chosen = sample_clients(run.seed, rnd, fed.total_clients, fed.sample_rate)
        deltas, train_seconds = [], 0.0
        loss_sum = correct = examples = 0.0
        for client in chosen:
            delta, stats, seconds = local_training(backend, run, data, params, clients[client], rnd, int(client))
            deltas.append(delta)
            train_seconds += seconds
            loss_sum += stats.loss * stats.examples
            correct += stats.accuracy * stats.examples
            examples += stats.examples
            if rnd == 0 and len(deltas) == 1:
                events.emit("compiled", seconds=seconds)
        update, state, agg = aggregate(
            deltas,
            state,
            dp=dp.enabled,
            noise_multiplier=dp.noise_multiplier or 0.0,
            expected_clients=float(fed.clients_per_round),
            adaptive=fed.adaptive_clipping,
            rng=np.random.default_rng([run.seed, rnd, NOISE_TAG]),
            like=params,
        )
        params, server = server_step(params, update, server, fed.server_optimizer)
        if not _finite(params):
            raise Diverged(f"non-finite global model after round {rnd + 1}")
        round_seconds = time.perf_counter() - round_start
        test_loss = test_accuracy = None
        if (rnd + 1) % fed.eval_every == 0 or rnd + 1 == fed.rounds:
            backend.set_params(params)
            test_loss, test_accuracy = evaluate(backend)
            if not math.isfinite(test_loss):
                raise Diverged(f"non-finite test loss {test_loss} after round {rnd + 1}")
        events.emit(
            "round",
            round=rnd + 1,
            sampled_clients=len(chosen),
            examples=int(examples),
            train_loss=loss_sum / examples if examples else None,
            train_accuracy=correct / examples if examples else None,
            test_loss=test_loss,
            test_accuracy=test_accuracy,
            clip_norm=agg.clip_norm if dp.enabled else None,
            unclipped_fraction=agg.unclipped_fraction if dp.enabled else None,
            train_seconds=train_seconds,
            round_seconds=round_seconds,
            peak_memory_mb=peak_memory_mb(),
        )
