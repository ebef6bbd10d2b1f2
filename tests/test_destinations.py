"""Object-store and Hub destinations, and hf:// sources.

S3: a real moto S3 server on 127.0.0.1 (:mod:`tests.s3server`); models big enough that a
shard is several multipart parts of at least 5 MiB (moto enforces S3's minimum part size on
completion). Hub: a local HTTP server on 127.0.0.1 implementing the few Hub API calls
huggingface_hub makes (:mod:`tests.hubserver`), reached through ``storage.hf.endpoint_url``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from distmerge.checkpoint.multipart import MAX_PARTS, MIN_PART
from distmerge.config import load_pipeline
from distmerge.demo import Shape, generate
from distmerge.engine.driver import run_pipeline
from distmerge.engine.executors import LocalExecutor
from distmerge.errors import ConfigError, DestinationError, NonFiniteError
from distmerge.plan import coalesce_for_parts, make_plan
from tests.conftest import make_pipeline, sha256_tree

BUCKET = "distmerge-dest"
# ~17 MB per model in bf16; with 12 MB shards the first shard is 3 multipart parts
SHAPE = Shape(hidden=512, layers=2, intermediate=1536, vocab=2048, heads=8, kv_heads=4,
              dtype="bfloat16", shard_size=8_000_000)
OUT = {"dtype": "bfloat16", "shard_size": "12MB"}
RESOURCES = {"workers": 2, "slice_size": "1MB"}     # 0.5 MiB slices: joined into >= 5 MiB parts


# -- the planner: one slice per part (pure) ---------------------------------------------------------

def _plan(shard_size: int, slice_elements: int):
    tensors = [(f"layer.{i}.w", "BF16", (1024, 1024)) for i in range(6)] + [("norm", "F32", (1024,))]
    return make_plan(tensors, out_dtype=None, shard_size=shard_size, slice_elements=slice_elements)


@pytest.mark.parametrize("slice_elements", [1000, 65_536, 300_000, 4 * 2**20])
def test_parts_cover_each_shard_in_order_and_all_but_the_last_reach_the_minimum(slice_elements):
    plan = _plan(7 * 2**20, slice_elements)
    out = coalesce_for_parts(plan, min_part=MIN_PART, max_parts=MAX_PARTS)
    assert [p for s in out.slices for p in s.pieces] == [p for s in plan.slices for p in s.pieces]
    assert [s.index for s in out.slices] == list(range(len(out.slices)))
    for si, shard in enumerate(out.shards):
        mine = [s for s in out.slices if s.shard == si]
        assert mine[0].start == len(shard.header) and mine[-1].stop == shard.size
        assert all(a.stop == b.start for a, b in zip(mine, mine[1:]))
        sizes = [s.nbytes for s in mine]
        sizes[0] += len(shard.header)
        assert all(n >= MIN_PART for n in sizes[:-1]), sizes
        if slice_elements * 2 < MIN_PART:
            assert len(mine) < len([s for s in plan.slices if s.shard == si])


def test_a_shard_needing_too_many_parts_is_refused_before_work():
    plan = _plan(64 * 2**20, 1000)
    with pytest.raises(ConfigError, match="multipart parts"):
        coalesce_for_parts(plan, min_part=2**16, max_parts=50)


# -- a real S3 server --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from tests.s3server import S3Server

    server = S3Server()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    return generate(tmp_path_factory.mktemp("dest-models") / "m", experts=3, shape=SHAPE)


@pytest.fixture(scope="module")
def s3_models(s3, models) -> list[str]:
    return [s3.upload_folder(folder, BUCKET, f"in/m{i}") for i, folder in enumerate(models)]


@pytest.fixture(scope="module")
def local_reference(models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("local-ref")
    run_pipeline(load_pipeline(make_pipeline(root, models, output={"path": str(root / "out"), **OUT},
                                             resources=RESOURCES)),
                 executor="local", show_progress=False)
    return root / "out"


@pytest.fixture
def creds(monkeypatch):
    monkeypatch.setenv("DM_DEST_KEY", "AKIADESTKEY0000")
    monkeypatch.setenv("DM_DEST_SECRET", "dest-secret-value-xyz")


def _storage(s3) -> dict:
    return {"s3": {"endpoint_url": s3.endpoint, "region": "us-east-1",
                   "key_env": "DM_DEST_KEY", "secret_env": "DM_DEST_SECRET"}}


def _s3_pipeline(root: Path, s3, urls: list[str], dest: str, **changes) -> Path:
    return make_pipeline(root, [], base=urls[0], experts=[{"path": u} for u in urls[1:]],
                         output={"path": dest, **OUT}, resources=RESOURCES, storage=_storage(s3),
                         **changes)


def _keys(s3, prefix: str) -> list[str]:
    resp = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def _open_uploads(s3, prefix: str = "") -> list[str]:
    resp = s3.client().list_multipart_uploads(Bucket=BUCKET, Prefix=prefix)
    return sorted(u["Key"] for u in resp.get("Uploads", []))


def _object_digests(s3, prefix: str, suffix: str = ".safetensors") -> dict[str, str]:
    c = s3.client()
    return {k.rsplit("/", 1)[1]: hashlib.sha256(c.get_object(Bucket=BUCKET, Key=k)["Body"].read()).hexdigest()
            for k in _keys(s3, prefix + "/") if k.endswith(suffix)}


class Capturing(LocalExecutor):
    def start(self, job):
        self.job = job
        super().start(job)


def test_s3_to_s3_merge_is_byte_identical_to_the_local_merge(tmp_path, s3, s3_models, creds, local_reference):
    import pickle

    dest = f"s3://{BUCKET}/out/full"
    executor = Capturing()
    summary = run_pipeline(load_pipeline(_s3_pipeline(tmp_path, s3, s3_models, dest)),
                           executor=executor, show_progress=False)
    sink = executor.job.sink                                   # what Ray would ship to workers
    assert len(sink.shards) >= 2 and b"dest-secret-value-xyz" not in pickle.dumps(executor.job)
    want = sha256_tree(local_reference)
    assert len(want) >= 2
    assert _object_digests(s3, "out/full") == want
    c = s3.client()
    index = json.loads(c.get_object(Bucket=BUCKET, Key="out/full/model.safetensors.index.json")["Body"].read())
    assert index == json.loads((local_reference / "model.safetensors.index.json").read_text())
    cfg = c.get_object(Bucket=BUCKET, Key="out/full/config.json")["Body"].read()
    assert cfg == (local_reference / "config.json").read_bytes()
    # each shard is one multipart object; the first is several parts (ETag "<md5>-<parts>")
    parts = {k: int(c.head_object(Bucket=BUCKET, Key=k)["ETag"].strip('"').rsplit("-", 1)[1])
             for k in _keys(s3, "out/full/") if k.endswith(".safetensors")}
    assert max(parts.values()) >= 2, parts
    assert summary.slices == sum(parts.values())
    # no staging objects, no upload left open
    assert _keys(s3, "out/.full") == [] and _open_uploads(s3, "out/") == []


@pytest.mark.ray
def test_s3_to_s3_on_ray_workers(tmp_path, ray_session, s3, s3_models, local_reference):
    """Ray workers (other processes) upload the parts with their own S3 clients, built from the
    sink in the Job (the bucket lets anonymous requests do anything, so no credential has to
    reach them)."""
    s3.client().put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": "*", "Action": ["s3:*"],
                       "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}]}))
    pipe = make_pipeline(tmp_path, [], base=s3_models[0], experts=[{"path": u} for u in s3_models[1:]],
                         output={"path": f"s3://{BUCKET}/out/ray", **OUT}, resources=RESOURCES,
                         storage={"s3": {"endpoint_url": s3.endpoint, "region": "us-east-1",
                                         "anonymous": True}})
    try:
        summary = run_pipeline(load_pipeline(pipe), executor="ray", show_progress=False)
    finally:
        s3.client().delete_bucket_policy(Bucket=BUCKET)
    assert summary.bytes_written > 0
    assert _object_digests(s3, "out/ray") == sha256_tree(local_reference)
    assert _open_uploads(s3, "out/") == []


class PeekAfter(LocalExecutor):
    """In-process executor that, after ``n`` merge slices, records the open uploads' parts
    (so a test can show parts existed before the run failed)."""

    def __init__(self, s3, n: int):
        super().__init__()
        self.s3, self.n, self.seen, self.parts = s3, n, 0, 0

    def run(self, tasks, ctx, on_report, on_retry=None):
        def hook(task, report):
            on_report(task, report)
            if task.round is None:
                self.seen += 1
                if self.seen == self.n:
                    c = self.s3.client()
                    for u in c.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []):
                        self.parts += len(c.list_parts(Bucket=BUCKET, Key=u["Key"],
                                                       UploadId=u["UploadId"]).get("Parts", []))
        return super().run(tasks, ctx, hook, on_retry)


def test_a_failed_run_leaves_no_object_and_no_open_upload(tmp_path, s3, s3_models, models, creds):
    # an expert whose last shard holds a NaN: found in the merge pass after parts were uploaded
    bad = tmp_path / "bad-expert"
    shutil.copytree(models[2], bad)
    last = sorted(bad.glob("*.safetensors"))[-1]
    tensors = load_file(last)
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[7] = float("nan")
    save_file(tensors, last, metadata={"format": "pt"})
    urls = [s3_models[0], s3_models[1], s3.upload_folder(bad, BUCKET, "in/bad"), s3_models[3]]
    dest = f"s3://{BUCKET}/out/failed"
    peek = PeekAfter(s3, n=2)
    with pytest.raises(NonFiniteError, match=name):
        run_pipeline(load_pipeline(_s3_pipeline(tmp_path, s3, urls, dest, method={"name": "linear"})),
                     executor=peek, show_progress=False)
    assert peek.parts >= 2                               # parts were uploaded...
    assert _keys(s3, "out/failed") == [] and _keys(s3, "out/.failed") == []   # ...and nothing is left
    assert _open_uploads(s3, "out/") == []               # every upload aborted


class Crash(RuntimeError):
    pass


class CrashesAfter(LocalExecutor):
    def __init__(self, n: int):
        super().__init__()
        self.n, self.seen = n, 0

    def run(self, tasks, ctx, on_report, on_retry=None):
        def hook(task, report):
            on_report(task, report)
            if task.round is None:
                self.seen += 1
                if self.seen >= self.n:
                    raise Crash(f"crashed after {self.n} slices")
        return super().run(tasks, ctx, hook, on_retry)


def test_interrupted_s3_run_resumes_to_identical_bytes(tmp_path, s3, s3_models, creds, local_reference):
    dest = f"s3://{BUCKET}/out/resumed"
    pipe = _s3_pipeline(tmp_path, s3, s3_models, dest)
    with pytest.raises(Crash):
        run_pipeline(load_pipeline(pipe), executor=CrashesAfter(2), show_progress=False)
    assert _keys(s3, "out/resumed/") == []                       # nothing visible
    staged = _keys(s3, "out/.resumed")
    assert any(k.endswith("/plan.json") for k in staged) and any("/manifest-" in k for k in staged)
    assert _open_uploads(s3, "out/resumed/")                      # kept for the resume
    with pytest.raises(DestinationError, match="--resume"):
        run_pipeline(load_pipeline(pipe), executor="local", show_progress=False)
    summary = run_pipeline(load_pipeline(pipe), executor="local", show_progress=False, resume=True)
    assert summary.resumed and summary.resumed_slices == 2 and summary.redone_slices == 0
    assert summary.stats_rounds_restored >= 1                     # stats.json from the staging prefix
    assert _object_digests(s3, "out/resumed") == sha256_tree(local_reference)
    assert _keys(s3, "out/.resumed") == [] and _open_uploads(s3, "out/") == []


def _staged_run(s3, name: str) -> tuple[dict, list[dict]]:
    """The interrupted run's plan.json and its manifest records, read back from the staging prefix."""
    c = s3.client()
    keys = _keys(s3, f"out/.{name}")
    state = json.loads(c.get_object(Bucket=BUCKET, Key=next(k for k in keys if k.endswith("/plan.json")))["Body"].read())
    records = [json.loads(line) for k in keys if "/manifest-" in k
               for line in c.get_object(Bucket=BUCKET, Key=k)["Body"].read().splitlines()]
    return state, records


