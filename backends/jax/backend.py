"""JAX DP-SGD (Abadi et al. 2016) as small pure functions composed into one jitted step.

A batch of the physical size is one call of the chunk function. A rare oversized Poisson
batch is split into chunks of the physical size whose clipped sums are added under `lax.scan`,
so memory stays bounded by one chunk and it costs one extra compilation. Not every batch goes
through the scan: XLA's CPU back end runs a convolution's filter gradient over 100x slower inside
a loop body than outside (2.8 s against 25 ms for the Fashion-MNIST CNN's second convolution at
batch 2232, tests/benchmarks/test_jax_kernels.py), and a batch of one chunk needs no loop.

A federated run (DP-FedAvg) builds no DP step: `local_train` calls one jitted non-private step on a
(B, ...) batch in a Python loop over the client's batches, so clients of any size share one compilation
and no convolution gradient runs inside a loop body.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from backends.jax import bk
from backends.jax.models import Params, make_apply
from bench.backend import StepStats
from bench.models import ModelSpec
from bench.spec import OptimizerSpec, RunSpec

CLIP_EPS = 1e-6  # as Opacus: factor = min(1, C / (norm + 1e-6))

# The original (non-partitionable) threefry draws the step's Gaussian noise 1.8x faster on CPU (89 ms against
# 161 ms for ResNet-18's 11.2M parameters on 2 cores, tests/benchmarks/test_jax_kernels.py); only the stream
# differs, not the distribution. Partitionable keys matter for sharded arrays, which this backend never uses.
jax.config.update("jax_threefry_partitionable", False)


def make_optimizer(opt: OptimizerSpec) -> optax.GradientTransformation:
    """torch semantics: coupled L2 weight decay added to the gradient, then SGD/Adam."""
    if opt.name == "adam":
        base = optax.adam(opt.learning_rate, b1=opt.beta1, b2=opt.beta2, eps=opt.eps)
    else:
        base = optax.sgd(opt.learning_rate, momentum=opt.momentum or None)
    if opt.weight_decay:
        return optax.chain(optax.add_decayed_weights(opt.weight_decay), base)
    return base


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def global_norms(per_example: Params) -> jax.Array:
    """L2 norm of each example's gradient over all parameters."""
    squares = [jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree.leaves(per_example)]
    return jnp.sqrt(sum(squares))


def clip_factors(norms: jax.Array, max_norm: float, mask: jax.Array) -> jax.Array:
    """min(1, C / norm) per example; 0 for padded rows."""
    return jnp.minimum(1.0, max_norm / (norms + CLIP_EPS)) * mask


def weighted_sum(per_example: Params, weights: jax.Array) -> Params:
    return jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), per_example)


