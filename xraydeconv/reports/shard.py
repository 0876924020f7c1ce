"""Projecting an archive: the work cut into chunks, shared among ``torchrun`` processes, resumable.

The films of a run are cut into chunks of whole batches (``--chunk`` films, rounded up to a multiple of
``--batch-size``), so every batch holds exactly the images it holds in a one-process run and the maps are the
same bit for bit. The chunks still to do are dealt out round-robin: rank ``r`` of ``w`` takes every ``w``-th,
from ``r``. Folder names are given to every film up front, in the run's order, so they do not depend on who
projects what.

The run is built in ``.<out>.partial`` beside ``--out`` (rank 0 creates it and holds the output lock; every rank
writes its own films into it). A chunk is finished when its record ``.chunks/<k>.json`` (the gallery rows of its
films) exists: the record is written last, atomically, after the chunk's folders and map-store part. When every
rank is done, rank 0 reads the records in order, writes the gallery (and the map store's index) and renames the
folder into place. A run that is killed or fails keeps the partial folder when it holds a finished chunk (nothing
else looks finished: there is no ``--out``); ``--resume`` continues it, skipping the finished chunks, and gives
the output an uninterrupted run gives.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from xraydeconv.errors import UserError, error_message
from xraydeconv.io import (
    building_folder,
    move_into_place,
    output_lock,
    remove_stale_builds,
    strict_json,
    write_json,
)
from xraydeconv.reports.gallery import write_gallery
from xraydeconv.reports.mapstore import STORE_DIR, PartWriter, write_index
from xraydeconv.reports.pipeline import (
    FilmKeep,
    ImageSource,
    Net,
    ProjectSettings,
    batch_ranges,
    prefetched_batches,
    printable_name,
    project_batch,
    unique_folder,
)
from xraydeconv.training import distributed
from xraydeconv.training.distributed import DistInfo

__all__ = ["ArchiveOptions", "DEFAULT_CHUNK", "parse_pictures", "picture_films", "chunk_ranges", "partial_folder",
           "run_chunk", "archive_build", "shared_building_folder", "project_archive"]

DEFAULT_CHUNK = 64
DEFAULT_PAGE = 1000  # gallery cards per page
RECORDS = ".chunks"
RUN_FILE = ".run.json"
MAPS_CHOICES = ("folders", "store", "none")
FILM_MAPS = {"folders": "folder", "store": "store", "none": "none"}  # --maps -> FilmKeep.maps


@dataclass(frozen=True)
class ArchiveOptions:
    """What a run keeps and how it is cut: ``pictures`` ``"all"``, ``"none"`` or a number of films spread evenly
    over the run; ``maps`` one of :data:`MAPS_CHOICES`; ``chunk`` films per unit of work; ``resume`` continues the
    interrupted run of the same options; ``page`` cards per gallery page."""

    pictures: str = "all"
    maps: str = "folders"
    chunk: int = DEFAULT_CHUNK
    resume: bool = False
    page: int = DEFAULT_PAGE

    def check(self) -> ArchiveOptions:
        """These options with ``pictures`` normalised; UserError naming the bad option."""
        if self.maps not in MAPS_CHOICES:
            raise UserError(f"--maps {self.maps}: not one of {', '.join(MAPS_CHOICES)}")
        for flag, value in (("--chunk", self.chunk), ("--page-size", self.page)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{flag} {value}: must be at least 1")
        return ArchiveOptions(parse_pictures(self.pictures), self.maps, self.chunk, self.resume, self.page)


def parse_pictures(value: str) -> str:
    """``--pictures``: ``all``, ``none`` or a positive number of films; UserError otherwise."""
    value = str(value).strip().lower()
    if value in ("all", "none"):
        return value
    if value.isdigit() and int(value) >= 1:
        return str(int(value))
    raise UserError(f"--pictures {value}: use all, none or a number of films (at least 1)")


def picture_films(n: int, pictures: str) -> frozenset[int]:
    """The films (positions in the run) that get pictures: all, none, or ``k`` spread evenly (the first included)."""
    if pictures == "all":
        return frozenset(range(n))
    if pictures == "none":
        return frozenset()
    k = min(int(pictures), n)
    return frozenset(j * n // k for j in range(k))


def chunk_ranges(n: int, batch_size: int, chunk: int) -> list[range]:
    """The chunks of a run of ``n`` films: ``chunk`` films rounded up to whole batches, the last one shorter."""
    return batch_ranges(range(n), -(-chunk // batch_size) * batch_size)


def partial_folder(out: Path) -> Path:
    """Where the run into ``out`` is built: ``.<name>.partial`` beside it."""
    out = Path(out)
    return out.absolute().parent / f".{out.name}.partial"


# --- the build folder ------------------------------------------------------------------------------------------


def _finished(tmp: Path) -> set[int]:
    return {int(p.stem) for p in (tmp / RECORDS).glob("*.json") if p.stem.isdigit()}


def _open_partial(out: Path, overwrite: bool, resume: bool, key: dict) -> tuple[Path, set[int]]:
    """The partial folder of this run (new, or the interrupted one when resuming) and its finished chunks."""
    remove_stale_builds(out)
    tmp = partial_folder(out)
    if tmp.exists() and not resume:
        if not overwrite:
            raise UserError(f"{out}: an interrupted run left its finished films in {tmp}; pass --resume to continue "
                            "it, or --overwrite to start afresh")
        shutil.rmtree(tmp)
    if tmp.exists():
        try:
            old = json.loads((tmp / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UserError(f"--resume: {tmp} holds no readable {RUN_FILE}; use --overwrite to start afresh") from None
        changed = [k for k in key if old.get(k) != key[k]]
        if changed:
            raise UserError(f"--resume: the interrupted run in {tmp} had other {', '.join(changed)}; give the same "
                            "checkpoint, images and options, or --overwrite to start afresh")
        return tmp, _finished(tmp)
    try:
        tmp.mkdir()
        (tmp / RECORDS).mkdir()
    except OSError as exc:
        raise UserError(f"{out}: cannot create the output beside it: {exc.strerror or exc}") from None
    write_json(key, tmp / RUN_FILE)
    return tmp, set()


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    move_into_place(tmp, out, overwrite)
    shutil.rmtree(out / RECORDS, ignore_errors=True)
    (out / RUN_FILE).unlink(missing_ok=True)


def _told_by_rank0(info: DistInfo) -> dict:
    """What rank 0 gathered about the build folder; a rank it told of an error exits with status 2."""
    told = distributed.all_gather_objects(None, info)[0]
    if told.get("error"):
        raise SystemExit(2)
    return told


@contextmanager
def archive_build(out: Path, overwrite: bool, resume: bool, key: dict, info: DistInfo
                  ) -> Iterator[tuple[Path, set[int]]]:
    """``(partial folder, finished chunks)`` for the block; on success rank 0 moves the folder into ``out``.

    Rank 0 holds the output lock for the block and tells the other ranks the folder (or that it failed: they
    then exit with status 2 and leave the message to rank 0). On failure the partial folder is kept when it holds
    a finished chunk (for ``--resume``), else removed.
    """
    key = json.loads(json.dumps(strict_json(key)))
    if not info.is_main:
        told = _told_by_rank0(info)
        yield Path(told["tmp"]), set(told["done"])
        return
    with output_lock(out):
        try:
            tmp, done = _open_partial(out, overwrite, resume, key)
        except (UserError, OSError) as exc:  # told to the other ranks, so none waits for a folder
            distributed.all_gather_objects({"error": error_message(exc)}, info)
            raise
        distributed.all_gather_objects({"tmp": str(tmp), "done": sorted(done)}, info)
        try:
            yield tmp, done
            _move_into_place(tmp, out, overwrite)
        except BaseException as exc:
            kept = _finished(tmp)
            if not kept:
                shutil.rmtree(tmp, ignore_errors=True)
            elif isinstance(exc, UserError):
                raise UserError(f"{exc} ({len(kept)} finished chunks kept in {tmp.name}: fix it and pass "
                                "--resume)") from None
            raise


@contextmanager
def shared_building_folder(out: Path, overwrite: bool, info: DistInfo) -> Iterator[Path]:
    """:func:`~xraydeconv.io.building_folder` shared by the processes of a job: rank 0 creates it (holding the
    output lock) and tells the other ranks where it is, or that it failed (they then exit with status 2 and leave the
    message to rank 0). Rank 0 moves it into ``out`` when its block succeeds, so the other ranks must have written
    their files before rank 0's block ends (a collective after their last write); on failure it is removed."""
    if not info.is_main:
        yield Path(_told_by_rank0(info)["tmp"])
        return
    opened = False
    try:
        with building_folder(out, overwrite) as tmp:
            opened = True
            distributed.all_gather_objects({"tmp": str(tmp)}, info)
            yield tmp
    except UserError as exc:
        if not opened:
            distributed.all_gather_objects({"error": str(exc)}, info)
        raise


