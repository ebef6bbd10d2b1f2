"""When a slice fails: retry it elsewhere, or fail the run. A pure policy, tested without Ray.

Errors distmerge raises on purpose (bad input: NaN in an expert, a vanished or truncated
shard) fail the run at once: another attempt would read the same bytes. Anything else (a
worker process that died, an I/O hiccup, out of memory on one node, storage that stayed
unavailable through a worker's own retries) is retried on another worker, up to
``max_attempts`` attempts per slice.
"""

from __future__ import annotations

from dataclasses import dataclass

from distmerge.errors import DistmergeError


@dataclass(frozen=True, kw_only=True)
class Decision:
    retry: bool
    reason: str


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    max_attempts: int = 3

    def decide(self, error: BaseException, attempts: int) -> Decision:
        """``attempts``: how many times the slice has run, this failure included."""
        if isinstance(error, DistmergeError) and not error.retryable:
            return Decision(retry=False, reason=f"not retried: {error}")
        if attempts >= self.max_attempts:
            return Decision(retry=False, reason=f"failed {attempts} times, last: {error!r}")
        return Decision(retry=True, reason=f"attempt {attempts} failed ({error!r}); retrying on another worker")
