"""Downloading a registry model: fetched by pooch, checksum-verified, then installed."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ..errors import Cancelled, FineMaskError
from ..hashing import file_hashes
from .folders import is_installed, models_dir
from .install import install_file, work_dir
from .registry import REGISTRY, RemoteModel

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]

#: Seconds to wait for a server to accept the connection: offline machines fail at once.
CONNECT_TIMEOUT = 5.0
#: Seconds without a byte before a started download is given up.
READ_TIMEOUT = 60.0


def get(name: str, *, on_progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> Path:
    """Download, verify, convert and install registry model ``name``; return its folder.

    Already installed: returns the folder at once. The file is downloaded by ``pooch`` into a
    hidden temporary folder inside :func:`models_dir` and checked (MD5 / SHA-256); a failed,
    cancelled (``Cancelled``), corrupt or unconvertible download leaves nothing behind.
    """
    entry = REGISTRY.get(name)
    if entry is None:
        raise FineMaskError(f"no downloadable model {name!r} (known: {', '.join(REGISTRY)})")
    target = models_dir() / name
    if is_installed(target):
        return target
    with work_dir() as work:
        url = entry.download_url()
        file = _download(entry, url, work, on_progress, cancel)
        hashes = _verify(file, entry, url)
        if cancel is not None and cancel():
            raise Cancelled()
        if on_progress:
            on_progress(0, 1, f"converting {name}")
        install_file(file, name, entry.kind, work, source=entry.description, url=entry.url, hashes=hashes,
                      architecture=entry.architecture)
        if on_progress:
            on_progress(1, 1, f"installed {name}")
    return target


def _download(entry: RemoteModel, url: str, work: Path, on_progress: ProgressFn | None,
              cancel: CancelFn | None) -> Path:
    """Fetch ``url`` into ``work`` with pooch; FineMaskError saying how to add the file by hand."""
    # pooch (fatiando/pooch) is the download library of our field (scikit-image and napari use it):
    # it streams into a temporary file and moves it to its name only once the hash matched. It
    # checks one full hash; a hash prefix (torchvision's) is checked by _verify afterwards.
    import pooch
    import requests

    known = f"md5:{entry.md5}" if entry.md5 else (f"sha256:{entry.sha256}" if _is_full_sha256(entry.sha256)
                                                  else None)
    bar = _ProgressBar(entry.name, on_progress, cancel)
    downloader = pooch.HTTPDownloader(progressbar=bar, chunk_size=1 << 20,
                                      timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
    by_hand = _by_hand(entry)
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)  # pooch logs every download at INFO; the caller shows progress
    try:
        return Path(pooch.retrieve(url, known_hash=known, fname=entry.filename, path=work / "download",
                                   downloader=downloader))
    except requests.exceptions.HTTPError as exc:
        raise FineMaskError(f"the server answered {exc.response.status_code} for {url}. {by_hand}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise FineMaskError(f"cannot download {entry.name}: {url} is unreachable or stopped answering "
                            f"(offline? {type(exc).__name__}). {by_hand}") from None
    except requests.exceptions.RequestException as exc:
        raise FineMaskError(f"the download of {url} broke off ({type(exc).__name__}: {exc}). {by_hand}") from None
    except ValueError as exc:  # pooch: the hash does not match
        raise FineMaskError(f"the file downloaded from {url} failed its checksum ({exc}): a broken transfer "
                            f"or a changed file. {by_hand}") from None
    finally:
        logger.setLevel(level)


class _ProgressBar:
    """What pooch drives as a progress bar: reports bytes to ``on_progress``, checks ``cancel``."""

    def __init__(self, name: str, on_progress: ProgressFn | None, cancel: CancelFn | None):
        self.name, self.on_progress, self.cancel = name, on_progress, cancel
        self.total = 0
        self.done = 0

    def update(self, n: int) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled()
        self.done += n
        if self.on_progress:
            total = max(self.total, 0)
            self.on_progress(min(self.done, total) if total else self.done, total, f"downloading {self.name}")

    def reset(self) -> None:
        self.done = 0

    def close(self) -> None:
        pass


def _verify(path: Path, entry: RemoteModel, url: str) -> dict[str, str]:
    """Check ``path`` against the entry's MD5 / SHA-256 (or prefix); return both digests."""
    hashes = file_hashes(path)
    for algo, want in (("md5", entry.md5), ("sha256", entry.sha256)):
        if want and not hashes[algo].startswith(want.lower()):
            raise FineMaskError(f"the file downloaded from {url} has {algo.upper()} {hashes[algo]}, expected "
                                f"{want}: a broken transfer or a changed file. {_by_hand(entry)}")
    return hashes


def _by_hand(entry: RemoteModel) -> str:
    return (f"Download {entry.url} with a browser (or on a machine with internet) and install it with "
            "`finemask models add FILE`; nothing was installed")


def _is_full_sha256(value: str | None) -> bool:
    return bool(value) and len(value) == 64
