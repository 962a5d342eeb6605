from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from PIL import Image

from monai_unet_bundle.curves import PALETTE, TrainingCurves, ValidationPreviews, overlay, preview_strip


def test_curves_have_one_row_per_validation_and_continue_after_resume(tmp_path):
    losses = iter([1.0, 0.5, 0.4, 0.2, 0.3, 0.1])
    trainer = Engine(lambda e, b: {"loss": next(losses)})
    evaluator = Engine(lambda e, b: None)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_mean_dice=0.1 * e.state.epoch))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.25)
    curves = TrainingCurves(tmp_path, optimizer=opt, evaluator=evaluator)
    curves.attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0], max_epochs=e.state.epoch))
    trainer.run([0, 1], max_epochs=3)
    rows = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["train_loss"]) for r in rows] == pytest.approx([0.75, 0.3, 0.2])
    assert float(rows[2]["val_mean_dice"]) == pytest.approx(0.3)
    assert float(rows[0]["learning_rate"]) == 0.25
    assert Image.open(tmp_path / "curves.png").size[0] > 100
    seconds = [float(r["train_seconds"]) for r in rows]
    assert 0 <= seconds[0] <= seconds[1] <= seconds[2] < 60
    restored = TrainingCurves(tmp_path / "again", evaluator=evaluator)
    restored.load_state_dict(curves.state_dict())
    assert [r["epoch"] for r in restored.rows] == [1, 2, 3]
    # a resumed run's clock goes on from the last row instead of starting at zero
    restored.rows[-1]["train_seconds"] = 100.0
    losses = iter([0.1, 0.1])
    again = Engine(lambda e, b: {"loss": next(losses)})
    restored.attach(again)
    again.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0], max_epochs=4))
    again.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "epoch", 3))
    again.run([0, 1], max_epochs=4)
    resumed = list(csv.DictReader(open(tmp_path / "again" / "curves.csv")))
    assert [int(r["epoch"]) for r in resumed] == [1, 2, 3, 4]
    assert 100.0 <= float(resumed[3]["train_seconds"]) < 160.0


def test_overlay_and_strip_orientation():
    rgb = np.zeros((2, 3, 3), np.uint8)
    index = np.array([[0, 1, 0], [0, 0, 2]])
    out = overlay(rgb, index, alpha=1.0)
    assert out[0, 1].tolist() == PALETTE[1].tolist() and out[1, 2].tolist() == PALETTE[2].tolist() and out[0, 0].sum() == 0
    image = torch.zeros(3, 5, 4)  # MONAI order: (C, W, H) for a 5-wide, 4-high picture
    label = torch.zeros(1, 5, 4)
    label[0, 4, 0] = 1  # top-right pixel
    strip = preview_strip(image, label, label)
    assert strip.shape == (4, 3 * 5 + 8, 3)
    assert strip[0, 5 + 4 + 4].tolist() == [127, 32, 32]  # ground-truth panel, top-right


def test_a_large_validation_image_is_previewed_at_most_512_pixels_a_side():
    image = torch.zeros(1, 2000, 1500)  # MONAI order: 2000 wide, 1500 high, as patch training validates it
    label = torch.zeros(1, 2000, 1500)
    label[0, 1996:, :4] = 1  # the top-right corner
    strip = preview_strip(image, label, label)
    assert strip.shape == (375, 3 * 500 + 8, 3)  # every 4th pixel
    assert strip[0, 500 + 4 + 499].tolist() == [127, 32, 32]  # still in the ground-truth panel's top-right corner
    assert preview_strip(torch.zeros(1, 512, 300), torch.zeros(1, 512, 300), torch.zeros(1, 512, 300)).shape == (300, 3 * 512 + 8, 3)


def test_previews_written_per_validation(tmp_path):
    item = {"image": torch.rand(3, 8, 6), "label": torch.zeros(2, 8, 6), "pred": torch.zeros(2, 8, 6)}
    evaluator = Engine(lambda e, b: [item, item, item])
    ValidationPreviews(tmp_path / "previews", num_images=2, log_dir=tmp_path / "tb").attach(evaluator)
    evaluator.run([0], max_epochs=1)
    picture = Image.open(tmp_path / "previews" / "epoch_0001.png")
    assert picture.size == (3 * 8 + 8, 2 * (6 + 4))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def _fake_clock(monkeypatch: pytest.MonkeyPatch, ticks: list[float]) -> list[float]:
    """Make the curves module's clock read ``now[0]``; the test moves time by setting it."""
    import monai_unet_bundle.curves as curves_module

    monkeypatch.setattr(curves_module.time, "perf_counter", lambda: ticks[0])
    return ticks


def test_curves_png_is_redrawn_at_most_every_interval_and_at_the_end(tmp_path, monkeypatch):
    now = _fake_clock(monkeypatch, [0.0])
    drawn: list[int] = []
    trainer = Engine(lambda e, b: {"loss": 1.0})
    evaluator = Engine(lambda e, b: None)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_mean_dice=0.5))
    curves = TrainingCurves(tmp_path, evaluator=evaluator, plot_every_seconds=30)
    monkeypatch.setattr(curves, "_plot", lambda columns: drawn.append(len(curves.rows)))
    curves.attach(trainer)

    def validate(engine: Engine) -> None:
        now[0] += 10.0  # every epoch takes 10 s
        evaluator.run([0], max_epochs=engine.state.epoch)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, validate)
    trainer.run([0], max_epochs=5)
    # drawn at the first row, again once 30 s had passed (row 4), and at the end for row 5
    assert drawn == [1, 4, 5]
    assert list(csv.DictReader(open(tmp_path / "curves.csv")))[-1]["epoch"] == "5"  # the CSV follows every row


def test_previews_are_throttled_and_the_last_is_written_when_training_ends(tmp_path, monkeypatch):
    now = _fake_clock(monkeypatch, [0.0])
    item = {"image": torch.rand(3, 8, 6), "label": torch.zeros(2, 8, 6), "pred": torch.zeros(2, 8, 6)}
    evaluator = Engine(lambda e, b: [item])
    previews = ValidationPreviews(tmp_path / "previews", num_images=1, every_seconds=30)
    previews.attach(evaluator)
    trainer = Engine(lambda e, b: None)
    previews.write_last_when_done(trainer)

    def validate(engine: Engine) -> None:
        now[0] += 10.0
        evaluator.run([0], max_epochs=engine.state.epoch)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, validate)
    trainer.run([0], max_epochs=5)
    names = sorted(p.name for p in (tmp_path / "previews").iterdir())
    assert names == ["epoch_0001.png", "epoch_0004.png", "epoch_0005.png"]
