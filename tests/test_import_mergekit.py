"""``distmerge import-mergekit``: mergekit YAML → pipeline YAML.

One realistic config per supported method (shapes from mergekit's docs/examples and
docs/merge_methods.md), checked against the exact pipeline; the produced YAML loads with
load_pipeline, and for the methods registered at the time of writing (linear,
task_arithmetic, ties) its method block builds. Then the warnings (slices, gradients,
differing densities, filters, unknown keys), the refusals, and the CLI end to end.
"""

from __future__ import annotations

import textwrap

import pytest
import yaml

from distmerge.cli import main
from distmerge.config import load_pipeline
from distmerge.errors import ConfigError
from distmerge.importers.mergekit import PLACEHOLDER_OUTPUT, from_mergekit, render
from distmerge.methods import build

OUT = "/data/merged"
BUILDABLE = ("linear", "task_arithmetic", "ties")


def translate(tmp_path, text: str, **kw):
    """Translate a mergekit YAML text; check that the rendered pipeline loads (and builds, for
    the methods registered when this was written) and equals the returned mapping."""
    config = yaml.safe_load(textwrap.dedent(text))
    kw.setdefault("output_path", OUT)
    pipeline, warnings = from_mergekit(config, source="merge.yml", **kw)
    path = tmp_path / "pipeline.yaml"
    path.write_text(render(pipeline, warnings, "merge.yml"))
    loaded = load_pipeline(path)
    assert loaded.method.name == pipeline["method"]["name"]
    assert loaded.method.params() == {k: v for k, v in pipeline["method"].items() if k != "name"}
    assert [(e.path, e.weight) for e in loaded.experts] == [(e["path"], e["weight"]) for e in pipeline["experts"]]
    assert [(o.match, o.params()) for o in loaded.overrides] == [
        (o["match"], {k: v for k, v in o.items() if k != "match"}) for o in pipeline.get("overrides", [])]
    if loaded.method.name in BUILDABLE:
        methods = build(loaded.method.name, loaded.method.params(),
                        [(o.match, o.params()) for o in loaded.overrides])
        methods.check_weights(tuple(e.weight for e in loaded.experts))
    return pipeline, warnings


def keys(warnings: list[str]) -> list[str]:
    return [w.split(": ", 1)[0] for w in warnings]


def refused(text: str, **kw) -> str:
    with pytest.raises(ConfigError) as err:
        from_mergekit(yaml.safe_load(textwrap.dedent(text)), source="merge.yml", **kw)
    return str(err.value)


HUB = "models: paths that look like Hugging Face repo ids are written as given"
DTYPE16 = ("dtype: mergekit loads and merges in float16; distmerge always merges in float32 and "
           "writes output.dtype float16: expect rounding-level differences")


# -- one realistic config per method -------------------------------------------------------

def test_linear_mergekit_example(tmp_path):
    # mergekit examples/linear.yml
    pipeline, warnings = translate(tmp_path, """
        models:
          - model: psmathur/orca_mini_v3_13b
            parameters:
              weight: 1.0
          - model: WizardLM/WizardLM-13B-V1.2
            parameters:
              weight: 0.3
          - model: garage-bAInd/Platypus2-13B
            parameters:
              weight: 0.5
        merge_method: linear
        dtype: float16
    """)
    assert pipeline == {
        "name": "merge",
        "base": "psmathur/orca_mini_v3_13b",      # linear uses no base: the first model
        "experts": [{"path": "psmathur/orca_mini_v3_13b", "weight": 1.0},
                    {"path": "WizardLM/WizardLM-13B-V1.2", "weight": 0.3},
                    {"path": "garage-bAInd/Platypus2-13B", "weight": 0.5}],
        "method": {"name": "linear", "normalize": True},            # mergekit's default
        "output": {"path": OUT, "dtype": "float16"},
    }
    assert warnings[0] == DTYPE16
    assert warnings[1].startswith(HUB + " (psmathur/orca_mini_v3_13b, WizardLM/WizardLM-13B-V1.2, "
                                        "garage-bAInd/Platypus2-13B)")
    assert len(warnings) == 2


