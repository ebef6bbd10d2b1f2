"""TIES ``scope: model`` without its sign pass: the majority sign is guessed in the second
statistics round, verified from the merge pass's exact statistics, and the slices merged with a
wrong guess are merged again. The output must be the bytes of the old three-pass algorithm,
whose majority is recomputed here directly with the old formula (:func:`old_ties_model`): the
model-wide Σ sign(Σ_t w_t τ̂_t) with the exact thresholds (−1 when negative, else +1).

The data (:func:`fold_tensors`) is tie-heavy bf16 built so that the guess is wrong: the true
sign sum is negative (−b), while the entries inside the threshold's radix bucket but below the
threshold (kept by the guess, trimmed in truth) push the guessed sum positive (c − b), and many
positions cancel exactly (their output is decided by the majority).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distmerge.config import load_pipeline
from distmerge.engine.driver import run_pipeline
from distmerge.engine.executors import LocalExecutor, RayExecutor
from distmerge.methods import build
from distmerge.methods.base import disjoint_mean, weighted_sum
from distmerge.methods.ties import ExactSignTies, Ties
from distmerge.reduce import StatsAccumulator
from tests.conftest import make_pipeline
from tests.harness import _blocks, merge_tensors

BF16 = torch.bfloat16
X, Y = "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"


# -- data and the old algorithm ---------------------------------------------------------------

def fold_tensors(k: int, *, c: int = 50, seed: int = 0, cols: int = 10):
    """(base, [expert1, expert2]) as bf16 dicts; per k, per expert: A 100 exact cancellations
    (±4), B 10 negative singletons (−4), C ``c`` in-bucket entries below the threshold
    (τ = 1.0), D 100 cancellations at the threshold (τ = ±(1 + 2⁻⁸)), Z 20 zero task vectors.
    With density 0.5 both thresholds are 1 + 2⁻⁸: true sign sum −10k, guessed (C kept)
    (c − 10)k. X holds A and D shuffled, then half of Z; Y holds B and C shuffled, then Z."""
    g = torch.Generator().manual_seed(seed)
    a, b, d, z = 100 * k, 10 * k, 100 * k, 10 * k
    c = c * k

    def rows(base, e1, e2, n, shuffle=True):
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        return [torch.as_tensor(v, dtype=torch.float32).expand(n).clone()[order] if not torch.is_tensor(v)
                else v[order] for v in (base, e1, e2)]

    def region(parts):
        return [torch.cat([p[i] for p in parts]) for i in range(3)]

    zb = (torch.randn(z, generator=g) * 0.1)
    # A: base 0, ±4 | D: base 2⁻⁸, e1 1 + 2⁻⁷, e2 −1 (τ = ±(1 + 2⁻⁸), exact in fp32)
    ad = region([(torch.zeros(a), torch.full((a,), 4.0), torch.full((a,), -4.0)),
                 (torch.full((d,), 2.0 ** -8), torch.full((d,), 1.0078125), torch.full((d,), -1.0))])
    perm = torch.randperm(a + d, generator=g)
    x = [torch.cat([t[perm], zb]) for t in ad]
    # B: base 0, e1 −4, e2 0 | C: base 0.5, e1 1.5 (τ 1.0), e2 0.5 (τ 0)
    bc = region([(torch.zeros(b), torch.full((b,), -4.0), torch.zeros(b)),
                 (torch.full((c,), 0.5), torch.full((c,), 1.5), torch.full((c,), 0.5))])
    perm = torch.randperm(b + c, generator=g)
    y = [torch.cat([t[perm], zb]) for t in bc]
    out = [{X: x[i].reshape(-1, cols).to(BF16), Y: y[i].reshape(-1, cols).to(BF16)} for i in range(3)]
    for t in out:                                  # exactly representable in bf16: no rounding
        assert all(torch.equal(v.float().to(BF16).float(), v.float()) for v in t.values())
    return out[0], out[1:]


def old_ties_model(base, experts, *, density, weights=None, majority=None):
    """The old three-pass TIES ``scope: model`` (fp32 merged tensors), computed directly:
    exact per-expert thresholds over the whole model (the (n − m)-th smallest |τ_t|, all kept
    when m = n), then the majority from the model-wide sum of elected signs (−1 when negative,
    else +1) unless ``majority`` is given, then the disjoint mean."""
    names = sorted(base)
    weights = tuple(weights or [1.0] * len(experts))
    tau = {n: torch.stack([e[n].float() - base[n].float() for e in experts]) for n in names}
    thr = []
    for t in range(len(experts)):
        flat = torch.cat([tau[n][t].abs().reshape(-1) for n in names])
        m = int(density * flat.numel())
        thr.append(0.0 if m == flat.numel() else float(flat.kthvalue(flat.numel() - m).values))
    trimmed, totals, signs = {}, {}, 0
    for n in names:
        th = torch.tensor(thr).view([-1] + [1] * (tau[n].dim() - 1))
        trimmed[n] = tau[n] * (tau[n].abs() >= th)
        totals[n] = weighted_sum(trimmed[n], weights)
        signs += int(torch.sign(totals[n]).sum())
    if majority is None:
        majority = -1.0 if signs < 0 else 1.0
    return {n: base[n].float() + disjoint_mean(trimmed[n], weights, majority=majority, total=totals[n])
            for n in names}, signs


def save_models(root: Path, base, experts) -> list[Path]:
    folders = []
    for i, tensors in enumerate([base, *experts]):
        f = root / ("base" if i == 0 else f"expert-{i}")
        f.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(f / "model.safetensors"))
        (f / "config.json").write_text(json.dumps({"model_type": "llama"}))
        folders.append(f)
    return folders


METHOD = {"name": "ties", "density": 0.5, "scope": "model"}


def expected_bytes(base, experts, majority=None) -> dict[str, bytes]:
    merged, _ = old_ties_model(base, experts, density=0.5, majority=majority)
    return {n: v.to(BF16).view(torch.int16).numpy().tobytes() for n, v in merged.items()}


def output_bytes(out: Path) -> dict[str, bytes]:
    t = load_file(str(out / "model.safetensors")) if (out / "model.safetensors").exists() else {}
    if not t:
        for p in sorted(out.glob("*.safetensors")):
            t.update(load_file(str(p)))
    return {n: v.view(torch.int16).numpy().tobytes() for n, v in t.items()}


# -- the data does what it claims; the in-memory protocol ---------------------------------------

def test_the_data_makes_the_guess_wrong_and_the_majority_matter():
    base, experts = fold_tensors(1)
    _, signs = old_ties_model(base, experts, density=0.5)
    assert signs == -10
    true, _ = old_ties_model(base, experts, density=0.5)
    wrong, _ = old_ties_model(base, experts, density=0.5, majority=1.0)
    assert not torch.equal(true[X], wrong[X]) and torch.equal(true[Y], wrong[Y])
    ms = build("ties", {"density": 0.5, "scope": "model"})
    ctx: dict = {}
    for rnd in range(2):
        acc = StatsAccumulator()
        for i, n in enumerate(sorted(base)):
            for blk in _blocks(n, base[n], [e[n] for e in experts], [1.0, 1.0], None):
                acc.add(i, ms.default.stats(rnd, blk, ctx))
        ctx = ms.reduce(rnd, acc.totals(), ctx, sorted(base))
    c = ctx[ms.default.group(X)]
    assert c["threshold"] == [1.00390625, 1.00390625]
    assert c["guess"] is True and c["majority"] == 1.0             # guessed Σ = +40: wrong


@pytest.mark.parametrize("rows_per_block", [None, 1, 7, 64])
@pytest.mark.parametrize("c", [50, 0], ids=["guess-wrong", "guess-right"])
def test_in_memory_protocol_equals_the_old_three_passes(rows_per_block, c):
    base, experts = fold_tensors(3, c=c)
    want, signs = old_ties_model(base, experts, density=0.5)
    assert signs == -30
    ms = build("ties", {"density": 0.5, "scope": "model"})
    assert ms.rounds == 2
    got = merge_tensors(ms, base, experts, rows_per_block=rows_per_block)
    for n in want:
        assert torch.equal(got[n].view(torch.int32), want[n].view(torch.int32)), n
    if c == 50:
        assert merge_tensors.redone >= 1                         # X's blocks, never Y's
        if rows_per_block:
            cancelling_rows = 200 * 3 // 10                          # X's rows holding A and D
            assert merge_tensors.redone == -(-cancelling_rows // rows_per_block)
    else:
        assert merge_tensors.redone == 0
    # and the old three-round code path (kept for LiNeS) agrees too
    exact = build("ties", {"density": 0.5, "scope": "model"})
    exact.default = ExactSignTies(density=0.5, scope="model")
    assert exact.rounds == 3
    old = merge_tensors(exact, base, experts, rows_per_block=rows_per_block)
    assert merge_tensors.redone == 0
    for n in want:
        assert torch.equal(old[n].view(torch.int32), want[n].view(torch.int32)), n


def test_random_tie_heavy_data_with_a_forced_wrong_guess(monkeypatch):
    """Coarse bf16 values (many exact cancellations), 3 experts, unequal weights, an override
    (two model-wide groups): the guessed majority, as computed and flipped on purpose (one of
    the two is wrong), is caught, and the bytes are the old ones either way."""
    g = torch.Generator().manual_seed(5)
    shapes = {"a.weight": (40, 16), "b.weight": (24, 8), "c.bias": (33,), "d.weight": (30, 6)}

    def coarse(shape):
        return (torch.randint(-3, 4, shape, generator=g).float() * 0.25).to(BF16)

    base = {n: coarse(s) for n, s in shapes.items()}
    experts = [{n: coarse(s) for n, s in shapes.items()} for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    ms = build("ties", {"density": 0.7, "scope": "model"}, [("d.*", {"density": 0.9})])
    ref, _ = old_ties_model({n: v for n, v in base.items() if n != "d.weight"},
                            [{n: v for n, v in e.items() if n != "d.weight"} for e in experts],
                            density=0.7, weights=weights)
    ref_d, _ = old_ties_model({"d.weight": base["d.weight"]}, [{"d.weight": e["d.weight"]} for e in experts],
                              density=0.9, weights=weights)
    ref.update(ref_d)
    orig = Ties.reduce

    def flipped(self, round, totals, ctx):
        ctx = orig(self, round, totals, ctx)
        for g in {k.rsplit("/", 1)[0] for k in totals} if round == 1 else ():
            ctx[g] = {**ctx[g], "majority": -ctx[g]["majority"]}
        return ctx

    redone = 0
    for flip in (False, True):
        if flip:
            monkeypatch.setattr(Ties, "reduce", flipped)
        got = merge_tensors(ms, base, experts, weights, rows_per_block=5)
        redone += merge_tensors.redone
        for n in shapes:
            assert torch.equal(got[n].view(torch.int32), ref[n].view(torch.int32)), (flip, n)
    assert redone > 0


@pytest.mark.parametrize("shortcut", [True, False], ids=["from-merged", "max-abs"])
@pytest.mark.parametrize("density,weights", [(0.7, (1.0, 0.5, 2.0)), (0.7, (1.0, 1.0, 1.0)),
                                             (1.0, (1.0, 1.0, 1.0))])
def test_merge_statistics_are_the_brute_force_counts(monkeypatch, shortcut, density, weights):
    """``signs`` is Σ sign(Σ_t w_t τ̂_t) and ``sensitive±`` counts the positions where that sum
    is 0 and some τ̂_t is not, by either way of counting them (the shortcut through the merged
    block where it is exact, max |τ̂_t| otherwise; density 1 keeps all: no shortcut)."""
    from distmerge.methods import ties as ties_module

    if not shortcut:
        monkeypatch.setattr(ties_module, "_decided_where_merged_nonzero", lambda thr, w: False)
    g = torch.Generator().manual_seed(11)
    base = (torch.randint(-3, 4, (50, 12), generator=g).float() * 0.25).to(BF16)
    experts = [(torch.randint(-3, 4, (50, 12), generator=g).float() * 0.25).to(BF16) for _ in range(3)]
    ms = build("ties", {"density": density, "scope": "model"})
    out = {}
    monkeypatch.setattr(ties_module.Ties, "merge_with_stats",
                        lambda self, b, c, f=ties_module.Ties.merge_with_stats: out.setdefault(
                            "r", f(self, b, c)))
    merge_tensors(ms, {"w": base}, [{"w": e} for e in experts], list(weights))
    _, stats = out["r"]
    tau = torch.stack([e.float() - base.float() for e in experts])
    n = tau[0].numel()
    m = int(density * n)
    thr = [0.0 if m == n else float(tau[t].abs().reshape(-1).kthvalue(n - m).values) for t in range(3)]
    trimmed = tau * (tau.abs() >= torch.tensor(thr).view(-1, 1, 1))
    total = weighted_sum(trimmed, weights)
    want = int(((total == 0) & (trimmed != 0).any(0)).sum())
    g_ = ms.default.group("w")
    assert want > 0
    assert int(stats[f"{g_}/signs"][0]) == int(torch.sign(total).sum())
    assert sum(int(v[0]) for k, v in stats.items() if "/sensitive" in k) == want


def test_lines_keeps_the_exact_sign_round():
    ms = build("ties", {"density": 0.5, "scope": "model", "lines": {"beta": 0.5}})
    assert isinstance(ms.default.inner, ExactSignTies) and ms.default.rounds == 4
    assert build("ties", {"density": 0.5, "scope": "tensor"}).rounds == 2


# -- the engine: in-process, resume, Ray, S3 --------------------------------------------------

@pytest.fixture(scope="module")
def fold(tmp_path_factory):
    base, experts = fold_tensors(40)
    folders = save_models(tmp_path_factory.mktemp("fold"), base, experts)
    return folders, expected_bytes(base, experts), expected_bytes(base, experts, 1.0)


def _pipe(root: Path, folders, slice_size="2KB", **changes) -> Path:
    return make_pipeline(root, folders, method=METHOD,
                         resources={"workers": 2, "slice_size": slice_size}, **changes)


def test_engine_redoes_the_sensitive_slices_and_equals_the_old_bytes(tmp_path, fold, caplog):
    folders, want, wrong = fold
    assert want[X] != wrong[X]
    summary = run_pipeline(load_pipeline(_pipe(tmp_path, folders)), executor="local", show_progress=False)
    assert output_bytes(tmp_path / "out") == want
    assert summary.passes == 3
    assert 0 < summary.remerged_slices < summary.slices
    assert f"{summary.remerged_slices} merged again" in "\n".join(summary.lines())


class CrashesInRedo(LocalExecutor):
    """Crashes the run once the merge pass is over: before the redo starts (``after`` = 0) or
    after ``after`` slices of it."""

    def __init__(self, after: int = 0):
        super().__init__()
        self.after, self.merge_passes = after, 0

    def run(self, tasks, ctx, on_report, on_retry=None):
        if tasks and tasks[0].round is None:
            self.merge_passes += 1
            if self.merge_passes == 2:
                from tests.test_resume import Crash
                if self.after == 0:
                    raise Crash("crashed between the merge pass and the redo")
                seen = [0]

                def hook(task, report):
                    on_report(task, report)
                    seen[0] += 1
                    if seen[0] >= self.after:
                        raise Crash("crashed in the redo")
                return super().run(tasks, ctx, hook, on_retry)
        return super().run(tasks, ctx, on_report, on_retry)


@pytest.mark.parametrize("after", [0, 2])
def test_resume_after_a_crash_before_or_in_the_redo(tmp_path, fold, after):
    from tests.test_resume import Crash

    folders, want, _ = fold
    pipe = _pipe(tmp_path, folders)
    with pytest.raises(Crash):
        run_pipeline(load_pipeline(pipe), executor=CrashesInRedo(after), show_progress=False)
    staging = next(p for p in tmp_path.iterdir() if ".distmerge-staging-" in p.name)
    records = [json.loads(line) for line in (staging / "manifest.jsonl").read_text().splitlines()]
    # every record (merge pass and redo alike) carries its sign count: a resume sums them
    assert all(any(k.endswith("/signs") for k in r.get("stats", {})) for r in records)
    assert any(k.endswith("/sensitive+") and v > 0 for r in records for k, v in r["stats"].items())
    summary = run_pipeline(load_pipeline(pipe), executor="local", show_progress=False, resume=True)
    # the merge pass was complete (a slice of the redo written but not recorded is redone)
    assert summary.resumed_slices + summary.redone_slices == summary.slices
    assert summary.redone_slices <= (1 if after else 0)
    assert summary.remerged_slices > 0
    assert output_bytes(tmp_path / "out") == want


@pytest.mark.ray
def test_ray_two_actors_tiny_slices(ray_session, tmp_path, fold):
    folders, want, _ = fold
    pipe = _pipe(tmp_path, folders, slice_size="512B")
    summary = run_pipeline(load_pipeline(pipe), executor=RayExecutor(workers=2), show_progress=False)
    assert summary.slices > 50 and len(summary.worker_peak_rss) == 2
    assert 0 < summary.remerged_slices < summary.slices
    assert output_bytes(tmp_path / "out") == want


def test_s3_destination_replaces_the_redone_parts(tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from tests.s3server import S3Server

    base, experts = fold_tensors(26_000)          # X: 11 MB of bf16, two parts of its shard
    folders = save_models(tmp_path / "in", base, experts)
    want = expected_bytes(base, experts)
    server = S3Server()
    try:
        server.create_bucket("fold")
        monkeypatch.setenv("DM_DEST_KEY", "AKIADESTKEY0000")
        monkeypatch.setenv("DM_DEST_SECRET", "dest-secret-value-xyz")
        storage = {"s3": {"endpoint_url": server.endpoint, "region": "us-east-1",
                          "key_env": "DM_DEST_KEY", "secret_env": "DM_DEST_SECRET"}}
        pipe = make_pipeline(tmp_path, folders, method=METHOD, storage=storage,
                             output={"path": "s3://fold/out/m", "dtype": "bfloat16", "shard_size": "3MB"},
                             resources={"workers": 1, "slice_size": "1MB"})
        summary = run_pipeline(load_pipeline(pipe), executor="local", show_progress=False)
        assert 0 < summary.remerged_slices < summary.slices
        out = tmp_path / "got"
        out.mkdir()
        c = server.client()
        keys = [o["Key"] for o in c.list_objects_v2(Bucket="fold", Prefix="out/m/")["Contents"]]
        for k in keys:
            (out / k.rsplit("/", 1)[1]).write_bytes(c.get_object(Bucket="fold", Key=k)["Body"].read())
        assert output_bytes(out) == want
        parts = [int(c.head_object(Bucket="fold", Key=k)["ETag"].strip('"').rsplit("-", 1)[1])
                 for k in keys if k.endswith(".safetensors")]
        assert max(parts) >= 2 and sum(parts) == summary.slices
    finally:
        server.stop()


def test_demo_models_give_the_old_bytes(tmp_path, tiny_models):
    """Ordinary data (the guess usually right): the same bytes as the old algorithm."""
    pipe = make_pipeline(tmp_path, tiny_models, method={"name": "ties", "density": 0.3, "scope": "model"},
                         resources={"workers": 1, "slice_size": "1KB"})
    run_pipeline(load_pipeline(pipe), executor="local", show_progress=False)
    base = {}
    for p in sorted(Path(tiny_models[0]).glob("*.safetensors")):
        base.update(load_file(str(p)))
    experts = []
    for m in tiny_models[1:]:
        e = {}
        for p in sorted(Path(m).glob("*.safetensors")):
            e.update(load_file(str(p)))
        experts.append(e)
    ref, _ = old_ties_model(base, experts, density=0.3)
    got = output_bytes(tmp_path / "out")
    assert got == {n: v.to(BF16).view(torch.int16).numpy().tobytes() for n, v in ref.items()}
