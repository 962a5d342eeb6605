"""Checkpoint files: atomic writes, the best model, and a resume checkpoint.

* Every file is written with :func:`monai_unet_bundle.atomic.atomic_save`: a temporary file in the
  target folder, flushed to disk and renamed over the target, so a kill at any moment leaves either
  the old file or the new one, never a truncated one.  (MONAI's ``CheckpointSaver`` writes in place and deletes the previous best
  model before writing the next, which a kill can turn into a truncated or missing ``model.pt``.)
* :class:`BestModelSaver` keeps ``models/model.pt`` (a plain state dict of the network) at the best
  validation score, and remembers that score across resumes.
* :class:`ResumeCheckpoint` saves everything a run needs to continue (network, optimizer, LR
  scheduler, epoch and iteration, early stopping, best score, curves) after every epoch, and loads
  it when a run starts.  It copies the state at the epoch's end and writes the copy from a
  background thread while the next epoch trains: the trainer waits about 5 ms instead of about
  60 ms (serialising and flushing 24 MB for the default network).
* :class:`ModelLoader` (inference and evaluation) loads ``ckpt_path`` into the network, and
  :func:`load_model` explains in one sentence a file that cannot be: a folder, an empty,
  truncated or foreign file, one carrying Python objects (never unpickled: ``weights_only=True``),
  a resume checkpoint, or a model trained with other ``num_classes``, ``in_channels``,
  ``architecture`` or ``base_features`` (read back from the tensor shapes).
"""

from __future__ import annotations

import copy
import logging
import math
import re
import threading
import shutil
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from monai_unet_bundle.atomic import atomic_save, remove_leftovers
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.settings import auto_flag

__all__ = [
    "BestModelSaver",
    "ModelLoader",
    "ResumeCheckpoint",
    "check_model",
    "load_model",
    "network_settings",
    "read_state_dict",
    "require_checkpoint",
    "snapshot",
]

logger = logging.getLogger(__name__)

#: how many earlier runs' best models a new run keeps beside models/model.pt
KEEP_EARLIER_MODELS = 3

#: resume checkpoint path -> the thread writing it, so that a load in the same process (a run
#: started again in a notebook after an error) waits for a write another instance began
_WRITERS: dict[str, threading.Thread] = {}


