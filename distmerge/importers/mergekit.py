"""mergekit config → distmerge pipeline (``distmerge import-mergekit``).

:func:`from_mergekit` is a pure function from a parsed mergekit YAML (mergekit 0.1.5's schema:
``mergekit/config.py`` and each method's parameters in ``mergekit/merge_methods/``) to a
pipeline mapping and a list of warnings. Every key of the input is either translated or named
in a warning; what would make distmerge compute a different merge than mergekit is refused
with :class:`~distmerge.errors.ConfigError` naming the key.

How mergekit's semantics map (read from mergekit 0.1.5's source):

- Parameters resolve, per tensor, from the most specific place down: the model's
  ``parameters``, the slice's, the global ones, then the method's default. A value is a scalar,
  a per-layer gradient (a list, interpolated over depth), or a list of ``{filter, value}``
  entries where ``filter`` is a substring of the tensor name (first match wins). Scalar filters
  become distmerge ``overrides`` with the glob ``*filter*``; gradients are averaged over depth,
  with a warning; weights must be one scalar per model (refused otherwise).
- ``weight`` has no default in mergekit (a model without one is an error there, and here).
  ``density`` defaults to 1.0 (keep everything) for every task-vector method; ``lambda`` is
  distmerge's ``scale``; ``normalize`` defaults to true for linear, ties and della, false for
  the others; ``rescale`` defaults to true for dare_* and della.
- ties / dare_ties / della elect the sign on weighted task vectors and, with ``normalize: true``,
  divide by the weights of the agreeing experts: distmerge's disjoint mean. ``normalize: false``
  there (dare_ties' default) sums instead, which distmerge does not do: refused.
- For methods without sign election, ``normalize: true`` divides by Σw: carried as
  ``scale = lambda / Σw``.
- DARE's ``rescale: true`` multiplies the masked task vector by ‖τ‖₁ / ‖masked τ‖₁ over the whole
  tensor (``mergekit/sparsify.py``, ``RescaleNorm.l1``): distmerge's ``rescale: l1``.
- TIES trims per tensor (``scope: tensor``); breadcrumbs removes outliers per tensor
  (``scope: tensor``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from pydantic import TypeAdapter, ValidationError

from distmerge.config import OUTPUT_DTYPES
from distmerge.errors import ConfigError

SUPPORTED = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
             "della", "model_stock", "slerp")

PLACEHOLDER_OUTPUT = "EDIT-ME/merged"

_MISSING = object()

_WHY_UNSUPPORTED = {
    "breadcrumbs_ties": "distmerge's breadcrumbs adds the masked task vectors (task arithmetic) and "
                        "has no TIES sign election; use breadcrumbs, or ties",
    "della_linear": "distmerge's della always takes the TIES sign election and disjoint mean; "
                    "mergekit's della_linear sums without it",
    "passthrough": "distmerge merges the same tensors of several models; it cannot stack or copy "
                   "layer ranges",
}

# merge method -> (normalize default, rescale default) for mergekit's generalized task arithmetic
_GTA_DEFAULTS = {
    "task_arithmetic": (False, False),
    "ties": (True, False),
    "dare_ties": (False, True),
    "dare_linear": (False, True),
    "breadcrumbs": (False, False),
    "della": (True, True),
}
_CONSENSUS = ("ties", "dare_ties", "della")     # mergekit's ConsensusMethod.sum
_RANDOM = ("dare_ties", "dare_linear", "della")

_TOP_KEYS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype",
             "out_dtype", "tokenizer_source", "tokenizer", "chat_template",
             "name", "out_path")   # the last two: mergekit-mega's per-document keys


@dataclass(frozen=True)
class _Param:
    kind: type               # float or bool
    shared: bool             # SHARED scope (global/slice only) vs per-model
    default: Any = _MISSING


def _spec(method: str) -> dict[str, _Param]:
    """mergekit 0.1.5's parameters of ``method``: name → type, scope, default."""
    if method == "linear":
        return {"weight": _Param(float, False), "normalize": _Param(bool, True, True)}
    if method == "model_stock":
        return {"filter_wise": _Param(bool, True, False)}
    if method == "slerp":
        return {"t": _Param(float, True)}
    normalize, rescale = _GTA_DEFAULTS[method]
    spec = {
        "int8_mask": _Param(bool, True, False),
        "normalize": _Param(bool, True, normalize),
        "rescale": _Param(bool, True, rescale),
        "lambda": _Param(float, True, 1.0),
        "weight": _Param(float, False),
        "density": _Param(float, False, 1.0),
    }
    if method == "breadcrumbs":
        spec["gamma"] = _Param(float, False, 0.01)
    if method == "della":
        spec["epsilon"] = _Param(float, False, 0.15)
    return spec