def test_linear_with_base_model_merges_it_as_one_more_input(tmp_path):
    # mergekit adds base_model to the inputs of linear; it needs a (global) weight
    pipeline, warnings = translate(tmp_path, """
        models:
          - model: /m/a
            parameters: {weight: 2}
          - model: /m/b
        merge_method: linear
        base_model: /m/base
        parameters: {weight: 1, normalize: false}
    """)
    assert pipeline["base"] == "/m/base"
    assert pipeline["experts"] == [{"path": "/m/a", "weight": 2.0}, {"path": "/m/b", "weight": 1.0},
                                   {"path": "/m/base", "weight": 1.0}]
    assert pipeline["method"] == {"name": "linear", "normalize": False}
    assert warnings == []


def test_task_arithmetic(tmp_path):
    pipeline, warnings = translate(tmp_path, """
        models:
          - model: /ckpt/llama-code
            parameters: {weight: 0.7}
          - model: /ckpt/llama-math
            parameters: {weight: 0.5}
        merge_method: task_arithmetic
        base_model: /ckpt/llama-base
        parameters:
          lambda: 0.8
        dtype: bfloat16
        out_dtype: float32
    """)
    assert pipeline == {
        "name": "merge",
        "base": "/ckpt/llama-base",
        "experts": [{"path": "/ckpt/llama-code", "weight": 0.7},
                    {"path": "/ckpt/llama-math", "weight": 0.5}],
        "method": {"name": "task_arithmetic", "scale": 0.8},   # normalize: false by default
        "output": {"path": OUT, "dtype": "float32"},          # out_dtype wins over dtype
    }
    assert warnings == ["dtype: mergekit loads and merges in bfloat16; distmerge always merges in "
                        "float32 and writes output.dtype float32: expect rounding-level differences"]


def test_task_arithmetic_normalize_true_divides_lambda_by_the_weights(tmp_path):
    pipeline, _ = translate(tmp_path, """
        models:
          - {model: /m/a, parameters: {weight: 1.5}}
          - {model: /m/b, parameters: {weight: 0.5}}
        merge_method: task_arithmetic
        base_model: /m/base
        parameters: {normalize: true, lambda: 3.0}
    """)
    assert pipeline["method"] == {"name": "task_arithmetic", "scale": 1.5}     # 3 / (1.5 + 0.5)


def test_ties_readme_example(tmp_path):
    # mergekit's README / examples/mega.yml TIES shape (scalar densities, the base listed too)
    pipeline, warnings = translate(tmp_path, """
        models:
          - model: psmathur/orca_mini_v3_13b
            parameters:
              density: [1, 0.7, 0.1] # density gradient
              weight: 1.0
          - model: garage-bAInd/Platypus2-13B
            parameters:
              density: 0.5
              weight: 0.5
          - model: WizardLM/WizardMath-13B-V1.0
            parameters:
              density: 0.33
              weight: 0.3
          - model: TheBloke/Llama-2-13B-fp16
            # no parameters necessary for base model
        merge_method: ties
        base_model: TheBloke/Llama-2-13B-fp16
        parameters:
          normalize: true
          int8_mask: true
        dtype: float16
    """)
    assert pipeline == {
        "name": "merge",
        "base": "TheBloke/Llama-2-13B-fp16",
        "experts": [{"path": "psmathur/orca_mini_v3_13b", "weight": 1.0},
                    {"path": "garage-bAInd/Platypus2-13B", "weight": 0.5},
                    {"path": "WizardLM/WizardMath-13B-V1.0", "weight": 0.3}],
        # densities differ: their mean (the gradient by its depth average 0.625)
        "method": {"name": "ties", "density": 0.485, "scope": "tensor", "scale": 1.0},
        "output": {"path": OUT, "dtype": "float16"},
    }
    assert keys(warnings) == ["parameters.int8_mask", "models[*].parameters.density", "dtype", "models"]
    assert warnings[1] == (
        "models[*].parameters.density: differs between models (psmathur/orca_mini_v3_13b: 0.625, "
        "garage-bAInd/Platypus2-13B: 0.5, WizardLM/WizardMath-13B-V1.0: 0.33): distmerge has one "
        "density per method block, not one per model; using their mean 0.485 (these models' filters "
        "and per-layer lists are not carried either); edit method.density, or merge in stages")