@pytest.mark.parametrize("damage", ["changed_part", "aborted_upload"])
def test_a_recorded_part_lost_after_the_crash_is_redone_on_resume(tmp_path, s3, s3_models, creds,
                                                                  local_reference, damage):
    """The store no longer holds a recorded slice's part as recorded (the part number uploaded
    again with other bytes of the same size, or the shard's whole upload aborted): the resume
    redoes that slice under the same part number, and the result is still the local merge."""
    name = f"redo-{damage}"
    pipe = _s3_pipeline(tmp_path, s3, s3_models, f"s3://{BUCKET}/out/{name}")
    with pytest.raises(Crash):
        run_pipeline(load_pipeline(pipe), executor=CrashesAfter(2), show_progress=False)
    state, records = _staged_run(s3, name)
    assert len({r["slice"] for r in records}) == 2
    victim = records[0]
    filename = state["shards"][victim["shard"]]
    key, upload = f"out/{name}/{filename}", state["uploads"][filename]
    c = s3.client()
    listed = {p["PartNumber"]: p for p in c.list_parts(Bucket=BUCKET, Key=key, UploadId=upload)["Parts"]}
    assert listed[victim["part"]]["ETag"] == victim["etag"]
    if damage == "changed_part":
        size = listed[victim["part"]]["Size"]
        etag = c.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=victim["part"],
                             Body=b"\xa5" * size)["ETag"]
        assert etag != victim["etag"]
        lost = 1
    else:
        c.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload)
        lost = len({r["slice"] for r in records if r["shard"] == victim["shard"]})
    summary = run_pipeline(load_pipeline(pipe), executor="local", show_progress=False, resume=True)
    assert summary.resumed and summary.redone_slices == lost >= 1
    assert summary.resumed_slices + summary.redone_slices == 2
    assert _object_digests(s3, f"out/{name}") == sha256_tree(local_reference)
    assert _keys(s3, f"out/.{name}") == [] and _open_uploads(s3, "out/") == []


