"""Personalization benchmarks as datasets: subjects, class nouns, photo paths, evaluation prompts.

:func:`load_dreambooth_dataset` (the DreamBooth benchmark of Ruiz et al., CVPR 2023),
:func:`load_customconcept101_dataset` (CustomConcept101 of Kumari et al., CVPR 2023),
:func:`load_benchmark_dataset`, which detects which of the two a folder is, and
:func:`toy_dataset`, the toy model's novel subjects rendered as a benchmark. They load no pixels.
"""

from __future__ import annotations

import ast
import csv
import json
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from hollownet.errors import HollownetError
from hollownet.photos import PhotoWarning, StrPath, list_photos, load_photos, one_line, warn_from_caller
from hollownet.settings import DEFAULT_IDENTIFIER
from hollownet.toy import world as W

__all__ = [
    "LIVE_CLASSES",
    "DEFAULT_IDENTIFIER",
    "DatasetError",
    "DatasetWarning",
    "BenchmarkSubject",
    "BenchmarkDataset",
    "DreamBoothDataset",
    "CustomConcept101Dataset",
    "load_dreambooth_dataset",
    "load_customconcept101_dataset",
    "load_benchmark_dataset",
    "toy_dataset",
    "load_dataset",
]

#: Class nouns of "live" subjects. The DreamBooth benchmark evaluates its dogs and cats with
#: the live-subject prompt list (outfits, hats, ...) and everything else with the object list.
LIVE_CLASSES: frozenset[str] = frozenset({"dog", "cat"})


class DatasetError(HollownetError):
    """A benchmark folder cannot be read; the message says which and how to fix it."""


class DatasetWarning(UserWarning):
    """Something about a benchmark folder was tolerated (a subject skipped, ...)."""


def _warn(message: str, category: type[Warning]) -> None:
    warn_from_caller(message, category, __file__)



@dataclass(frozen=True)
class BenchmarkSubject:
    """One subject (concept) of a personalization benchmark.

    ``prompts`` are the evaluation prompts with the identifier and class noun filled in
    (``"a sks dog in the jungle"``). ``instance_prompt`` is the training prompt for the
    subject's photos (``"a photo of sks dog"``) and ``class_prompt`` the matching prompt
    without the identifier, for prior-preservation images (``"a photo of dog"``).
    """

    name: str
    class_noun: str
    is_live: bool
    photo_paths: tuple[Path, ...]
    prompts: tuple[str, ...]
    identifier: str
    instance_prompt: str
    class_prompt: str

    @property
    def folder(self) -> Path:
        """The folder that holds the subject's photos."""
        return self.photo_paths[0].parent

    def load_photos(self, resolution: int) -> tuple[torch.Tensor, list[str]]:
        """The subject's photos as :func:`load_photos` returns them."""
        return load_photos(self.folder, resolution)


@dataclass(frozen=True)
class BenchmarkDataset(Sequence[BenchmarkSubject]):
    """The subjects of a benchmark folder, in the benchmark's own order.

    Index by position or by subject name (``dataset["dog"]``); ``missing`` names the subjects
    the benchmark lists but whose photos are not in this copy.
    """

    layout: ClassVar[str] = "benchmark"

    root: Path
    subjects: tuple[BenchmarkSubject, ...]
    identifier: str = DEFAULT_IDENTIFIER
    missing: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.subjects)

    def __iter__(self) -> Iterator[BenchmarkSubject]:
        return iter(self.subjects)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            for subject in self.subjects:
                if subject.name == key:
                    return subject
            raise KeyError(f"no subject {key!r} in {self.root} (have: {', '.join(self.names)})")
        return self.subjects[key]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            return key in self.names
        return key in self.subjects

    @property
    def names(self) -> list[str]:
        return [subject.name for subject in self.subjects]


@dataclass(frozen=True)
class DreamBoothDataset(BenchmarkDataset):
    """The DreamBooth benchmark (``prompts_and_classes.txt`` plus one folder per subject).

    ``object_prompt_templates`` / ``live_prompt_templates`` keep the raw ``{0} {1}`` templates
    (identifier, class noun) and ``classes`` maps every listed subject, present or not, to its
    class noun.
    """

    layout: ClassVar[str] = "dreambooth"

    object_prompt_templates: tuple[str, ...] = ()
    live_prompt_templates: tuple[str, ...] = ()
    classes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CustomConcept101Dataset(BenchmarkDataset):
    """The CustomConcept101 benchmark (``dataset.json`` plus ``prompts/`` and photo folders)."""

    layout: ClassVar[str] = "customconcept101"


