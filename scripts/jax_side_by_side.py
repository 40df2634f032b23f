"""DP and non-private jax:bk steps timed side by side, alternating in one process, so that machine drift
cancels out of their ratio; and each step's compiled temporary buffer, XLA's own count of its working memory.

    PYTHONPATH=. .envs/jax/bin/python scripts/jax_side_by_side.py [cnn|resnet] [--steps N] [--set NAME=VALUE]...
        [--slices N]...

The full jitted step (sliced clipped or plain sum, the noise's own draw, SGD with momentum) at the speed
suite's physical batch: the CNN on Fashion-MNIST rows, ResNet-18-GN on normal noise. Each `--set KEPT_BYTES=0`
(any integer constant of bk.py) adds a step, DP compiled with that constant, to measure a choice against the
default in the same process; each `--slices N` adds a DP and a non-private step cut into N batch slices instead
of `backend.slice_count`'s. XLA_FLAGS is passed to XLA as set (see backends/jax/__init__.py).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from backends.jax import backend as jb
from backends.jax import bk
from bench.data.loaders import load_raw
from bench.models import build_spec, init_params


def main(workload: str, steps: int, overrides: list[tuple[str, int]], slices: list[int]) -> None:
    if workload == "cnn":
        spec, physical, max_norm = build_spec("cnn-tanh", (28, 28, 1), 10), 2224, 0.1
        raw = load_raw("fashion-mnist")
        x, y = (raw.x_train[:physical].astype(np.float32) / 255.0 - 0.286) / 0.353, raw.y_train[:physical]
    else:
        spec, physical, max_norm = build_spec("resnet18-gn", (32, 32, 3), 10), 320, 1.0
        x = np.random.default_rng(0).normal(size=(physical, 32, 32, 3)).astype(np.float32)
        y = np.arange(physical) % 10
    y, mask = y.astype(np.int32), np.ones(physical, np.float32)
    params0 = {k: jnp.asarray(v) for k, v in init_params(spec, 0).items()}
    opt = optax.sgd(0.1, momentum=0.9)
    parts = jb.slice_count(physical)
    sums = {
        "non-private": jb.make_masked_sum(bk.make_apply(spec)),
        "dp": bk.make_clipped_sum(spec, jb.cross_entropy, lambda n, m: jb.clip_factors(n, max_norm, m)),
    }
    shapes = jax.eval_shape(lambda p: p, params0)
    draw = jax.jit(lambda key: jb.gaussian_noise(key, shapes, max_norm))

    def make_step(total):
        def step(p, s, noise, x, y, m):
            g, loss, _ = total(p, x, y, m)
            g = jax.tree.map(lambda a, z: (a + z) / physical, g, noise)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

        return jax.jit(step, donate_argnums=(0, 1))

    steps_of = {mode: make_step(jb.split_sum(s, parts)) for mode, s in sums.items()}
    for n in slices:
        steps_of.update({f"{mode} {n} slices": make_step(jb.split_sum(s, n)) for mode, s in sums.items()})
    zero = jax.tree.map(jnp.zeros_like, params0)
    args = (params0, opt.init(params0), zero, x, y, mask)
    fns = {mode: fn.lower(*args).compile() for mode, fn in steps_of.items()}
    for name, value in overrides:
        default = getattr(bk, name)
        setattr(bk, name, value)
        try:
            dp = bk.make_clipped_sum(spec, jb.cross_entropy, lambda n, m: jb.clip_factors(n, max_norm, m))
            fns[f"dp {name}={value}"] = make_step(jb.split_sum(dp, parts)).lower(*args).compile()
        finally:
            setattr(bk, name, default)
    temp = {mode: fn.memory_analysis().temp_size_in_bytes for mode, fn in fns.items()}
    state = {mode: (jax.tree.map(jnp.copy, params0), opt.init(params0)) for mode in fns}
    times: dict[str, list[float]] = {mode: [] for mode in fns}
    for i in range(steps + 1):
        for mode, fn in fns.items():
            p, s = state[mode]
            t = time.perf_counter()
            noise = zero if mode.startswith("non-private") else draw(jax.random.key(i))
            p, s, loss = fn(p, s, noise, x, y, mask)
            float(loss)
            if i:  # the first call warms up
                times[mode].append(time.perf_counter() - t)
            state[mode] = (p, s)
    med = {mode: float(np.median(t)) * 1000 for mode, t in times.items()}
    print(f"{workload}: physical {physical} in {parts} slices, median of {steps} alternating steps")
    width = max(map(len, med))
    for mode, ms in med.items():
        dp_slices = mode.startswith("dp ") and mode.endswith(" slices")
        base = f"non-private {mode.split(' ', 1)[1]}" if dp_slices else "non-private"
        ratio = f"   {ms / med[base]:.2f}x {base}" if mode != "non-private" else ""
        print(f"  {mode:{width}s} {ms:8.1f} ms   compiled temporary buffer {temp[mode] / 1e6:6.0f} MB{ratio}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", nargs="?", choices=["cnn", "resnet"], default="cnn")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each mode (default 10)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra DP step, compiled with this integer constant of bk.py (KEPT_BYTES, FEW_CHANNELS, ...)",
    )
    parser.add_argument(
        "--slices",
        action="append",
        type=int,
        default=[],
        metavar="N",
        help="a DP and a non-private step in N batch slices (default: backend.slice_count)",
    )
    args = parser.parse_args()
    overrides = []
    for item in args.set:
        name, _, value = item.partition("=")
        if not isinstance(getattr(bk, name, None), int) or not value.lstrip("-").isdigit():
            known = ", ".join(k for k, v in vars(bk).items() if k.isupper() and isinstance(v, int))
            parser.error(f"--set {item!r}: expected NAME=INTEGER with NAME one of bk.py's constants ({known})")
        overrides.append((name, int(value)))
    main(args.workload, args.steps, overrides, args.slices)