def test_overwrite_replaces_the_previous_checkpoint_only_at_publication(tmp_path, s3, s3_models, creds,
                                                                       local_reference):
    s3.put(BUCKET, "out/ow/model-00009-of-00009.safetensors", b"old shard")
    s3.put(BUCKET, "out/ow/config.json", b"old config")
    pipe = _s3_pipeline(tmp_path, s3, s3_models, f"s3://{BUCKET}/out/ow")
    with pytest.raises(DestinationError, match="already holds objects"):
        run_pipeline(load_pipeline(pipe), executor="local", show_progress=False)
    run_pipeline(load_pipeline(pipe, overwrite=True), executor="local", show_progress=False)
    assert _object_digests(s3, "out/ow") == sha256_tree(local_reference)      # the stale shard is gone
    assert s3.client().get_object(Bucket=BUCKET, Key="out/ow/config.json")["Body"].read() == \
        (local_reference / "config.json").read_bytes()


def test_existing_destination_and_bad_urls_are_refused_before_work(tmp_path, s3, s3_models, creds):
    s3.put(BUCKET, "out/taken/model.safetensors", b"x")
    with pytest.raises(DestinationError, match="already holds objects"):
        run_pipeline(load_pipeline(_s3_pipeline(tmp_path / "a", s3, s3_models, f"s3://{BUCKET}/out/taken")),
                     executor="local", show_progress=False)
    with pytest.raises(ConfigError, match="not a whole bucket"):
        run_pipeline(load_pipeline(_s3_pipeline(tmp_path / "b", s3, s3_models, f"s3://{BUCKET}")),
                     executor="local", show_progress=False)
    with pytest.raises(ConfigError, match="destinations are"):
        run_pipeline(load_pipeline(_s3_pipeline(tmp_path / "c", s3, s3_models, "memory://x/out")),
                     executor="local", show_progress=False)
    with pytest.raises(DestinationError, match="overlaps the source"):
        run_pipeline(load_pipeline(_s3_pipeline(tmp_path / "d", s3, s3_models, f"s3://{BUCKET}/in")),
                     executor="local", show_progress=False)
    assert _keys(s3, "out/taken/") == ["out/taken/model.safetensors"] and _open_uploads(s3) == []


