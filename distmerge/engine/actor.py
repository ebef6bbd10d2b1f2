"""The Ray actor wrapping a :class:`SliceWorker` (kept apart so workers import no Ray)."""

from __future__ import annotations

from typing import Any

import numpy as np

from distmerge.engine.worker import Job, Report, SliceWorker, Task


class SliceActor:
    """Made before the job is known (its process and imports start while the driver plans),
    then given it with :meth:`setup`; a replacement of a dead actor gets it at once."""

    def __init__(self, worker_id: str, job: Job | None = None):
        self.worker_id = worker_id
        self.worker: SliceWorker | None = None
        if job is not None:
            self.setup(job)

    def setup(self, job: Job) -> str:
        self.worker = SliceWorker(job, worker_id=self.worker_id)
        return self.worker_id

    def process(self, task: Task, ctx: dict[str, Any]) -> Report:
        return self.worker.process(task, ctx)

    def drain(self) -> dict[str, np.ndarray]:
        return self.worker.drain()
