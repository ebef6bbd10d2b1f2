"""The pipeline file: a typed schema that rejects unknown keys and says which key and why.

A pipeline YAML looks like::

    base: path-or-URL                       # or a mapping, as an expert without weight
    experts:
      - {path: path-or-URL, weight: 1.0}
      - {path: /ckpt/run2/checkpoint-500, format: deepspeed_zero, trust_pickle: true, weight: 1.0}
    input_cache: null                       # where converted inputs are staged (see below)
    allow_nonfinite: false
    method: {name: ties, density: 0.2, scope: model, scale: 1.0}
    overrides:
      - {match: "*.embed_tokens.*", density: 0.5}
    output: {path: path-or-URL, dtype: bfloat16, shard_size: 2GB, overwrite: false}
    resources: {workers: 2, gpus_per_worker: 0, memory_per_worker: 2GB}
    ray: {address: null}
    metrics: {port: null, host: 0.0.0.0, linger_seconds: 30}
    storage: {s3: {endpoint_url: null, region: null, anonymous: false,
                   key_env: AWS_ACCESS_KEY_ID, secret_env: AWS_SECRET_ACCESS_KEY}}

The method block and overrides carry method parameters; their names and types are checked
against the method's own parameter dataclass by :func:`distmerge.methods.build`, which the
driver calls before anything is read.

Paths: ``~`` is expanded; a relative local path is taken relative to the current directory.

Model formats (``format``, default ``safetensors``): a safetensors model is read in place, by
ranged reads. ``deepspeed_zero`` is a DeepSpeed ZeRO (stage 1-3) training checkpoint: the folder
holding ``latest`` and the tag folders (``global_step500/``), e.g. a Hugging Face Trainer
``checkpoint-500/``; ``tag`` picks the tag folder (default: the one ``latest`` names). Its files
are pickled torch files, and loading a pickle can execute arbitrary code, so such an entry needs
``trust_pickle: true`` (only for checkpoints you made, or whose source you trust); without it
the pipeline is refused before any file is opened. distmerge converts it once, on the driver,
with DeepSpeed's own ``zero_to_fp32`` (``pip install 'distmerge[deepspeed]'``), into a
safetensors folder (fp32, as ZeRO consolidation gives it) under ``input_cache``, and reads only
that afterwards (:mod:`distmerge.checkpoint.zero`). Local paths only. ``input_cache`` (default
``.distmerge-inputs`` beside the output folder, so that workers reach it as they reach the
output): converted inputs live there, keyed by the checkpoint's path, tag and files' sizes and
modification times, and are reused by later runs and by ``--resume``; delete it when done (not
while a run of it may still be resumed: a new conversion has new file times, so the interrupted
run's staging folder no longer matches and is refused).

``allow_nonfinite`` (top level: it is a property of the inputs, beside ``base`` and ``experts``,
not of the compute resources): by default a NaN or Inf in base or any expert refuses the run
(:class:`~distmerge.errors.NonFiniteError`, naming model, tensor and rows; nothing is written).
With ``true`` the run does not look: NaN and Inf go through the method's arithmetic as IEEE
floats do. Linear and task arithmetic put an expert's NaN at the same element of the output
and an Inf as ±Inf (or NaN where +Inf meets -Inf); methods that compare values (TIES, DARE,
DELLA: thresholds, sign election) may drop them or count them in their statistics, so the
output may hold none. ``distmerge validate --deep`` then reports sampled non-finite values as
warnings instead of failing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from distmerge.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}

OUTPUT_DTYPES = ("float32", "float16", "bfloat16")


def parse_size(value: int | str) -> int:
    """``"2GB"`` → 2_000_000_000, ``"512MiB"`` → 536_870_912, ``1024`` → 1024.

    Raises:
        ValueError: the text is not a size.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 2GB, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"a size must be positive, got {value}")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"expected a size such as 2GB or 512MiB, got {value!r}")
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])
    if n <= 0:
        raise ValueError(f"a size must be positive, got {value!r}")
    return n


def expand_path(path: str) -> str:
    """Expand ``~`` in local paths; URLs (``scheme://``) are returned unchanged."""
    if "://" in path:
        return path
    return str(Path(path).expanduser())


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MODEL_FORMATS = ("safetensors", "deepspeed_zero")

TRUST_PICKLE_MESSAGE = (
    "format deepspeed_zero needs trust_pickle: true. A DeepSpeed ZeRO checkpoint is a set of "
    "pickled torch files (*_model_states.pt, *_optim_states.pt), and loading a pickle can "
    "execute arbitrary code; set trust_pickle: true only for checkpoints you made yourself or "
    "whose source you trust. distmerge then converts it once into safetensors and reads only that"
)