def test_frank_wolfe_to_an_object_store_is_refused_before_work(tmp_path, s3, s3_models, creds):
    pipe = _s3_pipeline(tmp_path, s3, s3_models, f"s3://{BUCKET}/out/fw", method={"name": "frank_wolfe"})
    with pytest.raises(ConfigError, match="frank_wolfe keeps its selection trace"):
        run_pipeline(load_pipeline(pipe), executor="local", show_progress=False)
    assert _keys(s3, "out/fw") == [] and _open_uploads(s3) == []


# -- a local Hub -------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, want", [
    ("hf://org/repo", ("org/repo", None)), ("hf://org/repo@dev", ("org/repo", "dev")),
    ("hf://org/repo/", ("org/repo", None)), ("hf://org/repo@", ("org/repo", None)),
    ("hf://org/repo/sub", None), ("hf://org/repo@dev/sub", None), ("hf://org/repo@refs/pr/1", None),
    ("hf://org", None), ("hf://org/@dev", None), ("hf://o@x/repo", None),
    ("hf://datasets/org", None), ("hf://spaces/org", None)])
def test_hub_destination_urls_are_parsed_or_refused(url, want):
    from distmerge.checkpoint.hub import parse_hub_url

    if want is None:
        with pytest.raises(ConfigError, match="a Hub destination is hf://org/repo or hf://org/repo@branch"):
            parse_hub_url(url)
    else:
        assert parse_hub_url(url) == want