def test_ties_same_density_with_a_filter_becomes_an_override(tmp_path):
    pipeline, warnings = translate(tmp_path, """
        models:
          - {model: /m/a, parameters: {weight: 1.0}}
          - {model: /m/b, parameters: {weight: 1.0}}
        merge_method: ties
        base_model: /m/base
        parameters:
          density:
            - filter: self_attn
              value: 0.5
            - filter: "mlp.*"
              value: 0.3
            - value: 0.2
          lambda: 1.2
    """)
    assert pipeline["method"] == {"name": "ties", "density": 0.2, "scope": "tensor", "scale": 1.2}
    assert pipeline["overrides"] == [
        {"match": "*self_attn*", "density": 0.5, "scope": "tensor", "scale": 1.2},
        {"match": "*mlp.[*]*", "density": 0.3, "scope": "tensor", "scale": 1.2},   # literal '*'
    ]
    assert warnings == []


def test_ties_without_densities_keeps_everything_like_mergekit(tmp_path):
    # mergekit's density defaults to 1.0 (distmerge's ties to 0.2): written explicitly
    pipeline, _ = translate(tmp_path, """
        models:
          - {model: /m/a, parameters: {weight: 1}}
          - {model: /m/b, parameters: {weight: 1}}
        merge_method: ties
        base_model: /m/base
    """)
    assert pipeline["method"] == {"name": "ties", "density": 1.0, "scope": "tensor", "scale": 1.0}


def test_dare_ties(tmp_path):
    pipeline, warnings = translate(tmp_path, """
        models:
          - model: mistralai/Mistral-7B-v0.1
          - model: samir-fama/SamirGPT-v1
            parameters:
              density: 0.53
              weight: 0.4
          - model: abacusai/Slerp-CM-mist-dpo
            parameters:
              density: 0.53
              weight: 0.3
          - model: EmbeddedLLM/Mistral-7B-Merge-14-v0.2
            parameters:
              density: 0.53
              weight: 0.3
        merge_method: dare_ties
        base_model: mistralai/Mistral-7B-v0.1
        parameters:
          int8_mask: true
          normalize: true
        dtype: bfloat16
    """)
    assert pipeline == {
        "name": "merge",
        "base": "mistralai/Mistral-7B-v0.1",
        "experts": [{"path": "samir-fama/SamirGPT-v1", "weight": 0.4},
                    {"path": "abacusai/Slerp-CM-mist-dpo", "weight": 0.3},
                    {"path": "EmbeddedLLM/Mistral-7B-Merge-14-v0.2", "weight": 0.3}],
        # mergekit's rescale: true (its dare default) matches the tensor's L1 norm
        "method": {"name": "dare_ties", "density": 0.53, "rescale": "l1", "scale": 1.0},
        "output": {"path": OUT, "dtype": "bfloat16"},
    }
    assert keys(warnings) == ["parameters.int8_mask", "merge_method", "dtype", "models"]
    assert warnings[1].startswith("merge_method: dare_ties drops entries at random")


def test_dare_linear_rescale_false_and_normalize(tmp_path):
    pipeline, warnings = translate(tmp_path, """
        models:
          - {model: /m/a, parameters: {weight: 0.6, density: 0.7}}
          - {model: /m/b, parameters: {weight: 0.2, density: 0.7}}
        merge_method: dare_linear
        base_model: /m/base
        parameters: {rescale: false, normalize: true, lambda: 0.4}
    """)
    assert pipeline["method"] == {"name": "dare_linear", "density": 0.7, "rescale": "none",
                                  "scale": 0.5}                 # 0.4 / (0.6 + 0.2)
    assert keys(warnings) == ["merge_method"]


def test_breadcrumbs(tmp_path):
    pipeline, warnings = translate(tmp_path, """
        models:
          - model: /m/code
            parameters: {weight: 1.0, density: 0.9, gamma: 0.01}
          - model: /m/chat
            parameters: {weight: 0.5, density: 0.9, gamma: 0.01}
        merge_method: breadcrumbs
        base_model: /m/base
        parameters: {lambda: 0.9}
        dtype: float32
    """)
    assert pipeline == {
        "name": "merge",
        "base": "/m/base",
        "experts": [{"path": "/m/code", "weight": 1.0}, {"path": "/m/chat", "weight": 0.5}],
        "method": {"name": "breadcrumbs", "density": 0.9, "gamma": 0.01, "scope": "tensor",
                   "scale": 0.9},
        "output": {"path": OUT, "dtype": "float32"},
    }
    assert warnings == []


