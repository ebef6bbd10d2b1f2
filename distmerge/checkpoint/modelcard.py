"""The model card (README.md) published with a merge on the Hub: what was merged, how, from what.

Pure: a pipeline, the run's identity (input URLs, their header digests and file versions) and
the resolved revisions in, markdown with a YAML metadata block out.
"""

from __future__ import annotations

from typing import Any

import yaml

from distmerge.config import Pipeline


def hub_repo_of(url: str) -> str | None:
    """``org/repo`` of an ``hf://org/repo[@rev][/...]`` URL (None for other URLs)."""
    from distmerge.checkpoint.hub import split_hub_url    # hub imports this module

    ref = split_hub_url(url)
    return ref.repo if ref is not None else None


def model_card(pipeline: Pipeline, *, version: str, identity: dict[str, Any] | None,
               revisions: dict[str, str]) -> str:
    """README.md for the merged model. ``revisions``: input URL -> the commit it was read at
    (hf:// inputs whose revision could be resolved)."""
    base_models = [r for r in (hub_repo_of(u) for u in [pipeline.base_path] + [e.path for e in pipeline.experts]) if r]
    meta: dict[str, Any] = {"library_name": "transformers",
                            "tags": ["merge", "distmerge", pipeline.method.name]}
    if base_models:
        meta["base_model"] = list(dict.fromkeys(base_models))
    params = pipeline.method.params()
    inputs = {m.get("url"): m for m in (identity or {}).get("inputs", []) if isinstance(m, dict)}
    rows = ["| role | model | weight | revision | headers sha256 |", "|---|---|---|---|---|"]
    for role, url, weight in ([("base", pipeline.base_path, "")]
                              + [("expert", e.path, f"{e.weight:g}") for e in pipeline.experts]):
        rev = revisions.get(url, "")
        digest = (inputs.get(url) or {}).get("headers_sha256", "")
        rows.append(f"| {role} | `{url}` | {weight} | {rev} | {digest[:16]} |")
    spec = pipeline.model_dump(mode="json", exclude={"output": {"overwrite", "staging"}})
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {pipeline.name}", "",
        f"This model is a merge of {len(pipeline.experts)} fine-tuned models of the same base, "
        f"made with distmerge {version} using the `{pipeline.method.name}` method.", "",
        "## Method", "",
        f"`{pipeline.method.name}` with parameters:", "",
        "```yaml", (yaml.safe_dump(params, sort_keys=True).strip() if params else "{}"), "```", "",
    ]
    if pipeline.overrides:
        lines += ["Overrides (first matching pattern wins):", "", "```yaml",
                  yaml.safe_dump([o.model_dump(mode="json") for o in pipeline.overrides]).strip(),
                  "```", ""]
    lines += ["## Inputs", "", *rows, "",
              f"Output dtype: {pipeline.output.dtype or 'as the inputs'}; non-finite values "
              f"{'allowed' if pipeline.allow_nonfinite else 'refused'}.", "",
              "## Pipeline", "", "```yaml", yaml.safe_dump(spec, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)
