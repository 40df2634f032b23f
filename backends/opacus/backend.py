"""Opacus (PyTorch) DP-SGD: clipping, noise and accounting all by Opacus' own classes.

Variants are Opacus' grad-sample modes:

- ``ghost``: fast gradient clipping (Li et al. 2022, "Large Language Models Can Be Strong
  Differentially Private Learners"; Bu et al. 2022): per-example gradient *norms* from a
  first backward pass (without instantiating the per-example gradients where Opacus has a
  norm sampler, i.e. Linear; Conv2d and GroupNorm instantiate them and keep only the
  norms), then a second backward pass on the loss reweighted by the clipping factors
  (GradSampleModuleFastGradientClipping + DPOptimizerFastGradientClipping +
  DPLossFastGradientClipping).
- ``hooks``: per-example gradients from forward/backward hooks (GradSampleModule), clipped
  by DPOptimizer.
- ``functorch``: the same, with every layer's per-example gradients from torch.func.vmap.

Batches arrive padded to a multiple of the physical batch size with a 0/1 mask. The
per-example loss is multiplied by the mask, so padded rows have zero per-example gradients
and contribute nothing to the clipped sum. Each physical chunk is one forward/backward;
all but the last are "skipped" optimizer steps that only clip and accumulate (as Opacus'
BatchMemoryManager does), and the last adds N(0, sigma^2 C^2), divides by the expected
batch size q*N (Poisson) or the real row count (shuffle) and steps the optimizer.

A federated run (DP-FedAvg) sets up no Opacus machinery at all: each client's `local_train` is plain
torch (the non-private step below) with a new torch optimizer; the core clips and noises the deltas.

Known numerical caveat (torch, not this code): on CPU, float32 ``Tensor.norm(dim=...)``
accumulates in a single float32 register (pytorch/pytorch#169237), so Opacus' per-example
norms of layers with ~1M weights carry ~1e-5 relative error; updates then differ from an
exact clip by the same relative amount (ResNet-18 on CPU), far below the DP noise.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import warnings
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import IAccountant, create_accountant
from opacus.grad_sample import AbstractGradSampleModule
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn

from backends.opacus.models import ZooNet, build_module, canonical_params, load_canonical
from bench.backend import StepStats
from bench.models import ModelSpec
from bench.spec import OptimizerSpec, RunSpec

# Expected, not a problem: the first layer's input (the data) needs no gradient, so torch warns once per call site.
warnings.filterwarnings(
    "ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs"
)

LOSS_REDUCTION = "mean"  # PrivacyEngine.make_private's default; hooks rescale per-sample grads by the chunk's rows
Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def make_optimizer(opt: OptimizerSpec, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    """torch.optim SGD (with momentum) or Adam, with coupled L2 weight decay."""
    if opt.name == "adam":
        return torch.optim.Adam(
            params, lr=opt.learning_rate, betas=(opt.beta1, opt.beta2), eps=opt.eps, weight_decay=opt.weight_decay
        )
    return torch.optim.SGD(params, lr=opt.learning_rate, momentum=opt.momentum, weight_decay=opt.weight_decay)


def default_accountant() -> IAccountant:
    """The accountant PrivacyEngine uses by default in the installed Opacus ("prv" in 1.6)."""
    mechanism = inspect.signature(PrivacyEngine.__init__).parameters["accountant"].default
    return create_accountant(mechanism=mechanism)


def chunks(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, physical: int) -> list[Chunk]:
    return list(zip(x.split(physical), y.split(physical), mask.split(physical)))


class Totals:
    """Masked loss sum and correct count, kept on the device until the step ends."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)

    def add(self, logits: torch.Tensor, losses: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> None:
        self.loss += (losses.detach() * mask).sum()
        self.correct += ((logits.detach().argmax(-1) == y).float() * mask).sum()


class PlainStep:
    """Non-private baseline: the ordinary mean gradient over the real rows of the batch."""

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer):
        self.net = net
        self.optimizer = optimizer

    def __call__(self, parts: list[Chunk], count: float, totals: Totals) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        denom = max(count, 1.0)
        for x, y, mask in parts:
            logits = self.net(x)
            losses = F.cross_entropy(logits, y, reduction="none")
            ((losses * mask).sum() / denom).backward()
            totals.add(logits, losses, y, mask)
        self.optimizer.step()


class DPStep:
    """DP-SGD through a GradSampleModule (hooks or functorch) and Opacus' DPOptimizer."""

    def __init__(self, module: AbstractGradSampleModule, optimizer: DPOptimizer):
        self.module = module
        self.optimizer = optimizer

    def backward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, totals: Totals) -> None:
        logits = self.module(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        (losses * mask).mean().backward()
        totals.add(logits, losses, y, mask)

    def __call__(self, parts: list[Chunk], count: float, totals: Totals) -> None:
        for i, (x, y, mask) in enumerate(parts):
            self.optimizer.zero_grad(set_to_none=True)
            self.backward(x, y, mask, totals)
            if i < len(parts) - 1:
                self.optimizer.signal_skip_step(do_skip=True)
            self.optimizer.step()


class GhostStep(DPStep):
    """DP-SGD by ghost clipping: DPLossFastGradientClipping runs both backward passes."""

    def __init__(self, module: AbstractGradSampleModule, optimizer: DPOptimizer):
        super().__init__(module, optimizer)
        self.criterion = DPLossFastGradientClipping(
            module, optimizer, nn.CrossEntropyLoss(reduction=LOSS_REDUCTION), LOSS_REDUCTION
        )

    def backward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, totals: Totals) -> None:
        logits = self.module(x)
        loss = self.criterion(logits, y) * mask
        loss.backward()
        totals.add(logits, loss.loss_per_sample, y, mask)


