"""Synthetic radiographs of the 24 anatomy classes, with landmark masks: the embedded default data set.

Every film is a projection of simple 3-D shapes of bone and soft tissue (``shapes``,
``anatomy``) seen through the view of its class (``views``), with foreign
bodies that carry no label (``clutter``), developed with exposure, blur, noise and
collimation (``film``); ``--bias marker`` adds a class-specific lead letter to the train
and val films (``marker``). A landmark mask is the set of pixels where that structure has
non-zero thickness after pose and collimation.

The tree written by :func:`generate` is an ImageFolder with masks beside the images::

    DIR/dataset.json
    DIR/{train,val,test}/<class>/<id>.png
    DIR/{train,val,test}/<class>/<id>.landmarks/<landmark>.png
    DIR/{train,val,test}/<class>/<id>.landmarks/discriminative/<landmark>.png
    DIR/landmark_sets.json      {"all": {class: [landmark, ...]}, "discriminative": {...}}
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from xraydeconv.data.classes import CLASS_NAMES
from xraydeconv.data.landmarks import ALL_SET, LANDMARK_SETS_FILE
from xraydeconv.data.phantoms.anatomy import REGIONS, arm, leg, pelvis_bones
from xraydeconv.data.phantoms.clutter import add_clutter
from xraydeconv.data.phantoms.film import develop, sample_field
from xraydeconv.data.phantoms.marker import draw_marker
from xraydeconv.data.phantoms.shapes import Canvas, Pose
from xraydeconv.data.phantoms.views import VIEWS, landmark_names, set_keys
from xraydeconv.errors import UserError
from xraydeconv.io import building_folder

FORMAT = "xraydeconv-phantoms"
VERSION = 1


def _generator_id() -> str:
    """Fingerprint of the generator's source: a cached tree drawn by other code is regenerated, not reused."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


GENERATOR = _generator_id()
SPLITS = ("train", "val", "test")
BIASES = ("marker",)
BIASED_SPLITS = ("train", "val")  # the shortcut is planted here; the test split stays clean
MIN_SIZE, MAX_SIZE = 32, 2048

__all__ = ["BIASES", "CLASS_LANDMARKS", "LANDMARK_SETS", "SET_LANDMARKS", "default_cache_dir", "ensure_phantoms",
           "generate", "render_landmark_sets", "render_phantom", "split_counts"]

CLASS_LANDMARKS: dict[str, list[str]] = {name: landmark_names(VIEWS[name]) for name in CLASS_NAMES}
# "all": every named structure of a view (the masks beside each film); "discriminative": only those that tell
# the class apart from the classes it resembles (in <id>.landmarks/discriminative/)
LANDMARK_SETS: tuple[str, ...] = (ALL_SET, "discriminative")
SET_LANDMARKS: dict[str, dict[str, list[str]]] = {
    s: {name: landmark_names(VIEWS[name], s) for name in CLASS_NAMES} for s in LANDMARK_SETS
}


def _draw(canvas: Canvas, region: str, rng: np.random.Generator) -> None:
    name, _, side = region.partition(":")
    if name == "arm":
        arm(canvas, rng, int(side))
    elif name == "leg":
        leg(canvas, rng, int(side))
    elif name == "pelvis" and side:
        pelvis_bones(canvas, rng, sides=(int(side),))
    else:
        REGIONS[name](canvas, rng)


