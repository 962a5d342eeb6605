"""Finding the user's images and masks and turning them into MONAI datalists.

A data set is either a folder with ``images/`` and ``masks/`` (pairs matched by file stem, with an
optional mask suffix such as ``_mask``), or a Decathlon-style JSON datalist.  Without an explicit
validation list, a deterministic split (seeded shuffle) takes ``val_fraction`` of the pairs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from monai_unet_bundle.dicom import (
    DICOM_GROUP_NAMES,
    DICOM_SUFFIXES,
    dicom_group,
    expand_frames,
    frame_name,
    is_dicom,
    seg_references,
    sop_instance_uid,
    split_frame,
)
from monai_unet_bundle.errors import BundleInputError
from monai_unet_bundle.readers import NIFTI_SUFFIXES, PIL_SUFFIXES, inspect_image, unreadable_reason
from monai_unet_bundle.transforms import channel_conversion_note

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataSource",
    "build_datalists",
    "InputScan",
    "assign_groups",
    "find_pairs",
    "group_leaks",
    "fingerprint",
    "discover_datalists",
    "evaluation_items",
    "missing_masks_message",
    "output_names",
    "file_stem",
    "list_images",
    "scan_inputs",
    "split_pairs",
]

logger = logging.getLogger(__name__)

#: every file extension the bundle reads (matched case-insensitively)
IMAGE_EXTENSIONS: tuple[str, ...] = (*PIL_SUFFIXES, *NIFTI_SUFFIXES, *DICOM_SUFFIXES)


def _stem_and_extension(path: str | Path) -> tuple[str, str]:
    """``("a", ".nii.gz")`` for ``a.nii.gz``; a name with no image extension (a DICOM file named by
    number or UID) is all stem; frame ``k`` of a multi-frame file (``clip.dcm#k``) is ``clip_frame<k>``."""
    file, frame = split_frame(path)
    name = Path(file).name
    lower = name.lower()
    stem, ext = name, ""
    for candidate in sorted(IMAGE_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(candidate):
            stem, ext = name[: -len(candidate)], name[-len(candidate):]
            break
    return (f"{stem}_frame{frame}" if frame is not None else stem), ext


def file_stem(path: str | Path) -> str:
    """The file name without its image extension (``a.nii.gz`` -> ``a``, ``b.PNG`` -> ``b``, ``IM0001`` -> ``IM0001``).

    Frame ``k`` of a multi-frame DICOM file (``clip.dcm#k``) is ``clip_frame<k>``: its outputs are
    named so, and a PNG mask named so pairs with it.
    """
    return _stem_and_extension(path)[0]


def fingerprint(paths: Sequence[str], settings: object = None) -> str:
    """A hash of ``settings`` and of each file's absolute path, size and modification time.

    Caches keyed by it (class weights, data-check reports) go stale as soon as a file changes.
    """
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in sorted(set(map(str, paths))):
        try:
            st = os.stat(split_frame(path)[0])
            h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}|missing\n".encode())
    return h.hexdigest()


def _is_image(path: Path) -> bool:
    """An image file: a known image extension, or DICOM by its marker (PACS exports often have no suffix)."""
    if not path.is_file() or path.name.startswith("."):
        return False
    return path.name.lower().endswith(IMAGE_EXTENSIONS) or is_dicom(path)


def _image_files(folder: Path, frames: bool = False) -> list[Path]:
    """Every image file under ``folder``; with ``frames``, a multi-frame DICOM file gives one ``file#k`` path per frame."""
    files = sorted(p for p in folder.rglob("*") if _is_image(p))
    return [Path(f) for p in files for f in expand_frames(p)] if frames else files


def find_pairs(
    dataset_dir: str | Path, mask_suffix: str = ""
) -> tuple[list[dict[str, str]], list[str], list[str]]:
    """Match ``dataset_dir/images/*`` with ``dataset_dir/masks/*`` by file stem (sub-folders included).

    Args:
        dataset_dir: folder holding ``images/`` and ``masks/``.
        mask_suffix: text that ends every mask stem, e.g. ``"_mask"`` for ``car_01_mask.gif``;
            when empty, a mask stem equal to the image stem, or to it plus ``_mask``, matches.

    Returns:
        ``(pairs, images_without_mask, masks_without_image)``: pairs as ``{"image", "label"}`` dicts
        sorted by image path, and the unpaired files relative to ``dataset_dir``.

    Raises:
        BundleInputError: when a folder is missing or holds no images.
    """
    root = Path(dataset_dir)
    images_dir, masks_dir = root / "images", root / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise BundleInputError(
                f"dataset_dir {str(root)!r} has no '{folder.name}/' folder: put the images in "
                f"'{images_dir}' and the masks in '{masks_dir}', or pass --datalist."
            )
    images = _image_files(images_dir, frames=True)
    if not images:
        raise BundleInputError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {str(images_dir)!r}.")
    masks: dict[str, Path] = {}
    for mask in _image_files(masks_dir):
        rel = mask.relative_to(masks_dir).parent
        stem = file_stem(mask)
        if mask_suffix and stem.endswith(mask_suffix):
            stem = stem[: -len(mask_suffix)]
        elif not mask_suffix and stem.endswith("_mask"):
            masks.setdefault((rel / stem).as_posix(), mask)
            stem = stem[: -len("_mask")]
        masks[(rel / stem).as_posix()] = mask
    pairs, missing, used = [], [], set()
    segs = _SegMasks(masks)
    for image in images:
        key = (image.relative_to(images_dir).parent / file_stem(image)).as_posix()
        if key in masks:
            pairs.append({"image": str(image), "label": str(masks[key])})
            used.add(masks[key])
        elif (found := segs.for_image(image, images_dir)) is not None:
            seg, label = found
            pairs.append({"image": str(image), "label": label})
            used.add(seg)
        else:
            missing.append(image.relative_to(root).as_posix())
    orphans = sorted({m.relative_to(root).as_posix() for m in masks.values() if m not in used})
    return pairs, missing, orphans


class _SegMasks:
    """Finds the DICOM Segmentation that is the mask of a DICOM image without a mask of its stem.

    A Segmentation named like the file (``clip.dcm`` for every frame of ``clip.dcm``), else one
    that references the image's SOPInstanceUID; the label is ``seg#k`` for frame ``k`` of a
    multi-frame image (the reader then takes the SEG frames that reference source frame ``k``).
    """

    def __init__(self, masks: dict[str, Path]) -> None:
        self.masks = masks
        self._by_uid: dict[tuple[str, int | None], Path] | None = None
        self._references: dict[Path, set | None] = {}
        self.any_dicom = any(is_dicom(m) for m in set(masks.values()))

    def references(self, mask: Path) -> set[tuple[str, int | None]] | None:
        """:func:`~monai_unet_bundle.dicom.seg_references` of a mask file, read once per file."""
        if mask not in self._references:
            self._references[mask] = seg_references(mask)
        return self._references[mask]

    def _index(self) -> dict[tuple[str, int | None], Path]:
        """(SOP instance UID, frame or None) -> the Segmentation that references it."""
        if self._by_uid is None:
            self._by_uid = {}
            for mask in sorted(set(self.masks.values())):
                for reference in self.references(mask) or ():
                    self._by_uid.setdefault(reference, mask)
        return self._by_uid

    def for_image(self, image: Path, images_dir: Path) -> tuple[Path, str] | None:
        """``(seg file, label)`` for ``image``, or None."""
        file, frame = split_frame(image)
        if not is_dicom(file):
            return None
        key = (Path(file).relative_to(images_dir).parent / file_stem(file)).as_posix()
        seg = self.masks.get(key)
        if seg is None or self.references(seg) is None:
            uid = sop_instance_uid(file) if self.any_dicom else None
            seg = (self._index().get((uid, frame)) or self._index().get((uid, None))) if uid else None
        if seg is None:
            return None
        return seg, f"{seg}#{frame}" if frame is not None else str(seg)


def _listing(items: Sequence[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def missing_masks_message(images_dir: str | Path, masks_dir: str | Path, missing: Sequence[str], mask_suffix: str) -> str:
    """The sentence for images that have no mask."""
    hint = f" with suffix {mask_suffix!r}" if mask_suffix else " (set --mask_suffix if mask names end in e.g. '_mask')"
    return (
        f"{len(missing)} image(s) in {str(images_dir)!r} have no mask of the same stem{hint} in "
        f"{str(masks_dir)!r}: {_listing(missing)}."
    )


def split_pairs(
    pairs: Sequence[dict[str, str]], val_fraction: float, seed: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Split pairs deterministically into training and validation lists, keeping each group on one side.

    Pairs with the same ``group`` value (a patient; see :func:`assign_groups`) always land on the
    same side; a pair without one is a group of its own.  The groups are shuffled with
    ``random.Random(seed)`` (in the order of their first image), so the same files and seed always
    give the same split; in that order, each group that still fits goes to validation, which holds at
    most ``round(n * val_fraction)`` pairs (but at least one group: the smallest, when none fits).

    Raises:
        BundleInputError: when ``val_fraction`` is outside (0, 1), there are fewer than 2 pairs, or
            all pairs form one group.
    """
    try:
        fraction = float(val_fraction)
    except (TypeError, ValueError):
        fraction = -1.0
    if isinstance(val_fraction, bool) or not 0.0 < fraction < 1.0:
        raise BundleInputError(f"val_fraction must be a number between 0 and 1 (exclusive), e.g. 0.2; got {val_fraction!r}.")
    if len(pairs) < 2:
        raise BundleInputError(
            f"found {len(pairs)} image/mask pair(s) and no validation list, so the validation split would be empty and no "
            f"model could ever be saved: add pairs (at least 2), or give validation pairs with --val_dataset_dir or a datalist."
        )
    groups: dict[str, list[dict[str, str]]] = {}
    for pair in sorted(pairs, key=lambda d: d["image"]):
        groups.setdefault(pair.get("group") or f"\0{pair['image']}", []).append(pair)
    if len(groups) < 2:
        raise BundleInputError(
            f"all {len(pairs)} pairs belong to one group ({_shown_group(next(iter(groups)))}), so a validation split would "
            f"put one patient on both sides: add images of other groups, or give validation pairs with --val_dataset_dir or a datalist."
        )
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    n_val = min(len(pairs) - 1, max(1, round(len(pairs) * fraction)))
    # whole groups, in shuffled order, as long as they fit in the validation share; at least one group
    chosen = [i for i, _ in _fitting(order, n_val)] or [min(range(len(order)), key=lambda i: len(order[i]))]
    validation = [p for i in chosen for p in order[i]]
    return [p for i, group in enumerate(order) if i not in chosen for p in group], validation


def _fitting(groups: Sequence[list], budget: int) -> list[tuple[int, list]]:
    """The groups, in order, that fit into ``budget`` items together (each taken when it still fits)."""
    taken, size = [], 0
    for i, group in enumerate(groups):
        if size + len(group) <= budget:
            taken.append((i, group))
            size += len(group)
    return taken


def _shown_group(group: str) -> str:
    """How a group is named in messages; a DICOM patient or study only as such (its key is a hash of the identifier)."""
    if group.startswith("\0"):
        return f"image {group[1:]}"
    return next((name for prefix, name in DICOM_GROUP_NAMES.items() if group.startswith(prefix)), f"group {group!r}")


def assign_groups(items: Sequence[dict[str, str]], group_pattern: str | None = None) -> list[str]:
    """Give every item without a ``group`` one, in place: from ``group_pattern``, else from DICOM headers.

    * ``group_pattern``: a regular expression searched in the image's file name; its first group
      (or the whole match when it has none) is the group, e.g. ``^(P\\d+)_`` for ``P012_left.png``.
    * DICOM images: a hash of PatientID (else StudyInstanceUID), so that one patient's images stay
      together and the identifier itself appears nowhere (see :func:`~monai_unet_bundle.dicom.dicom_group`).

    A ``group`` given by the datalist wins.  Items that get none stay groups of their own.

    Returns:
        Sentences about file names the pattern does not match (warnings).

    Raises:
        BundleInputError: when ``group_pattern`` is not a valid regular expression.
    """
    pattern = None
    if group_pattern:
        try:
            pattern = re.compile(group_pattern)
        except re.error as exc:
            raise BundleInputError(f"group_pattern {group_pattern!r} is not a valid regular expression ({exc}): pass e.g. --group_pattern '^(P\\d+)_'.") from None
    unmatched: list[str] = []
    for item in items:
        if item.get("group"):
            continue
        if pattern is not None:
            found = pattern.search(Path(split_frame(item["image"])[0]).name)
            if found:
                item["group"] = found.group(1) if pattern.groups else found.group(0)
                continue
            unmatched.append(Path(item["image"]).name)
        if is_dicom(item["image"]):
            try:
                group = dicom_group(item["image"])
            except Exception:  # an unreadable file is reported by the data check
                group = None
            if group:
                item["group"] = group
    for item in items:  # every item has the key (a batch needs the same keys in every item); "" is a group of its own
        item.setdefault("group", "")
    warnings = []
    if unmatched:
        warnings.append(f"group_pattern {group_pattern!r} matches no part of {len(unmatched)} file name(s), which are each a group of their own: {_listing(unmatched)}.")
    return warnings


def group_leaks(lists: dict[str, list[dict[str, str]]]) -> list[str]:
    """One sentence per group that the lists place on more than one side (training, validation, test)."""
    sides: dict[str, dict[str, list[str]]] = {}
    for section, items in lists.items():
        for item in items:
            if item.get("group"):
                sides.setdefault(item["group"], {}).setdefault(section, []).append(item["image"])
    problems = []
    for group, where in sorted(sides.items()):
        if len(where) > 1:
            listing = "; ".join(f"{k}: {_listing(v, 2)}" for k, v in where.items())
            problems.append(
                f"the images of {_shown_group(group)} are on {len(where)} sides ({listing}), which leaks them into the score: put all of them in one list."
            )
    return problems


def _read_csv_datalist(path: Path, require_label: bool = True) -> dict[str, list[dict[str, str]]]:
    """A CSV with an ``image`` column, a ``label`` column and optionally ``split`` (training/validation/test) and ``group``.

    Args:
        path: the CSV file.
        require_label: training lists need a ``label`` for every training and validation row;
            inference lists (``require_label=False``) need only ``image``.  A ``test`` row with an
            empty ``label`` cell has no label.
    """
    if not path.is_file():
        raise BundleInputError(f"datalist {str(path)!r} does not exist: pass the path of a CSV or JSON file.")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BundleInputError(f"datalist {str(path)!r} cannot be read as CSV ({exc}).") from None
    columns = {c.strip().lower() for c in (rows[0] if rows else {}) if c}
    needed = {"image", "label"} if require_label else {"image"}
    if not rows or not needed <= columns:
        what = "'image' and 'label' columns" if require_label else "an 'image' column"
        raise BundleInputError(f"datalist {str(path)!r} needs a header row with {what} (and optionally 'split'), and at least one row.")
    content: dict[str, list[dict[str, str]]] = {"training": []}
    for i, raw in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
        split = (row.get("split") or "training").lower()
        if split not in ("training", "validation", "test"):
            raise BundleInputError(f"datalist {str(path)!r} line {i}: split must be training, validation or test, got {split!r}.")
        if not row.get("image"):
            raise BundleInputError(f"datalist {str(path)!r} line {i}: the 'image' cell is empty; name an image file or delete the line.")
        entry = {"image": row["image"]}
        if row.get("label"):
            entry["label"] = row["label"]
        elif require_label and split != "test":
            raise BundleInputError(f"datalist {str(path)!r} line {i}: the 'label' cell is empty; every {split} row needs a mask file.")
        if row.get("group"):
            entry["group"] = row["group"]
        content.setdefault(split, []).append(entry)
    return content


def _load_datalist(datalist: str | Path, base_dir: Path) -> dict[str, list[dict[str, str]]]:
    path = Path(datalist)
    if not path.is_file():
        raise BundleInputError(f"datalist {str(path)!r} does not exist: pass the path of a JSON or CSV file.")
    if path.suffix.lower() == ".csv":
        content = _read_csv_datalist(path)
    else:
        try:
            content = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleInputError(f"datalist {str(path)!r} is not valid JSON ({exc}).") from None
    if not isinstance(content, dict) or not isinstance(content.get("training"), list):
        raise BundleInputError(f"datalist {str(path)!r} needs a 'training' list of {{'image': ..., 'label': ...}} items.")
    out: dict[str, list[dict[str, str]]] = {}
    for section in ("training", "validation", "test"):
        items = content.get(section)
        if items is None:
            continue
        resolved = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "image" not in item or (section != "test" and "label" not in item):
                raise BundleInputError(
                    f"datalist {str(path)!r}: item {i} of '{section}' needs 'image' and 'label' keys, got {item!r}."
                )
            entry = {}
            for key in ("image", "label"):
                if key in item:
                    file = Path(item[key]) if Path(item[key]).is_absolute() else base_dir / item[key]
                    if not Path(split_frame(file)[0]).is_file():
                        raise BundleInputError(f"datalist {str(path)!r}: '{section}' item {i} names {str(file)!r}, which does not exist.")
                    entry[key] = str(file)
            if item.get("group") not in (None, ""):
                entry["group"] = str(item["group"])
            resolved.append(entry)
        out[section] = resolved
    return out


def _expand_clips(lists: dict[str, list[dict[str, str]]]) -> list[str]:
    """Datalist items naming a multi-frame DICOM file without a frame become one item per frame, in place.

    A clip's label can be a DICOM Segmentation (each frame then takes its own frames of it) or none
    (test items); one mask file for a whole clip is a problem.  Frames given as ``clip.dcm::3`` are
    renamed ``clip.dcm#3``.
    """
    problems = []
    for section, items in lists.items():
        expanded: list[dict[str, str]] = []
        for item in items:
            frames = expand_frames(Path(item["image"]))
            label = item.get("label")
            if len(frames) == 1:
                expanded.append({**item, "image": frame_name(item["image"]), **({"label": frame_name(label)} if label else {})})
            elif not label:
                expanded += [{**item, "image": f} for f in frames]
            elif split_frame(label)[1] is None and seg_references(label) is not None:
                expanded += [{**item, "image": f, "label": f"{label}#{split_frame(f)[1]}"} for f in frames]
            else:
                problems.append(
                    f"datalist '{section}' item {item['image']} is a clip of {len(frames)} frames but its label {label} is one mask: "
                    f"list each frame with its own mask ({Path(item['image']).name}#1, ...), or give a DICOM Segmentation of the clip."
                )
        lists[section] = expanded
    return problems


@dataclass(frozen=True)
class DataSource:
    """Where the training pairs come from: the six data settings as one value.

    Args:
        dataset_dir: folder with ``images/`` and ``masks/``; also the base of relative datalist paths.
        datalist: optional Decathlon-style JSON or ``image,label[,split]`` CSV; when it has no
            validation list, its training list is split with ``val_fraction``.
        val_fraction: share of pairs held out for validation when no validation list is given.
        seed: seed of the split.
        mask_suffix: see :func:`find_pairs`.
        val_dataset_dir: a separate folder with ``images/`` and ``masks/`` for validation; then
            ``dataset_dir`` is used for training only and nothing is split.
        group_pattern: a regular expression searched in each image's file name whose first group
            names the image's group (e.g. a patient id); see :func:`assign_groups`.
        num_folds: with K set, the training (and a datalist's validation) pairs are pooled instead
            of split, and the data check deals them into K folds (:mod:`monai_unet_bundle.folds`).
        fold: the fold validated on, ``0 .. num_folds - 1``.
    """

    dataset_dir: str | Path
    datalist: str | Path | None = None
    val_fraction: float = 0.2
    seed: int = 0
    mask_suffix: str = ""
    val_dataset_dir: str | Path | None = None
    group_pattern: str | None = None
    num_folds: int | None = None
    fold: int = 0


def discover_datalists(source: DataSource) -> tuple[dict[str, list[dict[str, str]]], list[str], list[str]]:
    """Build the ``training``/``validation`` (and optional ``test``) lists, collecting every problem.

    Args:
        source: where the pairs come from.

    Returns:
        ``(lists, problems, warnings)``: problems block training (missing folders or masks, an
        empty validation split); warnings do not (masks without an image).
    """
    dataset_dir, datalist, val_dataset_dir = source.dataset_dir, source.datalist, source.val_dataset_dir
    mask_suffix = source.mask_suffix
    problems: list[str] = []
    warnings: list[str] = []
    base = Path(dataset_dir)
    lists: dict[str, list[dict[str, str]]] = {"training": [], "validation": []}
    if datalist:
        try:
            lists = _load_datalist(datalist, base)
        except BundleInputError as exc:
            problems.append(str(exc))
            return lists, problems, warnings
        problems += _expand_clips(lists)
    elif not base.is_dir():
        problems.append(f"dataset_dir {str(base)!r} does not exist: pass --dataset_dir with a folder holding images/ and masks/.")
        return lists, problems, warnings
    else:
        for key, folder in (("training", base), ("validation", val_dataset_dir)):
            if not folder:
                continue
            if not Path(folder).is_dir():
                problems.append(f"val_dataset_dir {str(folder)!r} does not exist: pass a folder holding images/ and masks/.")
                continue
            try:
                pairs, missing, orphans = find_pairs(folder, mask_suffix)
            except BundleInputError as exc:
                problems.append(str(exc))
                continue
            if missing:
                problems.append(missing_masks_message(Path(folder) / "images", Path(folder) / "masks", missing, mask_suffix))
            by_mask: dict[str, list[str]] = {}
            for pair in pairs:
                by_mask.setdefault(pair["label"], []).append(pair["image"])
            for mask, images in sorted(by_mask.items()):
                if len(images) > 1:
                    problems.append(
                        f"images {', '.join(images)} share one stem, so all would pair with mask {mask} (and could fall on "
                        f"both sides of the split): rename or remove all but one."
                    )
            if orphans:
                warnings.append(f"{len(orphans)} mask(s) in {str(Path(folder) / 'masks')!r} have no image and are ignored: {_listing(orphans)}.")
            lists[key] = pairs
    try:
        warnings += assign_groups([d for section in lists.values() for d in section], source.group_pattern)
    except BundleInputError as exc:
        problems.append(str(exc))
    if source.num_folds is not None:
        if val_dataset_dir:
            problems.append("num_folds deals the pairs of dataset_dir into folds, so val_dataset_dir has no use: remove one of them.")
        # pooled: the data check deals them into folds once it has read the masks (class presence balances the folds)
        lists["training"], lists["validation"] = lists.get("training", []) + lists.get("validation", []), []
        problems += group_leaks(lists)  # the pool against a test list
        return lists, problems, warnings
    problems += group_leaks(lists)
    if not lists.get("validation"):
        try:
            lists["training"], lists["validation"] = split_pairs(lists["training"], source.val_fraction, source.seed)
        except BundleInputError as exc:
            problems.append(str(exc))
            lists["validation"] = []
    return lists, problems, warnings


def build_datalists(source: DataSource) -> dict[str, list[dict[str, str]]]:
    """The lists of :func:`discover_datalists`, refusing them when there is any problem.

    Raises:
        BundleInputError: holding every problem, one sentence per line.
    """
    lists, problems, _ = discover_datalists(source)
    if problems:
        raise BundleInputError("\n".join(problems))
    logger.info("data: %d training, %d validation pairs", len(lists["training"]), len(lists["validation"]))
    return lists


def evaluation_items(lists: dict[str, list[dict[str, str]]], held_out: bool = False, models: int = 1) -> list[dict[str, str]]:
    """The pairs evaluation scores: the labelled ``test`` items, else the ``validation`` pairs.

    With ``held_out`` (a cross-validation fold: see :mod:`monai_unet_bundle.folds`), the validation
    pairs are scored whatever the test list holds: they are the fold's out-of-fold pairs.

    A test list usually names images without masks; those cannot be scored, so they are left
    out with a warning (``configs/inference.json --input_files <datalist>`` predicts them).  When
    no test item has a label, the validation pairs are evaluated instead, and the log says so.

    Args:
        lists: the checked datalists (``training``, ``validation`` and optionally ``test``).
        held_out: score a cross-validation fold's held-out pairs.
        models: how many models are scored together (a fold ensemble, see :mod:`monai_unet_bundle.ensemble`):
            more than one are scored on labelled test pairs only, since every fold but one trained on
            any training or validation pair.

    Raises:
        BundleInputError: when there is nothing with a label to evaluate, or an ensemble has no labelled test pairs.
    """
    test = [] if held_out else lists.get("test") or []
    labelled = [d for d in test if d.get("label")]
    if models > 1 and not labelled:
        raise BundleInputError(
            f"an ensemble of {models} models can only be scored on labelled test pairs (each fold model trained on the "
            f"pairs the others held out), and there are none{' under --num_folds' if held_out else ''}: add test pairs "
            f"with masks (--datalist with a 'test' list or split whose entries have a label), or score each fold on its own "
            f"with --num_folds and --fold."
        )
    unlabelled = len(test) - len(labelled)
    if labelled:
        if unlabelled:
            logger.warning(
                "evaluation: %d of the %d test items have no 'label' and are left out; the %d labelled ones are scored "
                "(predict the others with configs/inference.json --input_files <datalist>)", unlabelled, len(test), len(labelled),
            )
        else:
            logger.info("evaluation: scoring the %d test pairs", len(labelled))
        return labelled
    validation = lists.get("validation") or []
    if not validation:
        raise BundleInputError("there is nothing to evaluate: the datalist has no labelled test items and no validation pairs.")
    if held_out:
        logger.info("evaluation: scoring the %d held-out pairs of this fold", len(validation))
    elif test:
        logger.warning(
            "evaluation: none of the %d test items has a 'label', so the %d validation pairs are scored instead "
            "(predict the test images with configs/inference.json --input_files <datalist>)", len(test), len(validation),
        )
    else:
        logger.info("evaluation: no test list, scoring the %d validation pairs", len(validation))
    return validation


def _readable(path: Path) -> tuple[str | None, str]:
    """Return ``(why path cannot be read as a 2D image or None, its mode)``, e.g. ``(None, "RGB")``."""
    try:
        (height, width), mode = inspect_image(str(path))
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            import nibabel

            nibabel.load(str(path)).get_fdata(dtype="float32")  # a truncated .nii.gz fails here, not mid-run
    except Exception as exc:  # any decoder failure means the file is skipped, with the reason kept
        return unreadable_reason(path, exc), ""
    if min(height, width) < 2:
        return f"the image is {height}x{width} pixels (height x width); a mask needs at least 2x2", ""
    return None, mode


@dataclass
class InputScan:
    """The images found for inference and the files skipped, with the reason for each.

    Each item is ``{"image": path, "output_name": name}``: ``name`` is the path of the image's
    outputs relative to ``output_dir``, without extension (its sub-folder under ``input_dir`` and
    its stem; see :func:`output_names`).
    """

    items: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    input_dir: str = ""

    @property
    def output_names(self) -> dict[str, str]:
        """Image path -> its output name (relative to ``output_dir``, no extension)."""
        return {item["image"]: item["output_name"] for item in self.items}


def output_names(paths: Sequence[str | Path], input_dir: str | Path | None = None) -> dict[str, str]:
    """A distinct output name for every input image: its sub-folder under ``input_dir`` and its stem.

    Two inputs whose names would clash (``a.png`` and ``a.jpg`` in one folder, or equal stems from
    different folders named by ``input_files``; compared without regard to case, as on Windows and
    macOS file systems) never overwrite each other's outputs: the first keeps the plain name, the
    next ones get their extension appended (``a_jpg``) and, if that is taken too, a number.

    Args:
        paths: the input image paths, in processing order.
        input_dir: the folder the images were found in; images outside it are named by stem only.

    Returns:
        ``{str(path): "sub/stem"}`` (POSIX separators, no extension).
    """
    root = Path(input_dir).resolve() if input_dir else None
    taken: set[str] = set()
    names: dict[str, str] = {}
    for path in paths:
        src = Path(path)
        parent = Path()
        if root is not None:
            try:
                parent = src.resolve().parent.relative_to(root)
            except ValueError:
                parent = Path()
        stem, ext = _stem_and_extension(src)
        ext = ext.lstrip(".").replace(".", "_").lower()
        candidates = [stem, f"{stem}_{ext}"] + [f"{stem}_{ext}_{i}" for i in range(2, len(paths) + 2)]
        for candidate in candidates:
            name = (parent / candidate).as_posix()
            if name.lower() not in taken:
                break
        if candidate != stem:
            logger.warning("%s: its outputs are named %r, since another input already has the name %r", src, name, (parent / stem).as_posix())
        taken.add(name.lower())
        names[str(path)] = name
    return names


def _list_file_names(list_file: Path) -> list[str]:
    """The image names in an inference list file: a CSV with an ``image`` column, or a JSON datalist.

    A CSV with a ``split`` column contributes its ``test`` rows when it has any, else every row.  A
    JSON file may be a Decathlon-style datalist (its ``test`` list, else ``training`` and
    ``validation``) or a plain list of paths or ``{"image": ...}`` items.
    """
    if not list_file.is_file():
        raise BundleInputError(f"input_files {str(list_file)!r} does not exist: pass an existing CSV or JSON list, or image paths.")
    if list_file.suffix.lower() == ".csv":
        lists = _read_csv_datalist(list_file, require_label=False)
    else:
        try:
            lists = json.loads(list_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleInputError(f"input_files {str(list_file)!r} is not a readable JSON datalist ({exc}).") from None
    if isinstance(lists, dict):
        section = lists.get("test") or [d for k in ("training", "validation") for d in (lists.get(k) or [])]
        if not lists.get("test"):
            logger.info("input_files %s has no 'test' list: predicting its training and validation images", list_file)
    else:
        section = lists
    names = []
    for i, item in enumerate(section if isinstance(section, list) else [None]):
        name = item.get("image") if isinstance(item, dict) else item
        if not isinstance(name, str) or not name.strip():
            raise BundleInputError(
                f"input_files {str(list_file)!r}: item {i} is {item!r}; each item must be an image path or an "
                f"{{'image': path}} object (a JSON list, or a datalist with a 'test' list)."
            )
        names.append(name.strip())
    return names


def _files_from(input_files: str | Sequence[str], base: Path) -> list[Path]:
    """The image paths named by ``input_files``: image paths, or a CSV/JSON list file (see :func:`_list_file_names`).

    A relative path is looked up under ``base`` (``input_dir``), then (for a list file) beside the
    list file, then in the current directory; the first place where it exists is used.  A
    multi-frame DICOM file stands for its frames (``clip.dcm#1`` ...), and a frame named as
    ``clip.dcm::3`` (how monai.bundle passes ``#``) is returned as ``clip.dcm#3``.
    """
    if isinstance(input_files, (str, Path)) and str(input_files).lower().endswith((".json", ".csv")):
        list_file = Path(input_files)
        bases = [base, list_file.parent, Path.cwd()]
        names = _list_file_names(list_file)
    else:
        bases = [base, Path.cwd()]
        names = [str(input_files)] if isinstance(input_files, (str, Path)) else [str(n) for n in input_files]
    paths: list[Path] = []
    seen: set[tuple[Path, int | None]] = set()
    for name in names:
        candidates = [Path(name)] if Path(name).is_absolute() else [b / name for b in bases]
        path = next((c for c in candidates if Path(split_frame(c)[0]).exists()), candidates[0])
        for image in expand_frames(path):  # a multi-frame file named without a frame stands for all its frames
            file, frame = split_frame(image)
            if (Path(file).resolve(), frame) not in seen:  # a file or frame named twice (also within its clip) is predicted once
                seen.add((Path(file).resolve(), frame))
                paths.append(Path(frame_name(image)))
    return paths


def scan_inputs(
    input_dir: str | Path,
    output_dir: str | Path | None = None,
    input_files: str | Sequence[str] | None = None,
    in_channels: int | None = None,
) -> InputScan:
    """Find every readable image for inference: all of ``input_dir``, or the given ``input_files``.

    Args:
        input_dir: folder searched (sub-folders too); also the base of relative ``input_files``.
        output_dir: where results go; files under it are never taken as inputs.
        input_files: a list of image paths, one path, or a JSON/CSV datalist whose ``test`` list
            (else every ``image``) is used.
        in_channels: the network's input channels; when given, one log line says which images
            are converted to it and how.

    Unreadable or missing files are logged with the reason and skipped so the rest can be written.

    Raises:
        BundleInputError: when the folder is missing, no readable image is found, or
            ``output_dir`` equals ``input_dir`` (writing masks there could overwrite the inputs).
    """
    folder = Path(input_dir)
    if input_files is None and folder.is_file():
        raise BundleInputError(f"input_dir {str(folder)!r} is a file: pass --input_dir with its folder, or --input_files {str(folder)!r}.")
    if input_files is None and not folder.is_dir():
        raise BundleInputError(f"input_dir {str(folder)!r} does not exist: pass --input_dir with a folder of images.")
    if isinstance(input_files, (str, Path)) and Path(input_files).is_dir():
        raise BundleInputError(f"input_files {str(input_files)!r} is a folder: pass --input_dir {str(input_files)!r} instead.")
    if output_dir is not None and folder.is_dir() and Path(output_dir).resolve() == folder.resolve():
        raise BundleInputError(
            f"output_dir {str(output_dir)!r} is the same folder as input_dir: choose another --output_dir so no input is overwritten."
        )
    out = Path(output_dir).resolve() if output_dir is not None else None
    # earlier predictions written into a sub-folder of input_dir are not inputs
    exclude = out if out is not None and folder.is_dir() and folder.resolve() in out.parents else None
    candidates = _image_files(folder, frames=True) if input_files is None else _files_from(input_files, folder)
    scan = InputScan(input_dir=str(folder) if input_files is None else "")
    readable: list[Path] = []
    reported: set[tuple[str, str]] = set()
    modes: Counter[str] = Counter()
    for path in candidates:
        if exclude is not None and exclude in path.resolve().parents:
            continue
        file = split_frame(path)[0]
        reason, mode = ("file not found", "") if not Path(file).is_file() else _readable(path)
        if reason is None:
            readable.append(path)
            modes[mode] += 1
        elif (file, reason) not in reported:  # a damaged clip is reported once, not once per frame
            reported.add((file, reason))
            scan.skipped.append({"file": str(path), "reason": reason})
            logger.warning("skipping unreadable file %s (%s)", path, reason)
    if not readable:
        if input_files is None:
            found = f" (first of {len(scan.skipped)} unreadable: {scan.skipped[0]['file']}: {scan.skipped[0]['reason']})" if scan.skipped else ""
            raise BundleInputError(
                f"no readable image ({', '.join(IMAGE_EXTENSIONS)}) found in input_dir {str(folder)!r}{found}: pass a folder of images."
            )
        if not scan.skipped:
            raise BundleInputError(f"input_files {input_files!r} names no image: pass image paths, or a CSV or JSON list of them.")
        first = scan.skipped[0]
        raise BundleInputError(
            f"none of the {len(scan.skipped)} file(s) named by input_files {input_files!r} can be read "
            f"(first: {first['file']}: {first['reason']}); relative paths are looked up under input_dir, beside a list file, "
            f"then in the current directory."
        )
    names = output_names(readable, folder if folder.is_dir() else None)
    scan.items = [{"image": str(p), "output_name": names[str(p)]} for p in readable]
    note = channel_conversion_note(modes, in_channels) if in_channels in (1, 3) else None
    if note:
        logger.warning("inference: %s", note)
    logger.info("inference: %d image(s) to process, %d skipped", len(scan.items), len(scan.skipped))
    return scan


def list_images(input_dir: str | Path, output_dir: str | Path | None = None) -> list[dict[str, str]]:
    """The readable images under ``input_dir`` as ``[{"image": path}]`` (see :func:`scan_inputs`)."""
    return scan_inputs(input_dir, output_dir).items