class SourceRef(_Strict):
    """One input model: where it is and how it is stored (see the module docstring)."""

    path: str
    format: Literal["safetensors", "deepspeed_zero"] = "safetensors"
    trust_pickle: bool = False
    tag: str | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return expand_path(v)

    @field_validator("tag")
    @classmethod
    def _tag(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or v in (".", "..") or "/" in v or "\\" in v):
            raise ValueError("must be the name of a tag folder inside the checkpoint, e.g. global_step500")
        return v

    @model_validator(mode="after")
    def _format(self) -> "SourceRef":
        if self.format == "deepspeed_zero":
            if not self.trust_pickle:
                raise ValueError(TRUST_PICKLE_MESSAGE)
            if "://" in self.path and not self.path.startswith("file://"):
                raise ValueError("format deepspeed_zero reads local paths only in this version; "
                                 "copy the checkpoint folder to a local or shared filesystem")
        else:
            if self.trust_pickle:
                raise ValueError("trust_pickle applies only to format: deepspeed_zero; pickle "
                                 "checkpoints are never loaded otherwise")
            if self.tag is not None:
                raise ValueError("tag applies only to format: deepspeed_zero")
        return self


class ModelRef(SourceRef):
    """An expert: a :class:`SourceRef` and its weight."""

    weight: float = Field(default=1.0, allow_inf_nan=False)


_ENTRY = "entry"          # the union tag of a model given as a mapping; left out of error paths
BaseEntry = Annotated[
    Union[Annotated[str, Tag("path")], Annotated[SourceRef, Tag(_ENTRY)]],
    Discriminator(lambda v: "path" if isinstance(v, str) else _ENTRY),
]