def render_phantom(class_name: str, rng: np.random.Generator, size: int = 256, *,
                   bias: str | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render one synthetic radiograph of ``class_name`` in memory.

    Returns ``(image, masks)``: ``image`` float32 (size, size) in [0, 1], bright where the beam was
    attenuated; ``masks`` maps each landmark of the class visible in this film to a bool
    (size, size) array (landmarks cut off by pose or collimation are left out). With
    ``bias="marker"`` the class's lead marker is drawn too and its mask is returned as ``"marker"``.
    All randomness (anatomy, pose, laterality, foreign bodies, exposure, noise, collimation) comes
    from ``rng``. :func:`render_landmark_sets` draws the same film with the masks of every landmark set.
    """
    image, sets = render_landmark_sets(class_name, rng, size, bias=bias)
    return image, sets[ALL_SET]


def _compose(key_masks: dict[str, np.ndarray], keys: dict[str, str], inside: np.ndarray) -> dict[str, np.ndarray]:
    """Landmark name -> the union of its structures' masks inside the field, for names drawn in this film."""
    out: dict[str, np.ndarray] = {}
    for key, name in keys.items():
        if key in key_masks:
            out[name] = out[name] | key_masks[key] if name in out else key_masks[key].copy()
    masks = {name: out[name] & inside for name in dict.fromkeys(keys.values()) if name in out}
    return {name: m for name, m in masks.items() if m.any()}


def render_landmark_sets(class_name: str, rng: np.random.Generator, size: int = 256, *,
                         bias: str | None = None) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
    """Render one film like :func:`render_phantom` (same ``rng`` draws, same pixels and same "all" masks).

    Returns ``(image, sets)``: ``sets`` maps each name of ``LANDMARK_SETS`` to that set's masks of the film,
    bool (size, size) per visible landmark; the marker (``bias="marker"``) is in the ``"all"`` set only.
    """
    if class_name not in VIEWS:
        raise UserError(f"class {class_name!r}: not one of the 24 phantom classes")
    if bias not in (None, *BIASES):
        raise UserError(f"bias {bias!r}: expected one of {', '.join(BIASES)} or none")
    view = VIEWS[class_name]
    wanted = CLASS_LANDMARKS[class_name]
    keys = {k: k for s in LANDMARK_SETS for k in set_keys(view, s)}  # the canvas keeps one mask per structure key
    for attempt in range(4):  # re-pose (rarely) when a landmark of the class falls outside the film
        pose = Pose(size, scale=view.zoom * float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))),
                    angle=view.angle + rng.uniform(-1.5, 1.5) * view.spin,
                    tx=rng.uniform(-0.14, 0.14), ty=rng.uniform(-0.14, 0.14), ox=view.origin[0], oy=view.origin[1])
        canvas = Canvas(pose, keep=keys)
        for region in view.draw:
            _draw(canvas, region, rng)
        field = sample_field(rng, size)
        inside = np.zeros((size, size), bool)
        inside[field[1]:field[3], field[0]:field[2]] = True
        masks = _compose(canvas.masks, view.landmarks, inside)
        if len(masks) == len(wanted) or attempt == 3:
            break
    sets = {s: masks if s == ALL_SET else _compose(canvas.masks, set_keys(view, s), inside) for s in LANDMARK_SETS}
    att = canvas.att
    add_clutter(att, rng)
    if rng.random() < 0.5:  # laterality: a left-sided film is the mirror image of a right-sided one
        att = att[:, ::-1]
        sets = {s: {name: m[:, ::-1] for name, m in ms.items()} for s, ms in sets.items()}
        field = (size - field[2], field[1], size - field[0], field[3])
    lead = None
    if bias == "marker":
        lead, sets[ALL_SET]["marker"] = draw_marker(size, CLASS_NAMES.index(class_name), field, rng)
    image = develop(np.ascontiguousarray(att), rng, field, bone=view.bone, opaque=lead)
    return image, {s: {name: np.ascontiguousarray(m) for name, m in ms.items()} for s, ms in sets.items()}


# ---------------------------------------------------------------------------------------------
# the tree on disk
# ---------------------------------------------------------------------------------------------
def split_counts(per_class: int, val_per_class: int | None = None, test_per_class: int | None = None,
                 splits: Iterable[str] = SPLITS) -> dict[str, int]:
    """Images per class in each split: ``per_class`` for train, N//5 (at least 2) for val and test by default."""
    default = max(2, per_class // 5)
    counts = {"train": per_class, "val": default if val_per_class is None else val_per_class,
              "test": default if test_per_class is None else test_per_class}
    for name, n in counts.items():
        if n < 0:
            raise UserError(f"{name} images per class: must be >= 0, got {n}")
    wanted = tuple(splits)
    for name in wanted:
        if name not in SPLITS:
            raise UserError(f"split {name!r}: expected one of {', '.join(SPLITS)}")
    return {name: (n if name in wanted else 0) for name, n in counts.items()}


def _manifest(counts: dict[str, int], size: int, seed: int, bias: str | None) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "generator": GENERATOR,
        "classes": list(CLASS_NAMES),
        "landmarks": {name: list(CLASS_LANDMARKS[name]) for name in CLASS_NAMES},
        "size": size,
        "seed": seed,
        "per_class": counts,
        "bias": bias,
    }


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array, mode="L").save(path, format="PNG", compress_level=3)


def _write_one(task: tuple[str, int, int], root: Path, size: int, seed: int, bias: str | None) -> int:
    split, label, index = task
    class_name = CLASS_NAMES[label]
    # one independent stream per image: the tree does not depend on the number of workers or their order
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), label, index]))
    image, sets = render_landmark_sets(class_name, rng, size, bias=bias if split in BIASED_SPLITS else None)
    folder = root / split / class_name
    stem = f"{index:06d}"
    _save_png(np.round(image * 255.0).astype(np.uint8), folder / f"{stem}.png")
    for landmark_set, masks in sets.items():
        # the "all" masks lie in <id>.landmarks/ itself, another set's in a folder of that name inside it
        lm_dir = folder / f"{stem}.landmarks"
        lm_dir = lm_dir if landmark_set == ALL_SET else lm_dir / landmark_set
        if masks:
            lm_dir.mkdir(parents=True, exist_ok=True)
        for name, mask in masks.items():
            _save_png(mask.astype(np.uint8) * 255, lm_dir / f"{name}.png")
    return 1


def _check_args(size: int, bias: str | None, seed: int = 0) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed: must be an integer >= 0, got {seed!r}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"size: must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")
    if bias not in (None, *BIASES):
        raise UserError(f"bias {bias!r}: expected one of {', '.join(BIASES)} or none")


