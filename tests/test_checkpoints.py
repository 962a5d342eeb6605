from __future__ import annotations


import pytest
import torch
from ignite.engine import Engine, Events

from monai_unet_bundle.atomic import atomic_save, atomic_write_text, remove_leftovers
from monai_unet_bundle.checkpoints import BestModelSaver, ResumeCheckpoint, require_checkpoint
from monai_unet_bundle.errors import BundleInputError


def test_atomic_save_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "m" / "model.pt"
    atomic_save({"a": torch.ones(2)}, target)
    atomic_save({"a": torch.zeros(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.zeros(3))
    assert [p.name for p in target.parent.iterdir()] == ["model.pt"]
    assert oct(target.stat().st_mode & 0o777) == "0o644"


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "model.pt"
    atomic_save({"a": torch.ones(1)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"x": Unpicklable()}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_atomic_write_text_from_two_processes_at_once(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\nfrom monai_unet_bundle.atomic import atomic_write_text\n"
        "for i in range(300):\n    atomic_write_text(sys.argv[1], sys.argv[2] * 1000)\n"
    )
    target = tmp_path / "report.json"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target), tag]) for tag in "ab"]
    assert [p.wait() for p in procs] == [0, 0]
    assert target.read_text() in ("a" * 1000, "b" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    atomic_write_text(target, "done")
    assert target.read_text() == "done"


def test_resume_derives_the_iteration_when_epochs_change_length(tmp_path):
    first = _trainer([])

    def crash(engine):
        raise KeyboardInterrupt

    ResumeCheckpoint(tmp_path / "r.pt", {}).attach(first)
    first.add_event_handler(Events.EPOCH_COMPLETED(once=2), crash)
    with pytest.raises(KeyboardInterrupt):
        first.run([0, 1, 2], max_epochs=4)  # 3 iterations per epoch: saved at iteration 6
    seen: list[int] = []
    second = _trainer(seen)
    ResumeCheckpoint(tmp_path / "r.pt", {}).attach(second)
    second.run([0, 1, 2, 3, 4, 5], max_epochs=4)  # now 6 per epoch, as with half the processes
    assert seen == [3, 4] and second.state.iteration == 24


def test_leftovers_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    atomic_save({"a": 1}, tmp_path / "resume.pt")
    (tmp_path / ".resume.pt.abc123.tmp").write_bytes(b"cut short")
    (tmp_path / ".model.pt.xyz.tmp").write_bytes(b"another target's")
    assert [p.name for p in remove_leftovers(tmp_path / "resume.pt")] == [".resume.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.pt.xyz.tmp", "resume.pt"]
    assert remove_leftovers(tmp_path / "missing" / "resume.pt") == []


def test_require_checkpoint(tmp_path):
    with pytest.raises(BundleInputError, match="no trained model at .*run configs/train.json first"):
        require_checkpoint(tmp_path / "model.pt")


def _evaluator(scores):
    """An engine whose epoch e reports scores[e-1] as val_mean_dice."""
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED(before=0) | Events.EPOCH_COMPLETED)
    def _metric(e):
        e.state.metrics["val_mean_dice"] = scores[e.state.epoch - 1]

    return engine


def test_best_model_saver_keeps_the_best_and_resumes_its_score(tmp_path):
    net = torch.nn.Linear(2, 1)
    saver = BestModelSaver(net, tmp_path / "model.pt")
    engine = _evaluator([0.5, 0.7, 0.6, float("nan")])
    saver.attach(engine)
    for i, epoch_weights in enumerate([1.0, 2.0, 3.0, 4.0]):
        torch.nn.init.constant_(net.weight, epoch_weights)
        engine.state.epoch = i  # one evaluation per call, as ValidationHandler does
        engine.run([0], max_epochs=i + 1)
    assert saver.state_dict() == {"best_metric": 0.7, "best_epoch": 2}
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].flatten().tolist() == [2.0, 2.0]
    fresh = BestModelSaver(net, tmp_path / "model.pt")
    fresh.load_state_dict(saver.state_dict())
    assert fresh.best_metric == 0.7 and fresh.best_epoch == 2


def _trainer(epochs_seen):
    trainer = Engine(lambda e, b: {"loss": 0.0})
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_seen.append(e.state.epoch))
    return trainer


class _Counter:
    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def test_resume_continues_at_the_next_epoch(tmp_path):
    net = torch.nn.Linear(2, 1)
    counter = _Counter()
    seen: list[int] = []
    first = _trainer(seen)
    first.add_event_handler(Events.EPOCH_COMPLETED, lambda e: setattr(counter, "value", counter.value + 1))
    checkpoint = ResumeCheckpoint(tmp_path / "resume.pt", {"network": net, "counter": counter})
    checkpoint.attach(first)

    def crash(engine):
        raise KeyboardInterrupt  # a run cut short after epoch 3 was saved

    first.add_event_handler(Events.EPOCH_COMPLETED(once=3), crash)
    with pytest.raises(KeyboardInterrupt):
        first.run([0, 1], max_epochs=6)
    checkpoint.wait()  # the epoch-3 write runs in the background (a process exiting waits for it too)
    state = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert state["trainer"]["epoch"] == 3 and state["counter"] == {"value": 3}

    net2, counter2, seen2 = torch.nn.Linear(2, 1), _Counter(), []
    second = _trainer(seen2)
    second.add_event_handler(Events.EPOCH_COMPLETED, lambda e: setattr(counter2, "value", counter2.value + 1))
    ResumeCheckpoint(tmp_path / "resume.pt", {"network": net2, "counter": counter2}).attach(second)
    second.run([0, 1], max_epochs=6)
    assert seen2 == [4, 5, 6] and counter2.value == 6
    assert torch.equal(net2.weight, net.weight)
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["trainer"]["finished"] is True


