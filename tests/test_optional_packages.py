"""Declared packages (configs/metadata.json) and optional outputs that degrade to one warning.

* Every third-party module the package imports, at any level, is declared in the metadata:
  ``required_packages_version`` (training and inference need it) or ``extra_packages_version``
  (optional outputs); monai, torch and numpy through their own ``*_version`` entries.
* The optional ones are imported only inside functions, through :mod:`monai_unet_bundle.optional`,
  so a bundle installed the model zoo's way (the required packages only) still trains: a real
  ``monai.bundle run`` with matplotlib, tensorboard and tqdm replaced by packages that raise
  ``ImportError`` writes ``models/model.pt`` and ``logs/curves.csv`` and warns once per package.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from monai_unet_bundle import optional
from tests.conftest import CONFIGS, REPO, TINY, config, write_pairs

META = json.loads((CONFIGS / "metadata.json").read_text())
PACKAGE = REPO / "monai_unet_bundle"
#: covered by monai_version, pytorch_version and numpy_version
CORE = {"monai": "monai_version", "torch": "pytorch_version", "numpy": "numpy_version"}
#: import name -> distribution, for modules packages_distributions() cannot map (not installed here)
KNOWN = {"PIL": "pillow", "yaml": "pyyaml", "ignite": "pytorch-ignite", "skimage": "scikit-image", "cv2": "opencv-python"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(top-level module, line, at module level)`` for every absolute import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    # imports inside `if TYPE_CHECKING:` or try/except at module level still run at import time
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(name.split(".")[0], node.lineno, id(node) in top_level) for name in names]
    return found


def _third_party(package: Path = PACKAGE) -> dict[str, list[str]]:
    """Top-level module -> ``file:line`` where ``package`` imports it (standard library and the package itself left out)."""
    modules: dict[str, list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        for module, line, _ in _imports(path):
            if module in sys.stdlib_module_names or module == package.name:
                continue
            modules.setdefault(module, []).append(f"{path.relative_to(package.parent)}:{line}")
    return modules


def _distribution(module: str) -> str | None:
    dists = importlib.metadata.packages_distributions().get(module)
    if dists:
        return _normalise(dists[0])
    return _normalise(KNOWN[module]) if module in KNOWN else None


def _declared(key: str, meta: dict = META) -> set[str]:
    return {_normalise(name) for name in meta.get(key, {})}


def _undeclared(package: Path = PACKAGE, meta: dict = META) -> list[str]:
    """One line per third-party module ``package`` imports that ``meta`` does not declare."""
    declared = _declared("required_packages_version", meta) | _declared("extra_packages_version", meta)
    problems = []
    for module, where in sorted(_third_party(package).items()):
        if module in CORE:
            if not meta.get(CORE[module]):
                problems.append(f"{module} ({where[0]}): metadata has no {CORE[module]}")
            continue
        dist = _distribution(module)
        if dist is None:
            problems.append(f"{module} ({where[0]}): no installed distribution provides it; add it to KNOWN and the metadata")
        elif dist not in declared:
            problems.append(f"{module} ({', '.join(where[:3])}) comes from {dist}, which configs/metadata.json does not declare")
    return problems


def test_every_third_party_import_is_declared_in_the_metadata():
    """A module the bundle imports but the metadata leaves out breaks the bundle in MONAI Label and the model zoo."""
    assert {"PIL", "scipy", "ignite", "matplotlib", "tqdm", "nibabel"} <= set(_third_party()), "the scan no longer sees the imports"
    problems = _undeclared()
    assert not problems, "undeclared imports:\n" + "\n".join(problems)


def test_an_undeclared_import_is_caught(tmp_path: Path):
    """The check above fails for a new import anywhere, also inside a function, and names the distribution."""
    package = tmp_path / "monai_unet_bundle"
    package.mkdir()
    (package / "__init__.py").write_text("import os\nimport numpy as np\nfrom monai_unet_bundle import errors\n")
    (package / "new.py").write_text("from PIL import Image\n\n\ndef f():\n    import yaml\n    from skimage import measure\n")
    problems = _undeclared(package)
    assert len(problems) == 2, problems
    assert problems[0].startswith("skimage (monai_unet_bundle/new.py:6) comes from scikit-image")
    assert problems[1].startswith("yaml (monai_unet_bundle/new.py:5) comes from pyyaml")
    no_numpy = {k: v for k, v in META.items() if k != "numpy_version"}
    assert _undeclared(package, no_numpy)[0] == "numpy (monai_unet_bundle/__init__.py:2): metadata has no numpy_version"


def test_the_declaration_check_sees_function_level_imports(tmp_path: Path):
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom PIL import Image\n\ndef f():\n    import skimage.measure\n    from yaml import safe_load\n")
    assert _imports(source) == [("os", 1, True), ("PIL", 2, True), ("skimage", 5, False), ("yaml", 6, False)]
    assert _distribution("PIL") == "pillow" and _distribution("yaml") == "pyyaml" and _distribution("ignite") == "pytorch-ignite"
    assert _distribution("skimage") == "scikit-image" and _distribution("no_such_module_here") is None


def test_optional_packages_are_extra_and_only_imported_inside_functions():
    """Required and extra do not overlap, every package optional.py handles is extra, and no module imports one at load time."""
    required, extra = _declared("required_packages_version"), _declared("extra_packages_version")
    assert not required & extra
    assert {_normalise(dist) for _, dist, _ in optional.OPTIONAL.values()} <= extra
    extra_modules = {m for m in _third_party() if _distribution(m) in extra}
    assert extra_modules >= {"matplotlib", "tqdm"}
    loaded_at_import = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for module, line, top in _imports(path)
        if top and module in extra_modules
    ]
    assert not loaded_at_import, "an optional package imported at module level stops the bundle where it is missing"


def test_versions_are_pinned_and_monai_keeps_the_required_list():
    """MONAI reads optional_packages_version as an old name of required_packages_version and lets it replace that list."""
    for key in ("required_packages_version", "extra_packages_version"):
        assert all(re.fullmatch(r"\d+(\.\d+)*", v) for v in META[key].values()), f"{key} holds a version that is not plain"
    assert "optional_packages_version" not in META
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_meta(str(CONFIGS / "metadata.json"))
    assert parser.get("_meta_#required_packages_version") == META["required_packages_version"]


# ------------------------------------------------------------------------------------ degrading in-process


@pytest.fixture
def missing(monkeypatch: pytest.MonkeyPatch):
    """Make modules unimportable (``sys.modules[name] = None``) and start optional's record afresh."""
    optional.reset()

    def hide(*modules: str) -> None:
        for module in modules:
            monkeypatch.setitem(sys.modules, module, None)

    yield hide
    optional.reset()