# --- the run ---------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything a rank needs to project its chunks."""

    source: ImageSource
    net: Net
    compare: Sequence[Net]
    settings: ProjectSettings
    device: torch.device
    options: ArchiveOptions
    folders: list[str]
    pictured: frozenset[int]


def run_chunk(run: _Run, tmp: Path, c: int, films: range, bar) -> None:
    """Project the films of chunk ``c`` into ``tmp``; its record is written last."""
    for i in films:  # folders a killed run left half-written
        if (tmp / run.folders[i]).exists():
            shutil.rmtree(tmp / run.folders[i])
    part = PartWriter(tmp / STORE_DIR, c, len(films)) if run.options.maps == "store" else None
    rows, bs, maps = [], run.settings.batch_size, FILM_MAPS[run.options.maps]
    try:
        for idx, x in prefetched_batches(run.source, batch_ranges(films, bs)):
            for j, p, fields, film, masks, extra in project_batch(run.source, idx, x, run.net, run.settings,
                                                                  run.device, run.compare, run.pictured.__contains__):
                i = idx[j]
                keep = FilmKeep(i in run.pictured, maps,
                                None if part is None else lambda half, r=i - films.start: part.put(r, half))
                man = run.net.write(tmp / run.folders[i], x[j], p, j, fields, run.settings.display, film, masks, extra,
                                    keep)
                rows.append({"folder": run.folders[i] if keep.has_folder else None, "manifest": man})
            bar.update(len(idx))
        if part is not None:
            part.close()
    except BaseException:
        if part is not None:
            part.discard()
        raise
    write_json(rows, tmp / RECORDS / f"{c}.json")