def test_breadcrumbs_edges_follow_mergekit(tmp_path):
    # density 1 (mergekit's default) skips the outlier cut; density + gamma > 1 shrinks gamma
    pipeline, warnings = translate(tmp_path, """
        models:
          - {model: /m/a, parameters: {weight: 1}}
          - {model: /m/b, parameters: {weight: 1}}
        merge_method: breadcrumbs
        base_model: /m/base
        parameters:
          gamma: 0.1
          density: [{filter: mlp, value: 0.95}, {value: 1.0}]
    """)
    assert pipeline["method"] == {"name": "breadcrumbs", "density": 1.0, "gamma": 0.0,
                                  "scope": "tensor", "scale": 1.0}
    assert pipeline["overrides"] == [{"match": "*mlp*", "density": 0.95, "gamma": 0.05,
                                      "scope": "tensor", "scale": 1.0}]
    assert keys(warnings) == ["parameters.density[1].value", "parameters.gamma"]
    assert warnings[1].endswith("written as gamma: 0.05 (in the override for *mlp*)")


def test_della(tmp_path):
    pipeline, warnings = translate(tmp_path, """
        models:
          - model: /m/a
            parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}
          - model: /m/b
            parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}
        merge_method: della
        base_model: /m/base
        parameters: {lambda: 1.1}
        dtype: bfloat16
    """)
    assert pipeline["method"] == {"name": "della", "density": 0.5, "epsilon": 0.1, "scale": 1.1}
    assert keys(warnings) == ["parameters.rescale", "merge_method", "dtype"]
    assert "1/p_i" in warnings[0] and "mergekit's default" in warnings[0]


def test_della_default_epsilon_is_mergekits(tmp_path):
    pipeline, _ = translate(tmp_path, """
        models:
          - {model: /m/a, parameters: {weight: 1.0}}
          - {model: /m/b, parameters: {weight: 1.0}}
        merge_method: della
        base_model: /m/base
        parameters: {density: 0.4}
    """)
    assert pipeline["method"] == {"name": "della", "density": 0.4, "epsilon": 0.15, "scale": 1.0}


def test_model_stock(tmp_path):
    pipeline, warnings = translate(tmp_path, """
        models:
          - model: /ft/run-1
          - model: /ft/run-2
          - model: /ft/run-3
        merge_method: model_stock
        base_model: /ft/pretrained
        dtype: bfloat16
    """)
    assert pipeline == {
        "name": "merge",
        "base": "/ft/pretrained",
        "experts": [{"path": f"/ft/run-{i}", "weight": 1.0} for i in (1, 2, 3)],
        "method": {"name": "model_stock"},
        "output": {"path": OUT, "dtype": "bfloat16"},
    }
    assert keys(warnings) == ["dtype"]


def test_slerp_gradient_example(tmp_path):
    # mergekit examples/gradient-slerp.yml (with filter:, as mega.yml writes it)
    pipeline, warnings = translate(tmp_path, """
        slices:
          - sources:
              - model: psmathur/orca_mini_v3_13b
                layer_range: [0, 40]
              - model: garage-bAInd/Platypus2-13B
                layer_range: [0, 40]
        merge_method: slerp
        base_model: psmathur/orca_mini_v3_13b
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5 # fallback for rest of tensors
        dtype: float16
    """)
    assert pipeline == {
        "name": "merge",
        "base": "psmathur/orca_mini_v3_13b",
        # t = 0 is the base (first expert), t = 1 the other model, as in mergekit
        "experts": [{"path": "psmathur/orca_mini_v3_13b", "weight": 1.0},
                    {"path": "garage-bAInd/Platypus2-13B", "weight": 1.0}],
        "method": {"name": "slerp", "t": 0.5},
        "overrides": [{"match": "*self_attn*", "t": 0.5}, {"match": "*mlp*", "t": 0.5}],
        "output": {"path": OUT, "dtype": "float16"},
    }
    assert keys(warnings) == ["slices", "parameters.t[0].value", "parameters.t[1].value", "dtype", "models"]
    assert warnings[0] == (
        "slices: one slice over layers [0, 40) of every model, taken as the whole models (distmerge "
        "merges whole checkpoints): the same merge only if every model has exactly 40 layers; check "
        "num_hidden_layers in config.json")
    assert warnings[1] == (
        "parameters.t[0].value: per-layer gradient [0.0, 0.5, 0.3, 0.7, 1.0] cannot be carried "
        "(distmerge sets parameters per tensor-name pattern, not per layer); using its average over "
        "depth, 0.5")