def gaussian_noise(key: jax.Array, like: Params, std: float) -> Params:
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _chunks(physical: int, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(a.reshape(a.shape[0] // physical, physical, *a.shape[1:]) for a in arrays)


def per_example_grads(apply: Callable) -> Callable:
    """(params, x, y) -> (per-example gradients, logits), by vmap over single-example grads."""

    def loss_one(p: Params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = apply(p, x[None])[0]
        return cross_entropy(logits, y), logits

    return jax.vmap(jax.grad(loss_one, has_aux=True), in_axes=(None, 0, 0))


def make_clipped_sum(apply: Callable, max_norm: float) -> Callable:
    """(params, x, y, mask) -> (sum of clipped per-example grads, loss sum, correct count)."""
    grad_one = per_example_grads(apply)

    def clipped_sum(params: Params, x: jax.Array, y: jax.Array, mask: jax.Array):
        grads, logits = grad_one(params, x, y)
        factors = clip_factors(global_norms(grads), max_norm, mask)
        losses = cross_entropy(logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return weighted_sum(grads, factors), jnp.sum(losses * mask), jnp.sum(correct * mask)

    return clipped_sum


def make_masked_sum(apply: Callable) -> Callable:
    """Non-private: (params, x, y, mask) -> (sum of grads over real rows, loss sum, correct)."""

    def loss_sum(p: Params, x: jax.Array, y: jax.Array, mask: jax.Array):
        logits = apply(p, x)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return jnp.sum(cross_entropy(logits, y) * mask), jnp.sum(correct * mask)

    def masked_sum(params: Params, x: jax.Array, y: jax.Array, mask: jax.Array):
        (loss, correct), grads = jax.value_and_grad(loss_sum, has_aux=True)(params, x, y, mask)
        return grads, loss, correct

    return masked_sum


def slice_bounds(rows: int, parts: int) -> list[tuple[int, int]]:
    """(start, stop) of `parts` consecutive slices of `rows` rows whose sizes differ by at most one."""
    if not 1 <= parts <= rows:
        raise ValueError(f"{parts} slices of a batch of {rows} rows; expected 1 to {rows}")
    bounds = [round(i * rows / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def split_sum(chunk_sum: Callable, parts: int) -> Callable:
    """`chunk_sum` as the sum over `parts` slices of the batch (sizes differing by at most one row), written out
    rather than looped, so that XLA's CPU runtime runs the slices concurrently: it runs many single
    convolutions and batched matmuls of these shapes on one thread, and smaller slices stay in cache."""
    if parts == 1:
        return chunk_sum

    def total(params: Params, x: jax.Array, y: jax.Array, mask: jax.Array):
        sums = [chunk_sum(params, *(a[lo:hi] for a in (x, y, mask))) for lo, hi in slice_bounds(x.shape[0], parts)]
        return jax.tree.map(lambda *s: sum(s[1:], s[0]), *sums)

    return total


# On CPU, rows per concurrent slice of a physical batch at most. For the Fashion-MNIST CNN at 2224 rows, 28
# slices rather than 16 (of 128 rows at most) made the DP step 7-9% faster and left the non-private one within 4%
# (three runs of `scripts/jax_side_by_side.py cnn --slices 16`); ResNet-18-GN at 320 rows keeps its 4, its
# fastest (5 or 8 slices: 9-31% slower, measured like `... resnet --slices 5 --slices 8`).
SLICE_ROWS = 80
MAX_SLICES = 32


def slice_count(physical: int) -> int:
    """How many slices `split_sum` cuts a physical batch into on CPU: the fewest of at most SLICE_ROWS rows
    (28 for the speed suite's Fashion-MNIST CNN batch of 2224 rows, 4 for ResNet-18's 320), at most MAX_SLICES."""
    return max(1, min(MAX_SLICES, -(-physical // SLICE_ROWS)))


def accumulate(chunk_sum: Callable, physical: int) -> Callable:
    """Sum `chunk_sum` over physical-size chunks of a padded batch with lax.scan."""

    def total(params: Params, x: jax.Array, y: jax.Array, mask: jax.Array):
        if x.shape[0] == physical:
            return chunk_sum(params, x, y, mask)
        xs = _chunks(physical, x, y, mask)

        def body(carry, chunk):
            g, loss, correct = chunk_sum(params, *chunk)
            acc_g, acc_loss, acc_correct = carry
            return (jax.tree.map(jnp.add, acc_g, g), acc_loss + loss, acc_correct + correct), None

        zero = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0))
        (g, loss, correct), _ = jax.lax.scan(body, zero, xs)
        return g, loss, correct

    return total


def make_local_step(apply: Callable, opt: optax.GradientTransformation) -> Callable:
    """Federated local training: one non-private step of `opt` on the mean loss over a batch's real rows."""
    masked_sum = make_masked_sum(apply)

    def step(params: Params, opt_state, x: jax.Array, y: jax.Array, mask: jax.Array):
        g, loss, correct = masked_sum(params, x, y, mask)
        count = jnp.maximum(jnp.sum(mask), 1.0)
        updates, opt_state = opt.update(jax.tree.map(lambda s: s / count, g), opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, correct

    return step


def to_device(params: dict[str, np.ndarray]) -> Params:
    """A float32 device copy: jnp.asarray would alias the caller's numpy memory on CPU."""
    return jax.device_put({k: np.asarray(v, np.float32) for k, v in params.items()})


class JaxBackend:
    name: ClassVar[str] = "jax"
    # bk: book-keeping clipping (backends/jax/bk.py), the default: the fastest;
    # vmap: per-example gradients by jax.vmap, the reference of tests/conformance.
    variants: ClassVar[tuple[str, ...]] = ("bk", "vmap")

    def versions(self) -> dict[str, str]:
        device = jax.devices()[0]
        return {
            "jax": jax.__version__,
            "jaxlib": importlib.metadata.version("jaxlib"),
            "optax": optax.__version__,
            "device": f"{device.platform}:{device.device_kind}",
        }

    def build(
        self, run: RunSpec, model: ModelSpec, init_params: dict[str, np.ndarray], *, physical_batch_size: int
    ) -> None:
        self.run = run
        self._physical = physical_batch_size
        self._model = model
        self._variant = run.variant or self.variants[0]
        if self._variant not in self.variants:
            raise ValueError(f"jax has no variant {self._variant!r}; known: {', '.join(self.variants)}")
        self._model_apply = bk.make_apply(model) if self._variant == "bk" else make_apply(model)
        self._apply = jax.jit(self._model_apply)
        self._params = to_device(init_params)
        self._opt = make_optimizer(run.train.optimizer)
        self._opt_state = self._opt.init(self._params)
        self._key = jax.random.key(run.seed)
        self._step = 0
        self._traces = 0
        if run.federated is not None:  # local training only: the core clips and noises the clients' deltas
            self._local_step = jax.jit(self._counted(make_local_step(self._model_apply, self._opt)))
        else:
            self._step_fn = self._make_step()

    def _counted(self, fn: Callable) -> Callable:
        """`fn`, counting its traces (each is one compilation of the jitted step)."""

        def traced(*args):
            self._traces += 1
            return fn(*args)

        return traced

    def _make_step(self) -> Callable:
        run, dp = self.run, self.run.dp
        if dp.enabled and self._variant == "bk":
            clip = lambda norms, mask: clip_factors(norms, dp.max_grad_norm, mask)  # noqa: E731
            chunk_sum = bk.make_clipped_sum(self._model, cross_entropy, clip)
        elif dp.enabled:
            chunk_sum = make_clipped_sum(self._model_apply, dp.max_grad_norm)
        else:
            chunk_sum = make_masked_sum(self._model_apply)
        parts = slice_count(self._physical) if jax.devices()[0].platform == "cpu" else 1
        total = accumulate(split_sum(chunk_sum, parts), self._physical)
        noise_std = (dp.noise_multiplier or 0.0) * dp.max_grad_norm
        expected = run.train.batch_size if dp.sampling == "shuffle" else run.sample_rate * run.dataset_size
        opt = self._opt

        # The noise has its own jitted draw: compiled into the step, ResNet-18's 11.2M normals raised the worker's
        # peak memory by about 400 MB (XLA:CPU's compilation of the step), more than the step's buffers.
        shapes = jax.eval_shape(lambda p: p, self._params)
        self._draw = jax.jit(lambda key: gaussian_noise(key, shapes, noise_std)) if dp.enabled else lambda key: None

        def step(params, opt_state, noise, x, y, mask):
            self._traces += 1
            g, loss, correct = total(params, x, y, mask)
            count = jnp.sum(mask)
            if dp.enabled:
                denom = expected if dp.sampling == "poisson" else jnp.maximum(count, 1.0)
                g = jax.tree.map(lambda s, z: (s + z) / denom, g, noise)
            else:
                g = jax.tree.map(lambda s: s / jnp.maximum(count, 1.0), g)
            updates, opt_state = opt.update(g, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss, correct, count

        return jax.jit(step, donate_argnums=(0, 1))

    def train_step(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> StepStats:
        key = jax.random.fold_in(self._key, self._step)
        self._params, self._opt_state, loss, correct, count = self._step_fn(
            self._params, self._opt_state, self._draw(key), x, y.astype(np.int32), mask
        )
        self._step += 1
        n = float(count)  # blocks until the step is done
        return StepStats(loss=float(loss) / n if n else 0.0, accuracy=float(correct) / n if n else 0.0, examples=int(n))

    def local_train(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> StepStats:
        """One jitted (B, ...) step per batch with real rows, in a Python loop: no recompilation per client size
        and no lax.scan (slow conv filter gradients on XLA:CPU, see the module docstring)."""
        counts = np.asarray(mask).sum(axis=1)
        params, opt_state = self._params, self._opt.init(self._params)
        y = np.asarray(y, np.int32)
        sums = []
        for s in np.flatnonzero(counts):
            params, opt_state, loss, correct = self._local_step(params, opt_state, x[s], y[s], mask[s])
            sums.append((loss, correct))
        self._params = params
        n = float(counts.sum())
        if not n:
            return StepStats(loss=0.0, accuracy=0.0, examples=0)
        loss, correct = np.sum(jax.device_get(sums), axis=0, dtype=np.float64)
        return StepStats(loss=float(loss) / n, accuracy=float(correct) / n, examples=int(n))

    def set_params(self, params: dict[str, np.ndarray]) -> None:
        if params.keys() != self._params.keys():
            raise ValueError(f"jax: parameter names {sorted(params)} != {sorted(self._params)}")
        self._params = to_device(params)

    def predict(self, x: np.ndarray) -> np.ndarray:
        n, bs = len(x), self.run.train.eval_batch_size
        if n < bs:  # pad so a short last chunk reuses the compiled shape
            x = np.concatenate([x, np.zeros((bs - n, *x.shape[1:]), x.dtype)])
        return np.asarray(self._apply(self._params, x))[:n]

    def per_example_grad_norms(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Reference per-example gradient norms (used by tests/conformance to pick C)."""
        grads, _ = per_example_grads(self._model_apply)(self._params, x, y.astype(np.int32))
        return np.asarray(global_norms(grads))

    def params(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self._params.items()}

    def reported_epsilon(self, delta: float) -> float | None:
        return None

    def peak_memory_mb(self) -> float | None:
        stats = jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return peak / 2**20 if peak else None

    def compilations(self) -> int | None:
        return self._traces