def snapshot(state: Any) -> Any:
    """A copy of a (nested) state dict that later training steps cannot change: tensors are cloned."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, Mapping):
        return {key: snapshot(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(value) for value in state)
    return copy.deepcopy(state)


def require_checkpoint(path: str | Path) -> str:
    """Return ``path`` when it is an existing file, else explain how to get one.

    Raises:
        BundleInputError: when no file exists at ``path``, or it is a folder.
    """
    if Path(path).is_dir():
        inside = Path(path) / "model.pt"
        hint = f"--ckpt_path {inside}" if inside.is_file() else "--ckpt_path with the model.pt that training wrote"
        raise BundleInputError(f"model {path} is a folder, not a model file: pass {hint}.")
    if not Path(path).is_file():
        raise BundleInputError(
            f"no trained model at {str(path)!r}: run configs/train.json first, or pass --ckpt_path with a model.pt."
        )
    return str(path)


#: what to do about a file that is no model of network_def
_TRAIN_OR_PASS = "train again, or pass --ckpt_path with a model.pt written by configs/train.json"
#: the settings that shape a network's tensors, in the order messages name them
_SETTINGS = ("num_classes", "in_channels", "architecture", "base_features")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _pickle_globals(path: str | Path) -> list[str] | None:
    """The ``module.name`` objects a raw pickle file refers to, read without unpickling anything.

    Returns:
        The names (empty for a pickle of plain data only), or ``None`` when the file is no pickle.
    """
    import pickletools

    names: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(Path(path).read_bytes()):
            if opcode.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL":
                names.append(".".join(strings[-2:]) if len(strings) >= 2 else "?")
            elif isinstance(arg, str):
                strings.append(arg)
            elif opcode.name in ("REDUCE", "BUILD", "NEWOBJ", "NEWOBJ_EX", "OBJ") and not names:
                names.append("?")
    except Exception:  # not a pickle (or one cut short): genops raises on the first bad opcode
        return None
    return list(dict.fromkeys(names))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain state dict (parameter name -> tensor) from ``path``, never running code from it.

    The file is read with ``torch.load(..., weights_only=True)``: a pickle that refers to any
    Python object besides tensors and plain containers is refused before anything in it runs.

    Raises:
        BundleInputError: one sentence naming the file, what it holds and what to do, for a
            missing file or folder, an empty, truncated or foreign file, a file carrying Python
            objects, a resume checkpoint, or anything else that is not a state dict.
    """
    require_checkpoint(path)
    size = Path(path).stat().st_size
    if size == 0:
        raise BundleInputError(f"model {path} is an empty file (0 bytes; a copy or a save cut short?): {_TRAIN_OR_PASS}.")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        names = [found.group(1)] if found else _pickle_globals(path)
        if names:
            raise BundleInputError(
                f"model {path} holds Python objects besides tensors ({', '.join(names[:3])}), which are never loaded "
                f"because loading them could run code: pass --ckpt_path with a plain state dict such as the model.pt "
                f"configs/train.json writes, or train again."
            ) from None
        if "zip archive" in text or "central directory" in text or isinstance(exc, EOFError):
            what = f"a truncated or damaged PyTorch file ({_plural(size, 'byte')})"
        elif names is not None:
            what = f"a plain Python pickle ({_plural(size, 'byte')}), not a PyTorch file"
        else:
            what = f"no PyTorch data ({_plural(size, 'byte')} that torch.load cannot read)"
        raise BundleInputError(f"model {path} holds {what}: {_TRAIN_OR_PASS}.") from None
    if isinstance(state, Mapping) and isinstance(state.get("network"), Mapping) and "trainer" in state:
        beside = Path(path).parent / "model.pt"
        where = str(beside) if beside.is_file() and beside.resolve() != Path(path).resolve() else "with the model.pt beside it"
        raise BundleInputError(
            f"model {path} is a resume checkpoint (network, optimizer and trainer state), not a model: pass --ckpt_path "
            f"{where}, the best model that training keeps."
        )
    if not isinstance(state, Mapping):
        raise BundleInputError(
            f"model {path} holds a {type(state).__name__}, not a state dict of network_def (parameter name -> tensor): "
            f"{_TRAIN_OR_PASS}."
        )
    if not state:
        raise BundleInputError(f"model {path} holds an empty dict, not the weights of network_def: {_TRAIN_OR_PASS}.")
    others = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise BundleInputError(
            f"model {path} holds a dict with entries that are not tensors ({shown}), not a plain state dict of "
            f"network_def: save network.state_dict() alone, or {_TRAIN_OR_PASS}."
        )
    return dict(state)


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _reference_shapes(architecture: str, in_channels: int, num_classes: int, base_features: int) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of ``build_network(...)``, built on the meta device (no memory, no weights)."""
    from monai_unet_bundle.networks import build_network

    with torch.device("meta"):
        net = build_network(architecture, in_channels=in_channels, out_channels=num_classes, base_features=base_features)
    return _shapes(net.state_dict())


def network_settings(state: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """The settings a state dict of :func:`monai_unet_bundle.networks.build_network` was made with.

    Tensor names tell the architecture; every shape is linear in ``in_channels``,
    ``num_classes`` and ``base_features``, so one network built with each raised by one tells
    which dimensions follow it and how; the result is checked by building it again.

    Returns:
        ``{"architecture", "in_channels", "num_classes", "base_features"}``, or ``None`` for a
        state dict of some other network.
    """
    from monai_unet_bundle.networks import NETWORKS

    shapes = _shapes(state)
    for architecture in NETWORKS:
        base = _reference_shapes(architecture, 1, 1, 1)
        if set(base) != set(shapes):
            continue
        found: dict[str, Any] = {"architecture": architecture}
        for name, args in (("in_channels", (2, 1, 1)), ("num_classes", (1, 2, 1)), ("base_features", (1, 1, 2))):
            bumped = _reference_shapes(architecture, *args)
            values = set()
            for key, dims in base.items():
                if len(dims) != len(shapes[key]):
                    return None
                for one, two, actual in zip(dims, bumped[key], shapes[key]):
                    if one != two:  # actual = one + slope * (value - 1)
                        slope = two - one
                        values.add((actual - one) / slope + 1)
            if len(values) != 1 or not float(next(iter(values))).is_integer() or next(iter(values)) < 1:
                return None
            found[name] = int(next(iter(values)))
        args = (found["architecture"], found["in_channels"], found["num_classes"], found["base_features"])
        return found if _reference_shapes(*args) == shapes else None
    return None


def _describe(settings: Mapping[str, Any], names: list[str]) -> str:
    return ", ".join(f"{n} {settings[n]}" for n in names)


def _fits(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` has exactly the tensor names and shapes of the state dict ``expected``."""
    return set(state) == set(expected) and all(tuple(state[k].shape) == tuple(v.shape) for k, v in expected.items())


