"""The Ray actor wrapping a :class:`SliceWorker` (kept apart so workers import no Ray)."""

from __future__ import annotations

from typing import Any

import numpy as np

from distmerge.engine.worker import Job, Report, SliceWorker, Task


class SliceActor:
    def __init__(self, job: Job, worker_id: str):
        self.worker = SliceWorker(job, worker_id=worker_id)

    def ready(self) -> str:
        return self.worker.worker_id

    def process(self, task: Task, ctx: dict[str, Any]) -> Report:
        return self.worker.process(task, ctx)

    def drain(self) -> dict[str, np.ndarray]:
        return self.worker.drain()