def _merge(tmp: Path, n_chunks: int, options: ArchiveOptions, title: str, info: dict) -> list[dict]:
    """Rank 0, once every chunk is finished: the gallery (and the map store's index) over the records in order."""
    rows: list[dict] = []
    for c in range(n_chunks):
        rows += json.loads((tmp / RECORDS / f"{c}.json").read_text(encoding="utf-8"))
    if options.maps == "store":
        write_index(tmp / STORE_DIR, rows)
    write_gallery(tmp, rows, title=title, info=info, page_size=options.page)
    return rows


def run_key(source: ImageSource, net: Net, compare: Sequence[Net], settings: ProjectSettings,
            options: ArchiveOptions) -> dict:
    """What must not change between an interrupted run and its ``--resume``."""
    films = hashlib.sha256("\0".join(f"{printable_name(p)}\0{n}" for p, n in zip(source.paths, source.names))
                           .encode("utf-8", "surrogateescape")).hexdigest()
    opts = {k: v for k, v in asdict(options).items() if k not in ("resume", "page")}
    return {"films": films, "film_count": len(source), "model": net.base,
            "compare": [n.base["checkpoint_sha256"] for n in compare],
            "settings": {**asdict(settings), "display": settings.display.as_dict()}, "options": opts}


def project_archive(out: Path, source: ImageSource, net: Net, settings: ProjectSettings, device: torch.device,
                    title: str, info: dict, options: ArchiveOptions = ArchiveOptions(), overwrite: bool = False,
                    progress: bool = True, compare: Sequence[Net] = (), dist: DistInfo | None = None) -> list[dict]:
    """Project ``source`` into ``out`` as rank ``dist.rank`` of ``dist.world_size`` (the process group joined).

    Returns the gallery rows on rank 0 (one per film, in order), ``[]`` on the other ranks.
    """
    from tqdm import tqdm

    dist = dist or DistInfo()
    taken: set[str] = set()
    folders = [unique_folder(s, taken) for s in source.stems]
    chunks = chunk_ranges(len(source), settings.batch_size, options.chunk)
    run = _Run(source, net, compare, settings, device, options, folders,
               picture_films(len(source), options.pictures))
    key = run_key(source, net, compare, settings, options)
    with archive_build(out, overwrite, options.resume, key, dist) as (tmp, done):
        mine = [c for c in range(len(chunks)) if c not in done][dist.rank::dist.world_size]
        desc = "projecting" if not dist.enabled else f"projecting (rank 0 of {dist.world_size}, its share)"
        with tqdm(total=sum(len(chunks[c]) for c in mine), desc=desc, unit="img", file=sys.stderr,
                  disable=not (progress and dist.is_main)) as bar:
            error = None
            for c in mine:
                try:
                    run_chunk(run, tmp, c, chunks[c], bar)
                except (UserError, OSError) as exc:  # told to every rank, so none waits for the others
                    error = (c, error_message(exc))
                    break
        distributed.raise_first(distributed.all_gather_objects(error, dist), dist)  # also the barrier
        rows = _merge(tmp, len(chunks), options, title, info) if dist.is_main else []
    return rows
