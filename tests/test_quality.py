"""The quality experiment (``distmerge bench quality``): tasks, training, engine merges, CLI."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("sklearn", reason="the quality experiment needs the test extra (scikit-learn)")

from distmerge import quality as q  # noqa: E402
from distmerge.cli import main  # noqa: E402
from distmerge.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return q.load_splits(seed=0)


@pytest.fixture(scope="module")
def pretrained(digits):
    """A briefly pretrained model (pretraining domains, 3 epochs)."""
    parts = [q.task_data(q.Task("pre", d, "digits", 0, False), digits, "train") for d in q.PRETRAIN_DOMAINS]
    with _one_thread():
        model = q.train(q.new_model(0), torch.cat([p[0] for p in parts]),
                        torch.cat([p[1] for p in parts]), epochs=3, lr=1e-3, batch_size=32, seed=0)
    return q.state_of(model)


class _one_thread:
    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def _finetune(state, task, digits, epochs=3):
    model = q.new_model(0)
    model.load_state_dict(state)
    x, y = q.task_data(task, digits, "train")
    with _one_thread():
        q.train(model, x, y, epochs=epochs, lr=1e-3, batch_size=32, seed=task.seed, frozen=q.FROZEN)
    return q.state_of(model)


def test_splits_are_disjoint_and_cover_the_data(digits):
    idx = torch.cat(list(digits.splits.values()))
    assert len(idx) == len(digits.labels) == 1797
    assert len(set(idx.tolist())) == 1797
    assert [len(digits.splits[s]) for s in ("train", "val", "test")] == [1078, 359, 360]


def test_task_builder_is_deterministic(digits):
    a_targets, a_irr = q.build_tasks(16, seed=0)
    b_targets, b_irr = q.build_tasks(16, seed=0)
    assert a_targets == b_targets and a_irr == b_irr
    assert [t.domain for t in a_targets] == list(q.TARGET_DOMAINS)
    assert {t.labels for t in a_irr} == {"shuffled", "ink", "permuted"}
    assert all(t.domain in q.PRETRAIN_DOMAINS for t in a_irr)
    assert q.build_tasks(4, seed=0)[1] == a_irr[:4]              # nested pools
    for task in a_targets + a_irr:
        x1, y1 = q.task_data(task, q.load_splits(seed=0), "train")
        x2, y2 = q.task_data(task, digits, "train")
        assert torch.equal(x1, x2) and torch.equal(y1, y2), task.name
    # the irrelevant labels are not the digits, and the two shuffles differ
    digits_y = digits.labels[digits.splits["train"]]
    for task in a_irr[:4]:
        y = q.task_data(task, digits, "train")[1]
        assert (y == digits_y).float().mean() < 0.3, task.name
        assert y.min() >= 0 and y.max() < 10
    assert not torch.equal(q.task_data(a_irr[0], digits, "train")[1],
                           q.task_data(a_irr[2], digits, "train")[1])
    only = q.build_tasks(3, seed=0, kinds=("ink", "permuted"))[1]
    assert [t.labels for t in only] == ["ink", "permuted", "ink"]
    # another seed, another split
    assert not torch.equal(q.load_splits(seed=1).splits["test"], digits.splits["test"])


def test_domains_transform_the_images(digits):
    img = digits.images[:5]
    flat = {d: q.transform(d, img) for d in q.PRETRAIN_DOMAINS + q.TARGET_DOMAINS}
    assert all(v.shape == (5, 64) for v in flat.values())
    assert torch.equal(flat["orig"], img.reshape(5, 64))
    assert torch.equal(flat["invert"], 1 - flat["orig"])
    assert torch.equal(flat["fliplr"].reshape(5, 8, 8)[:, :, 0], img[:, :, 7])
    names = list(flat)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.equal(flat[a], flat[b]), (a, b)


def test_training_is_deterministic_and_keeps_the_head(digits, pretrained):
    task = q.build_tasks(0)[0][0]
    a = _finetune(pretrained, task, digits, epochs=1)
    b = _finetune(pretrained, task, digits, epochs=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["head.weight"], pretrained["head.weight"])
    assert not torch.equal(a["fc1.weight"], pretrained["fc1.weight"])


def test_expert_beats_the_pretrained_model_on_its_task(digits, pretrained):
    task = q.build_tasks(0)[0][0]                                   # rot90, unseen in pretraining
    expert = _finetune(pretrained, task, digits)
    x, y = q.task_data(task, digits, "test")
    before, after = q.accuracy(pretrained, x, y), q.accuracy(expert, x, y)
    assert after > 0.85 and after > before + 0.3, (before, after)


def test_digits_model_matches_the_checkpoint_names(tmp_path, pretrained):
    folder = q.write_model(tmp_path / "m", pretrained)
    model = q.digits_model()
    assert set(model.state_dict()) == set(q.load_model(folder))
    model.load_state_dict(q.load_model(folder))               # strict: every name and shape


def test_linear_merge_of_an_expert_with_itself_reproduces_it(tmp_path, digits, pretrained):
    task = q.build_tasks(0)[0][1]                                   # fliplr
    expert = _finetune(pretrained, task, digits, epochs=1)
    base = q.write_model(tmp_path / "base", pretrained)
    folder = q.write_model(tmp_path / "expert", expert)
    merged = q.merge(base, [folder, folder], {"name": "linear"}, tmp_path / "merged")
    assert all(torch.equal(merged[k], expert[k]) for k in expert)
    x, y = q.task_data(task, digits, "test")
    assert q.accuracy(merged, x, y) == q.accuracy(expert, x, y)
    val = q.write_task_set(tmp_path / "val.safetensors", *q.task_data(task, digits, "val"))
    from safetensors.torch import load_file

    sets = load_file(str(val))
    assert sets["inputs"].dtype == torch.float32 and sets["labels"].dtype == torch.int64
    assert sets["inputs"].shape == (359, 64)


def test_command_runs_end_to_end_and_prints_the_table(tmp_path, capsys):
    report = tmp_path / "quality.json"
    assert main(["-q", "bench", "quality", "--pretrain-epochs", "2", "--finetune-epochs", "1",
                 "--pool-sizes", "0,1", "--ta-grid", "0.3,1.0", "--seeds", "0",
                 "--json", str(report)]) == 0
    out = capsys.readouterr().out
    results = json.loads(report.read_text())
    assert "test accuracy per target task" in out and "mean test accuracy by irrelevant" in out
    for domain in q.TARGET_DOMAINS:
        assert domain in out.splitlines()[1]
    methods = [m for m in q.ALL_METHODS if m not in results["skipped"]]
    merged = [(r["method"], r["pool"]) for r in results["rows"] if r["pool"] is not None]
    assert merged == [(m, k) for k in (0, 1) for m in methods]
    assert [r["method"] for r in results["rows"][:5]] == ["pretrained"] + [
        f"expert {d}" for d in q.TARGET_DOMAINS]
    for r in results["rows"]:
        assert set(r["accuracy"]) == set(q.TARGET_DOMAINS)
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
        name, pool = q.label(r), "-" if r["pool"] is None else str(r["pool"])
        line = next(ln for ln in out.splitlines()
                    if ln.startswith(name) and ln[len(name):].split()[0] == pool)
        assert line.split()[-1] == f"{r['mean']:.3f}"
        assert r["seed_means"] == [r["mean"]] and r["std"] == 0.0
    assert set(results["task_vector_norms"]) == {"target", "irrelevant"}
    assert all(v > 0 for v in results["task_vector_norms"].values())
    # the validation choice of λ is one of the grid, and its row says which
    ta_val = [r for r in results["rows"] if r["method"] == "task_arithmetic_val"]
    assert all(r["specs"][0]["scale"] in (0.3, 1.0) for r in ta_val)
    assert all(f"λ by val: {r['specs'][0]['scale']}" in out for r in ta_val)
    if q.fw_available():
        assert not results["skipped"]
    else:
        assert results["skipped"] == [m for m in q.ALL_METHODS if m.startswith("frank_wolfe")]
        assert "skipped: frank_wolfe_data" in out


def test_bad_options_fail_before_any_work(capsys):
    assert main(["bench", "quality", "--methods", "linear,nope"]) == 2
    assert "unknown method(s) nope" in capsys.readouterr().err
    assert main(["bench", "quality", "--pool-sizes", "-1"]) == 2
    assert main(["bench", "quality", "--irrelevant-labels", "ink,noise"]) == 2
    assert "got noise" in capsys.readouterr().err


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)     # import fails as if absent
    with pytest.raises(ConfigError, match=r"distmerge\[quality\]"):
        q.load_splits()


def test_seeds_are_averaged_with_their_spread():
    def one(seed, accs, scale):
        rows = [{"method": "pretrained", "pool": None, "accuracy": dict(zip("ab", accs[0])),
                 "mean": sum(accs[0]) / 2},
                {"method": "task_arithmetic_val", "pool": 0, "accuracy": dict(zip("ab", accs[1])),
                 "mean": sum(accs[1]) / 2, "spec": {"name": "task_arithmetic", "scale": scale},
                 "val_mean": 0.5}]
        return {"config": {"seed": seed}, "tasks": ["a", "b"], "irrelevant": [], "rows": rows,
                "frank_wolfe": "registered", "skipped": [],
                "task_vector_norms": {"target-a": 1.0 + seed, "irrelevant-00-x": 5.0},
                "seconds": {"pretrain": 1.0, "finetune": 2.0, "merge_and_eval": 3.0}}

    out = q.combine([one(0, [(0.2, 0.4), (0.6, 0.8)], 0.5), one(1, [(0.4, 0.6), (0.8, 1.0)], 0.7)])
    pre, ta = out["rows"]
    assert out["seeds"] == [0, 1]
    assert pre["accuracy"] == pytest.approx({"a": 0.3, "b": 0.5})
    assert pre["mean"] == pytest.approx(0.4) and pre["std"] == pytest.approx(0.1)
    assert ta["seed_means"] == pytest.approx([0.7, 0.9])
    assert q.label(ta) == "task_arithmetic (λ by val: 0.5/0.7)"
    assert out["seconds"] == {"pretrain": 2.0, "finetune": 4.0, "merge_and_eval": 6.0}
    assert out["task_vector_norms"] == {"target": 1.5, "irrelevant": 5.0}
    text = q.render(out)
    assert "0.800 ±0.100" in text and "0.400 ±0.100" in text
    assert "target experts 1.50, irrelevant experts 5.00" in text


def test_frank_wolfe_rows_can_score_from_a_sketch(tmp_path):
    """``--fw-scoring sketch`` reaches the data objective: its trace says the iterations after
    the first were scored from the sketch, and the row counts how many picks were certain."""
    if not q.fw_available():
        pytest.skip("frank_wolfe is not in this build")
    report = tmp_path / "quality.json"
    assert main(["-q", "bench", "quality", "--pretrain-epochs", "2", "--finetune-epochs", "1",
                 "--pool-sizes", "1", "--seeds", "0", "--methods", "frank_wolfe_data",
                 "--fw-iterations", "3", "--fw-scoring", "sketch", "--fw-sketch-ratio", "4",
                 "--json", str(report)]) == 0
    rows = [r for r in json.loads(report.read_text())["rows"] if r["method"] == "frank_wolfe_data"]
    assert len(rows) == 1
    picked = rows[0]["picked"]
    assert picked["scoring"] == "sketch"
    assert picked["sketched"] == 2                      # iteration 0 is exact, 1 and 2 sketched
    assert 0 <= picked["certain"] <= picked["sketched"]
    assert picked["target"] + picked["irrelevant"] == 3          # one pick per iteration