# parameters carried as one scalar (refused when filtered or a gradient), and parameters that
# may vary by tensor (filters become overrides), per method; "weight" is handled on its own
_SCALAR_ONLY = {
    "linear": ("normalize",), "task_arithmetic": ("normalize",), "model_stock": ("filter_wise",),
    "slerp": (), **{m: ("normalize", "rescale") for m in
                    ("ties", "dare_ties", "dare_linear", "breadcrumbs", "della")},
}
_PER_TENSOR = {
    "linear": (), "model_stock": (), "slerp": ("t",), "task_arithmetic": ("lambda",),
    "ties": ("density", "lambda"), "dare_ties": ("density", "lambda"),
    "dare_linear": ("density", "lambda"), "breadcrumbs": ("density", "gamma", "lambda"),
    "della": ("density", "epsilon", "lambda"),
}
# in mergekit's spec, but without effect on the result for this method
_NO_EFFECT = {
    "task_arithmetic": {"density": "mergekit's task_arithmetic does not sparsify",
                        "rescale": "mergekit's task_arithmetic does not sparsify"},
}


class _Rule(NamedTuple):
    filter: str | None       # None: every tensor
    value: Any               # a scalar or a list (per-layer gradient)
    where: str               # the key it came from, e.g. "models[1].parameters.density"
    default: bool = False    # mergekit's default, not written in the config


@dataclass(frozen=True)
class _Ref:
    path: str
    revision: str | None = None
    lora: str | None = None

    @property
    def key(self) -> tuple:
        return (self.path, self.revision, self.lora)

    def __str__(self) -> str:
        return self.path + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class _Input:
    ref: _Ref
    params: dict
    where: str


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _glob(substring: str) -> str:
    """mergekit's ``filter in tensor_name`` as an fnmatch glob."""
    return "*" + "".join(f"[{c}]" if c in "*?[" else c for c in substring) + "*"


def _depth_average(values: list[float]) -> float:
    """The mean over depth of mergekit's piecewise-linear interpolation of ``values``."""
    if len(values) == 1:
        return float(values[0])
    n = len(values) - 1
    return round((values[0] / 2 + sum(values[1:-1]) + values[-1] / 2) / n, 10)


def _pipeline_name(name: Any, source: str) -> str:
    for cand in (name if isinstance(name, str) else None, Path(source).stem):
        if cand:
            s = re.sub(r"[^A-Za-z0-9._-]+", "-", cand).lstrip("._-")[:63]
            if s:
                return s
    return "merge"


