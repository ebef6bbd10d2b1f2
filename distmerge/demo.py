"""Small generated models for the quickstart, the tests and the benchmarks.

A Llama-shaped base (``config.json`` with ``model_type: llama``, sharded safetensors and an
index json, written by the ``safetensors`` library) and experts that are the base plus a
seeded task vector: a dense small perturbation and a sparse larger one, so merging methods
have something to disagree about. Generation is deterministic and idempotent: a finished
folder carries a marker and is reused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from distmerge.errors import DestinationError

MARKER = ".distmerge-demo-complete"


@dataclass(frozen=True, kw_only=True)
class Shape:
    hidden: int = 256
    layers: int = 4
    intermediate: int = 688
    vocab: int = 4096
    heads: int = 8
    kv_heads: int = 4
    dtype: str = "bfloat16"
    shard_size: int = 5_000_000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab, h),
            "model.norm.weight": (h,),
            "lm_head.weight": (self.vocab, h),
        }
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            })
        return shapes

    def params(self) -> int:
        return sum(math.prod(s) for s in self.tensor_shapes().values())

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": self.dtype,
            "bos_token_id": 1, "eos_token_id": 2,
        }


def _base_weights(shape: Shape, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for name, s in shape.tensor_shapes().items():
        if len(s) == 1:
            out[name] = 1.0 + 0.05 * torch.randn(s, generator=gen)
        else:
            out[name] = torch.randn(s, generator=gen) * 0.02
    return out


def _expert_weights(base: dict[str, torch.Tensor], index: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1000 + index + 1)
    out = {}
    for name, w in base.items():
        dense = torch.randn(w.shape, generator=gen) * 0.002
        sparse = torch.randn(w.shape, generator=gen) * 0.02
        keep = torch.rand(w.shape, generator=gen) < 0.05
        out[name] = w + dense + torch.where(keep, sparse, 0.0)
    return out


def save_model(folder: Path, weights: dict[str, torch.Tensor], shape: Shape) -> None:
    """Write ``weights`` in the Hugging Face layout (sharded, with an index json)."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, shape.dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name in sorted(weights):
        t = weights[name].to(dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and used + nbytes > shape.shard_size:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += nbytes
    n = len(shards)
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(shape.config(), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


def generate(out: str | os.PathLike, *, experts: int = 4, shape: Shape = Shape(), seed: int = 0) -> list[Path]:
    """Generate (or reuse) ``out/base`` and ``out/expert-1..N``; returns their folders."""
    out = Path(out).expanduser()
    spec = {"experts": experts, "seed": seed, **asdict(shape)}
    marker = out / MARKER
    folders = [out / "base"] + [out / f"expert-{i + 1}" for i in range(experts)]
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return folders
    if out.exists():
        if not marker.exists():
            raise DestinationError(f"{out} exists and is not a distmerge demo folder; choose another path")
        shutil.rmtree(out)          # a demo of another shape: regenerate
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    gen = torch.Generator().manual_seed(seed)
    base = _base_weights(shape, gen)
    save_model(tmp / "base", base, shape)
    for i in range(experts):
        save_model(tmp / f"expert-{i + 1}", _expert_weights(base, i, seed), shape)
    (tmp / MARKER).write_text(json.dumps(spec))
    tmp.rename(out)
    return folders


def default_cache() -> Path:
    return Path(os.environ.get("DISTMERGE_CACHE", "~/.cache/distmerge")).expanduser()