def generate(out_dir: str | os.PathLike, per_class: int = 200, size: int = 256, seed: int = 0,
             bias: str | None = None, splits: Sequence[str] = SPLITS, *, val_per_class: int | None = None,
             test_per_class: int | None = None, workers: int | None = None, force: bool = False,
             progress: bool = True) -> Path:
    """Write a phantom data set to ``out_dir`` and return its path.

    ``per_class`` training images per class; val and test get ``val_per_class`` / ``test_per_class``
    (default ``max(2, per_class // 5)``). The same arguments give byte-identical files whatever
    ``workers`` is. The tree is built in a temporary folder beside ``out_dir`` and renamed into place,
    so a crash never leaves a half-written data set; an existing non-empty ``out_dir`` is an error
    unless ``force`` (then it is replaced).
    """
    _check_args(size, bias, seed)
    counts = split_counts(per_class, val_per_class, test_per_class, splits)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: folder exists and is not empty (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with building_folder(out, overwrite=force) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the data set is as shareable as any new folder
        _render_all(tmp, out.name, counts, size, seed, bias, workers, progress)
        (tmp / "dataset.json").write_text(json.dumps(_manifest(counts, size, seed, bias), indent=2) + "\n")
        (tmp / LANDMARK_SETS_FILE).write_text(json.dumps(SET_LANDMARKS, indent=2) + "\n")
        if out.is_dir() and not force and any(out.iterdir()):
            raise UserError(f"{out}: another process filled this folder while the phantoms were generated")
    return out


def _render_all(root: Path, name: str, counts: dict[str, int], size: int, seed: int, bias: str | None,
                workers: int | None, progress: bool) -> None:
    """Render every film of ``counts`` into ``root``, on ``workers`` processes."""
    tasks = []
    for split in SPLITS:
        for label, class_name in enumerate(CLASS_NAMES):
            if counts[split]:
                (root / split / class_name).mkdir(parents=True)
            tasks += [(split, label, i) for i in range(counts[split])]
    work = partial(_write_one, root=root, size=size, seed=seed, bias=bias)
    workers = min(os.cpu_count() or 1, 8) if workers is None else max(1, workers)
    from tqdm import tqdm

    with tqdm(total=len(tasks), desc=f"phantoms -> {name}", unit="img", disable=not progress) as bar:
        if workers == 1 or len(tasks) < 64:
            for task in tasks:
                bar.update(work(task))
        else:
            with _pool_context().Pool(workers) as pool:
                for done in pool.imap_unordered(work, tasks, chunksize=16):
                    bar.update(done)


def _pool_context():
    """The start method of the rendering workers. Not "fork": the caller may run threads (torch's, a background
    batch loader, a test runner's), and a child forked while one of them holds a lock can wait on it forever; a
    forkserver forks from a clean single-threaded server that has imported this module once."""
    if os.name == "nt":
        return get_context("spawn")
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _read_manifest(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def default_cache_dir(per_class: int, size: int, seed: int, bias: str | None) -> Path:
    """``$XRAYDECONV_CACHE`` (or ``~/.cache/xraydeconv``) / ``phantoms-<size>-<n>-<seed>[-<bias>]``."""
    root = Path(os.environ.get("XRAYDECONV_CACHE") or Path.home() / ".cache" / "xraydeconv").expanduser()
    return root / (f"phantoms-{size}-{per_class}-{seed}" + (f"-{bias}" if bias else ""))


def ensure_phantoms(out_dir: str | os.PathLike | None = None, per_class: int = 200, size: int = 256, seed: int = 0,
                    bias: str | None = None, splits: Sequence[str] = SPLITS, **kwargs) -> Path:
    """Return a phantom tree made with these arguments, generating it only when none exists yet.

    An existing tree is reused when its ``dataset.json`` equals the one these arguments would write;
    a different tree in the same place is regenerated. ``out_dir`` defaults to :func:`default_cache_dir`.
    Other keyword arguments go to :func:`generate`.
    """
    _check_args(size, bias, seed)
    out = Path(out_dir).expanduser() if out_dir is not None else default_cache_dir(per_class, size, seed, bias)
    counts = split_counts(per_class, kwargs.get("val_per_class"), kwargs.get("test_per_class"), splits)
    out.parent.mkdir(parents=True, exist_ok=True)
    # several processes (torchrun ranks, parallel test workers) may ask for the same tree at once:
    # the first builds it under the lock, the others wait and then reuse it
    with _exclusive(out.parent):
        if out.is_dir() and any(out.iterdir()):
            existing = _read_manifest(out / "dataset.json")
            if existing == _manifest(counts, size, seed, bias):
                return out
            if existing is None or existing.get("format") != FORMAT:
                raise UserError(f"{out}: exists and is not a phantom data set; refusing to replace it")
            kwargs["force"] = True  # a phantom tree made with other arguments: regenerate it
        return generate(out, per_class, size, seed, bias, splits, **kwargs)


@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """An advisory inter-process lock held on ``folder`` itself, so no lock file is left behind.

    A no-op where ``fcntl`` does not exist (Windows): concurrent first runs may then both generate.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
