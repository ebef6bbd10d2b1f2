"""The whole path in-process (LocalExecutor): output equals the in-memory protocol, the
published folder is complete, and bytes do not depend on the slice size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distmerge.config import load_pipeline
from distmerge.engine.driver import run_pipeline
from distmerge.methods import build
from tests.conftest import make_pipeline, sha256_tree
from tests.harness import merge_tensors


def _run(path: Path, **cli):
    return run_pipeline(load_pipeline(path, **cli), executor="local", show_progress=False)


def _load_model(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


METHODS = [
    {"name": "ties", "density": 0.3, "scope": "model"},
    {"name": "ties", "density": 0.3, "scope": "tensor", "scale": 0.8},
    {"name": "task_arithmetic", "scale": 0.5},
    {"name": "linear"},
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: "-".join(map(str, m.values())))
def test_engine_output_equals_the_in_memory_protocol(tmp_path, tiny_models, method):
    weights = [1.0, 0.5, 2.0]
    pipe = make_pipeline(tmp_path, tiny_models, method=method,
                         experts=[{"path": str(m), "weight": w} for m, w in zip(tiny_models[1:], weights)],
                         resources={"workers": 1, "slice_size": "2KB"})
    summary = _run(pipe)
    base = _load_model(tiny_models[0])
    experts = [_load_model(m) for m in tiny_models[1:]]
    params = {k: v for k, v in method.items() if k != "name"}
    want = merge_tensors(build(method["name"], params), base, experts, weights)
    got = _load_model(tmp_path / "out")
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], want[name].bfloat16()), name
    assert summary.bytes_written == sum(t.numel() * 2 for t in got.values())


def test_published_folder_is_complete_and_loadable(tmp_path, tiny_models):
    pipe = make_pipeline(tmp_path, tiny_models, output={"path": str(tmp_path / "out"),
                                                       "dtype": "float32", "shard_size": "30KB"})
    _run(pipe)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    tensors = _load_model(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert all(t.dtype == torch.float32 for t in tensors.values())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["torch_dtype"] == "float32"
    assert (out / "generation_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_bytes_do_not_depend_on_slice_size(tmp_path, tiny_models):
    digests = []
    for i, size in enumerate(["1GB", "3KB", "200B"]):
        pipe = make_pipeline(tmp_path / str(i), tiny_models, resources={"slice_size": size})
        summary = _run(pipe)
        digests.append(sha256_tree(tmp_path / str(i) / "out"))
        if size == "200B":
            assert summary.slices > 30
    assert digests[0] == digests[1] == digests[2]


def test_integer_and_fp32_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 4, generator=g), "ids": torch.arange(10, dtype=torch.int64).view(2, 5),
            "flag": torch.tensor([True, False])}
    folders = []
    for i in range(3):
        d = tmp_path / f"m{i}"
        d.mkdir()
        tensors = dict(base)
        if i:
            tensors = {**base, "w": base["w"] + i * 0.25, "ids": base["ids"] + 100 * i}
        save_file(tensors, str(d / "model.safetensors"))
        folders.append(d)
    pipe = make_pipeline(tmp_path, folders, method={"name": "task_arithmetic", "scale": 1.0},
                         output={"path": str(tmp_path / "out")})
    _run(pipe)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(got["ids"], base["ids"])                   # integers copied from the base
    assert torch.equal(got["flag"], base["flag"])
    assert got["w"].dtype == torch.float32                        # dtype kept when output.dtype is null
    assert torch.equal(got["w"], base["w"] + 0.25 + 0.5)


def test_models_behind_an_fsspec_url_are_read_by_ranges(tmp_path, tiny_models):
    """Base and experts on ``memory://`` (in-process): headers and row blocks come through
    fsspec ranged reads, and the bytes equal those merged from the local copies."""
    import fsspec

    fs = fsspec.filesystem("memory")
    urls = []
    for i, folder in enumerate(tiny_models):
        url = f"memory://dm-{tmp_path.name}/m{i}"
        for f in folder.iterdir():
            fs.pipe(f"{url}/{f.name}", f.read_bytes())
        urls.append(url)
    try:
        remote = make_pipeline(tmp_path / "remote", [], base=urls[0],
                               experts=[{"path": u} for u in urls[1:]],
                               resources={"slice_size": "2KB"})
        local = make_pipeline(tmp_path / "local", tiny_models, resources={"slice_size": "2KB"})
        summary = _run(remote)
        _run(local)
        assert summary.bytes_read > 0
        assert sha256_tree(tmp_path / "remote" / "out") == sha256_tree(tmp_path / "local" / "out")
        assert (tmp_path / "remote" / "out" / "config.json").exists()
    finally:
        fs.rm(f"memory://dm-{tmp_path.name}", recursive=True)


def test_verification_refuses_a_staged_shard_that_differs_from_the_plan(tmp_path):
    """The gather stage's shard check: a changed header byte or a wrong size is refused."""
    from distmerge.checkpoint.writer import StagedOutput
    from distmerge.errors import MergeFailedError
    from distmerge.plan import make_plan

    plan = make_plan([("a", "BF16", (4, 4)), ("b", "F32", (3,))], out_dtype=None,
                     shard_size=10**6, slice_elements=1024)
    out = StagedOutput(str(tmp_path / "out"))
    out.create(plan)
    out.check_shards(plan)                                   # as planned: accepted
    path = out.shard_path(plan.shards[0].filename)
    data = bytearray(open(path, "rb").read())
    data[12] ^= 0x01                                         # inside the JSON header
    open(path, "wb").write(bytes(data))
    with pytest.raises(MergeFailedError, match="header differs"):
        out.check_shards(plan)
    data[12] ^= 0x01
    open(path, "wb").write(bytes(data) + b"\0")
    with pytest.raises(MergeFailedError, match="bytes, planned"):
        out.check_shards(plan)
    out.abort()