def test_input_hub_urls_name_their_repository_and_revision():
    """The model card's base_model list and the revisions it resolves read input URLs (which
    may name a file path) with the same parser as the destination."""
    from distmerge.checkpoint.hub import split_hub_url
    from distmerge.checkpoint.modelcard import hub_repo_of

    ref = split_hub_url("hf://org/repo@v1.0/sub/dir")
    assert (ref.repo, ref.revision, ref.path) == ("org/repo", "v1.0", "sub/dir")
    assert split_hub_url("hf://org/repo/sub@x")[2:] == (None, "sub@x")
    assert [hub_repo_of(u) for u in ["hf://org/repo", "hf://org/repo@main", "hf://org/repo/a/b",
                                     "hf://org", "s3://org/repo", "/models/org/repo"]] == \
        ["org/repo", "org/repo", "org/repo", None, None, None]


HF_TOKEN = "hf_local_test_token_0123456789"
HF_SOURCES = ["org/base", "org/e1", "org/e2", "org/e3"]


@pytest.fixture(scope="module")
def hub(tiny_models):
    from tests.hubserver import Hub

    server = Hub(token=HF_TOKEN)
    for repo, folder in zip(HF_SOURCES, tiny_models):
        server.upload_folder(folder, repo)
    yield server
    server.stop()


@pytest.fixture
def hf_env(monkeypatch, tmp_path):
    """The token in the environment, named by the pipeline; Xet off (the local hub speaks
    LFS only), as HF_HUB_DISABLE_XET=1 would do before huggingface_hub is imported."""
    import huggingface_hub.constants

    monkeypatch.setenv("DM_HF_TOKEN", HF_TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)


def _hf_storage(hub) -> dict:
    return {"hf": {"endpoint_url": hub.endpoint, "token_env": "DM_HF_TOKEN"}}