def _mismatch_message(
    path: str | Path, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], resume: bool = False
) -> str:
    """One sentence on why ``state`` does not fit the network whose state dict is ``expected``.

    With ``resume`` the file is a resume checkpoint: the remedy is to pass its settings to resume
    it, or ``--resume false``, instead of training again.
    """
    trained, current = network_settings(state), network_settings(expected)
    if trained is not None and current is not None:
        differ = [n for n in _SETTINGS if trained[n] != current[n]]
        flags = " ".join(f"--{n} {trained[n]}" for n in differ)
        remedy = f"pass {flags} to resume it, or --resume false to start afresh." if resume else f"pass {flags} or train again."
        if differ == ["num_classes"]:
            return (
                f"model {path} was trained for {trained['num_classes']} classes while num_classes is "
                f"{current['num_classes']}: {remedy}"
            )
        if differ == ["in_channels"]:
            return (
                f"model {path} was trained for {_plural(trained['in_channels'], 'input channel')} while in_channels is "
                f"{current['in_channels']}: {remedy}"
            )
        if differ:
            return f"model {path} was trained with {_describe(trained, differ)} while the settings say {_describe(current, differ)}: {remedy}"
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    example = (missing or unexpected or resized or ["?"])[0]
    if trained is not None:  # a network of this bundle, but network_def builds something else
        remedy = "pass those settings to resume it, or --resume false to start afresh" if resume else "pass those settings or train again"
        return (
            f"model {path} was trained with {_describe(trained, list(_SETTINGS))} but network_def builds another "
            f"network (e.g. {example!r} differs): {remedy}."
        )
    what = (
        f"model {path} holds the weights of another network ({len(missing)} of network_def's tensors missing, "
        f"{len(unexpected)} unknown, {len(resized)} of another shape, e.g. {example!r})"
    )
    if resume:
        return f"{what}: pass --resume false to start afresh."
    return (
        f"{what}: pass --ckpt_path with a model.pt trained by this bundle with the same --architecture, --base_features, "
        f"--num_classes and --in_channels, or train again."
    )


def run_finished(resume_path: str | Path) -> bool:
    """Whether ``resume_path`` is the resume checkpoint of a training run that finished (it ran out of epochs or
    budget, or stopped early); ``False`` when there is none or it cannot be read."""
    try:
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return bool(isinstance(state, dict) and state.get("trainer", {}).get("finished"))


def load_model(path: str | Path, network: torch.nn.Module) -> torch.nn.Module:
    """Load the state dict in ``path`` into ``network`` after checking that it fits.

    ``network`` may be wrapped (``DistributedDataParallel``: its ``.module`` is loaded), live on
    any device and in any memory format (the weights are copied into its own tensors, which keep
    theirs).  A state dict saved from a wrapped network (every name starting with ``module.``) is
    accepted too.

    Returns:
        ``network``.

    Raises:
        BundleInputError: as :func:`read_state_dict`, and for a model of another ``num_classes``,
            ``in_channels``, ``architecture`` or ``base_features`` (naming the values to pass) or
            of another network altogether.
    """
    state = read_state_dict(path)
    net = getattr(network, "module", network)
    expected = net.state_dict()
    if set(state) != set(expected) and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if not _fits(state, expected):
        raise BundleInputError(_mismatch_message(path, state, expected))
    net.load_state_dict(state)
    logger.info("loaded the model %s", path)
    return network


def check_model(path: Any, network: torch.nn.Module) -> str:
    """Load ``path`` into ``network`` now (see :func:`load_model`) and return the path.

    ``path`` may also name several models for a fold ensemble (see :mod:`monai_unet_bundle.ensemble`).
    For a config's ``initialize`` list: there it runs before the data set is built (and cached),
    so a wrong file is reported before any image is read, instead of when the evaluator's
    :class:`ModelLoader` is attached.
    """
    from monai_unet_bundle.ensemble import load_models

    return ", ".join(load_models(path, network))