def test_verification_reads_every_slice_back_whatever_the_threads(tmp_path):
    """The gather stage's slice check: one shard of many slices, read back on several threads,
    matches the crc32 of what was written; one changed byte names its own slice, with any
    number of threads, and the same slices are the bad ones for a resume's check."""
    import zlib

    from distmerge.checkpoint.writer import StagedOutput
    from distmerge.errors import MergeFailedError
    from distmerge.plan import make_plan

    plan = make_plan([("a", "F32", (64, 32)), ("b", "F32", (40, 16))], out_dtype=None,
                     shard_size=10**6, slice_elements=256)
    assert len(plan.shards) == 1 and len(plan.slices) >= 8
    out = StagedOutput(str(tmp_path / "out"))
    out.create(plan)
    path = out.shard_path(plan.shards[0].filename)
    rng = np.random.default_rng(0)
    checksums = {}
    with open(path, "r+b") as f:
        for sl in plan.slices:
            data = rng.integers(0, 256, sl.nbytes, dtype=np.uint8).tobytes()
            f.seek(sl.start)
            f.write(data)
            checksums[sl.index] = zlib.crc32(data)
    out.verify(plan, checksums)
    victim = plan.slices[5]
    with open(path, "r+b") as f:
        f.seek(victim.start + 3)
        b = f.read(1)
        f.seek(victim.start + 3)
        f.write(bytes([b[0] ^ 0x20]))
    with pytest.raises(MergeFailedError, match=f"slice {victim.index} of"):
        out.verify(plan, checksums)
    for threads in (1, 3, 16):
        good, bad = out.check_slices(plan, checksums, threads=threads)
        assert bad == [victim.index] and sorted(good) == sorted(set(checksums) - {victim.index})
    out.abort()


def test_the_local_executor_keeps_two_slices_in_flight_and_reports_on_the_calling_thread():
    """Two slices run at once (as on an actor with max_concurrency 2): a barrier that needs
    both passes; every report reaches ``on_report`` on the thread that called ``run``."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from distmerge.engine.executors import LocalExecutor

    both = threading.Barrier(2, timeout=20)

    class Worker:
        def process(self, task, ctx):
            both.wait()                          # breaks (and raises) unless 2 are in flight
            return task.slice.index

        def drain(self):
            return {}

    ex = LocalExecutor(in_flight=2)
    ex.worker, ex.pool = Worker(), ThreadPoolExecutor(2)
    caller, seen = threading.get_ident(), []
    tasks = [SimpleNamespace(slice=SimpleNamespace(index=i)) for i in range(6)]
    ex.run(tasks, {}, lambda task, rep: seen.append((rep, threading.get_ident())))
    ex.pool.shutdown()
    assert sorted(r for r, _ in seen) == list(range(6)) and {t for _, t in seen} == {caller}


@pytest.mark.parametrize("method", [{"name": "ties", "density": 0.3, "scope": "model"},
                                    {"name": "task_arithmetic", "scale": 0.5}], ids=lambda m: m["name"])
def test_the_local_executor_shares_the_cores_among_its_slices_with_the_same_bytes(tmp_path, method):
    """On the CPU each slice in flight gets cores // in_flight torch threads during the run
    (not all cores each), torch's setting is restored after it, and the bytes are the same
    whatever the thread count (tensors big enough for torch to split its ops over threads)."""
    import os

    from distmerge.engine.executors import LocalExecutor

    g = torch.Generator().manual_seed(3)
    base = torch.randn(768, 512, generator=g)
    folders = []
    for i in range(4):
        d = tmp_path / f"m{i}"
        d.mkdir()
        w = base if i == 0 else base + 0.05 * torch.randn(768, 512, generator=g)
        save_file({"w": w.to(torch.bfloat16), "v": w[:3].clone()}, str(d / "model.safetensors"))
        folders.append(d)

    class Watching(LocalExecutor):
        def run(self, *args, **kwargs):
            self.threads = torch.get_num_threads()
            return super().run(*args, **kwargs)

    before, cores = torch.get_num_threads(), os.cpu_count() or 1
    digests = []
    for in_flight in (1, 2):
        out = tmp_path / f"out{in_flight}"
        pipe = make_pipeline(tmp_path / f"p{in_flight}", folders, method=method,
                             output={"path": str(out), "dtype": "bfloat16"})
        ex = Watching(in_flight=in_flight)
        run_pipeline(load_pipeline(pipe), executor=ex, show_progress=False)
        assert ex.threads == max(1, cores // in_flight)
        assert torch.get_num_threads() == before
        digests.append(sha256_tree(out))
    assert digests[0] == digests[1]