def _warnings(caplog: pytest.LogCaptureFixture, package: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == optional.__name__ and f"package {package} " in r.getMessage()]


def test_available_warns_once_per_package(missing, caplog: pytest.LogCaptureFixture):
    missing("matplotlib")
    with caplog.at_level(logging.WARNING):
        assert optional.available("matplotlib") is False
        assert optional.available("matplotlib") is False
        assert optional.available("tqdm") is True
    (message,) = _warnings(caplog, "matplotlib")
    assert "curves.png" in message and "pip install matplotlib" in message
    assert not _warnings(caplog, "tqdm")
    with pytest.raises(KeyError):
        optional.available("pandas")


def test_tensorboard_stand_in_keeps_monai_s_handler_working(missing, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    from monai.handlers import TensorBoardStatsHandler

    assert optional.tensorboard_stand_in() is None  # installed: MONAI's handler opens its own writer, as before
    optional.reset()
    missing("torch.utils.tensorboard")
    with caplog.at_level(logging.WARNING):
        writer = optional.tensorboard_stand_in()
        assert isinstance(writer, optional.NullSummaryWriter)
        assert isinstance(optional.tensorboard_stand_in(), optional.NullSummaryWriter)
    assert len(_warnings(caplog, "tensorboard")) == 1
    handler = TensorBoardStatsHandler(log_dir=str(tmp_path), summary_writer=writer, output_transform=lambda out: out["loss"])
    engine = Engine(lambda e, b: {"loss": torch.tensor(0.5)})
    handler.attach(engine)
    engine.run([0, 1], max_epochs=2)
    assert not list(tmp_path.iterdir())


def test_curves_without_matplotlib_write_the_csv(missing, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    from monai_unet_bundle.curves import TrainingCurves

    missing("matplotlib", "matplotlib.pyplot")
    evaluator = Engine(lambda e, b: None)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_mean_dice=0.5))
    trainer = Engine(lambda e, b: {"loss": 1.0})
    TrainingCurves(tmp_path, evaluator=evaluator).attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0], max_epochs=e.state.epoch))
    with caplog.at_level(logging.WARNING):
        trainer.run([0], max_epochs=3)
    assert (tmp_path / "curves.csv").read_text().count("\n") == 4
    assert not (tmp_path / "curves.png").exists()
    assert len(_warnings(caplog, "matplotlib")) == 1