def test_a_finished_run_is_not_resumed_by_auto(tmp_path):
    seen: list[int] = []
    t = _trainer(seen)
    ResumeCheckpoint(tmp_path / "resume.pt", {}).attach(t)
    t.run([0], max_epochs=2)
    seen.clear()
    t2 = _trainer(seen)
    ResumeCheckpoint(tmp_path / "resume.pt", {}, resume="auto").attach(t2)
    t2.run([0], max_epochs=2)
    assert seen == [1, 2]


def test_resume_settings_and_broken_files(tmp_path):
    with pytest.raises(BundleInputError, match="resume must be auto, true or false"):
        ResumeCheckpoint(tmp_path / "r.pt", {}, resume="yes")
    t = _trainer([])
    ResumeCheckpoint(tmp_path / "r.pt", {}, resume=True).attach(t)
    with pytest.raises(BundleInputError, match="resume is true but there is no resume checkpoint"):
        t.run([0], max_epochs=1)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    t = _trainer([])
    ResumeCheckpoint(tmp_path / "bad.pt", {}).attach(t)
    with pytest.raises(BundleInputError, match="cannot be read .*delete it or pass --resume false"):
        t.run([0], max_epochs=1)


def test_resume_writes_a_snapshot_in_the_background_and_reports_a_failed_write(tmp_path):
    net = torch.nn.Linear(2, 1)
    checkpoint = ResumeCheckpoint(tmp_path / "resume.pt", {"network": net})
    engine = Engine(lambda e, b: None)
    engine.state.epoch, engine.state.iteration = 2, 10
    before = net.weight.detach().clone()
    checkpoint.save(engine)
    with torch.no_grad():
        net.weight.add_(1.0)  # the next epoch changes the weights while the file is written
    checkpoint.wait()
    state = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert torch.equal(state["network"]["weight"], before) and state["trainer"]["finished"] is False
    assert not list(tmp_path.glob(".resume.pt.*"))  # no temporary file left behind

    (tmp_path / "blocked").write_text("a file where the checkpoint's folder should be")
    broken = ResumeCheckpoint(tmp_path / "blocked" / "resume.pt", {"network": net})
    broken.save(engine)
    with pytest.raises(OSError, match="could not write the resume checkpoint .*blocked/resume.pt"):
        broken.wait()
    broken.wait()  # the error is reported once


def test_a_new_run_keeps_the_earlier_best_model(tmp_path):
    net = torch.nn.Linear(2, 1)
    saver = BestModelSaver(net, tmp_path / "model.pt")
    atomic_save({"weight": torch.full((1, 2), 7.0)}, tmp_path / "model.pt")  # an earlier run's trained model
    t = _trainer([])
    ResumeCheckpoint(tmp_path / "resume.pt", {"network": net, "best_model": saver}, resume="auto").attach(t)
    t.run([0], max_epochs=1)
    kept = sorted(tmp_path.glob("model_*.pt"))
    assert len(kept) == 1 and torch.load(kept[0], weights_only=True)["weight"][0, 0] == 7.0
    assert not (tmp_path / "model.pt").exists()  # nothing overwrote it: the new run writes its own when it validates
    atomic_save({"weight": torch.zeros(1, 2)}, tmp_path / "model_final.pt")  # the user's own: never touched
    (tmp_path / "plan.json").write_text("{}")  # the model's plan goes with it when it is kept, and is pruned with it
    for i in range(5):  # repeated new runs keep only the most recent earlier models
        atomic_save({"weight": torch.full((1, 2), float(i))}, tmp_path / "model.pt")
        t = _trainer([])
        ResumeCheckpoint(tmp_path / "resume.pt", {"network": net, "best_model": saver}, resume="false").attach(t)
        t.run([0], max_epochs=1)
    kept = sorted((p for p in tmp_path.glob("model_2*.pt")), key=lambda p: p.stat().st_mtime)
    assert (tmp_path / "model_final.pt").is_file() and len(kept) == 3 and torch.load(kept[-1], weights_only=True)["weight"][0, 0] == 4.0
    assert sorted(p.name for p in tmp_path.glob("model_2*.plan.json")) == sorted(f"{p.stem}.plan.json" for p in kept)


def test_resuming_with_other_network_settings_is_one_sentence(tmp_path):
    from monai_unet_bundle.networks import build_network

    trained = build_network("basic_unet", 1, 2, base_features=4)
    atomic_save({"network": trained.state_dict(), "trainer": {"epoch": 1, "iteration": 1, "finished": False}}, tmp_path / "resume.pt")
    t = _trainer([])
    ResumeCheckpoint(tmp_path / "resume.pt", {"network": build_network("basic_unet", 1, 2, base_features=8)}).attach(t)
    with pytest.raises(BundleInputError, match=r"was trained with base_features 4 .*: pass --base_features 4 to resume it, or --resume false to start afresh\.$"):
        t.run([0], max_epochs=2)
