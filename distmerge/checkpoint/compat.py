"""Cross-model checks on headers alone: every expert has exactly the base's tensors, with the
same shapes and dtypes. Reported before any tensor byte is read."""

from __future__ import annotations

from distmerge.checkpoint.source import ModelHeaders
from distmerge.errors import IncompatibleModelsError

MAX_LISTED = 5


def check_compatible(base: ModelHeaders, experts: list[ModelHeaders]) -> None:
    """Raises:
        IncompatibleModelsError: naming the expert and the first tensors that differ.
    """
    problems: list[str] = []
    names = set(base.tensors)
    for expert in experts:
        theirs = set(expert.tensors)
        missing = sorted(names - theirs)
        extra = sorted(theirs - names)
        if missing:
            problems.append(f"{expert.url} lacks {len(missing)} tensor(s) of the base: {_few(missing)}")
        if extra:
            problems.append(f"{expert.url} has {len(extra)} tensor(s) the base lacks: {_few(extra)}")
        diffs = []
        for name in sorted(names & theirs):
            b, e = base.tensors[name][1], expert.tensors[name][1]
            if b.shape != e.shape or b.dtype != e.dtype:
                diffs.append(f"{name} is {e.dtype}{list(e.shape)} (base {b.dtype}{list(b.shape)})")
        if diffs:
            problems.append(f"{expert.url}: {len(diffs)} tensor(s) differ in shape or dtype: {_few(diffs)}")
    if problems:
        raise IncompatibleModelsError(
            "the experts do not match the base:\n  " + "\n  ".join(problems)
            + "\nall models must be fine-tunes of one architecture, saved in one dtype"
        )


def _few(items: list[str]) -> str:
    head = ", ".join(items[:MAX_LISTED])
    return head + (f", ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")
