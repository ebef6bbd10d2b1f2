"""Hugging Face Hub destinations (``hf://org/repo`` or ``hf://org/repo@branch``): one commit.

The checkpoint is staged locally exactly as for a local destination
(:class:`~distmerge.checkpoint.writer.StagedOutput`: preallocated shards, manifest, resume,
verification), in ``output.staging`` (default ``~/.cache/distmerge/staging``; on a multi-node
cluster a folder every worker shares). Publication is ONE commit
(``HfApi.create_commit``) holding every shard, the index json, config and tokenizer files and a
generated ``README.md`` (:mod:`distmerge.checkpoint.modelcard`); nothing reaches the repository
before it, and the staging folder is deleted after it. A repository that does not exist is
created (private); a branch that does not exist is created from the default branch. A revision
already holding weights is refused before any work unless ``output.overwrite`` is set; then the
commit also deletes its weight files that the merge does not replace.

Limits: the Hub refuses files over 50 GB (:data:`HUB_MAX_FILE`) and recommends shards of at
most 5 GB (:data:`HUB_RECOMMENDED_SHARD`); a shard size above the limit, or a single tensor
bigger than it, is refused before any work, and one above the recommendation is warned about.

The token is read from the variable ``storage.hf.token_env`` names (never from the pipeline,
never logged); without it, huggingface_hub's own lookup (``HF_TOKEN``, saved login).
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, NamedTuple

from distmerge.checkpoint.modelcard import model_card
from distmerge.checkpoint.storage import credentials_note, hub_options
from distmerge.checkpoint.writer import STATE_FILES, StagedOutput
from distmerge.config import Pipeline, StorageConfig
from distmerge.errors import AccessDeniedError, ConfigError, DestinationError, MergeFailedError
from distmerge.plan import Plan

log = logging.getLogger(__name__)

HUB_MAX_FILE = 50 * 10**9
HUB_RECOMMENDED_SHARD = 5 * 10**9
DEFAULT_STAGING = "~/.cache/distmerge/staging"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")


def is_hub(url: str) -> bool:
    return url.startswith("hf://")


class HubRef(NamedTuple):
    """The parts of ``hf://org/name[@revision][/path]``."""

    org: str
    name: str
    revision: str | None     # None when the URL names none (or an empty one)
    path: str                # inside the repository; "" for the repository itself

    @property
    def repo(self) -> str:
        return f"{self.org}/{self.name}"


def split_hub_url(url: str) -> HubRef | None:
    """The parts of an ``hf://`` URL (the one parser of them: destinations, input revisions
    and the model card); None for another URL or one naming no repository."""
    if not is_hub(url):
        return None
    segments = url[len("hf://"):].strip("/").split("/")
    if len(segments) < 2:
        return None
    name, _, rev = segments[1].partition("@")
    return HubRef(org=segments[0], name=name, revision=rev or None, path="/".join(segments[2:]))


def parse_hub_url(url: str) -> tuple[str, str | None]:
    """(``org/repo``, revision or None) of ``hf://org/repo[@revision]``.

    Raises:
        ConfigError: anything else (a path inside the repository, a dataset or space).
    """
    ref = split_hub_url(url)
    if (ref is None or ref.path or not ref.org or not ref.name or "@" in ref.org
            or ref.org in ("datasets", "spaces", "buckets")):
        raise ConfigError(f"output.path: {url}: a Hub destination is hf://org/repo or "
                          "hf://org/repo@branch (a model repository, no path inside it)")
    return ref.repo, ref.revision


def staging_root(pipeline_output) -> str:
    return os.path.expanduser(pipeline_output.staging or DEFAULT_STAGING)


def _api(storage: StorageConfig):
    from huggingface_hub import HfApi

    return HfApi(**hub_options(storage))


def _call(fn, url: str, storage: StorageConfig, what: str):
    """``fn()`` (huggingface_hub retries its own transient failures); an HTTP error becomes
    one of ours naming the URL and, for 401/403, the token variable.

    Raises:
        AccessDeniedError, MergeFailedError
    """
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return fn()
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if status in (401, 403):
            raise AccessDeniedError(f"access denied {what} {url} (HTTP {status}); requests used "
                                    f"{credentials_note('hf', storage)}: check that it may write "
                                    "there") from None
        raise MergeFailedError(f"{what} {url} failed (HTTP {status}): {first}") from None


def check_hub_shard_size(shard_size: int) -> None:
    """Raises:
        ConfigError: ``output.shard_size`` is over the Hub's 50 GB file limit."""
    if shard_size > HUB_MAX_FILE:
        raise ConfigError(f"output.shard_size: {shard_size} bytes is over the Hub's limit of "
                          f"{HUB_MAX_FILE} bytes per file; use at most 5GB (recommended)")
    if shard_size > HUB_RECOMMENDED_SHARD:
        log.warning("output.shard_size %d bytes is above the Hub's recommended 5 GB per file",
                    shard_size)