def test_slerp_old_pattern_key_applies_everywhere_like_mergekit(tmp_path):
    # the first gradient-slerp.yml wrote `pattern:`, which mergekit ignores: entry 0 then applies
    # to every tensor and the later entries are never used
    pipeline, warnings = translate(tmp_path, """
        models:
          - model: /m/a
          - model: /m/b
        merge_method: slerp
        base_model: /m/a
        parameters:
          t:
            - pattern: self_attn
              value: [0, 1]
            - value: 0.5
    """)
    assert pipeline["method"] == {"name": "slerp", "t": 0.5}
    assert "overrides" not in pipeline
    assert keys(warnings) == ["parameters.t[0].pattern", "parameters.t[1]", "parameters.t[0].value"]
    assert "applies to every tensor" in warnings[0]


# -- warnings ------------------------------------------------------------------------------

def test_same_density_gradient_everywhere_is_averaged_with_a_warning(tmp_path):
    pipeline, warnings = translate(tmp_path, """
        models:
          - {model: /m/a, parameters: {weight: 1}}
          - {model: /m/b, parameters: {weight: 1}}
        merge_method: ties
        base_model: /m/base
        parameters: {density: [0.8, 0.3, 0.1]}
    """)
    assert pipeline["method"]["density"] == 0.375
    assert warnings == ["parameters.density: per-layer gradient [0.8, 0.3, 0.1] cannot be carried "
                        "(distmerge sets parameters per tensor-name pattern, not per layer); using "
                        "its average over depth, 0.375"]


def test_differing_scalar_densities_warn_with_each_value(tmp_path):
    pipeline, warnings = translate(tmp_path, """
        models:
          - {model: /m/a, parameters: {weight: 1, density: 0.2}}
          - {model: /m/b, parameters: {weight: 1, density: 0.6}}
        merge_method: dare_linear
        base_model: /m/base
    """)
    assert pipeline["method"]["density"] == 0.4
    assert warnings[0] == (
        "models[*].parameters.density: differs between models (/m/a: 0.2, /m/b: 0.6): distmerge has "
        "one density per method block, not one per model; using their mean 0.4; edit method.density, "
        "or merge in stages")


def test_every_other_key_is_named(tmp_path):
    pipeline, warnings = translate(tmp_path, """
        models:
          - model: /m/a@v2
            parameters: {weight: 1, t: 0.3, normalize: false}
            comment: mine
          - model: {model: {path: /m/b}, override_architecture: LlamaForCausalLM}
            parameters: {weight: 1}
          - model: /m/base
            parameters: {weight: 9}
        merge_method: task_arithmetic
        base_model: /m/base
        parameters: {density: 0.5, rescale: true, int8_mask: false, weight: 3}
        tokenizer_source: union
        chat_template: chatml
        random_seed: 3
    """, output_path=None)
    assert pipeline["output"] == {"path": PLACEHOLDER_OUTPUT}
    assert pipeline["experts"] == [{"path": "/m/a", "weight": 1.0}, {"path": "/m/b", "weight": 1.0}]
    assert keys(warnings) == [
        "random_seed", "models[0].comment", "models[0].model",
        "models[1].model.override_architecture",
        "parameters.density", "parameters.rescale", "parameters.int8_mask",
        "models[0].parameters.t", "models[0].parameters.normalize",
        "models[2].parameters", "output.path", "parameters.weight", "tokenizer_source",
        "chat_template",
    ]
    assert "revision 'v2'" in warnings[2]
    assert "mergekit never uses this one" in warnings[11]


def test_mega_out_path_and_name(tmp_path):
    pipeline, warnings = translate(tmp_path, """
        name: first-step
        models:
          - {model: /m/a, parameters: {weight: 1}}
          - {model: /m/b, parameters: {weight: 1}}
        merge_method: linear
        out_path: ./models/first
    """, output_path=None)
    assert pipeline["name"] == "first-step" and pipeline["output"] == {"path": "./models/first"}
    assert warnings == []


# -- refusals ------------------------------------------------------------------------------