class ModelLoader:
    """Load ``models/model.pt`` into the network of an inference or evaluation run (instead of MONAI's ``CheckpointLoader``).

    The weights are loaded, through :func:`load_model`, when the handler is attached, that is
    when the evaluator is built and before it runs, so a wrong file stops the run at once with
    one sentence.

    Args:
        load_path: the model file (``ckpt_path``), or several for a fold ensemble.
        network: the network to load it into (``@network``, possibly DistributedDataParallel).
    """

    def __init__(self, load_path: Any, network: torch.nn.Module) -> None:
        self.load_path = load_path
        self.network = network

    def attach(self, engine: Engine) -> None:
        """Load the weights now (one file each into a fold ensemble's networks), unless the config's
        model check already loaded these very files into this network."""
        from monai_unet_bundle.ensemble import load_models

        load_models(self.load_path, self.network, skip_loaded=True)


class BestModelSaver:
    """Save the network's state dict whenever the validation score beats the best so far.

    Attach it to the evaluator.  Only rank 0 writes in a distributed run.

    Args:
        network: the model (a ``DistributedDataParallel`` wrapper is unwrapped).
        save_path: where the state dict goes, e.g. ``models/model.pt``.
        metric_name: the evaluator metric to maximise.
        plan: the training plan (:mod:`monai_unet_bundle.plan`), written as ``plan.json`` beside the
            model whenever the model is, so evaluation and inference build what was trained.
    """

    def __init__(
        self, network: torch.nn.Module, save_path: str | Path, metric_name: str = "val_mean_dice", plan: Mapping[str, Any] | None = None
    ) -> None:
        self.network = network
        self.save_path = Path(save_path)
        self.metric_name = metric_name
        self.plan = plan
        self.best_metric = -math.inf
        self.best_epoch = 0

    def attach(self, engine: Engine) -> None:
        """Check the score after every evaluation (and clear what a killed write of the model left)."""
        if idist.get_rank() == 0:
            remove_leftovers(self.save_path)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        score = float(engine.state.metrics[self.metric_name])
        if math.isnan(score) or score <= self.best_metric:
            return
        self.best_metric, self.best_epoch = score, int(engine.state.epoch)
        if idist.get_rank() == 0:
            net = getattr(self.network, "module", self.network)
            if self.plan is not None:  # first, so a model.pt is never beside another run's plan
                from monai_unet_bundle.plan import PLAN_FILE, write_plan

                write_plan(self.plan, self.save_path.parent / PLAN_FILE)
            atomic_save(net.state_dict(), self.save_path)
            logger.info("saved the best model so far (%s %.4f, epoch %d) to %s", self.metric_name, score, self.best_epoch, self.save_path)

    def state_dict(self) -> dict[str, float | int]:
        """The best score and its epoch."""
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the best score and its epoch."""
        self.best_metric, self.best_epoch = float(state["best_metric"]), int(state["best_epoch"])


class ResumeCheckpoint:
    """Save a resume checkpoint after every epoch and load it when training starts.

    Args:
        path: the checkpoint file, e.g. ``models/resume.pt`` (never ``model.pt``).
        objects: name -> object with ``state_dict``/``load_state_dict`` (network, optimizer, LR
            scheduler, early stopping, best-model saver, curves ...).
        resume: ``"auto"`` continues an unfinished run when the file exists and starts afresh
            otherwise (also after a run that finished); ``True`` requires the file; ``False``
            always starts afresh.

    Raises:
        BundleInputError: for a ``resume`` value that is not ``auto``/``true``/``false``, or
            ``resume=True`` with no checkpoint.
    """

    def __init__(self, path: str | Path, objects: Mapping[str, Any], resume: bool | str = "auto") -> None:
        normalised = auto_flag(resume, "resume")
        self.path = Path(path)
        self.objects = dict(objects)
        self.resume = normalised
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def attach(self, engine: Engine) -> None:
        """Load on ``STARTED`` (before the first epoch), save on every ``EPOCH_COMPLETED`` and at the end."""
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, self.save, finished=True)

    def save(self, engine: Engine, finished: bool = False) -> None:
        """Write the checkpoint atomically (rank 0 only).

        The state is copied now and written by a background thread, so the next epoch starts at
        once; a new save waits for the previous write first.  The final save (``finished``) is
        written before returning.  The thread is not a daemon: a run that stops with an error
        or Ctrl-C still completes the write in progress before the process exits, and a kill
        leaves the previous checkpoint whole (the write is atomic).
        """
        if idist.get_rank() != 0:
            return
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        state["trainer"] = {"epoch": int(engine.state.epoch), "iteration": int(engine.state.iteration), "finished": finished}
        self.wait()
        if finished:  # written here and now: nothing changes the state meanwhile, no copy needed
            atomic_save(state, self.path)
            return
        state = snapshot(state)
        self._writer = threading.Thread(target=self._write, args=(state,), name="resume-checkpoint-writer")
        _WRITERS[str(self.path.resolve())] = self._writer
        self._writer.start()

    def _write(self, state: dict) -> None:
        try:
            atomic_save(state, self.path)
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Block until the checkpoint being written is on disk; raise the error of a failed write."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join()
        error, self._error = self._error, None
        if error is not None:
            raise OSError(f"could not write the resume checkpoint {str(self.path)!r}: {error}") from error

    def _keep_earlier_model(self) -> None:
        """A new run is starting: move the best model of an earlier run aside instead of letting it be overwritten."""
        best = self.objects.get("best_model")
        path = getattr(best, "save_path", None)
        if path is None or idist.get_rank() != 0 or not Path(path).is_file():
            return
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(Path(path).stat().st_mtime))
        kept = Path(path).with_name(f"{Path(path).stem}_{stamp}{Path(path).suffix}")
        n = 1
        while kept.exists():
            n += 1
            kept = Path(path).with_name(f"{Path(path).stem}_{stamp}_{n}{Path(path).suffix}")
        Path(path).rename(kept)
        plan = Path(path).parent / "plan.json"
        if plan.is_file():  # the model's plan goes with it, as <stem>.plan.json (monai_unet_bundle.plan.plan_path_for)
            shutil.copy2(plan, kept.with_name(f"{kept.stem}.plan.json"))
        logger.warning("a new run starts: the earlier run's best model %s was kept as %s", path, kept)
        ours = re.compile(rf"{re.escape(Path(path).stem)}_\d{{8}}-\d{{6}}(_\d+)?{re.escape(Path(path).suffix)}")
        earlier = sorted((p for p in Path(path).parent.iterdir() if ours.fullmatch(p.name)), key=lambda p: p.stat().st_mtime)
        for old in earlier[:-KEEP_EARLIER_MODELS]:  # the oldest go, so repeated runs (MONAI Label) don't fill the disk
            old.unlink(missing_ok=True)
            old.with_name(f"{old.stem}.plan.json").unlink(missing_ok=True)
            logger.info("removed %s: only the %d most recent earlier models are kept", old, KEEP_EARLIER_MODELS)

    def load(self, engine: Engine) -> None:
        """Restore every object and the trainer's epoch and iteration from the checkpoint, if one applies."""
        self.wait()
        other = _WRITERS.get(str(self.path.resolve()))
        if other is not None:
            other.join()
        if idist.get_rank() == 0:
            remove_leftovers(self.path)
        if self.resume == "false":
            self._keep_earlier_model()
            return
        if not self.path.is_file():
            if self.resume == "true":
                raise BundleInputError(
                    f"resume is true but there is no resume checkpoint at {str(self.path)!r}: pass --resume auto or false to start a new run."
                )
            self._keep_earlier_model()
            return
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BundleInputError(
                f"the resume checkpoint {str(self.path)!r} cannot be read ({type(exc).__name__}); delete it or pass --resume false."
            ) from None
        progress = state.get("trainer", {})
        if progress.get("finished") and self.resume == "auto":
            logger.info("%s belongs to a finished run: starting a new run (pass --resume true to continue it)", self.path)
            self._keep_earlier_model()
            return
        network = self.objects.get("network")
        if network is not None and "network" in state:
            net = getattr(network, "module", network)
            expected = net.state_dict()
            if not _fits(state["network"], expected):
                raise BundleInputError(_mismatch_message(self.path, state["network"], expected, resume=True))
        for name, obj in self.objects.items():
            if name in state:
                obj.load_state_dict(state[name])
        epoch, iteration = int(progress.get("epoch", 0)), int(progress.get("iteration", 0))
        if epoch >= engine.state.max_epochs:
            logger.info("the resumed run already reached epoch %d of max_epochs %d", epoch, engine.state.max_epochs)
        # checkpoints are written at epoch ends, so the iteration follows from the epoch; deriving it
        # keeps a resume right when the iterations per epoch changed (batch size, data, processes)
        length = engine.state.epoch_length
        engine.state.epoch, engine.state.iteration = epoch, epoch * length if length else iteration
        logger.info("resumed from %s at epoch %d (iteration %d)", self.path, epoch, iteration)