def check_hub_plan(plan: Plan) -> None:
    """Raises:
        ConfigError: a shard (a single tensor bigger than the shard size) is over 50 GB."""
    big = [s for s in plan.shards if s.size > HUB_MAX_FILE]
    if big:
        raise ConfigError(f"{big[0].filename} would be {big[0].size} bytes (a tensor bigger than "
                          f"output.shard_size), over the Hub's limit of {HUB_MAX_FILE} bytes per file")


def existing_weights(url: str, storage: StorageConfig) -> list[str]:
    """Weight files (safetensors, pickles, index json) at the destination's revision; [] when
    the repository or the branch does not exist yet."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    repo, rev = parse_hub_url(url)
    api = _api(storage)

    def listing() -> list[str]:
        try:
            return api.list_repo_files(repo, revision=rev)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return []

    files = _call(listing, url, storage, "listing")
    return sorted(f for f in files if f.endswith(WEIGHT_SUFFIXES))


def check_hub_destination(url: str, *, overwrite: bool, shard_size: int, storage: StorageConfig) -> None:
    """Refuse an unusable Hub destination before any work.

    Raises:
        ConfigError: a malformed URL, a shard size over the Hub's limit, the token variable unset.
        DestinationError: the revision holds weights already (without ``overwrite``).
        AccessDeniedError: the token may not read the repository.
    """
    parse_hub_url(url)
    check_hub_shard_size(shard_size)
    found = existing_weights(url, storage)
    if found and not overwrite:
        raise DestinationError(f"output.path: {url} already holds weights ({', '.join(found[:3])}); "
                               "choose another repository or branch, or set output.overwrite: true")


class HubOutput(StagedOutput):
    """A local staging folder published as one commit to a Hub repository."""

    pipeline: Pipeline                  # set by prepare: the card's and the token's source
    storage: StorageConfig
    commit_url: str | None = None

    @classmethod
    def prepare(cls, dest: str, plan: Plan, identity: dict[str, Any], *, resume: bool,
                pipeline: Pipeline, staging_root: str | None = None) -> "HubOutput":
        """:meth:`StagedOutput.prepare`, for ``pipeline``'s run (its model card, its storage
        settings: the token variable and the endpoint)."""
        out = super().prepare(dest, plan, identity, resume=resume, staging_root=staging_root)
        out.pipeline, out.storage = pipeline, pipeline.storage
        return out

    def finalize(self, plan: Plan, *, base_url: str, out_dtype: str | None) -> None:
        import distmerge

        super().finalize(plan, base_url=base_url, out_dtype=out_dtype)
        card = model_card(self.pipeline, version=distmerge.__version__, identity=self.identity,
                          revisions=self._revisions())
        with open(os.path.join(self.staging, "README.md"), "w") as f:
            f.write(card)

    def _revisions(self) -> dict[str, str]:
        """input URL -> commit sha, for hf:// inputs (best effort: a failure leaves it out)."""
        out: dict[str, str] = {}
        api = None
        for url in [self.pipeline.base_path] + [e.path for e in self.pipeline.experts]:
            ref = split_hub_url(url)
            if ref is None:
                continue
            rev = ref.revision
            try:
                api = api or _api(self.storage)
                out[url] = api.model_info(ref.repo, revision=rev).sha or (rev or "")
            except Exception as err:  # noqa: BLE001 - the card records the revision asked for
                log.warning("could not resolve the revision of %s: %s", url, type(err).__name__)
                if rev:
                    out[url] = rev
        return out

    def publish(self, *, overwrite: bool) -> None:
        """One commit with every file of the staging folder but the resume state; the staging
        folder is deleted after it (and kept, resumable, when the commit fails).

        Raises:
            DestinationError: the revision got weights during the run (without ``overwrite``).
        """
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        self.close()
        repo, rev = parse_hub_url(self.dest)
        api = _api(self.storage)
        old = existing_weights(self.dest, self.storage)
        if old and not overwrite:
            raise DestinationError(f"output.path: {self.dest} got weights during the run; not "
                                   "committing over them")
        _call(lambda: api.create_repo(repo, private=True, exist_ok=True), self.dest,
              self.storage, "creating")
        if rev is not None:
            _call(lambda: api.create_branch(repo, branch=rev, exist_ok=True), self.dest,
                  self.storage, "creating the branch of")
        # the resume state stays in the folder (and out of the commit) until the commit is
        # made: a refused or failed commit leaves a run that --resume publishes without redoing
        names = sorted(n for n in os.listdir(self.staging)
                       if n not in STATE_FILES and not n.endswith(".tmp"))
        ops: list[Any] = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=os.path.join(self.staging, n))
                          for n in names]
        ops += [CommitOperationDelete(path_in_repo=f) for f in old if f not in names]
        method = self.pipeline.method.name if self.pipeline else "merge"
        name = self.pipeline.name if self.pipeline else "merge"
        info = _call(lambda: api.create_commit(
            repo, operations=ops, revision=rev,
            commit_message=f"distmerge: {name} ({method}, {len(names)} files)",
            commit_description="Merged checkpoint published by distmerge in one commit; see README.md."),
            self.dest, self.storage, "committing to")
        self.commit_url = getattr(info, "commit_url", None)
        log.info("published %s in one commit: %s", self.dest, self.commit_url)
        shutil.rmtree(self.staging, ignore_errors=True)
