"""TensorFlow Privacy DP-SGD: per-example clipping and noise by TF Privacy's own code.

Variants (all true per-example clipping: one microbatch per row):

- ``vectorized``: VectorizedDPKeras{SGD,Adam}Optimizer (tape.jacobian, then clipping
  under tf.vectorized_map);
- ``keras``: DPKeras{SGD,Adam}Optimizer (tape.jacobian, then a tf.while_loop over the
  examples through the GaussianSumQuery);
- ``fast``: fast gradient clipping (Li et al. 2022; Lee & Kifer 2021), as DPModel runs it:
  per-example norms from the layer registry without per-example gradients, then one
  backward pass of the loss reweighted by the clip factors. TF Privacy 0.9.0 registers only
  Dense and Embedding layers, so models with convolutions or GroupNorm are "unsupported";
- ``*-xla``: the same step compiled with XLA (``tf.function(jit_compile=True)``).

The contract. TF Privacy assumes fixed-size batches and divides the noised sum by the
number of microbatches. Here a batch is the core's Poisson batch padded to a physical size
with a 0/1 mask: the per-example loss is multiplied by the mask, so padded rows have zero
gradients and are clipped to zero; TF Privacy's result is multiplied back by the row
count and divided by the expected batch size q*N (or the real row count under shuffle
sampling), which gives (sum of clipped gradients + N(0, sigma^2 C^2)) / (q N), as in
Abadi et al. 2016 with Poisson sampling. The whole padded batch is one TF Privacy call:
splitting it into physical chunks would add noise per chunk (its gradient accumulation
does exactly that), which is a different mechanism.

A federated run (DP-FedAvg) uses no TF Privacy optimizer: `local_train` calls one traced non-private
step per batch (fixed signature, so clients of any size share one trace) after zeroing the optimizer
state; the core clips and noises the clients' deltas.

The update is torch's SGD (momentum, coupled L2) or Adam written out in TF, applied to TF
Privacy's privatised gradient: Keras' Adam adds epsilon outside the bias correction, which
would make the three backends train different optimizers.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import tensorflow as tf

from backends.tf_privacy.models import build_model
from bench.backend import StepStats, Unsupported
from bench.models import ModelSpec
from bench.spec import OptimizerSpec, RunSpec

logging.getLogger("absl").setLevel(logging.ERROR)  # compute_dp_sgd_privacy logs a deprecation per call

import tensorflow_privacy as tfp  # noqa: E402
from tensorflow_privacy.privacy.fast_gradient_clipping import (  # noqa: E402
    clip_grads,
    gradient_clipping_utils,
    layer_registry,
)

Grads = list[tf.Tensor]
DP_OPTIMIZERS = {
    ("keras", "sgd"): tfp.DPKerasSGDOptimizer,
    ("keras", "adam"): tfp.DPKerasAdamOptimizer,
    ("vectorized", "sgd"): tfp.VectorizedDPKerasSGDOptimizer,
    ("vectorized", "adam"): tfp.VectorizedDPKerasAdamOptimizer,
}


def cross_entropy(y: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)


class TorchUpdate:
    """torch.optim SGD (momentum, coupled L2 weight decay) or Adam on a list of variables."""

    def __init__(self, opt: OptimizerSpec, variables: list[tf.Variable]):
        self.opt = opt
        self.variables = variables
        self.t = tf.Variable(0.0, trainable=False)
        self.m = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables]
        self.v = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables] if opt.name == "adam" else []

    def apply(self, grads: Grads) -> None:
        opt = self.opt
        if opt.weight_decay:
            grads = [g + opt.weight_decay * w for g, w in zip(grads, self.variables)]
        if opt.name == "adam":
            self.t.assign_add(1.0)
            c1 = 1.0 - tf.pow(opt.beta1, self.t)
            c2 = 1.0 - tf.pow(opt.beta2, self.t)
            for w, g, m, v in zip(self.variables, grads, self.m, self.v):
                m.assign(opt.beta1 * m + (1.0 - opt.beta1) * g)
                v.assign(opt.beta2 * v + (1.0 - opt.beta2) * tf.square(g))
                w.assign_sub(opt.learning_rate * (m / c1) / (tf.sqrt(v / c2) + opt.eps))
        elif opt.momentum:
            for w, g, m in zip(self.variables, grads, self.m):
                m.assign(opt.momentum * m + g)
                w.assign_sub(opt.learning_rate * m)
        else:
            for w, g in zip(self.variables, grads):
                w.assign_sub(opt.learning_rate * g)

    def reset(self) -> None:
        """A fresh optimizer state (step count, momentum buffer / Adam moments)."""
        self.t.assign(0.0)
        for slot in (*self.m, *self.v):
            slot.assign(tf.zeros_like(slot))


def split_variant(variant: str) -> tuple[str, bool]:
    """ "vectorized-xla" -> ("vectorized", True)."""
    return variant.removesuffix("-xla"), variant.endswith("-xla")


def unregistered_layers(model: tf.keras.Model, registry: layer_registry.LayerRegistry) -> list[str]:
    return sorted(
        {type(layer).__name__ for layer in model.layers if layer.trainable_variables and not registry.is_elem(layer)}
    )


class TFPrivacyBackend:
    name: ClassVar[str] = "tf_privacy"
    variants: ClassVar[tuple[str, ...]] = ("vectorized", "keras", "fast", "vectorized-xla", "keras-xla", "fast-xla")

    def versions(self) -> dict[str, str]:
        return {
            "tensorflow": tf.__version__,
            "tensorflow-privacy": importlib.metadata.version("tensorflow-privacy"),
            "device": "gpu" if tf.config.list_physical_devices("GPU") else "cpu",
        }

    def build(
        self, run: RunSpec, model: ModelSpec, init_params: dict[str, np.ndarray], *, physical_batch_size: int
    ) -> None:
        threads = int(os.environ.get("BENCH_THREADS", "2"))
        if not tf.config.threading.get_intra_op_parallelism_threads():
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.random.set_seed(run.seed)
        variant = run.variant or self.variants[0]
        if variant not in self.variants:
            raise ValueError(f"tf_privacy has no variant {variant!r}; known: {', '.join(self.variants)}")
        self.run = run
        self._base, xla = split_variant(variant)
        self._num_classes = model.num_classes
        self.model, self._named = build_model(model, init_params)
        self._vars = self.model.trainable_variables
        self._update = TorchUpdate(run.train.optimizer, self._vars)
        self._steps = 0
        self._traces = 0
        if run.federated is not None:
            grads = self._local_grads
            self._reset = tf.function(self._update.reset, input_signature=[])
        elif not run.dp.enabled:
            grads = self._plain_grads
        elif self._base == "fast":
            grads = self._fast_grads()
        else:
            grads = self._optimizer_grads()
        self._step_fn = self._make_step(grads, xla)
        self._shapes = {name: tuple(var.shape) for name, var in self._named.items()}
        variables = list(self._named.values())  # read in one call: 2x faster than Variable.numpy() each
        self._read = tf.function(lambda: [tf.identity(v) for v in variables], input_signature=[])
        shape = tf.TensorSpec([None, *model.input_shape], tf.float32)
        self._predict = tf.function(lambda x: self.model(x, training=False), input_signature=[shape])

    def _denominator(self, mask: tf.Tensor) -> tf.Tensor:
        """The expected batch size q*N (Poisson), or the real row count (shuffle)."""
        if self.run.dp.enabled and self.run.dp.sampling == "poisson":
            return tf.constant(self.run.sample_rate * self.run.dataset_size, tf.float32)
        return tf.maximum(tf.reduce_sum(mask), 1.0)

    def _plain_grads(self, x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor) -> tuple[Grads, tf.Tensor]:
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            loss = tf.reduce_sum(cross_entropy(y, logits) * mask) / self._denominator(mask)
        return tape.gradient(loss, self._vars), logits

    def _local_grads(self, x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor) -> tuple[Grads, tf.Tensor]:
        """A federated client's non-private gradient: the mean loss over the batch's real rows."""
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            loss = tf.reduce_sum(cross_entropy(y, logits) * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
        return tape.gradient(loss, self._vars), logits

    def _optimizer_grads(self) -> Callable:
        dp, opt = self.run.dp, self.run.train.optimizer
        if dp.noise_multiplier is None:
            raise ValueError("tf_privacy: dp.noise_multiplier is unset (the suite loader calibrates target_epsilon)")
        dp_optimizer = DP_OPTIMIZERS[self._base, opt.name](
            l2_norm_clip=dp.max_grad_norm,
            noise_multiplier=dp.noise_multiplier,
            num_microbatches=None,  # one microbatch per row: per-example clipping
            learning_rate=opt.learning_rate,
        )

        def grads(x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor) -> tuple[Grads, tf.Tensor]:
            with tf.GradientTape() as tape:
                logits = self.model(x, training=True)
                losses = cross_entropy(y, logits) * mask
            noised_means = dp_optimizer._compute_gradients(losses, self._vars, tape=tape)
            rows = tf.cast(tf.shape(losses)[0], tf.float32)  # what TF Privacy divided by
            scale = rows / self._denominator(mask)
            return [g * scale for g, _ in noised_means], logits

        return grads

    def _fast_grads(self) -> Callable:
        dp = self.run.dp
        registry = layer_registry.make_default_layer_registry()
        missing = unregistered_layers(self.model, registry)
        if missing:
            raise Unsupported(
                f"TF Privacy {importlib.metadata.version('tensorflow-privacy')} fast gradient clipping has no "
                f"per-example norm rule for {', '.join(missing)} (model {self.run.model}); "
                "it supports Dense and Embedding layers only"
            )
        sum_loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
        self.model.compile(loss=sum_loss)  # clip_grads reads the per-example loss from model.loss

        def grads(x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor) -> tuple[Grads, tf.Tensor]:
            clipped_sum, logits, _ = clip_grads.compute_clipped_gradients_and_outputs(
                input_model=self.model,
                l2_norm_clip=dp.max_grad_norm,
                layer_registry=registry,
                x_batch=x,
                y_batch=y,
                weight_batch=mask,
                clipping_loss=sum_loss,
            )
            noised = gradient_clipping_utils.add_aggregate_noise(
                clipped_sum, tf.shape(y)[0], dp.max_grad_norm, dp.noise_multiplier, loss_reduction="sum"
            )
            denom = self._denominator(mask)
            return [g / denom for g in noised], logits

        return grads

    def _make_step(self, grads_fn: Callable, xla: bool) -> Callable:
        def step(x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            self._traces += 1
            grads, logits = grads_fn(x, y, mask)
            self._update.apply(grads)
            losses = cross_entropy(y, logits) * mask
            correct = tf.cast(tf.argmax(logits, -1, output_type=tf.int32) == y, tf.float32) * mask
            return tf.reduce_sum(losses), tf.reduce_sum(correct), tf.reduce_sum(mask)

        signature = [
            tf.TensorSpec([None, *self.model.input_shape[1:]], tf.float32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], tf.float32),
        ]
        return tf.function(step, input_signature=signature, jit_compile=xla)

    def train_step(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> StepStats:
        loss, correct, count = self._step_fn(
            tf.constant(x, tf.float32), tf.constant(y, tf.int32), tf.constant(mask, tf.float32)
        )
        self._steps += 1
        n = float(count)  # .numpy() waits for the step
        return StepStats(loss=float(loss) / n if n else 0.0, accuracy=float(correct) / n if n else 0.0, examples=int(n))

    def local_train(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> StepStats:
        """The traced plain step once per batch with real rows, after resetting the client optimizer's state."""
        counts = np.asarray(mask).sum(axis=1)
        self._reset()
        sums = []
        for s in np.flatnonzero(counts):
            loss, correct, _ = self._step_fn(
                tf.constant(x[s], tf.float32), tf.constant(y[s], tf.int32), tf.constant(mask[s], tf.float32)
            )
            sums.append((loss, correct))
        n = float(counts.sum())
        if not n:
            return StepStats(loss=0.0, accuracy=0.0, examples=0)
        loss, correct = np.sum([(a.numpy(), b.numpy()) for a, b in sums], axis=0, dtype=np.float64)
        return StepStats(loss=float(loss) / n, accuracy=float(correct) / n, examples=int(n))

    def set_params(self, params: dict[str, np.ndarray]) -> None:
        """Raw AssignVariableOp: 2.5x faster than Variable.assign for the mlp (0.26 against 0.66 ms); it does not
        check shapes itself, so this does."""
        if params.keys() != self._named.keys():
            raise ValueError(f"tf_privacy: parameter names {sorted(params)} != {sorted(self._named)}")
        for name, var in self._named.items():
            value = np.asarray(params[name], np.float32)
            if value.shape != self._shapes[name]:
                raise ValueError(f"tf_privacy: {name} has shape {value.shape}, expected {self._shapes[name]}")
            tf.raw_ops.AssignVariableOp(resource=var.handle, value=value)

    def predict(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros((0, self._num_classes), np.float32)
        return self._predict(tf.constant(x, tf.float32)).numpy()

    def params(self) -> dict[str, np.ndarray]:
        return {name: value.numpy() for name, value in zip(self._named, self._read())}

    def reported_epsilon(self, delta: float) -> float | None:
        """TF Privacy's compute_dp_sgd_privacy (RDP, Poisson sampling) for the steps taken so far."""
        run = self.run
        if not run.dp.enabled or run.federated is not None:  # federated: the core accounts for rounds
            return None
        if self._steps == 0:
            return 0.0
        if not run.dp.noise_multiplier:
            return math.inf
        n, batch = run.dataset_size, run.sample_rate * run.dataset_size
        epochs = self._steps * batch / n
        if math.ceil(epochs * n / batch) != self._steps:  # it rounds epochs * n / batch up to whole steps
            epochs = math.nextafter(epochs, 0.0)
        eps, _ = tfp.compute_dp_sgd_privacy(n, batch, run.dp.noise_multiplier, epochs, delta)
        return float(eps)

    def peak_memory_mb(self) -> float | None:
        return None

    def compilations(self) -> int | None:
        return self._traces
