"""The CIFAR-10 archive: download, checksum, and extraction of the selected classes.

The archive is ``cifar-10-python.tar.gz`` in the official layout: a folder ``cifar-10-batches-py``
holding ``batches.meta``, ``data_batch_1`` to ``data_batch_5`` and ``test_batch``, each a Python 2
pickle. A data batch maps ``data`` to a ``uint8`` array of shape ``(N, 3072)`` (1024 red, then 1024
green, then 1024 blue values, row-major) and ``labels`` to N class ids.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from cifar2.errors import ArchiveError
from cifar2.outputs import atomic_path, save_npz

logger = logging.getLogger(__name__)

ARCHIVE_ENV = "CIFAR10_ARCHIVE"
TOP_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{number}" for number in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
IMAGE_SHAPE = (3, 32, 32)
_CHUNK = 1 << 20


def file_md5(path: str | Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, destination: str | Path, md5: str | None) -> Path:
    """Download ``url`` to ``destination`` with a progress bar and check its md5.

    The bytes go to a temporary file beside ``destination``, which is renamed only after the
    checksum matched. An existing ``destination`` with the right checksum is reused.
    """
    destination = Path(destination)
    if destination.is_file() and md5 is not None and file_md5(destination) == md5:
        logger.info("Reusing %s, whose md5 matches %s.", destination, md5)
        return destination

    logger.info("Downloading %s to %s.", url, destination)
    digest = hashlib.md5()
    with atomic_path(destination, suffix=".part") as partial:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc="download") as progress:
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        out.write(chunk)
                        digest.update(chunk)
                        progress.update(len(chunk))
            if total is not None and progress.n != total:
                raise ArchiveError(f"Download of {url} stopped after {progress.n} of {total} bytes. "
                                   "The partial file was discarded; download again.")
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
            raise ArchiveError(
                f"Download of {url} failed: {error}. Check the address in data.url and your "
                f"connection, or set {ARCHIVE_ENV} to a local copy of cifar-10-python.tar.gz."
            ) from None

        actual = digest.hexdigest()
        if md5 is not None and actual != md5:
            raise ArchiveError(
                f"Checksum mismatch for {url}: md5 is {actual}, data.md5 expects {md5}. The file "
                "was discarded. Download again, or fix data.md5 if you changed data.url on purpose."
            )
    logger.info("Downloaded %s (md5 %s).", destination, actual)
    return destination


def locate_archive(url: str, md5: str | None, download_dir: str | Path) -> Path:
    """Return the archive to read: ``$CIFAR10_ARCHIVE`` when it is set, else a verified download."""
    local = os.environ.get(ARCHIVE_ENV)
    if local is not None and not local.strip():
        raise ArchiveError(f"{ARCHIVE_ENV} is set but empty. Point it at a copy of "
                           f"cifar-10-python.tar.gz, or unset it to download from {url}.")
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise ArchiveError(f"{ARCHIVE_ENV}={local} does not name a file. Point it at a copy of "
                               f"cifar-10-python.tar.gz, or unset it to download from {url}.")
        logger.info("Using the local archive %s from %s (md5 %s); data.url is not used.", path,
                    ARCHIVE_ENV, file_md5(path))
        return path
    logger.info("%s is not set, so the archive comes from data.url.", ARCHIVE_ENV)
    return download(url, Path(download_dir) / Path(url).name, md5)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays, so a crafted archive cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in a protocol 2 pickle
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise ArchiveError(f"Unexpected object {module}.{name} in a CIFAR-10 batch; the "
                               "archive is not in the official format.")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"  # numpy 2 moved it; the old path warns.
        return super().find_class(module, name)


def _decode_keys(batch: Any, member: str) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        raise ArchiveError(f"Member {member} is not a dict as in the official format.")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value
            for key, value in batch.items()}


def _read_member(archive: tarfile.TarFile, path: Path, member: str) -> dict[str, Any]:
    name = f"{TOP_FOLDER}/{member}"
    try:
        handle = archive.extractfile(name)
    except KeyError:
        raise ArchiveError(f"Archive {path} has no member {name}. It is not in the official "
                           "cifar-10-python.tar.gz layout; use the official archive.") from None
    if handle is None:
        raise ArchiveError(f"Member {name} of {path} is not a regular file.")
    try:
        batch = _BatchUnpickler(handle, encoding="bytes").load()
    except ArchiveError as error:
        raise ArchiveError(f"Member {name} of {path}: {error} Use the official "
                           "cifar-10-python.tar.gz.") from None
    except (tarfile.TarError, zlib.error):
        raise  # reported by extract_classes as a corrupt archive
    except Exception as error:  # noqa: BLE001  (a corrupt pickle can raise almost anything)
        raise ArchiveError(f"Member {name} of {path} cannot be read ({type(error).__name__}: "
                           f"{error}); the archive is corrupt. Delete it and obtain a fresh "
                           "copy.") from None
    return _decode_keys(batch, member)


def _read_batch(archive: tarfile.TarFile, path: Path, member: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_member(archive, path, member)
    if "data" not in batch or "labels" not in batch:
        raise ArchiveError(f"Batch {member} of {path} lacks 'data' or 'labels'; the archive is "
                           "not in the official format.")
    images = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        raise ArchiveError(f"Batch {member} of {path} holds data of dtype {images.dtype} and shape "
                           f"{images.shape}; expected uint8 of shape (N, 3072). Use the official "
                           "cifar-10-python.tar.gz.")
    if labels.shape != (images.shape[0],):
        raise ArchiveError(f"Batch {member} of {path} has {images.shape[0]} images but "
                           f"{labels.size} labels; the archive is corrupt. Obtain a fresh copy.")
    return images, labels


def extract_classes(archive_path: str | Path, classes: Sequence[str], output: str | Path) -> dict[str, int]:
    """Extract the images of ``classes`` from the archive into a compact ``.npz`` file.

    The file holds, for ``split`` in ``train`` and ``test``:

    - ``{split}_images``: ``uint8`` of shape ``(N, 3, 32, 32)``;
    - ``{split}_labels``: ``int64`` of shape ``(N,)``, class ``classes[k]`` mapped to ``k``;
    - ``{split}_batch``: ``int64``, the official batch the image comes from (1 to 5 for the
      training batches, 0 for the test batch);
    - ``{split}_index``: ``int64``, the image's row in that batch;

    and ``class_names``. Images keep the official order. The bytes depend only on the selected
    images, so two archives with the same pixels give the same file.

    Returns the number of images per split.
    """
    archive_path = Path(archive_path)
    if not archive_path.is_file():
        raise ArchiveError(f"Archive {archive_path} not found. Run the download stage or set "
                           f"{ARCHIVE_ENV} to an existing file.")
    try:
        with tarfile.open(archive_path, "r:gz") as archive:
            names = _read_member(archive, archive_path, META).get("label_names")
            label_names = [name.decode("latin1") if isinstance(name, bytes) else name
                           for name in (names or [])]
            missing = [name for name in classes if name not in label_names]
            if missing:
                raise ArchiveError(f"Archive {archive_path}: class {missing[0]!r} is not in its "
                                   f"label_names {label_names}. Fix data.classes, or use the "
                                   "official cifar-10-python.tar.gz.")
            class_ids = np.array([label_names.index(name) for name in classes])
            # remap[cifar_label] is the label's position in ``classes``; other classes never reach it.
            remap = np.full(len(label_names), -1, dtype=np.int64)
            remap[class_ids] = np.arange(len(classes))

            arrays: dict[str, np.ndarray] = {}
            for split, members in (("train", TRAIN_BATCHES), ("test", (TEST_BATCH,))):
                parts = []
                for member in tqdm(members, desc=f"extract {split}", unit="batch"):
                    images, labels = _read_batch(archive, archive_path, member)
                    keep = np.flatnonzero(np.isin(labels, class_ids))
                    batch_number = 0 if member == TEST_BATCH else int(member.rsplit("_", 1)[1])
                    parts.append((images[keep], labels[keep], np.full(keep.size, batch_number), keep))
                labels = np.concatenate([part[1] for part in parts])
                arrays[f"{split}_images"] = np.concatenate([part[0] for part in parts]).reshape(
                    -1, *IMAGE_SHAPE)
                arrays[f"{split}_labels"] = remap[labels]
                arrays[f"{split}_batch"] = np.concatenate([part[2] for part in parts]).astype(np.int64)
                arrays[f"{split}_index"] = np.concatenate([part[3] for part in parts]).astype(np.int64)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise ArchiveError(f"Archive {archive_path} is corrupt or truncated ({error}). Delete it "
                           f"and download it again, or point {ARCHIVE_ENV} at a good copy.") from None

    arrays["class_names"] = np.array(list(classes))
    for split in ("train", "test"):
        counts = np.bincount(arrays[f"{split}_labels"], minlength=len(classes))
        for name, count in zip(classes, counts):
            if count == 0:
                raise ArchiveError(f"Archive {archive_path} has no {split} images of class "
                                   f"{name!r}; check data.classes and the archive.")
    save_npz(output, arrays)
    counts = {split: int(arrays[f"{split}_labels"].size) for split in ("train", "test")}
    logger.info("Extracted %d training and %d test images of %s into %s.", counts["train"],
                counts["test"], ", ".join(classes), output)
    return counts
