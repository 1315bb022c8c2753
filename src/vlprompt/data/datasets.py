"""``get_dataset``: turn a name (+ data root) into validated :class:`DatasetSplits`.

Readers follow CoOp's loaders so that items, labels and order match the reference: split files for
most sets, class folders + ``classnames.txt`` for ImageNet and its variants, and FGVC's own
``images_variant_*.txt`` files for FGVCAircraft.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vlprompt.data.custom import load_custom, parse_custom_name
from vlprompt.data.demo import ensure_demo
from vlprompt.data.images import drop_unreadable, is_image_file
from vlprompt.data.registry import DatasetSpec, canonical_name, generate_dataset, get_spec
from vlprompt.data.splits import DatasetSplits, Datum, drop_missing, read_split, validate_classes
from vlprompt.errors import VlpromptError

log = logging.getLogger(__name__)

DATA_ENV = "VLPROMPT_DATA"


# How the images inside an ImageNet(-variant) class folder are listed.  "sorted" (default): by name,
# the same on every machine.  "os": in os.listdir order, as the reference toolkit lists them
# (Dassl's listdir_nohidden(sort=False)); that order depends on the filesystem and on how the folder
# was written, so it reproduces the reference's few-shot picks only on the same copy of the data.
LISTINGS = ("sorted", "os")


def _listdir(path: str, listing: str = "sorted") -> list[str]:
    names = [n for n in os.listdir(path) if not n.startswith(".")]
    return names if listing == "os" else sorted(names)


def check_listing(listing: str) -> str:
    """``listing`` validated (one-line error naming the choices)."""
    if listing not in LISTINGS:
        raise VlpromptError(f"unknown listing '{listing}'; use one of {', '.join(LISTINGS)}")
    return listing


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The folder holding all data sets (CoOp's ``$DATA``): ``root``, else ``$VLPROMPT_DATA``."""
    if root is None:
        root = os.environ.get(DATA_ENV)
        if not root:
            raise VlpromptError(f"no data root given; pass root=... (--root DIR) or set {DATA_ENV}")
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise VlpromptError(f"data root not found: {path}; pass the folder that holds the data set folders")
    return path


def dataset_dir(spec: DatasetSpec, root: Path) -> Path:
    """``root/<folder>``; ``root`` itself is accepted when it already is the data set's folder."""
    cand = root / spec.folder
    if cand.is_dir():
        return cand
    if root.name == spec.folder or (spec.split_file and (root / spec.split_file).is_file()):
        return root
    raise VlpromptError(f"{spec.title} folder not found: {cand}; " + spec.howto.format(root=root))


def image_dir(spec: DatasetSpec, ddir: Path) -> Path:
    """The first existing candidate image folder (the first candidate when none exists yet)."""
    for rel in spec.image_dirs:
        if (ddir / rel).is_dir():
            return ddir / rel
    return ddir / spec.image_dirs[0]


def _require_dir(path: Path, spec: DatasetSpec, root: Path) -> None:
    if not path.is_dir():
        raise VlpromptError(f"{spec.title} image folder not found: {path}; " + spec.howto.format(root=root))


def read_classnames_txt(path: Path) -> dict[str, str]:
    """ImageNet's ``classnames.txt``: ``wnid class name`` per line, in label order."""
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(" ", 1)
        if len(parts) != 2 or not parts[1].strip():
            raise VlpromptError(f"{path} line {n}: expected 'wnid class name', got {line!r}; fix that line")
        out[parts[0]] = parts[1].strip()
    return out


def _find_classnames(spec: DatasetSpec, ddir: Path, root: Path) -> dict[str, str]:
    for cand in (ddir / "classnames.txt", root / "imagenet" / "classnames.txt"):
        if cand.is_file():
            names = read_classnames_txt(cand)
            if len(names) != 1000:
                raise VlpromptError(
                    f"{cand} has {len(names)} classes, ImageNet has 1000; use CoOp's classnames.txt"
                )
            return names
    raise VlpromptError(
        f"classnames.txt not found in {ddir} or {root / 'imagenet'}; " + spec.howto.format(root=root)
    )


def _read_class_folders(
    folder: Path, wnids: list[str], names: dict[str, str], listing: str = "sorted"
) -> list[Datum]:
    items = []
    for label, wnid in enumerate(wnids):
        sub = folder / wnid
        for f in _listdir(str(sub), listing) if sub.is_dir() else []:
            if is_image_file(f):
                items.append(Datum(str(sub / f), label, names[wnid], f"{wnid}/{f}"))
    return items