class OpacusBackend:
    name: ClassVar[str] = "opacus"
    variants: ClassVar[tuple[str, ...]] = ("ghost", "hooks", "functorch")

    def versions(self) -> dict[str, str]:
        device = f"cuda:{torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cpu"
        return {"torch": torch.__version__, "opacus": importlib.metadata.version("opacus"), "device": device}

    def build(
        self, run: RunSpec, model: ModelSpec, init_params: dict[str, np.ndarray], *, physical_batch_size: int
    ) -> None:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
        self.run = run
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._physical = physical_batch_size
        self._num_classes = model.num_classes
        self.net: ZooNet = build_module(model, init_params).to(self.device)
        optimizer = make_optimizer(run.train.optimizer, self.net.parameters())
        self._accountant: IAccountant | None = None
        if run.dp.enabled and run.federated is None:
            self._step = self._make_dp_step(optimizer)
            self._accountant = default_accountant()
        else:
            self._step = PlainStep(self.net, optimizer)

    def _variant(self) -> str:
        variant = self.run.variant or self.variants[0]
        if variant not in self.variants:
            raise ValueError(f"opacus has no variant {variant!r}; known: {', '.join(self.variants)}")
        return variant

    def _make_dp_step(self, optimizer: torch.optim.Optimizer) -> DPStep:
        """Wrap model and optimizer as PrivacyEngine.make_private would, minus its DataLoader."""
        dp, variant = self.run.dp, self._variant()
        if dp.noise_multiplier is None:
            raise ValueError("opacus: dp.noise_multiplier is unset (the suite loader calibrates target_epsilon)")
        ModuleValidator.validate(self.net, strict=True)
        extra = {"max_grad_norm": dp.max_grad_norm} if variant == "ghost" else {}
        module = prepare_module(
            self.net, grad_sample_mode=variant, batch_first=True, loss_reduction=LOSS_REDUCTION, **extra
        )
        generator = torch.Generator(device=self.device).manual_seed(self.run.seed)
        dp_optimizer = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=variant)(
            optimizer=optimizer,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=self.run.sample_rate * self.run.dataset_size,
            loss_reduction=LOSS_REDUCTION,
            generator=generator,
        )
        return (GhostStep if variant == "ghost" else DPStep)(module, dp_optimizer)

    def _tensors(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> Chunk:
        return (
            torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device),
            torch.from_numpy(np.asarray(y, np.int64)).to(self.device),
            torch.from_numpy(np.asarray(mask, np.float32)).to(self.device),
        )

    def train_step(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> StepStats:
        count = float(np.sum(mask))
        if self.run.dp.enabled and self.run.dp.sampling == "shuffle":
            self._step.optimizer.expected_batch_size = max(count, 1.0)
        self.net.train()
        totals = Totals(self.device)
        self._step(chunks(*self._tensors(x, y, mask), self._physical), count, totals)
        if self._accountant is not None:
            self._accountant.step(noise_multiplier=self.run.dp.noise_multiplier, sample_rate=self.run.sample_rate)
        loss, correct = totals.loss.item(), totals.correct.item()  # .item() waits for the device
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return StepStats(
            loss=loss / count if count else 0.0, accuracy=correct / count if count else 0.0, examples=int(count)
        )

    def local_train(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> StepStats:
        """Plain torch steps (no PrivacyEngine) with a new client optimizer, one per batch with real rows."""
        counts = np.asarray(mask).sum(axis=1)
        step = PlainStep(self.net, make_optimizer(self.run.train.optimizer, self.net.parameters()))
        xs, ys, masks = self._tensors(x, y, mask)
        self.net.train()
        totals = Totals(self.device)
        for s in np.flatnonzero(counts):
            step([(xs[s], ys[s], masks[s])], float(counts[s]), totals)
        n = float(counts.sum())
        loss, correct = totals.loss.item(), totals.correct.item()  # .item() waits for the device
        return StepStats(loss=loss / n if n else 0.0, accuracy=correct / n if n else 0.0, examples=int(n))

    def set_params(self, params: dict[str, np.ndarray]) -> None:
        load_canonical(self.net, params)

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        self.net.eval()
        bs = self.run.train.eval_batch_size
        out = [
            self.net(torch.from_numpy(np.ascontiguousarray(x[i : i + bs], np.float32)).to(self.device))
            for i in range(0, len(x), bs)
        ]
        return torch.cat(out).cpu().numpy() if out else np.zeros((0, self._num_classes), np.float32)

    def params(self) -> dict[str, np.ndarray]:
        return canonical_params(self.net)

    def reported_epsilon(self, delta: float) -> float | None:
        """What Opacus' own accountant says (a cross-check; the core's epsilon is the headline)."""
        if self._accountant is None:
            return None
        if len(self._accountant) == 0:
            return 0.0
        if not self.run.dp.noise_multiplier:
            return float("inf")
        return float(self._accountant.get_epsilon(delta))

    def peak_memory_mb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else None

    def compilations(self) -> int | None:
        return None