DREAMBOOTH_FILE = "prompts_and_classes.txt"
CUSTOMCONCEPT101_FILE = "dataset.json"

_DB_SECTIONS = {
    "classes": "classes",
    "prompts": "prompts",
    "object prompts": "object",
    "live subject prompts": "live",
    "live prompts": "live",
}


def _training_prompts(identifier: str, class_noun: str) -> tuple[str, str]:
    return f"a photo of {identifier} {class_noun}", f"a photo of {class_noun}"


def _is_live(class_noun: str) -> bool:
    return class_noun.strip().lower() in LIVE_CLASSES


def _parse_dreambooth_file(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """(subject -> class, object templates, live templates) from ``prompts_and_classes.txt``."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"Cannot read {path}: {one_line(exc)}.") from None
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    literal = re.compile(r"""^\s*(?P<lit>(?P<q>['"]).*?(?P=q))\s*(\.format\b.*)?,?\s*$""")
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        header = line.rstrip(":").strip().lower()
        if header in _DB_SECTIONS:
            section = _DB_SECTIONS[header]
            continue
        if section == "classes":
            row = next(csv.reader([line]))
            if len(row) != 2:
                continue
            subject, noun = row[0].strip(), row[1].strip()
            if not subject or (subject.lower(), noun.lower()) == ("subject_name", "class"):
                continue
            classes[subject] = noun
        elif section in lists:
            if line.startswith(("prompt_list", "]", "[")):
                continue
            match = literal.match(line)
            if match:
                try:
                    template = ast.literal_eval(match["lit"])
                except (ValueError, SyntaxError):
                    template = match["lit"][1:-1]
            else:
                template = line.rstrip(",")
            if "{0}" in template and "{1}" in template:
                lists[section].append(template)
    what = (
        "'Classes' list of subject_name,class lines" if not classes
        else "'Object Prompts' list" if not lists["object"]
        else "'Live Subject Prompts' list" if not lists["live"]
        else None
    )
    if what:
        raise DatasetError(
            f"{path} has no {what}; is it the DreamBooth benchmark's prompts_and_classes.txt?"
        )
    return classes, lists["object"], lists["live"]


def _fill_dreambooth(template: str, identifier: str, class_noun: str, path: Path) -> str:
    try:
        return template.format(identifier, class_noun)
    except (IndexError, KeyError, ValueError) as exc:
        raise DatasetError(
            f"Bad prompt template {template!r} in {path}: {one_line(exc)}; templates may only "
            f"use {{0}} (identifier) and {{1}} (class noun)."
        ) from None


def _subject_photos(folder: Path) -> list[Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhotoWarning)  # stray files in a benchmark folder
        return list_photos(folder)


def _check_root(root: StrPath, index_name: str | None = None) -> Path:
    """The benchmark folder; ``root`` may also be the path of its ``index_name`` file."""
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"Benchmark folder not found: {path}. Check the path.")
    if path.is_file() and index_name is not None and path.name == index_name:
        return path.parent
    if not path.is_dir():
        raise DatasetError(f"Not a folder: {path}. Pass the benchmark's root folder.")
    return path


def load_dreambooth_dataset(
    root: StrPath, *, identifier: str = DEFAULT_IDENTIFIER
) -> DreamBoothDataset:
    """Read a DreamBooth benchmark folder: ``prompts_and_classes.txt`` and subject folders.

    ``prompts_and_classes.txt`` is the benchmark's own file: a ``Classes`` header, then
    ``subject_name,class`` CSV lines for its 30 subjects, then ``Object Prompts`` and
    ``Live Subject Prompts``, each 25 Python lines like
    ``'a {0} {1} in the jungle'.format(unique_token, class_token),``. Each subject's photos
    are the image files in ``root/<subject_name>/``.

    Subjects whose folder is absent (or holds no photos) are skipped with one
    :class:`DatasetWarning` and listed in ``missing``; folders not listed in the file are
    ignored with a warning. Live subjects (class ``dog`` or ``cat``, :data:`LIVE_CLASSES`) get
    the live-subject prompts, the others the object prompts, formatted with ``identifier``
    and the class noun: ``"a sks dog in the jungle"``. Unreadable or malformed files raise
    :class:`DatasetError`.
    """
    base = _check_root(root, DREAMBOOTH_FILE)
    prompts_file = base / DREAMBOOTH_FILE
    if not prompts_file.is_file():
        raise DatasetError(
            f"{base} is not a DreamBooth benchmark folder: {DREAMBOOTH_FILE} is missing. "
            f"Point at the folder that holds it and the subject folders."
        )
    classes, object_templates, live_templates = _parse_dreambooth_file(prompts_file)
    subjects: list[BenchmarkSubject] = []
    missing: list[str] = []
    for name, noun in classes.items():
        folder = base / name
        photos = _subject_photos(folder) if folder.is_dir() else []
        if not photos:
            missing.append(name)
            continue
        live = _is_live(noun)
        templates = live_templates if live else object_templates
        instance_prompt, class_prompt = _training_prompts(identifier, noun)
        subjects.append(
            BenchmarkSubject(
                name=name,
                class_noun=noun,
                is_live=live,
                photo_paths=tuple(photos),
                prompts=tuple(
                    _fill_dreambooth(template, identifier, noun, prompts_file)
                    for template in templates
                ),
                identifier=identifier,
                instance_prompt=instance_prompt,
                class_prompt=class_prompt,
            )
        )
    if missing:
        _warn(
            f"DreamBooth benchmark at {base}: skipping {len(missing)} of {len(classes)} subjects "
            f"with no photo folder: {', '.join(missing)}.",
            DatasetWarning,
        )
    _warn_unlisted(base, classes)
    if not subjects:
        raise DatasetError(
            f"No subject of {DREAMBOOTH_FILE} has photos in {base}: each subject needs a "
            f"folder named like it (e.g. {base / next(iter(classes))}) holding its photos."
        )
    return DreamBoothDataset(
        root=base,
        subjects=tuple(subjects),
        identifier=identifier,
        missing=tuple(missing),
        object_prompt_templates=tuple(object_templates),
        live_prompt_templates=tuple(live_templates),
        classes=dict(classes),
    )


def _warn_unlisted(base: Path, classes: dict[str, str]) -> None:
    """One :class:`DatasetWarning` naming the folders of ``base`` that ``prompts_and_classes.txt`` does not list."""
    unlisted = sorted(
        p.name for p in base.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in classes
    )
    if unlisted:
        _warn(
            f"DreamBooth benchmark at {base}: ignoring folders not listed in {DREAMBOOTH_FILE}: "
            f"{', '.join(unlisted)}.",
            DatasetWarning,
        )


def _resolve(base: Path, relative: str, fallbacks: Sequence[Path]) -> Path | None:
    """``relative`` (as written in dataset.json) under ``base``, else the first existing fallback."""
    for candidate in (base / relative, *fallbacks):
        if candidate.exists():
            return candidate
    return None


def _fill_customconcept(template: str, identifier: str, class_noun: str) -> str | None:
    """CustomConcept101 templates have one ``{}`` for the whole concept phrase ("sks dog")."""
    if "<new1>" in template and "{" not in template:
        return template.replace("<new1>", identifier)
    try:
        return template.format(f"{identifier} {class_noun}")
    except (IndexError, KeyError, ValueError):
        return None  # e.g. a multi-concept template with {0} and {1}


def _customconcept_index(base: Path) -> tuple[Path, list]:
    """``dataset.json``'s path and its list of entries."""
    index = base / CUSTOMCONCEPT101_FILE
    if not index.is_file():
        raise DatasetError(
            f"{base} is not a CustomConcept101 folder: {CUSTOMCONCEPT101_FILE} is missing. "
            f"Point at the folder that holds dataset.json and prompts/."
        )
    try:
        entries = json.loads(index.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"Cannot parse {index}: {one_line(exc)}. Is it valid JSON?") from None
    if isinstance(entries, dict):  # tolerate {"concepts": [...]}-style wrappers
        lists = [v for v in entries.values() if isinstance(v, list)]
        entries = lists[0] if len(lists) == 1 else None
    if not isinstance(entries, list):
        raise DatasetError(f"{index} must hold a JSON list of concept objects.")
    return index, entries


def _customconcept_subject(base: Path, number: int, entry, identifier: str) -> BenchmarkSubject | tuple[str, str]:
    """Entry ``number`` of ``dataset.json`` as a subject, or ``(who, why)`` it is skipped."""
    if not isinstance(entry, dict):
        return (f"entry {number}", "multi-concept or not an object")
    data_dir = str(entry.get("instance_data_dir") or "").strip()
    if not data_dir:
        return (f"entry {number}", "no instance_data_dir")
    name = Path(data_dir).name
    folder = _resolve(base, data_dir, [base / "benchmark_dataset" / name, base / name])
    photos = _subject_photos(folder) if folder is not None and folder.is_dir() else []
    if not photos:
        return (name, "no photos")
    instance_template = str(entry.get("instance_prompt") or "")
    noun = str(entry.get("class_prompt") or "").strip()
    if not noun and "<new1>" in instance_template:
        noun = instance_template.split("<new1>", 1)[1].strip()
    if not noun:
        return (name, "no class_prompt")
    prompt_name = str(entry.get("prompt_filename") or "").strip()
    prompt_file = (
        _resolve(base, prompt_name, [base / "prompts" / Path(prompt_name).name])
        if prompt_name else None
    )
    if prompt_file is None or not prompt_file.is_file():
        return (name, f"no prompt file {prompt_name or '-'}")
    try:
        lines = prompt_file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"Cannot read {prompt_file}: {one_line(exc)}.") from None
    prompts = [
        filled for line in lines if line.strip()
        if (filled := _fill_customconcept(line.strip(), identifier, noun)) is not None
    ]
    if not prompts:
        return (name, f"no usable prompt in {prompt_file.name}")
    if "<new1>" in instance_template:
        instance_prompt = instance_template.replace("<new1>", identifier)
        class_prompt = f"a photo of {noun}"
    else:
        instance_prompt, class_prompt = _training_prompts(identifier, noun)
    return BenchmarkSubject(
        name=name,
        class_noun=noun,
        is_live=_is_live(noun) or name.startswith("pet_"),
        photo_paths=tuple(photos),
        prompts=tuple(prompts),
        identifier=identifier,
        instance_prompt=instance_prompt,
        class_prompt=class_prompt,
    )


def load_customconcept101_dataset(
    root: StrPath, *, identifier: str = DEFAULT_IDENTIFIER
) -> CustomConcept101Dataset:
    """Read a CustomConcept101 benchmark folder (Kumari et al., "Multi-Concept Customization
    of Text-to-Image Diffusion", CVPR 2023; github.com/adobe-research/custom-diffusion).

    Layout (the repository's ``customconcept101/`` folder with the downloaded
    ``benchmark_dataset/`` unzipped into it)::

        root/dataset.json          # list of concepts, see below
        root/prompts/<name>.txt    # one prompt per line, "{}" stands for the concept
        root/benchmark_dataset/<concept>/*.jpg

    ``dataset.json`` is a JSON list of objects such as::

        {"instance_prompt": "photo of a <new1> dog", "class_prompt": "dog",
         "instance_data_dir": "./benchmark_dataset/pet_dog1",
         "class_data_dir": "./regularization/pet_dog", "prompt_filename": "prompts/dog.txt"}

    Tolerances: paths are relative to ``root``; a missing ``instance_data_dir`` is also
    looked up as ``root/benchmark_dataset/<basename>`` and ``root/<basename>``, a missing
    ``prompt_filename`` as ``root/prompts/<basename>``. Without ``class_prompt`` the class noun
    is what follows ``<new1>`` in ``instance_prompt``. Entries whose photos or prompt file are
    absent, that lack ``instance_data_dir``, or that are multi-concept (a list rather than an
    object, as in ``dataset_multiconcept.json``) are skipped with one :class:`DatasetWarning`.
    Prompt lines are formatted with ``"<identifier> <class noun>"`` ("Photo of a sks dog.");
    lines that do not take one ``{}`` are dropped. The subject name is the photo folder's name;
    it is live if the class noun is in :data:`LIVE_CLASSES` or the folder starts with ``pet_``.
    """
    base = _check_root(root, CUSTOMCONCEPT101_FILE)
    index, entries = _customconcept_index(base)
    subjects: list[BenchmarkSubject] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for number, entry in enumerate(entries):
        subject = _customconcept_subject(base, number, entry, identifier)
        if isinstance(subject, tuple):
            skipped.append(subject)
        elif subject.name in seen:
            skipped.append((subject.name, "listed twice"))
        else:
            seen.add(subject.name)
            subjects.append(subject)
    if skipped:
        _warn(
            f"CustomConcept101 benchmark at {base}: skipping {len(skipped)} of {len(entries)} "
            f"entries: {'; '.join(f'{who} ({why})' for who, why in skipped)}.",
            DatasetWarning,
        )
    if not subjects:
        raise DatasetError(
            f"No concept of {index} has both photos and prompts under {base}: unzip "
            f"benchmark_dataset.zip there and keep the prompts/ folder next to dataset.json."
        )
    return CustomConcept101Dataset(
        root=base,
        subjects=tuple(subjects),
        identifier=identifier,
        missing=tuple(who for who, _ in skipped),
    )


def load_benchmark_dataset(
    root: StrPath, *, identifier: str = DEFAULT_IDENTIFIER
) -> BenchmarkDataset:
    """Load a DreamBooth or CustomConcept101 benchmark folder, whichever ``root`` is.

    DreamBooth if it holds ``prompts_and_classes.txt``, CustomConcept101 if it holds
    ``dataset.json`` (also accepted: the path of either file). Anything else raises
    :class:`DatasetError`.
    """
    path = Path(root).expanduser()
    if path.is_file() and path.name == DREAMBOOTH_FILE:
        return load_dreambooth_dataset(path, identifier=identifier)
    if path.is_file() and path.name == CUSTOMCONCEPT101_FILE:
        return load_customconcept101_dataset(path, identifier=identifier)
    path = _check_root(path)
    if (path / DREAMBOOTH_FILE).is_file():
        return load_dreambooth_dataset(path, identifier=identifier)
    if (path / CUSTOMCONCEPT101_FILE).is_file():
        return load_customconcept101_dataset(path, identifier=identifier)
    raise DatasetError(
        f"{path} is not a benchmark folder: expected {DREAMBOOTH_FILE} (DreamBooth) or "
        f"{CUSTOMCONCEPT101_FILE} (CustomConcept101) in it."
    )



def toy_dataset(root: Path, identifier: str = DEFAULT_IDENTIFIER, photos: int = 5,
                names: list[str] | None = None) -> BenchmarkDataset:
    """The toy model's novel subjects (``--dataset toy``): rendered into ``root/<name>/NN.png`` once, evaluated on
    the backgrounds their photos never showed."""
    subjects = []
    for name in names or list(W.SUBJECTS):
        folder = root / name
        paths = [folder / f"{i:02d}.png" for i in range(photos)]
        if not all(p.exists() for p in paths):
            folder.mkdir(parents=True, exist_ok=True)
            for p, img in zip(paths, W.subject_photos(name, photos)):
                img.save(p)
        subjects.append(BenchmarkSubject(
            name=name, class_noun="shape", is_live=False, photo_paths=tuple(paths),
            prompts=tuple(W.evaluation_prompts(identifier)), identifier=identifier,
            instance_prompt=f"a {identifier} shape", class_prompt="a shape"))
    return BenchmarkDataset(root=root, subjects=tuple(subjects), identifier=identifier)


def load_dataset(name: str | StrPath, output: Path, identifier: str = DEFAULT_IDENTIFIER) -> BenchmarkDataset:
    """``hollownet bench --dataset``: ``toy`` (rendered under ``output/toy-subjects``), else a benchmark folder."""
    if str(name) == "toy":
        return toy_dataset(output / "toy-subjects", identifier=identifier)
    return load_benchmark_dataset(name, identifier=identifier)