@pytest.fixture(scope="module")
def tiny_reference(tiny_models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-ref")
    run_pipeline(load_pipeline(make_pipeline(root, tiny_models)), executor="local", show_progress=False)
    return root / "out"


def _hub_pipeline(root: Path, hub, sources, dest: str, **changes) -> Path:
    output = {"path": dest, "dtype": "bfloat16", **changes.pop("output", {})}
    if dest.startswith("hf://"):
        output.setdefault("staging", str(root / "staging"))
    changes.setdefault("resources", {"workers": 2, "memory_per_worker": "2GB"})
    return make_pipeline(root, [], base=str(sources[0]), experts=[{"path": str(s)} for s in sources[1:]],
                         output=output, storage=_hf_storage(hub), **changes)


def test_hf_sources_merge_equals_the_local_merge(tmp_path, hub, hf_env, tiny_reference):
    urls = ["hf://org/base", "hf://org/e1@main", "hf://org/e2", "hf://org/e3"]
    pipe = _hub_pipeline(tmp_path, hub, urls, str(tmp_path / "out"))
    run_pipeline(load_pipeline(pipe), executor="local", show_progress=False)
    assert sha256_tree(tmp_path / "out") == sha256_tree(tiny_reference)
    assert (tmp_path / "out" / "config.json").read_bytes() == (tiny_reference / "config.json").read_bytes()
    assert any("/resolve/main/model-" in r for r in hub.requests) and hub.unhandled == []


def test_hub_destination_is_one_commit_with_every_file_and_a_model_card(tmp_path, hub, hf_env,
                                                                        tiny_models, tiny_reference):
    pipe = _hub_pipeline(tmp_path, hub, tiny_models, "hf://org/merged")
    run_pipeline(load_pipeline(pipe), executor="local", show_progress=False)
    repo = hub.repos["org/merged"]
    assert len(repo.log) == 2                               # created empty, then ONE commit
    head = hub.head("org/merged")
    want = sorted(p.name for p in tiny_reference.iterdir()) + ["README.md"]
    assert sorted(head.files) == sorted(want)
    for name in want:
        if name != "README.md":
            assert hub.file("org/merged", name) == (tiny_reference / name).read_bytes(), name
    assert {p for p in head.lfs} == {n for n in want if n.endswith(".safetensors")}
    card = hub.file("org/merged", "README.md").decode()
    import distmerge

    assert f"distmerge {distmerge.__version__}" in card and "`ties`" in card and "density: 0.3" in card
    assert str(tiny_models[1]) in card and "tags:" in card.split("---")[1]
    assert HF_TOKEN not in card
    assert list((tmp_path / "staging").iterdir()) == []      # staging folder removed
    assert hub.unhandled == []

    # the same destination again: refused before work; with overwrite: one more commit
    again = _hub_pipeline(tmp_path / "again", hub, tiny_models, "hf://org/merged")
    with pytest.raises(DestinationError, match="already holds weights"):
        run_pipeline(load_pipeline(again), executor="local", show_progress=False)
    assert len(repo.log) == 2
    over = _hub_pipeline(tmp_path / "over", hub, tiny_models, "hf://org/merged",
                         output={"overwrite": True, "shard_size": "1GB"})
    run_pipeline(load_pipeline(over), executor="local", show_progress=False)
    assert len(repo.log) == 3
    files = hub.head("org/merged").files
    assert "model.safetensors" in files and not any(f.startswith("model-0") for f in files)


def test_hub_to_hub_card_records_the_input_revisions(tmp_path, hub, hf_env, tiny_reference):
    urls = ["hf://org/base", "hf://org/e1@main", "hf://org/e2", "hf://org/e3"]
    run_pipeline(load_pipeline(_hub_pipeline(tmp_path, hub, urls, "hf://org/from-hub",
                                             method={"name": "linear"})),
                 executor="local", show_progress=False)
    card = hub.file("org/from-hub", "README.md").decode()
    meta = card.split("---")[1]
    for repo in HF_SOURCES:
        assert hub.head(repo).sha in card and f"- {repo}" in meta      # revision and base_model
    assert "`linear`" in card and hub.unhandled == []


def test_hub_branch_destination_and_resume(tmp_path, hub, hf_env, tiny_models, tiny_reference):
    pipe = _hub_pipeline(tmp_path, hub, tiny_models, "hf://org/branched@dev",
                         resources={"workers": 2, "slice_size": "4KB"})
    with pytest.raises(Crash):
        run_pipeline(load_pipeline(pipe), executor=CrashesAfter(5), show_progress=False)
    assert "org/branched" not in hub.repos                      # nothing before the commit
    summary = run_pipeline(load_pipeline(pipe), executor="local", show_progress=False, resume=True)
    assert summary.resumed_slices == 5
    repo = hub.repos["org/branched"]
    assert set(repo.branches) == {"main", "dev"} and hub.head("org/branched", "main").files == {}
    for name, digest in sha256_tree(tiny_reference).items():
        assert hashlib.sha256(hub.file("org/branched", name, "dev")).hexdigest() == digest


def test_a_refused_commit_publishes_nothing_and_the_run_resumes(tmp_path, hub, hf_env, tiny_models,
                                                                 tiny_reference):
    from distmerge.errors import AccessDeniedError

    pipe = _hub_pipeline(tmp_path, hub, tiny_models, "hf://org/denied")
    hub.deny_commits = True
    try:
        with pytest.raises(AccessDeniedError, match="DM_HF_TOKEN"):
            run_pipeline(load_pipeline(pipe), executor="local", show_progress=False)
    finally:
        hub.deny_commits = False
    assert hub.head("org/denied").files == {}                   # created empty, nothing committed
    staged = list((tmp_path / "staging").iterdir())
    assert len(staged) == 1                                     # kept: all the work is done
    summary = run_pipeline(load_pipeline(pipe), executor="local", show_progress=False, resume=True)
    assert summary.resumed_slices == summary.slices
    assert len(hub.repos["org/denied"].log) == 2
    for name, digest in sha256_tree(tiny_reference).items():
        assert hashlib.sha256(hub.file("org/denied", name)).hexdigest() == digest


def test_hub_limits_and_tokens_are_checked_before_work(tmp_path, hub, hf_env, tiny_models, monkeypatch):
    with pytest.raises(ConfigError, match="50000000000"):
        run_pipeline(load_pipeline(_hub_pipeline(tmp_path / "a", hub, tiny_models, "hf://org/big",
                                                 output={"shard_size": "60GB"})),
                     executor="local", show_progress=False)
    with pytest.raises(ConfigError, match="hf://org/repo"):
        run_pipeline(load_pipeline(_hub_pipeline(tmp_path / "b", hub, tiny_models, "hf://org/repo/sub")),
                     executor="local", show_progress=False)
    with pytest.raises(ConfigError, match="output.staging"):
        run_pipeline(load_pipeline(_hub_pipeline(tmp_path / "s", hub, tiny_models, str(tmp_path / "s" / "out"),
                                                 output={"staging": str(tmp_path)})),
                     executor="local", show_progress=False)
    monkeypatch.delenv("DM_HF_TOKEN")
    with pytest.raises(ConfigError, match="DM_HF_TOKEN"):
        run_pipeline(load_pipeline(_hub_pipeline(tmp_path / "c", hub, tiny_models, "hf://org/x")),
                     executor="local", show_progress=False)
    assert "org/big" not in hub.repos and "org/x" not in hub.repos


def test_s3_inputs_are_read_once_by_a_three_pass_merge(tmp_path, s3, s3_models, creds, monkeypatch):
    """Models behind URLs stay in the worker between passes: ties (2 statistics passes and the
    merge) reads each input byte from the server once; a run that keeps nothing reads it 3 times,
    to the same bytes."""
    from distmerge.engine.driver import Run

    ties = {"name": "ties", "density": 0.3, "scope": "model"}
    kept = run_pipeline(load_pipeline(_s3_pipeline(tmp_path / "a", s3, s3_models, str(tmp_path / "a" / "out"),
                                                   method=ties)), executor="local", show_progress=False)
    monkeypatch.setattr(Run, "_resident_bytes", lambda self: 0)
    read = run_pipeline(load_pipeline(_s3_pipeline(tmp_path / "b", s3, s3_models, str(tmp_path / "b" / "out"),
                                                   method=ties)), executor="local", show_progress=False)
    assert read.bytes_read == 3 * kept.bytes_read
    assert sha256_tree(tmp_path / "a" / "out") == sha256_tree(tmp_path / "b" / "out")