def _imagenet(
    spec: DatasetSpec, ddir: Path, root: Path, listing: str = "sorted"
) -> tuple[list, list, list, list[str]]:
    names = _find_classnames(spec, ddir, root)
    img = image_dir(spec, ddir)
    splits = []
    for part in ("train", "val"):
        folder = img / part
        _require_dir(folder, spec, root)
        wnids = [w for w in _listdir(str(folder)) if (folder / w).is_dir()]
        unknown = [w for w in wnids if w not in names]
        if unknown or len(wnids) != 1000:
            raise VlpromptError(
                f"{folder} must hold the 1000 wnid folders of classnames.txt (found {len(wnids)}, unknown: "
                f"{unknown[:3]}); " + spec.howto.format(root=root)
            )
        splits.append(_read_class_folders(folder, wnids, names, listing))  # class folders: always sorted
    train, test = splits
    classnames = [names[w] for w in sorted(names)]
    # CoOp: ImageNet's val set is its test set
    return train, test, test, classnames


def _imagenet_variant(
    spec: DatasetSpec, ddir: Path, root: Path, listing: str = "sorted"
) -> tuple[list, list, list, list[str]]:
    names = _find_classnames(spec, ddir, root)
    img = image_dir(spec, ddir)
    _require_dir(img, spec, root)
    if spec.name == "imagenetv2":
        wnids = list(names)  # folder i holds class i of classnames.txt
        items = []
        for label, wnid in enumerate(wnids):
            sub = img / str(label)
            for f in _listdir(str(sub), listing) if sub.is_dir() else []:
                if is_image_file(f):
                    items.append(Datum(str(sub / f), label, names[wnid], f"{label}/{f}"))
        classnames = [names[w] for w in wnids]
    else:
        wnids = [w for w in _listdir(str(img)) if w.startswith("n") and (img / w).is_dir()]
        unknown = [w for w in wnids if w not in names]
        if unknown:
            raise VlpromptError(
                f"{img}: folders {unknown[:3]} are not ImageNet wnids; " + spec.howto.format(root=root)
            )
        items = _read_class_folders(img, wnids, names, listing)
        classnames = [names[w] for w in wnids]
    if len(classnames) != spec.num_classes:
        raise VlpromptError(
            f"{img} has {len(classnames)} classes but {spec.title} has {spec.num_classes}; "
            + spec.howto.format(root=root)
        )
    return [], [], items, classnames


def _aircraft(spec: DatasetSpec, ddir: Path, root: Path) -> tuple[list, list, list, list[str]]:
    img = image_dir(spec, ddir)
    variants = ddir / "variants.txt"
    if not variants.is_file():
        raise VlpromptError(f"{variants} not found; " + spec.howto.format(root=root))
    classnames = [ln.strip() for ln in variants.read_text(encoding="utf-8").splitlines() if ln.strip()]
    cname2lab = {c: i for i, c in enumerate(classnames)}
    rows = {}
    for part in ("train", "val", "test"):
        path = ddir / f"images_variant_{part}.txt"
        if not path.is_file():
            raise VlpromptError(f"{path} not found; " + spec.howto.format(root=root))
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            imname, _, cname = line.strip().partition(" ")
            if cname not in cname2lab:
                raise VlpromptError(
                    f"{path} line {n}: variant '{cname}' is not in {variants}; use the FGVC files"
                )
            out.append((imname + ".jpg", cname2lab[cname], cname))
        rows[part] = out
    names = validate_classes(rows, f"{ddir}", num_classes=spec.num_classes, title=spec.title)
    train, val, test = (
        [Datum(str(img / r), y, names[y], r) for r, y, _ in rows[p]] for p in ("train", "val", "test")
    )
    return train, val, test, names