class MethodSpec(BaseModel):
    """``name`` plus the method's parameters, checked later against the method's dataclass."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Override(BaseModel):
    """``match`` (a glob on tensor names) plus method parameters for the matching tensors."""

    model_config = ConfigDict(extra="allow", frozen=True)
    match: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Output(_Strict):
    path: str
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    shard_size: int = Field(default=2 * 10**9)
    overwrite: bool = False
    # hf:// outputs: the local (on a multi-node cluster: shared) folder where the checkpoint is
    # staged before its one commit; default ~/.cache/distmerge/staging
    staging: str | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return expand_path(v)

    @field_validator("staging")
    @classmethod
    def _staging(cls, v: str | None) -> str | None:
        if v is not None and "://" in v:
            raise ValueError("must be a local or shared-filesystem folder, not a URL")
        return None if v is None else expand_path(v)

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)


class Resources(_Strict):
    workers: int = Field(default=2, ge=1, le=100_000)
    gpus_per_worker: float = Field(default=0, ge=0)
    memory_per_worker: int = Field(default=2 * 10**9)
    slice_size: int | None = None

    @field_validator("memory_per_worker", mode="before")
    @classmethod
    def _mem(cls, v: Any) -> int:
        return parse_size(v)

    @field_validator("slice_size", mode="before")
    @classmethod
    def _slice(cls, v: Any) -> int | None:
        return None if v is None else parse_size(v)


class RayConfig(_Strict):
    address: str | None = None


class MetricsConfig(_Strict):
    """Prometheus metrics of the run (:mod:`distmerge.metrics`), served by the driver.

    ``port``: null serves none, 0 any free port (logged); ``host``: the address to bind
    (0.0.0.0: every interface, as a pod must for a PodMonitor); ``linger_seconds``: after the
    run ends, the endpoint stays up until its final values were scraped once, at most this long;
    make it longer than the scrape interval, or the last values (100%, or the failure) may never
    reach Prometheus.
    """

    port: int | None = Field(default=None, ge=0, le=65535)
    host: str = "0.0.0.0"
    linger_seconds: float = Field(default=30.0, ge=0, le=3600, allow_inf_nan=False)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _endpoint_url(v: str | None) -> str | None:
    if v is not None and not re.match(r"^https?://[^/\s]+", v):
        raise ValueError("expected an http:// or https:// URL")
    return v


def _env_var_name(v: str | None, what: str) -> str | None:
    # The message never repeats the value: a secret pasted here must not reach a log.
    if v is not None and not _ENV_NAME.fullmatch(v):
        raise ValueError("must be the NAME of an environment variable (letters, digits, "
                         f"'_'), never the {what} itself")
    return v


class S3Storage(_Strict):
    """How ``s3://`` URLs are opened (AWS or any S3-compatible endpoint).

    Credentials are given only by the NAMES of environment variables; every process that opens
    a URL (the driver and each worker) reads them from its own environment. Without
    ``key_env``/``secret_env`` (and not ``anonymous``), the default AWS credential chain of
    each process is used (``AWS_ACCESS_KEY_ID``..., ``AWS_PROFILE``, an instance role).
    """

    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False
    key_env: str | None = None
    secret_env: str | None = None
    token_env: str | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return _endpoint_url(v)

    @field_validator("key_env", "secret_env", "token_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        return _env_var_name(v, "credential")

    @model_validator(mode="after")
    def _pairs(self) -> "S3Storage":
        if (self.key_env is None) != (self.secret_env is None):
            raise ValueError("key_env and secret_env go together")
        if self.token_env is not None and self.key_env is None:
            raise ValueError("token_env needs key_env and secret_env")
        if self.anonymous and self.key_env is not None:
            raise ValueError("anonymous access takes no credentials (key_env/secret_env)")
        return self


class HubStorage(_Strict):
    """How ``hf://`` URLs (sources and destinations) reach the Hugging Face Hub.

    ``endpoint_url``: another Hub (default: ``HF_ENDPOINT``, else huggingface.co);
    ``token_env``: the NAME of the environment variable holding the access token (default:
    huggingface_hub's own lookup, ``HF_TOKEN`` or the saved login).
    """

    endpoint_url: str | None = None
    token_env: str | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        v = _endpoint_url(v)
        return v.rstrip("/") if v else v

    @field_validator("token_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        return _env_var_name(v, "token")


class StorageConfig(_Strict):
    """Options for models behind URLs. Holds no secret, so it travels to workers as is.

    ``concurrency``: ranged requests in flight per process; ``part_size``: a larger range is
    fetched as parts of this size in parallel; ``attempts``: tries per request on transient
    errors (5xx, timeouts, connection resets), with exponential backoff.
    """

    s3: S3Storage = Field(default_factory=S3Storage)
    hf: HubStorage = Field(default_factory=HubStorage)
    concurrency: int = Field(default=32, ge=1, le=512)
    part_size: int = Field(default=8 * 2**20)
    attempts: int = Field(default=5, ge=1, le=20)

    @field_validator("part_size", mode="before")
    @classmethod
    def _part(cls, v: Any) -> int:
        return parse_size(v)


class Pipeline(_Strict):
    name: str = "merge"
    base: BaseEntry                       # a path, or a SourceRef mapping: see base_ref
    experts: list[ModelRef] = Field(min_length=2)
    input_cache: str | None = None        # see the module docstring
    allow_nonfinite: bool = False         # see the module docstring
    method: MethodSpec
    overrides: list[Override] = Field(default_factory=list)
    output: Output
    resources: Resources = Field(default_factory=Resources)
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @field_validator("base")
    @classmethod
    def _base(cls, v: str | SourceRef) -> str | SourceRef:
        if isinstance(v, SourceRef):
            return v
        if not v.strip():
            raise ValueError("must not be empty")
        return expand_path(v)

    @field_validator("input_cache")
    @classmethod
    def _input_cache(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not v.strip():
            raise ValueError("must not be empty")
        if "://" in v and not v.startswith("file://"):
            raise ValueError("must be a local or shared-filesystem path")
        return expand_path(v)

    @property
    def base_ref(self) -> SourceRef:
        """The base as a :class:`SourceRef`, whichever way it was written."""
        return self.base if isinstance(self.base, SourceRef) else SourceRef(path=self.base)

    @property
    def base_path(self) -> str:
        """The path or URL the pipeline names for the base."""
        return self.base_ref.path

    def models(self) -> list[SourceRef]:
        """Base, then every expert, as :class:`SourceRef` (experts keep their weights)."""
        return [self.base_ref, *self.experts]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", v):
            raise ValueError("use 1-63 letters, digits, '.', '_' or '-'")
        return v


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p != _ENTRY) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def parse_pipeline(data: Any, source: str = "pipeline") -> Pipeline:
    """Validate an already-parsed mapping.

    Raises:
        ConfigError: with one line per problem, each naming the key's path.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Pipeline.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_pipeline(path: str | os.PathLike, **cli_overrides: Any) -> Pipeline:
    """Read a pipeline YAML and apply CLI overrides (``workers``, ``memory_per_worker``,
    ``slice_size``, ``overwrite``, ``metrics_port``; ``None`` means not given).

    Raises:
        ConfigError: the file is missing, not YAML, or does not match the schema.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"pipeline file not found: {p}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    if isinstance(data, dict):
        data = _apply_cli(data, cli_overrides)
    return parse_pipeline(data, source=str(p))


def _apply_cli(data: dict, cli: dict[str, Any]) -> dict:
    data = dict(data)
    res = dict(data.get("resources") or {})
    out = dict(data.get("output") or {})
    for key in ("workers", "memory_per_worker", "slice_size"):
        if cli.get(key) is not None:
            res[key] = cli[key]
    if cli.get("overwrite"):
        out["overwrite"] = True
    if res:
        data["resources"] = res
    if out:
        data["output"] = out
    if cli.get("metrics_port") is not None:
        metrics = data.get("metrics") or {}
        if isinstance(metrics, dict):          # otherwise the schema names the problem
            data["metrics"] = {**metrics, "port": cli["metrics_port"]}
    unknown = set(cli) - {"workers", "memory_per_worker", "slice_size", "overwrite", "metrics_port"}
    if unknown:
        raise ConfigError(f"unknown override(s): {sorted(unknown)}")
    return data
