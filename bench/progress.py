"""Terminal progress for a sweep: a bar for the sweep, a bar for the current run, log lines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.spec import RunSpec


class SweepProgress:
    def __init__(self, total_runs: int, console: Console | None = None):
        self.console = console or Console(highlight=False)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._sweep = self._progress.add_task("sweep", total=total_runs)
        self._run = self._progress.add_task("run", total=1, visible=False)
        self.describe: Callable[[RunSpec], str] = lambda run: run.run_id
        self.concurrent = False  # runs overlap (the Ray executor): lines name their run, no per-run bar

    def __enter__(self) -> SweepProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def log(self, message: str) -> None:
        self._progress.console.print(message, markup=False, soft_wrap=True)

    def start(self, index: int, run: RunSpec) -> None:
        self._progress.update(self._sweep, completed=index)
        unit = "rounds" if run.federated else "steps"
        self._progress.update(
            self._run, description=f"  {run.backend_label} {unit}", total=run.total_steps, completed=0, visible=True
        )

    def tally(self, tally: Any) -> None:
        """The whole sweep when runs overlap: queued, running, done, failed (a `ray_executor.Tally`)."""
        failed = f", {tally.failed} failed" if tally.failed else ""
        self._progress.update(
            self._sweep,
            completed=tally.done,
            description=f"sweep: {tally.queued} queued, {tally.running} running, {tally.done} done{failed}",
        )

    def on_event(self, run: RunSpec, event: dict[str, Any]) -> None:
        if self.concurrent:
            self._on_concurrent_event(run, event)
            return
        kind = event["event"]
        if kind == "progress":
            self._progress.update(self._run, completed=event["step"])
        elif kind == "compiled":
            self.log(f"    first step (compile/trace) {event['seconds']:.1f} s")
        elif kind == "round":
            self._progress.update(self._run, completed=event["round"])
            if event.get("test_accuracy") is not None:
                clip = f", clip {event['clip_norm']:.3g}" if event.get("clip_norm") is not None else ""
                self.log(
                    f"    round {event['round']}/{run.federated.rounds}: test accuracy {event['test_accuracy']:.4f}"
                    f"{clip}, {event['round_seconds']:.2f} s per round"
                )
        elif kind == "epoch":
            self._progress.update(self._run, completed=event["steps"])
            self.log(
                f"    epoch {event['epoch']}/{run.train.epochs}: test accuracy {event['test_accuracy']:.4f}, "
                f"train loss {event['train_loss']:.4f}, {event['train_seconds']:.2f} s training"
            )

    def _on_concurrent_event(self, run: RunSpec, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "epoch":
            self.log(
                f"    {run.run_id} epoch {event['epoch']}/{run.train.epochs}: test accuracy "
                f"{event['test_accuracy']:.4f}, {event['train_seconds']:.2f} s training"
            )
        elif kind == "round" and event.get("test_accuracy") is not None:
            self.log(
                f"    {run.run_id} round {event['round']}/{run.federated.rounds}: test accuracy {event['test_accuracy']:.4f}"
            )