def read_items(
    spec: DatasetSpec,
    ddir: Path,
    base: Path,
    *,
    check_files: bool = True,
    skip_bad: bool = False,
    listing: str = "sorted",
) -> tuple[list[Datum], list[Datum], list[Datum], list[str]]:
    """Items and class names of a built-in data set found at ``ddir`` (``check_files`` tests existence).

    ``listing`` orders the images of ImageNet-style class folders (see :data:`LISTINGS`); split-file
    and FGVC data sets follow their files' order whatever it is.
    """
    check_listing(listing)
    img = image_dir(spec, ddir)
    if spec.kind in ("split", "demo", "world"):
        split_path = ddir / spec.split_file
        if not split_path.is_file():
            raise VlpromptError(f"split file not found: {split_path}; " + spec.howto.format(root=base))
        if check_files:
            _require_dir(img, spec, base)
        return read_split(
            split_path,
            img,
            check_files=check_files,
            skip_bad=skip_bad,
            num_classes=spec.num_classes,
            classnames=spec.classnames,
            renames=spec.renames,
            title=spec.title,
        )
    reader = {"imagenet": _imagenet, "imagenet_variant": _imagenet_variant, "aircraft": _aircraft}[spec.kind]
    if spec.kind == "aircraft":
        train, val, test, classnames = reader(spec, ddir, base)
    else:
        train, val, test, classnames = reader(spec, ddir, base, listing)
    if spec.kind == "aircraft" and check_files:
        train, val, test = (
            drop_missing(x, skip_bad, f"{ddir} ({p})")
            for x, p in zip((train, val, test), ("train", "val", "test"))
        )
    return train, val, test, classnames


def get_dataset(
    name: str, root: str | os.PathLike | None = None, skip_bad: bool = False, listing: str = "sorted"
) -> DatasetSplits:
    """Load a data set by name, validated, with class names ordered by label.

    ``name`` is one of ``list_datasets()`` (CoOp spellings such as ``Caltech101`` work too), ``demo``
    (no root needed), ``folder:PATH`` / ``csv:PATH`` (see :mod:`vlprompt.data.custom`), or ``custom``
    with ``root`` pointing at the folder or CSV. ``root`` is the folder holding the data set folders
    (CoOp's ``$DATA``; default ``$VLPROMPT_DATA``). Missing files raise a one-line
    :class:`VlpromptError`; ``skip_bad=True`` instead drops missing *and undecodable* images (the latter
    needs a decode pass over every image) and logs how many.  ``listing="os"`` lists the images of
    ImageNet(-variant) class folders in ``os.listdir`` order, as the reference toolkit does, so its
    ImageNet few-shot picks are reproduced on the same copy of the data (filesystem-dependent).
    """
    check_listing(listing)
    if name == "custom":
        if root is None:
            raise VlpromptError("data set 'custom' needs root=PATH (a class-folder tree or a CSV file)")
        path = Path(root).expanduser().resolve()
        name = f"{'csv' if path.suffix.lower() == '.csv' else 'folder'}:{path}"
    custom = parse_custom_name(name)
    if custom is not None:
        splits = load_custom(*custom, skip_bad=skip_bad)
    else:
        spec = get_spec(canonical_name(name))
        if spec.kind in ("demo", "world"):
            ddir = ensure_demo() if spec.kind == "demo" else generate_dataset(spec.name)
            base = ddir
        else:
            base = resolve_root(root)
            ddir = dataset_dir(spec, base)
        img = image_dir(spec, ddir)
        train, val, test, classnames = read_items(
            spec, ddir, base, check_files=True, skip_bad=skip_bad, listing=listing
        )
        splits = DatasetSplits(
            name=spec.name,
            root=str(base),
            train=train,
            val=val,
            test=test,
            classnames=classnames,
            template=spec.template,
            image_dir=str(img),
            extra={"fewshot_val": spec.fewshot_val},
        )
    if skip_bad:
        same_val_test = splits.val is splits.test
        train = drop_unreadable(splits.train, f"{splits.name} train")
        val = drop_unreadable(splits.val, f"{splits.name} val")
        test = val if same_val_test else drop_unreadable(splits.test, f"{splits.name} test")
        emptied = sorted({d.label for d in splits.train} - {d.label for d in train})
        if emptied and custom is not None:  # a user's class with no training image left is no class
            names = ", ".join(repr(splits.classnames[i]) for i in emptied[:3])
            raise VlpromptError(
                f"--skip-bad dropped every training image of class {names}"
                f"{f' and {len(emptied) - 3} more' if len(emptied) > 3 else ''} in {splits.name}; fix those "
                "images or remove the class"
            )
        splits = splits.with_(train=train, val=val, test=test)
    return splits
