"""Listing the images under a folder: every image once, symlinked folders never followed (so a link back up the tree
cannot loop, nor pull in the queries or another part of the split), and what was left out said by name."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # any letter case
SHOWN = 5  # names shown per kind of skipped entry


@dataclass
class ImageListing:
    """What find_images found under a folder: image paths relative to it (posix, sorted), and what it left out,
    each as (relative path, reason)."""

    images: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def warn_about_skipped(self, folder: Path) -> None:
        """One warning per kind of entry left out, naming a few of them."""
        by_reason: dict[str, list[str]] = {}
        for path, reason in self.skipped:
            by_reason.setdefault(reason, []).append(path)
        for reason, paths in by_reason.items():
            more = f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else ""
            logger.warning("%s: left out %d %s: %s%s", folder, len(paths), reason, ", ".join(paths[:SHOWN]), more)


def find_images(folder: str | Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> ImageListing:
    """The image files under folder (recursively) whose extension is one of ``extensions`` (any case), sorted.

    Left out, with the reason: files with another extension; hidden files and folders (names starting with '.',
    as glob does); symlinked folders (a loop such as ``loop -> ..``, or another part of the split; link the files,
    or copy or bind-mount the folder, instead); broken links and other non-files; and a second path to a file
    already listed (a symlinked file pointing to another image of the folder)."""
    root = Path(folder)
    root_real = os.path.realpath(root)
    listing = ImageListing()
    files = []  # (is a symlink, relative path, real path)
    pending = [root]
    while pending:
        for entry in sorted(os.scandir(pending.pop()), key=lambda entry: entry.name):
            relative = Path(entry.path).relative_to(root).as_posix()
            reason = _skip_reason(entry, extensions)
            if reason is not None:
                listing.skipped.append((relative, reason))
            elif entry.is_dir():
                pending.append(Path(entry.path))
            elif entry.is_symlink():
                files.append((True, relative, os.path.realpath(entry.path)))
            else:  # no symlinked folder is followed, so its real path is under the root's
                files.append((False, relative, os.path.join(root_real, relative)))
    listed: dict[str, str] = {}  # real path -> the relative path listed for it; real files before links to them
    for _, relative, real in sorted(files):
        if real in listed:
            listing.skipped.append((f"{relative} (= {listed[real]})", "second paths to images already listed"))
        else:
            listed[real] = relative
            listing.images.append(relative)
    listing.images.sort()
    return listing


def _skip_reason(entry: os.DirEntry, extensions: tuple[str, ...]) -> str | None:
    """Why a folder entry is left out, or None for an image file or a folder to descend into."""
    if entry.name.startswith("."):
        return "hidden files or folders (names starting with '.')"
    if entry.is_dir(follow_symlinks=False):
        return None
    if entry.is_symlink() and entry.is_dir():
        return "symlinked folders, not followed (a loop, or images that are not this folder's)"
    if not entry.is_file():
        return "broken links or entries that are not files"
    if os.path.splitext(entry.name)[1].lower() not in extensions:
        return f"files whose extension is not one of {', '.join(extensions)}"
    return None
