"""Which destination an ``output.path`` is, and the output object a run writes through.

- a local or shared filesystem path: :class:`~distmerge.checkpoint.writer.StagedOutput`
  (staging folder beside it, atomic rename);
- ``s3://bucket/prefix``: :class:`~distmerge.checkpoint.objectstore.ObjectStoreOutput` (one
  multipart upload per shard, a slice per part, completed at the end);
- ``hf://org/repo[@branch]``: :class:`~distmerge.checkpoint.hub.HubOutput` (staged locally,
  one commit).

Every output has the same steps, which the driver calls: ``prepare`` (create or resume),
``shard_path``/``sink`` (what workers write to), ``record``/``recorded_slices``/
``check_slices``/``save_stats``/``load_stats`` (resume), ``finalize``/``verify`` (gather),
``publish``, ``close`` and ``abort``.
"""

from __future__ import annotations

from typing import Any

from distmerge.checkpoint.hub import (
    HubOutput,
    check_hub_destination,
    check_hub_plan,
    is_hub,
    staging_root,
)
from distmerge.checkpoint.multipart import MAX_PARTS, MIN_PART, is_object_store
from distmerge.checkpoint.objectstore import (
    ObjectStoreOutput,
    check_object_destination,
    object_staging_areas,
    refuse_object_staging,
)
from distmerge.checkpoint.source import is_local
from distmerge.checkpoint.writer import StagedOutput, check_destination, refuse_existing_staging
from distmerge.config import Pipeline
from distmerge.errors import ConfigError
from distmerge.plan import Plan, coalesce_for_parts


def check_output(pipeline: Pipeline, sources: list[str]) -> None:
    """Refuse an unusable destination before anything is read or written.

    Raises:
        ConfigError: an unsupported URL scheme or a setting the destination cannot take.
        DestinationError: it exists (without ``overwrite``) or overlaps a source.
    """
    out = pipeline.output
    if out.staging is not None and not is_hub(out.path):
        raise ConfigError(f"output.staging: only hf:// destinations are staged there; {out.path} "
                          "is staged beside itself (remove output.staging)")
    if is_hub(out.path):
        check_hub_destination(out.path, overwrite=out.overwrite, shard_size=out.shard_size,
                              storage=pipeline.storage)
    elif is_object_store(out.path):
        check_object_destination(out.path, overwrite=out.overwrite, sources=sources,
                                 storage=pipeline.storage)
    elif is_local(out.path):
        check_destination(out.path, overwrite=out.overwrite, sources=sources)
    else:
        raise ConfigError(
            f"output.path: {out.path}: destinations are a local or shared-filesystem path, "
            "s3://bucket/prefix (an object store with multipart uploads) or hf://org/repo[@branch]"
        )


def refuse_staging(pipeline: Pipeline) -> None:
    """Raises:
        DestinationError: a staging area of the destination exists (run with --resume)."""
    out = pipeline.output
    if is_hub(out.path):
        refuse_existing_staging(out.path, staging_root(out))
    elif is_object_store(out.path):
        refuse_object_staging(out.path, object_staging_areas(out.path, pipeline.storage))
    else:
        refuse_existing_staging(out.path)


def shape_plan(pipeline: Pipeline, plan: Plan) -> Plan:
    """The plan as the destination needs it: for an object store, one slice per multipart
    part; for the Hub, no file over its limit.

    Raises:
        ConfigError
    """
    if is_object_store(pipeline.output.path):
        return coalesce_for_parts(plan, min_part=MIN_PART, max_parts=MAX_PARTS)
    if is_hub(pipeline.output.path):
        check_hub_plan(plan)
    return plan


def prepare_output(pipeline: Pipeline, plan: Plan, identity: dict[str, Any], *, resume: bool):
    """The run's output, created or (with ``resume``) reopened."""
    out = pipeline.output
    if is_object_store(out.path):
        return ObjectStoreOutput.prepare(out.path, plan, identity, resume=resume,
                                         storage=pipeline.storage)
    if is_hub(out.path):
        return HubOutput.prepare(out.path, plan, identity, resume=resume, pipeline=pipeline,
                                 staging_root=staging_root(out))
    return StagedOutput.prepare(out.path, plan, identity, resume=resume)