BASE_CFG = """
    models:
      - {model: /m/a, parameters: {weight: 1, density: 0.5}}
      - {model: /m/b, parameters: {weight: 1, density: 0.5}}
    base_model: /m/base
"""


@pytest.mark.parametrize("method, why", [
    ("passthrough", "cannot stack or copy layer ranges"),
    ("breadcrumbs_ties", "no TIES sign election"),
    ("della_linear", "sums without it"),
    ("sce", "no distmerge method computes it"),
])
def test_unsupported_method_is_refused(method, why):
    msg = refused(BASE_CFG + f"    merge_method: {method}\n")
    assert msg.startswith(f"merge.yml: merge_method: '{method}' cannot be imported: ") and why in msg


def test_weight_gradient_is_refused():
    msg = refused("""
        models:
          - {model: /m/a, parameters: {weight: [0, 0.3, 0.7, 1], density: 0.5}}
          - {model: /m/b, parameters: {weight: 1}}
        merge_method: ties
        base_model: /m/base
    """)
    assert msg == ("merge.yml: models[0].parameters.weight: a per-layer weight gradient "
                   "[0.0, 0.3, 0.7, 1.0] cannot be carried: distmerge has one weight per expert")


def test_filtered_weight_is_refused():
    # examples/mega.yml's second merge
    msg = refused("""
        models:
          - model: ./models/gradient-slerp
            parameters: {density: 0.5, weight: 1.0}
          - model: WizardLM/WizardMath-13B-V1.0
            parameters:
              density: 0.33
              weight:
                - filter: mlp
                  value: 0.5
                - value: 0
        merge_method: ties
        base_model: TheBloke/Llama-2-13B-fp16
        parameters: {normalize: true, int8_mask: true}
    """)
    assert msg.startswith("merge.yml: models[1].parameters.weight[0].value: a weight for some tensors "
                          "only (filter: mlp)")


@pytest.mark.parametrize("text, key, fragment", [
    (BASE_CFG + "    merge_method: dare_ties\n", "parameters.normalize",
     "normalize: false (mergekit's default for dare_ties)"),
    (BASE_CFG + "    merge_method: ties\n    parameters: {normalize: false}\n", "parameters.normalize",
     "always takes that disjoint weighted mean"),
    (BASE_CFG + "    merge_method: ties\n    parameters: {rescale: true}\n", "parameters.rescale",
     "L1 norm"),
    (BASE_CFG + "    merge_method: della\n    parameters: {rescale: false}\n", "parameters.rescale",
     "1/p_i"),
    (BASE_CFG + "    merge_method: della\n    parameters: {epsilon: 0.6}\n", "parameters.epsilon",
     "density ± epsilon inside (0, 1)"),
    (BASE_CFG + "    merge_method: model_stock\n    parameters: {filter_wise: true}\n",
     "parameters.filter_wise", "per row"),
    ("""
        models: [{model: /m/a, parameters: {weight: 1}}, {model: /m/b}]
        merge_method: ties
        base_model: /m/base
     """, "models[1].parameters.weight", "mergekit requires one for every model"),
    ("""
        models: [{model: /m/a, parameters: {weight: -1}}, {model: /m/b, parameters: {weight: 1}}]
        merge_method: ties
        base_model: /m/base
     """, "models[0].parameters.weight", "negative weight"),
    ("""
        models: [{model: /m/a, parameters: {weight: 1}}]
        merge_method: task_arithmetic
        base_model: /m/base
     """, "models", "distmerge merges two or more experts"),
    ("""
        models: [{model: /m/a, parameters: {weight: 1}}, {model: /m/b, parameters: {weight: 1}}]
        merge_method: ties
     """, "base_model", "requires a base model"),
    ("""
        models: [{model: /m/a+/loras/x, parameters: {weight: 1}}, {model: /m/b, parameters: {weight: 1}}]
        merge_method: linear
     """, "models[0].model", "LoRA adapter '/loras/x'"),
    ("""
        models: [{model: /m/a}, {model: /m/b}, {model: /m/c}]
        merge_method: slerp
        base_model: /m/a
        parameters: {t: 0.5}
     """, "models", "exactly one other model"),
    ("""
        slices:
          - sources: [{model: /m/a, layer_range: [0, 16]}, {model: /m/b, layer_range: [0, 16]}]
          - sources: [{model: /m/a, layer_range: [16, 32]}, {model: /m/b, layer_range: [16, 32]}]
        merge_method: slerp
        base_model: /m/a
        parameters: {t: 0.5}
     """, "slices", "frankenmerge"),
    ("""
        slices:
          - sources: [{model: /m/a, layer_range: [8, 16]}, {model: /m/b, layer_range: [8, 16]}]
        merge_method: slerp
        base_model: /m/a
        parameters: {t: 0.5}
     """, "slices[0].sources[0].layer_range", "cannot select or shift layers"),
    ("""
        models: [{model: /m/a}, {model: /m/b}]
        merge_method: slerp
        base_model: /m/a
     """, "parameters.t", "required by mergekit's slerp"),
    ("""
        models: [{model: /m/a, parameters: {weight: 1}}, {model: /m/b, parameters: {weight: 1}}]
        merge_method: linear
        dtype: float64
     """, "dtype", "float64 is not an output dtype"),
    ("""
        models: [{model: /m/a, parameters: {weight: 1}}, {model: /m/b, parameters: {weight: 1}}]
        merge_method: linear
        parameters: {normalize: [{filter: mlp, value: false}, {value: true}]}
     """, "parameters.normalize[0].value", "one normalize for the whole merge"),
])
def test_refusals_name_the_key(text, key, fragment):
    msg = refused(text)
    assert msg.startswith(f"merge.yml: {key}: "), msg
    assert fragment in msg, msg