class _Importer:
    def __init__(self, source: str):
        self.source = source
        self.warnings: list[str] = []
        self.used: set[str] = set()       # parameter keys some chain reached
        self.label = ""                   # names the override being translated, if any

    # -- messages ---------------------------------------------------------------------------
    def warn(self, key: str, msg: str) -> None:
        line = f"{key}: {msg}{self.label}".replace("\n", " ")
        if line not in self.warnings:
            self.warnings.append(line)

    def refuse(self, key: str, msg: str):
        raise ConfigError(f"{self.source}: {key}: {msg}{self.label}")

    def _coerce(self, kind: type, value: Any, where: str) -> Any:
        """mergekit validates scalars with pydantic (lax): the same rules here."""
        if isinstance(value, list):
            if kind is bool:
                self.refuse(where, f"a per-layer list {_fmt(value)} of true/false cannot be carried")
            return [self._coerce(kind, v, where) for v in value]
        try:
            out = TypeAdapter(kind).validate_python(value)
        except ValidationError:
            self.refuse(where, f"must be {'true or false' if kind is bool else 'a number'}, got {value!r}")
        if kind is float and (out != out or out in (float("inf"), float("-inf"))):
            self.refuse(where, f"must be a finite number, got {value!r}")
        return out

    # -- model references ------------------------------------------------------------------
    def _ref(self, value: Any, where: str) -> _Ref:
        lora = arch = None
        if isinstance(value, dict):
            for k in value:
                if k not in ("model", "lora", "override_architecture"):
                    self.warn(f"{where}.{k}", "not a key of a mergekit model reference (mergekit "
                                              "ignores it); not carried")
            lora, arch = value.get("lora"), value.get("override_architecture")
            value = value.get("model")
            if isinstance(value, dict):
                path, revision = value.get("path"), value.get("revision")
                for k in value:
                    if k not in ("path", "revision"):
                        self.warn(f"{where}.model.{k}", "not a key of a mergekit model path "
                                                        "(mergekit ignores it); not carried")
            else:
                path, revision = value, None
        elif isinstance(value, str):
            chunks = value.split("+")
            if len(chunks) > 2:
                self.refuse(where, f"cannot parse the model reference {value!r}")
            path, revision = chunks[0], None
            lora = chunks[1] if len(chunks) == 2 else None
        else:
            self.refuse(where, f"expected a model path, got {value!r}")
        if not isinstance(path, str) or not path.strip():
            self.refuse(where, f"expected a model path, got {path!r}")
        if revision is None and "@" in path:
            if path.count("@") > 1:
                self.refuse(where, f"invalid model path (several @): {path!r}")
            path, revision = path.split("@")
        if lora:
            self.refuse(where, f"LoRA adapter {lora!r}: distmerge merges full checkpoints only; "
                               "merge the adapter into its model first (peft merge_and_unload, "
                               "saved as safetensors) and name that folder")
        if revision:
            self.warn(where, f"revision {revision!r} of {path} not carried: distmerge reads the path "
                             "as it is; download that revision and point the path at it")
        if arch:
            self.warn(f"{where}.override_architecture", "not carried: distmerge copies the base's "
                                                        "config.json unchanged")
        return _Ref(path=path, revision=revision)

    # -- parameter settings ----------------------------------------------------------------
    def _params(self, value: Any, where: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.refuse(where, f"expected a mapping of parameters, got {value!r}")
        return value

    def _rules(self, setting: Any, where: str) -> list[_Rule]:
        """One place's setting of one parameter as ordered rules; entries after a catch-all
        are never used by mergekit and are named in a warning."""
        scalar = (bool, int, float, str)
        if isinstance(setting, scalar):
            return [_Rule(None, setting, where)]
        if isinstance(setting, dict):
            setting, where_of = [setting], (lambda i: where)
        else:
            where_of = lambda i: f"{where}[{i}]"          # noqa: E731
        if not isinstance(setting, list):
            self.refuse(where, f"expected a number, a per-layer list or filter entries, got {setting!r}")
        if not setting:
            return []
        if all(isinstance(e, scalar) for e in setting):
            return [_Rule(None, list(setting), where)]
        if not all(isinstance(e, dict) for e in setting):
            self.refuse(where, "mixes plain values and {filter, value} entries")
        rules: list[_Rule] = []
        for i, cond in enumerate(setting):
            w = where_of(i)
            if "value" not in cond:
                self.refuse(w, "a filter entry needs a value")
            for k in cond:
                if k not in ("filter", "value"):
                    self.warn(f"{w}.{k}", "not a key of mergekit's filter entries (it knows filter "
                                          "and value) and ignored by mergekit"
                                          + (", so this entry applies to every tensor"
                                             if cond.get("filter") is None else "")
                                          + "; not carried")
            f = cond.get("filter")
            if f is not None and not isinstance(f, str):
                self.refuse(f"{w}.filter", f"expected a substring of tensor names, got {f!r}")
            value = cond["value"]
            if isinstance(value, list):
                if not value or not all(isinstance(e, scalar) for e in value):
                    self.refuse(f"{w}.value", f"expected a number or a per-layer list, got {value!r}")
                vw = f"{w}.value"
            elif isinstance(value, scalar):
                vw = f"{w}.value"
            else:
                self.refuse(f"{w}.value", f"expected a number or a per-layer list, got {value!r}")
            if rules and rules[-1].filter is None:
                self.warn(w, f"comes after the entry {rules[-1].where}, which applies to every tensor: "
                             "mergekit never uses it; not carried")
                continue
            rules.append(_Rule(None if f in (None, "*") else f, value, vw))
        return rules

    def _chain(self, name: str, p: _Param, places: list[tuple[dict, str]]) -> list[_Rule]:
        """Rules for ``name`` in mergekit's precedence (most specific place first), ending at
        the first catch-all; mergekit's default closes the chain."""
        out: list[_Rule] = []
        for params, where in places:
            if name in params:
                self.used.add(f"{where}.{name}")
                for r in self._rules(params[name], f"{where}.{name}"):
                    out.append(_Rule(r.filter, self._coerce(p.kind, r.value, r.where), r.where))
                    if r.filter is None:
                        return out
        if p.default is not _MISSING:
            out.append(_Rule(None, p.default, f"parameters.{name}", default=True))
        return out

    @staticmethod
    def _at(rules: list[_Rule], context: str | None) -> _Rule | None:
        """The rule mergekit applies to a tensor whose name contains ``context`` (and no other
        filter), or to any other tensor when ``context`` is None."""
        return next((r for r in rules if r.filter is None or r.filter == context), None)

    def _scalar(self, rule: _Rule) -> Any:
        if isinstance(rule.value, list):
            avg = _depth_average(rule.value)
            self.warn(rule.where, f"per-layer gradient {_fmt(rule.value)} cannot be carried "
                                  "(distmerge sets parameters per tensor-name pattern, not per "
                                  f"layer); using its average over depth, {_fmt(avg)}")
            return avg
        return rule.value

    # -- inputs ----------------------------------------------------------------------------
    def _inputs(self, config: dict) -> tuple[list[_Input], list[tuple[dict, str]], Any]:
        """The input models, the slice-level parameter places, and the slice's base_model."""
        if config.get("modules"):
            self.refuse("modules", "per-module merges (several output modules) cannot be carried: "
                                   "distmerge merges one checkpoint with one method")
        if "modules" in config:
            self.warn("modules", "empty; not carried")
        models, slices = config.get("models"), config.get("slices")
        if bool(models) == bool(slices):
            self.refuse("models", "mergekit needs exactly one of models or slices")
        if models:
            if not isinstance(models, list):
                self.refuse("models", f"expected a list, got {models!r}")
            out = []
            for i, m in enumerate(models):
                where = f"models[{i}]"
                if not isinstance(m, dict) or "model" not in m:
                    self.refuse(where, "expected a mapping with model:")
                for k in m:
                    if k not in ("model", "parameters"):
                        self.warn(f"{where}.{k}", "not a key of a mergekit model entry (mergekit "
                                                  "ignores it); not carried")
                out.append(_Input(self._ref(m["model"], f"{where}.model"),
                                  self._params(m.get("parameters"), f"{where}.parameters"), where))
            return out, [], None
        if not isinstance(slices, list):
            self.refuse("slices", f"expected a list, got {slices!r}")
        if len(slices) != 1:
            self.refuse("slices", f"{len(slices)} output slices stack layer ranges (a frankenmerge): "
                                  "distmerge merges whole checkpoints tensor by tensor and cannot "
                                  "build that")
        s = slices[0]
        if not isinstance(s, dict) or not isinstance(s.get("sources"), list) or not s["sources"]:
            self.refuse("slices[0]", "expected a mapping with a list of sources")
        for k in s:
            if k == "residual_weight":
                self.warn("slices[0].residual_weight", "unused by mergekit 0.1.5; not carried")
            elif k not in ("sources", "base_model", "parameters"):
                self.warn(f"slices[0].{k}", "not a key of a mergekit slice (mergekit ignores it); "
                                            "not carried")
        out, ranges = [], []
        for i, src in enumerate(s["sources"]):
            where = f"slices[0].sources[{i}]"
            if not isinstance(src, dict) or "model" not in src:
                self.refuse(where, "expected a mapping with model: and layer_range:")
            for k in src:
                if k not in ("model", "layer_range", "parameters"):
                    self.warn(f"{where}.{k}", "not a key of a mergekit slice source (mergekit "
                                              "ignores it); not carried")
            lr = src.get("layer_range")
            if (not isinstance(lr, list) or len(lr) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)):
                self.refuse(f"{where}.layer_range", f"expected [start, end], got {lr!r}")
            ranges.append(tuple(lr))
            out.append(_Input(self._ref(src["model"], f"{where}.model"),
                              self._params(src.get("parameters"), f"{where}.parameters"), where))
        start, end = ranges[0]
        for i, r in enumerate(ranges):
            if r != ranges[0] or start != 0 or end <= 0:
                self.refuse(f"slices[0].sources[{i}].layer_range",
                            f"layer ranges {', '.join(map(str, map(list, ranges)))}: only one slice "
                            "over the same layers [0, N) of every model can be taken as whole "
                            "models; distmerge cannot select or shift layers")
        self.warn("slices", f"one slice over layers [0, {end}) of every model, taken as the whole "
                            f"models (distmerge merges whole checkpoints): the same merge only if every "
                            f"model has exactly {end} layers; check num_hidden_layers in config.json")
        places = [(self._params(s.get("parameters"), "slices[0].parameters"), "slices[0].parameters")]
        return out, places, s.get("base_model")

    # -- the translation -------------------------------------------------------------------
    def run(self, config: Any, output_path: str | None) -> dict:
        if not isinstance(config, dict):
            self.refuse("(top level)", f"expected a mergekit config mapping, got {type(config).__name__}")
        for k in config:
            if k not in _TOP_KEYS:
                self.warn(k, "not a mergekit config key (mergekit ignores it); not carried")
        method = config.get("merge_method")
        if not isinstance(method, str):
            self.refuse("merge_method", f"required (one of {', '.join(SUPPORTED)}), got {method!r}")
        if method not in SUPPORTED:
            why = _WHY_UNSUPPORTED.get(method, "no distmerge method computes it")
            self.refuse("merge_method", f"{method!r} cannot be imported: {why} "
                                        f"(supported: {', '.join(SUPPORTED)})")
        spec = _spec(method)
        inputs, slice_places, slice_base = self._inputs(config)
        global_params = self._params(config.get("parameters"), "parameters")
        base_value = slice_base if slice_base is not None else config.get("base_model")
        base_where = "slices[0].base_model" if slice_base is not None else "base_model"
        if slice_base is not None and config.get("base_model") is not None:
            self.warn("base_model", "replaced by slices[0].base_model, as in mergekit")
        base = self._ref(base_value, base_where) if base_value is not None else None

        self._check_param_names(method, spec, inputs, slice_places, global_params)

        # base and experts
        seen: dict[tuple, str] = {}
        for inp in inputs:
            if inp.ref.key in seen:
                self.refuse(f"{inp.where}.model", f"{inp.ref} is listed twice ({seen[inp.ref.key]}); "
                                                  "mergekit refuses duplicate inputs")
            seen[inp.ref.key] = inp.where
        if method == "linear":
            experts = list(inputs)
            if base is not None and base.key not in seen:
                experts.append(_Input(base, {}, base_where))    # mergekit adds it as an input
            pipeline_base = base or inputs[0].ref
        else:
            if base is None:
                self.refuse("base_model", f"mergekit's {method} requires a base model")
            experts = [i for i in inputs if i.ref.key != base.key]
            for inp in inputs:
                if inp.ref.key == base.key and inp.params:
                    self.warn(f"{inp.where}.parameters", f"{inp.ref} is the base model: mergekit "
                                                         "does not use its parameters; not carried")
            pipeline_base = base
        if method == "slerp":
            if len(experts) != 1:
                self.refuse("models", f"slerp interpolates between base_model and exactly one other "
                                      f"model, got {len(experts)} others")
            experts = [_Input(base, {}, base_where), experts[0]]
        elif len(experts) < 2:
            self.refuse("models", f"{len(experts)} model(s) to merge: distmerge merges two or more "
                                  "experts" + ("" if method == "linear" else " besides the base"))

        slice_and_global = slice_places + [(global_params, "parameters")]
        weights = self._weights(method, spec, experts, slice_and_global)
        params, overrides = self._method_params(method, spec, experts, slice_and_global, weights)

        pipeline: dict[str, Any] = {
            "name": _pipeline_name(config.get("name"), self.source),
            "base": str(pipeline_base.path),
            "experts": [{"path": e.ref.path, "weight": w} for e, w in zip(experts, weights)],
            "method": {"name": method, **params},
        }
        if overrides:
            pipeline["overrides"] = overrides
        pipeline["output"] = self._output(config, output_path)
        self._unused(method, spec, slice_and_global
                     + [(e.params, f"{e.where}.parameters") for e in experts])
        self._other_keys(config)
        self._hub_ids([pipeline_base] + [e.ref for e in experts])
        return pipeline

    def _check_param_names(self, method, spec, inputs, slice_places, global_params) -> None:
        places = [(p, w) for p, w in slice_places] + [(global_params, "parameters")]
        places += [(i.params, f"{i.where}.parameters") for i in inputs]
        per_model = {id(i.params) for i in inputs}
        for params, where in places:
            for k in params:
                key = f"{where}.{k}"
                if k not in spec:
                    self.warn(key, f"not a parameter of mergekit's {method} (mergekit ignores it); "
                                   "not carried")
                elif k == "int8_mask":
                    self.warn(key, "a mergekit memory option with no effect on the result; "
                                   "distmerge needs no equivalent")
                elif k in _NO_EFFECT.get(method, {}):
                    self.warn(key, f"no effect: {_NO_EFFECT[method][k]}; not carried")
                elif spec[k].shared and id(params) in per_model:
                    self.warn(key, f"mergekit reads {k} only from the global or slice parameters "
                                   "and ignores it here; not carried")

    def _unused(self, method, spec, places) -> None:
        """Parameters of the method that no chain reached: set more specifically everywhere."""
        for params, where in places:
            for k in params:
                key = f"{where}.{k}"
                if (k in spec and k != "int8_mask" and k not in _NO_EFFECT.get(method, {})
                        and not (spec[k].shared and not where.startswith(("parameters", "slices[0].parameters")))
                        and key not in self.used):
                    self.warn(key, "every model sets its own value, so mergekit never uses this one; "
                                   "not carried")

    def _weights(self, method, spec, experts, shared_places) -> list[float]:
        if "weight" not in spec:
            return [1.0] * len(experts)
        out = []
        for e in experts:
            rules = self._chain("weight", spec["weight"],
                                [(e.params, f"{e.where}.parameters")] + shared_places)
            if not rules:
                if e.where == "base_model" or e.where.endswith(".base_model"):
                    self.refuse("parameters.weight", f"no weight for the base model {e.ref}: mergekit's "
                                                     "linear merges base_model as one more input and "
                                                     "requires a weight for it (parameters.weight); or "
                                                     "drop base_model")
                self.refuse(f"{e.where}.parameters.weight",
                            f"no weight for {e.ref}: mergekit requires one for every model "
                            "(here or in the global parameters)")
            r = rules[0]
            if r.filter is not None:
                self.refuse(r.where, f"a weight for some tensors only (filter: {r.filter}) cannot be "
                                     "carried: distmerge has one weight per expert")
            if isinstance(r.value, list):
                self.refuse(r.where, f"a per-layer weight gradient {_fmt(r.value)} cannot be carried: "
                                     "distmerge has one weight per expert")
            if method in _CONSENSUS and r.value < 0:
                self.refuse(r.where, f"negative weight {_fmt(r.value)}: mergekit elects signs on "
                                     "weighted task vectors (w·τ), distmerge on the task vectors; "
                                     "the two differ for negative weights")
            out.append(float(r.value))
        return out

    def _method_params(self, method, spec, experts, shared_places, weights):
        scalars: dict[str, _Rule] = {}
        for name in _SCALAR_ONLY[method]:
            rules = self._chain(name, spec[name], shared_places)
            r = rules[0]
            if r.filter is not None or isinstance(r.value, list):
                self.refuse(r.where, f"{name} for some tensors or layers only cannot be carried: "
                                     f"distmerge's {method} takes one {name} for the whole merge")
            scalars[name] = r
        per_tensor: dict[str, list[_Rule]] = {}
        for name in _PER_TENSOR[method]:
            p = spec[name]
            if p.shared:
                rules = self._chain(name, p, shared_places)
            else:
                rules = self._per_model(name, p, experts, shared_places)
            if not rules or rules[-1].filter is not None:
                self.refuse(f"parameters.{name}", f"required by mergekit's {method} for every tensor")
            per_tensor[name] = rules

        filters: list[str] = []
        for rules in per_tensor.values():
            for r in rules:
                if r.filter is not None and r.filter not in filters:
                    filters.append(r.filter)
        lists = [[r.filter for r in rules if r.filter] for rules in per_tensor.values()]
        lists = [lst for lst in lists if lst]
        if len(filters) > 1 and any(lst != lists[0] for lst in lists):
            self.warn("parameters", "filters differ between parameters: a tensor whose name contains "
                                    "several filters takes the first matching override for every "
                                    "parameter, whereas mergekit picks each parameter's first match")

        def at(context):
            values = {k: r.value for k, r in scalars.items()}
            where = {k: r for k, r in scalars.items()}
            for k, rules in per_tensor.items():
                r = self._at(rules, context)
                values[k], where[k] = self._scalar(r), r
            self.label = "" if context is None else f" (in the override for {_glob(context)})"
            try:
                return getattr(self, f"_m_{method}")(values, where, weights)
            finally:
                self.label = ""

        params = at(None)
        overrides = [{"match": _glob(f), **at(f)} for f in filters]
        if method in _RANDOM:
            self.warn("merge_method", f"{method} drops entries at random: distmerge's counter-based "
                                      "generator draws other masks than mergekit's torch generator, so "
                                      "the merge matches mergekit's in distribution, not bit for bit")
        return params, overrides

    def _per_model(self, name, p, experts, shared_places) -> list[_Rule]:
        chains = [self._chain(name, p, [(e.params, f"{e.where}.parameters")] + shared_places)
                  for e in experts]
        shape = [[(r.filter, r.value) for r in c] for c in chains]
        if all(s == shape[0] for s in shape):
            return chains[0]
        values, lossy = [], False
        for c in chains:
            lossy |= len(c) > 1 or any(isinstance(r.value, list) for r in c)
            v = self._at(c, None).value
            values.append(_depth_average(v) if isinstance(v, list) else v)
        mean = round(sum(values) / len(values), 10)
        listing = ", ".join(f"{e.ref}: {_fmt(v)}" for e, v in zip(experts, values))
        self.warn(f"models[*].parameters.{name}",
                  f"differs between models ({listing}): distmerge has one {name} per method block, "
                  f"not one per model; using their mean {_fmt(mean)}"
                  + (" (these models' filters and per-layer lists are not carried either)" if lossy else "")
                  + f"; edit method.{name}, or merge in stages")
        return [_Rule(None, mean, f"models[*].parameters.{name}")]

    # -- per-method parameter translation (one call per override context) -------------------
    def _normalized_scale(self, values, weights) -> float:
        lam = float(values["lambda"])
        total = sum(weights)
        if values["normalize"] and abs(total) >= 1e-8:     # mergekit divides by Σw (1 below 1e-8)
            return lam / total
        return lam

    def _density(self, values, where) -> float:
        d = float(values["density"])
        if d < 0:
            self.refuse(where["density"].where, f"must be 0 or more, got {_fmt(d)}")
        return min(d, 1.0)          # mergekit keeps everything at density ≥ 1, as distmerge at 1

    def _need_normalize(self, method, where) -> None:
        r = where["normalize"]
        default = f" (mergekit's default for {method})" if r.default else ""
        self.refuse(r.where, f"normalize: false{default} makes mergekit's {method} add the agreeing "
                             "weighted task vectors without dividing by their weights; distmerge's "
                             f"{method} always takes that disjoint weighted mean (mergekit's normalize: "
                             "true). Set normalize: true to accept the mean")

    def _m_linear(self, values, where, weights) -> dict:
        return {"normalize": values["normalize"]}

    def _m_task_arithmetic(self, values, where, weights) -> dict:
        return {"scale": self._normalized_scale(values, weights)}

    def _m_ties(self, values, where, weights) -> dict:
        if not values["normalize"]:
            self._need_normalize("ties", where)
        if values["rescale"]:
            self.refuse(where["rescale"].where, "rescale: true makes mergekit's ties rescale each "
                                                "trimmed task vector to its L1 norm; distmerge's ties "
                                                "does not rescale")
        d = self._density(values, where)
        if d == 0:
            self.warn(where["density"].where, "density 0: mergekit's ties keeps no entry (the merge is "
                                              "the base); distmerge's scope: tensor keeps each tensor's "
                                              "largest entry")
        return {"density": d, "scope": "tensor", "scale": float(values["lambda"])}

    def _m_dare_ties(self, values, where, weights) -> dict:
        if not values["normalize"]:
            self._need_normalize("dare_ties", where)
        return {"density": self._density(values, where),
                "rescale": "l1" if values["rescale"] else "none",
                "scale": float(values["lambda"])}

    def _m_dare_linear(self, values, where, weights) -> dict:
        return {"density": self._density(values, where),
                "rescale": "l1" if values["rescale"] else "none",
                "scale": self._normalized_scale(values, weights)}

    def _m_breadcrumbs(self, values, where, weights) -> dict:
        if values["rescale"]:
            self.refuse(where["rescale"].where, "rescale: true makes mergekit's breadcrumbs rescale "
                                                "each masked task vector to its L1 norm; distmerge's "
                                                "breadcrumbs does not rescale")
        d = self._density(values, where)
        g = float(values["gamma"])
        if g < 0:
            self.refuse(where["gamma"].where, f"must be 0 or more, got {_fmt(g)}")
        if d >= 1:
            if g:
                default = " (mergekit's default)" if where["density"].default else ""
                self.warn(where["density"].where, f"density 1{default}: mergekit's breadcrumbs keeps "
                                                  "every entry and ignores gamma; written as gamma: 0.0")
            g = 0.0
        elif d + g > 1:
            g = round(1 - d, 10)
            self.warn(where["gamma"].where, f"density + gamma > 1: mergekit then removes only the "
                                            f"largest 1 − density of entries; written as gamma: {_fmt(g)}")
        return {"density": d, "gamma": g, "scope": "tensor",
                "scale": self._normalized_scale(values, weights)}

    def _m_della(self, values, where, weights) -> dict:
        if not values["normalize"]:
            self._need_normalize("della", where)
        if not values["rescale"]:
            self.refuse(where["rescale"].where, "rescale: false makes mergekit's della keep survivors "
                                                "unscaled; distmerge's della always rescales them by "
                                                "1/p_i")
        default = ", mergekit's default" if where["rescale"].default else ""
        self.warn(where["rescale"].where, f"with rescale: true{default}, mergekit's della rescales each "
                                          "tensor's survivors to the tensor's L1 norm; distmerge's della "
                                          "rescales each survivor by 1/p_i, as the paper: equal in "
                                          "expectation, not the same merge")
        d = self._density(values, where)
        eps = float(values["epsilon"])
        if d >= 1:
            if eps:
                self.warn(where["density"].where, "density 1: mergekit's della keeps every entry and "
                                                  "ignores epsilon; written as epsilon: 0.0")
            eps = 0.0
        elif d <= 0 or eps < 0 or d - eps <= 0 or d + eps >= 1:
            self.refuse(where["epsilon"].where, f"mergekit requires density ± epsilon inside (0, 1), "
                                                f"got density {_fmt(d)} and epsilon {_fmt(eps)}")
        return {"density": d, "epsilon": eps, "scale": float(values["lambda"])}

    def _m_model_stock(self, values, where, weights) -> dict:
        if values["filter_wise"]:
            self.refuse(where["filter_wise"].where, "filter_wise: true computes model stock per row; "
                                                    "distmerge's model_stock works per tensor")
        return {}

    def _m_slerp(self, values, where, weights) -> dict:
        return {"t": float(values["t"])}

    # -- output and the keys that are not merge parameters ---------------------------------
    def _output(self, config: dict, output_path: str | None) -> dict:
        out: dict[str, Any] = {}
        out_path = config.get("out_path")
        if output_path:
            out["path"] = output_path
            if out_path is not None:
                self.warn("out_path", f"{out_path!r} replaced by --output-path {output_path}")
        elif isinstance(out_path, str) and out_path.strip():
            out["path"] = out_path
        else:
            if out_path is not None:
                self.warn("out_path", f"expected a folder, got {out_path!r}; not carried")
            out["path"] = PLACEHOLDER_OUTPUT
            self.warn("output.path", f"placeholder {PLACEHOLDER_OUTPUT}: mergekit takes the output "
                                     "folder on its command line; edit output.path (or pass "
                                     "--output-path) before running")

        def dtype(key):
            v = config.get(key)
            if v is None:
                return None
            if not isinstance(v, str):
                self.refuse(key, f"expected a dtype name, got {v!r}")
            return v.removeprefix("torch.")

        compute, written = dtype("dtype"), dtype("out_dtype")
        final = written or compute
        if final is not None:
            if final not in OUTPUT_DTYPES:
                self.refuse("out_dtype" if written else "dtype",
                            f"{final} is not an output dtype distmerge writes "
                            f"({' | '.join(OUTPUT_DTYPES)})")
            out["dtype"] = final
        if compute is not None and compute != "float32":
            self.warn("dtype", f"mergekit loads and merges in {compute}; distmerge always merges in "
                               f"float32 and writes output.dtype {final}: expect rounding-level "
                               "differences")
        return out

    def _other_keys(self, config: dict) -> None:
        for key in ("tokenizer_source", "tokenizer"):
            if config.get(key) is not None:
                self.warn(key, "not carried: distmerge copies the base's tokenizer files and merges "
                               "embedding rows by index, which equals mergekit only if every model "
                               "has the same tokenizer (same tokens in the same order)")
        if config.get("chat_template") is not None:
            self.warn("chat_template", "not carried: distmerge copies the base's tokenizer files, "
                                       "chat template included; set it on the merged model afterwards")

    def _hub_ids(self, refs: list[_Ref]) -> None:
        ids = []
        for r in refs:
            if (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", r.path) and r.path not in ids):
                ids.append(r.path)
        if ids:
            self.warn("models", f"paths that look like Hugging Face repo ids are written as given "
                                f"({', '.join(ids)}): mergekit downloads them when no such local "
                                "folder exists, distmerge reads only local folders and fsspec URLs; "
                                "download them (huggingface-cli download ID --local-dir DIR) and edit "
                                "the paths, or write them as hf://ID")


def from_mergekit(config: dict, *, source: str,
                  output_path: str | None = None) -> tuple[dict, list[str]]:
    """Translate a parsed mergekit config into a distmerge pipeline mapping.

    Args:
        config: the mergekit YAML, parsed (one document).
        source: where it came from (used in messages and to name the pipeline).
        output_path: the pipeline's ``output.path``; default: the config's ``out_path``
            (mergekit-mega) or a placeholder to edit, named in a warning.

    Returns:
        The pipeline mapping (loads with :func:`distmerge.config.parse_pipeline`) and one
        warning line per thing not carried or carried differently.

    Raises:
        ConfigError: the config would give a different merge in distmerge (unsupported method,
            per-layer or per-tensor weights, ...), or is malformed; the message names the key.
    """
    importer = _Importer(source)
    pipeline = importer.run(config, output_path)
    return pipeline, importer.warnings


def render(pipeline: dict, warnings: list[str], source: str) -> str:
    """The pipeline as YAML, headed by comments naming the source and every warning."""
    lines = [f"# distmerge pipeline translated from the mergekit config {source}",
             "# by `distmerge import-mergekit`; check it with `distmerge validate` before running."]
    if warnings:
        lines.append("# Not carried, or carried differently (also printed on stderr):")
        lines += [f"#   - {w}" for w in warnings]
    body = yaml.safe_dump(pipeline, sort_keys=False, default_flow_style=None, width=100,
                          allow_unicode=True)
    return "\n".join(lines) + "\n" + body


def import_mergekit(config_path: str, *, output_path: str | None = None,
                    out: str | None = None) -> tuple[str, list[str]]:
    """Read a mergekit YAML file, translate it, and write the pipeline YAML to ``out`` when
    given. Returns the YAML text and the warnings.

    Raises:
        ConfigError: the file is missing, not one YAML document, or cannot be translated.
    """
    p = Path(config_path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"mergekit config not found: {p}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{p}: cannot read: {err}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    if len(docs) != 1:
        raise ConfigError(f"{p}: {len(docs)} YAML documents (a mergekit-mega file?): import one "
                          "merge at a time, each in its own file")
    pipeline, warnings = from_mergekit(docs[0], source=str(p), output_path=output_path)
    result = render(pipeline, warnings, str(p))
    if out is not None:
        dest = Path(out)
        if dest.resolve() == p.resolve():
            raise ConfigError(f"-o {out}: that is the mergekit config itself; choose another file")
        try:
            dest.write_text(result, encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"-o {out}: cannot write the pipeline: {err}") from None
    return result, warnings
