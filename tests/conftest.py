"""Shared fixtures: small generated models, pipeline files, one local Ray for the session."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from distmerge.demo import Shape, generate

TINY = Shape(hidden=32, layers=2, intermediate=64, vocab=96, heads=4, kv_heads=2,
             dtype="bfloat16", shard_size=20_000)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> list[Path]:
    """A tiny Llama-shaped base and 3 experts (bf16, several shards, index json).
    Shared by many tests: never modify these folders; copy them first."""
    return generate(tmp_path_factory.mktemp("models") / "tiny", experts=3, shape=TINY)


def make_pipeline(tmp_path: Path, models: list[Path], **changes) -> Path:
    """Write a pipeline YAML over ``models`` (base first) into ``tmp_path``; ``changes``
    replace top-level keys (e.g. ``method={...}``)."""
    data = {
        "name": "test",
        "base": str(models[0]) if models else None,
        "experts": [{"path": str(m), "weight": 1.0} for m in models[1:]],
        "method": {"name": "ties", "density": 0.3, "scope": "model"},
        "output": {"path": str(tmp_path / "out"), "dtype": "bfloat16"},
        "resources": {"workers": 2, "memory_per_worker": "2GB"},
    }
    data.update(changes)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def sha256_tree(folder: Path, suffix: str = ".safetensors") -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).iterdir()) if p.name.endswith(suffix)
    }


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs) for every test that needs Ray."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()