def test_previews_without_tensorboard_still_write_pngs(missing, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    from monai_unet_bundle.curves import ValidationPreviews

    missing("torch.utils.tensorboard")
    item = {"image": torch.rand(3, 8, 6), "label": torch.zeros(2, 8, 6), "pred": torch.zeros(2, 8, 6)}
    evaluator = Engine(lambda e, b: [item])
    ValidationPreviews(tmp_path / "previews", num_images=1, log_dir=tmp_path / "tb").attach(evaluator)
    with caplog.at_level(logging.WARNING):
        evaluator.run([0], max_epochs=2)
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]
    assert not (tmp_path / "tb").exists()
    assert len(_warnings(caplog, "tensorboard")) == 1


class _Terminal:
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def test_progress_on_a_terminal_without_tqdm_logs_plain_lines(missing, caplog: pytest.LogCaptureFixture):
    from monai_unet_bundle.progress import TrainingProgress

    missing("tqdm", "tqdm.autonotebook", "tqdm.auto")
    engine = Engine(lambda e, b: {"loss": 0.25})
    with caplog.at_level(logging.INFO):
        TrainingProgress(lines_per_epoch=2, stream=_Terminal()).attach(engine)
        engine.run(list(range(4)), max_epochs=1)
    messages = [r.getMessage() for r in caplog.records]
    assert any("iteration 2/4, mean loss 0.2500" in m for m in messages)
    assert any(m.startswith("epoch 1/1 done") for m in messages)
    assert len(_warnings(caplog, "tqdm")) == 1


# ------------------------------------------------------------------------------------ a real training run


@pytest.mark.slow
def test_training_without_the_optional_packages(tmp_path: Path):
    """``monai.bundle run`` of train.json where importing matplotlib, tensorboard or tqdm raises ImportError."""
    stand_ins = tmp_path / "stand_ins"
    for name in ("matplotlib", "tensorboard", "tqdm"):
        (stand_ins / name).mkdir(parents=True)
        (stand_ins / name / "__init__.py").write_text(f"raise ImportError('stand-in: {name} is not installed')\n")
    data = write_pairs(tmp_path / "data", n=6)
    env = dict(os.environ, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE")
    env.pop("PYTHONWARNINGS", None)  # Python warnings shown, so a second one about the same package would count
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(stand_ins), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [
            sys.executable, "-m", "monai.bundle", "run", "--config_file", config("train.json"), "--bundle_root", str(tmp_path),
            "--dataset_dir", str(data), "--max_epochs", "2", *TINY,
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Traceback" not in output
    assert (tmp_path / "models" / "model.pt").is_file()
    rows = (tmp_path / "logs" / "curves.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,train_loss")
    assert not (tmp_path / "logs" / "curves.png").exists()
    assert not list((tmp_path / "logs").glob("events.out.tfevents.*"))
    assert len(list((tmp_path / "logs" / "previews").glob("epoch_*.png"))) == 2
    for name in ("matplotlib", "tensorboard", "tqdm"):
        lines = [line for line in output.splitlines() if name in line.lower()]
        assert len(lines) == 1, f"expected one warning about {name}, got {lines}"
        assert "WARNING" in lines[0] and f"optional package {name} is not installed" in lines[0] and f"pip install {name}" in lines[0]
