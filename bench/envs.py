"""One virtual environment per backend, created on first use (like asv).

TF Privacy needs numpy < 2 and TensorFlow <= 2.15 while JAX and PyTorch want numpy 2,
so they cannot share an environment. The orchestrator never imports a framework; it
starts `<env python> -m bench.worker` in the backend's environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.backend import get_backend_info

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MARKER = ".dpbench-requirements"


class EnvError(RuntimeError):
    """A backend environment could not be created; the message says what pip said."""


def envs_dir() -> Path:
    return Path(os.environ.get("BENCH_ENVS_DIR") or PROJECT_ROOT / ".envs")


def env_dir(backend: str) -> Path:
    return envs_dir() / backend


def env_python(backend: str) -> Path:
    return env_dir(backend) / "bin" / "python"


def _requirements(backend: str) -> Path:
    return PROJECT_ROOT / get_backend_info(backend).requirements


def _fingerprint(backend: str) -> str:
    text = _requirements(backend).read_text() + sys.version
    return hashlib.sha256(text.encode()).hexdigest()


def is_ready(backend: str) -> bool:
    marker = env_dir(backend) / MARKER
    return env_python(backend).exists() and marker.exists() and marker.read_text() == _fingerprint(backend)


def ensure_env(backend: str, log: Callable[[str], None] = print) -> Path:
    """The backend's python, creating or updating its environment when its requirements changed.

    Creation holds a lock on `<envs>/.<backend>.lock`, so two `bench` processes never build one environment at
    once (the second waits, then finds it ready); a creation that fails or is killed leaves no ready marker, so
    the next use starts it again from scratch."""
    if is_ready(backend):
        return env_python(backend)
    with _creation_lock(backend, log):
        if is_ready(backend):  # built by another process while this one waited
            return env_python(backend)
        return _create(backend, log)


@contextlib.contextmanager
def _creation_lock(backend: str, log: Callable[[str], None]) -> Iterator[None]:
    envs_dir().mkdir(parents=True, exist_ok=True)
    fd = os.open(envs_dir() / f".{backend}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process to finish creating the {backend} environment")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _create(backend: str, log: Callable[[str], None]) -> Path:
    target = env_dir(backend)
    log(f"creating the {backend} environment in {target} (first use; this takes a few minutes)")
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", str(target)], log, backend)
    pip = [str(env_python(backend)), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    _run([*pip, "--upgrade", "pip"], log, backend)
    _run([*pip, "-r", str(_requirements(backend))], log, backend)
    (target / MARKER).write_text(_fingerprint(backend))
    log(f"{backend} environment ready")
    return env_python(backend)


def _run(cmd: list[str], log: Callable[[str], None], backend: str) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-20:]
        if line.startswith(("Collecting", "Installing", "Successfully", "ERROR")):
            log(f"  [{backend}] {line}")
    if proc.wait() != 0:
        raise EnvError(f"creating the {backend} environment failed ({' '.join(cmd[-2:])}):\n" + "\n".join(tail))