# -- the CLI ------------------------------------------------------------------------------

SLERP = """\
slices:
  - sources:
      - model: /models/a
        layer_range: [0, 32]
      - model: /models/b
        layer_range: [0, 32]
merge_method: slerp
base_model: /models/a
parameters:
  t:
    - filter: self_attn
      value: 0.3
    - value: 0.6
dtype: bfloat16
"""


def test_cli_writes_a_pipeline_that_loads(tmp_path, capsys):
    src = tmp_path / "my merge.yml"
    src.write_text(SLERP)
    out = tmp_path / "pipeline.yaml"
    assert main(["import-mergekit", str(src), "-o", str(out), "--output-path", "/data/out"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "distmerge: warning: slices: one slice over layers [0, 32)" in captured.err
    text = out.read_text()
    assert text.startswith(f"# distmerge pipeline translated from the mergekit config {src}\n")
    assert "#   - slices: one slice over layers [0, 32)" in text
    p = load_pipeline(out)
    assert p.name == "my-merge" and p.base == "/models/a"
    assert [e.path for e in p.experts] == ["/models/a", "/models/b"]
    assert (p.method.name, p.method.params()) == ("slerp", {"t": 0.6})
    assert [(o.match, o.params()) for o in p.overrides] == [("*self_attn*", {"t": 0.3})]
    assert (p.output.path, p.output.dtype) == ("/data/out", "bfloat16")


def test_cli_prints_to_stdout_with_the_placeholder(tmp_path, capsys):
    src = tmp_path / "slerp.yml"
    src.write_text(SLERP)
    assert main(["import-mergekit", str(src)]) == 0
    captured = capsys.readouterr()
    assert f"output.path: placeholder {PLACEHOLDER_OUTPUT}" in captured.err
    assert f"#   - output.path: placeholder {PLACEHOLDER_OUTPUT}" in captured.out
    assert yaml.safe_load(captured.out)["output"]["path"] == PLACEHOLDER_OUTPUT


def test_cli_refusal_exits_2(tmp_path, capsys):
    src = tmp_path / "m.yml"
    src.write_text("models: [{model: /a}, {model: /b}]\nmerge_method: passthrough\n")
    out = tmp_path / "p.yaml"
    assert main(["import-mergekit", str(src), "-o", str(out)]) == 2
    assert "distmerge: error: " in capsys.readouterr().err and not out.exists()


def test_cli_refuses_multi_document_and_missing_files(tmp_path, capsys):
    src = tmp_path / "mega.yml"
    src.write_text(SLERP + "---\n" + SLERP)
    assert main(["import-mergekit", str(src)]) == 2
    assert "2 YAML documents" in capsys.readouterr().err
    assert main(["import-mergekit", str(tmp_path / "none.yml")]) == 2
    assert "mergekit config not found" in capsys.readouterr().err
