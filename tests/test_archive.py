"""Tests of cifar2.archive and the download stage on small archives in the official CIFAR-10 layout."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import shutil
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cifar2.archive import ARCHIVE_ENV, download, extract_classes, file_md5, locate_archive
from cifar2.errors import ArchiveError
from cifar2.outputs import load_npz
from cifar2.params import CIFAR10_CLASSES
from conftest import copy_project, make_batches, run_stage, write_archive

AIRPLANE = CIFAR10_CLASSES.index("airplane")
BIRD = CIFAR10_CLASSES.index("bird")
CAT = CIFAR10_CLASSES.index("cat")
TRUCK = CIFAR10_CLASSES.index("truck")
TRAIN_MEMBERS = tuple(f"data_batch_{number}" for number in range(1, 6))


def expected_split(batches: dict[str, dict], members: tuple[str, ...],
                   class_ids: list[int]) -> dict[str, np.ndarray]:
    """Select the rows of ``class_ids`` from ``batches`` row by row, independently of the code under test."""
    images, labels, batch_numbers, rows = [], [], [], []
    for member in members:
        batch = batches[member]
        number = 0 if member == "test_batch" else int(member.removeprefix("data_batch_"))
        for row, label in enumerate(batch[b"labels"]):
            if label in class_ids:
                images.append(batch[b"data"][row].reshape(3, 32, 32))
                labels.append(class_ids.index(label))
                batch_numbers.append(number)
                rows.append(row)
    return {"images": np.stack(images), "labels": np.array(labels), "batch": np.array(batch_numbers),
            "index": np.array(rows)}


def rewrite_member(source: Path, destination: Path, member: str, payload: bytes) -> Path:
    """Copy the archive ``source`` to ``destination`` with the bytes of one member replaced."""
    with tarfile.open(source, "r:gz") as old, tarfile.open(destination, "w:gz") as new:
        for info in old.getmembers():
            data = old.extractfile(info).read()
            if info.name == f"cifar-10-batches-py/{member}":
                data = payload
            replacement = tarfile.TarInfo(info.name)
            replacement.size = len(data)
            new.addfile(replacement, io.BytesIO(data))
    return destination


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


# Extraction of the requested classes


def test_extract_keeps_requested_classes(tmp_path, tiny_batches, tiny_archive):
    output = tmp_path / "out" / "cifar2.npz"

    extract_classes(tiny_archive, ["airplane", "bird"], output)

    data = load_npz(output)
    expected_train = expected_split(tiny_batches, TRAIN_MEMBERS, [AIRPLANE, BIRD])
    expected_test = expected_split(tiny_batches, ("test_batch",), [AIRPLANE, BIRD])
    assert np.array_equal(data["train_labels"], expected_train["labels"])
    assert np.array_equal(data["test_labels"], expected_test["labels"])
    assert set(data["train_labels"].tolist()) == {0, 1}


def test_extract_counts_per_class(tmp_path, tiny_archive):
    output = tmp_path / "cifar2.npz"

    counts = extract_classes(tiny_archive, ["airplane", "bird"], output)

    data = load_npz(output)
    # make_batches puts 3 images of each class in each of the 5 training batches and the test batch.
    assert np.bincount(data["train_labels"]).tolist() == [15, 15]
    assert np.bincount(data["test_labels"]).tolist() == [3, 3]
    assert counts == {"train": 30, "test": 6}


def test_extract_images_match_rows(tmp_path, tiny_batches, tiny_archive):
    output = tmp_path / "cifar2.npz"

    extract_classes(tiny_archive, ["airplane", "bird"], output)

    data = load_npz(output)
    expected_train = expected_split(tiny_batches, TRAIN_MEMBERS, [AIRPLANE, BIRD])
    expected_test = expected_split(tiny_batches, ("test_batch",), [AIRPLANE, BIRD])
    assert np.array_equal(data["train_images"], expected_train["images"])
    assert np.array_equal(data["test_images"], expected_test["images"])


def test_extract_pixel_layout(tmp_path, tiny_batches, tiny_archive):
    # A row is 1024 red, then 1024 green, then 1024 blue values, each channel row-major.
    output = tmp_path / "cifar2.npz"

    extract_classes(tiny_archive, ["airplane", "bird"], output)

    data = load_npz(output)
    first_row = tiny_batches["data_batch_1"][b"data"][0]  # its label is 0 (airplane)
    for channel, y, x in [(0, 0, 0), (0, 0, 31), (1, 5, 7), (2, 31, 31), (2, 17, 3)]:
        assert data["train_images"][0, channel, y, x] == first_row[channel * 1024 + y * 32 + x]


def test_extract_dtypes_and_shapes(tmp_path, tiny_archive):
    output = tmp_path / "cifar2.npz"

    extract_classes(tiny_archive, ["airplane", "bird"], output)

    data = load_npz(output)
    assert data["train_images"].dtype == np.uint8
    assert data["train_images"].shape == (30, 3, 32, 32)
    assert data["test_images"].shape == (6, 3, 32, 32)
    for name in ("train_labels", "train_batch", "train_index", "test_labels", "test_batch", "test_index"):
        assert data[name].dtype == np.int64, name
    assert data["class_names"].tolist() == ["airplane", "bird"]


def test_extract_points_to_source(tmp_path, tiny_batches, tiny_archive):
    output = tmp_path / "cifar2.npz"

    extract_classes(tiny_archive, ["airplane", "bird"], output)

    data = load_npz(output)
    for image, batch_number, row in zip(data["train_images"], data["train_batch"], data["train_index"]):
        source = tiny_batches[f"data_batch_{batch_number}"]
        assert np.array_equal(image.ravel(), source[b"data"][row])
        assert source[b"labels"][row] in (AIRPLANE, BIRD)
    for image, row in zip(data["test_images"], data["test_index"]):
        assert np.array_equal(image.ravel(), tiny_batches["test_batch"][b"data"][row])
    assert set(data["test_batch"].tolist()) == {0}


def test_extract_batch_and_index(tmp_path, tiny_batches, tiny_archive):
    output = tmp_path / "cifar2.npz"

    extract_classes(tiny_archive, ["airplane", "bird"], output)

    data = load_npz(output)
    expected = expected_split(tiny_batches, TRAIN_MEMBERS, [AIRPLANE, BIRD])
    assert np.array_equal(data["train_batch"], expected["batch"])
    assert np.array_equal(data["train_index"], expected["index"])


def test_extract_keeps_official_order(tmp_path, tiny_archive):
    output = tmp_path / "cifar2.npz"

    extract_classes(tiny_archive, ["airplane", "bird"], output)

    data = load_npz(output)
    batch, index = data["train_batch"], data["train_index"]
    same_batch = batch[1:] == batch[:-1]
    assert np.all(np.diff(batch) >= 0)
    assert np.all(np.diff(index)[same_batch] > 0)
    assert np.all(np.diff(data["test_index"]) > 0)


def test_extract_class_order_sets_labels(tmp_path, tiny_batches, tiny_archive):
    forward = tmp_path / "airplane_bird.npz"
    reverse = tmp_path / "bird_airplane.npz"

    extract_classes(tiny_archive, ["airplane", "bird"], forward)
    extract_classes(tiny_archive, ["bird", "airplane"], reverse)

    forward_data, reverse_data = load_npz(forward), load_npz(reverse)
    expected = expected_split(tiny_batches, TRAIN_MEMBERS, [BIRD, AIRPLANE])
    assert np.array_equal(reverse_data["train_labels"], expected["labels"])
    assert np.array_equal(reverse_data["train_labels"], 1 - forward_data["train_labels"])
    assert np.array_equal(reverse_data["train_images"], forward_data["train_images"])
    assert reverse_data["class_names"].tolist() == ["bird", "airplane"]


def test_extract_other_classes(tmp_path, tiny_batches, tiny_archive):
    output = tmp_path / "cifar3.npz"
    class_ids = [CIFAR10_CLASSES.index(name) for name in ("truck", "cat", "ship")]

    extract_classes(tiny_archive, ["truck", "cat", "ship"], output)

    data = load_npz(output)
    expected = expected_split(tiny_batches, TRAIN_MEMBERS, class_ids)
    assert np.array_equal(data["train_labels"], expected["labels"])
    assert np.array_equal(data["train_images"], expected["images"])


def test_extract_twice_identical(tmp_path, tiny_archive):
    first, second = tmp_path / "first.npz", tmp_path / "second.npz"

    extract_classes(tiny_archive, ["airplane", "bird"], first)
    # Zip timestamps have a 2-second resolution, so a writer that stamped the current time would
    # give the second file another timestamp.
    time.sleep(2.1)
    extract_classes(tiny_archive, ["airplane", "bird"], second)

    assert first.read_bytes() == second.read_bytes()


def test_extract_same_images_identical(tmp_path, tiny_batches, tiny_archive):
    # The second archive has the same airplane and bird rows. Its filenames, batch labels and rows of
    # other classes differ, and it is compressed at gzip level 1 where write_archive uses level 9.
    other_batches = make_batches(seed=1)
    for name, batch in other_batches.items():
        source = tiny_batches[name]
        keep = np.isin(source[b"labels"], [AIRPLANE, BIRD])
        batch[b"data"][keep] = source[b"data"][keep]
        labels = []
        for row, label in enumerate(source[b"labels"]):
            if keep[row]:
                labels.append(label)
            else:
                labels.append(TRUCK if label != TRUCK else CAT)
        batch[b"labels"] = labels
        batch[b"filenames"] = [f"renamed_{row}.png".encode() for row in range(len(batch[b"labels"]))]
        batch[b"batch_label"] = b"another label"
    level_9 = write_archive(tmp_path / "level9.tar.gz", other_batches)
    level_1 = tmp_path / "level1.tar.gz"
    level_1.write_bytes(gzip.compress(gzip.decompress(level_9.read_bytes()), compresslevel=1))
    assert level_1.read_bytes() != tiny_archive.read_bytes()  # precondition: the archives differ

    first, second = tmp_path / "first.npz", tmp_path / "second.npz"
    extract_classes(tiny_archive, ["airplane", "bird"], first)
    extract_classes(level_1, ["airplane", "bird"], second)

    assert first.read_bytes() == second.read_bytes()


def test_extract_replaces_output(tmp_path, tiny_archive):
    output = tmp_path / "cifar2.npz"
    output.write_bytes(b"stale output of an earlier run")

    extract_classes(tiny_archive, ["airplane", "bird"], output)

    assert load_npz(output)["class_names"].tolist() == ["airplane", "bird"]
    assert files_in(tmp_path) == ["cifar-10-python.tar.gz", "cifar2.npz"]


# Archives that extract_classes must reject


def truncated_archive(folder: Path) -> Path:
    whole = write_archive(folder / "whole.tar.gz", make_batches())
    path = folder / "truncated.tar.gz"
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def garbage_archive(folder: Path) -> Path:
    path = folder / "garbage.tar.gz"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, size=5000, dtype=np.uint8).tobytes())
    return path


def missing_member_archive(folder: Path) -> Path:
    return write_archive(folder / "missing.tar.gz", make_batches(), skip=("data_batch_3",))


def wrong_shape_archive(folder: Path) -> Path:
    batches = make_batches()
    batches["data_batch_2"][b"data"] = batches["data_batch_2"][b"data"][:, :3000]
    return write_archive(folder / "shape.tar.gz", batches)


def wrong_dtype_archive(folder: Path) -> Path:
    batches = make_batches()
    batches["test_batch"][b"data"] = batches["test_batch"][b"data"].astype(np.int64)
    return write_archive(folder / "dtype.tar.gz", batches)


def label_count_archive(folder: Path) -> Path:
    batches = make_batches()
    batches["data_batch_4"][b"labels"] = batches["data_batch_4"][b"labels"][:-1]
    return write_archive(folder / "labels.tar.gz", batches)


def corrupt_member_archive(folder: Path) -> Path:
    whole = write_archive(folder / "whole.tar.gz", make_batches())
    return rewrite_member(whole, folder / "member.tar.gz", "data_batch_5", b"not a pickle at all")


def not_gzip_archive(folder: Path) -> Path:
    path = folder / "plain.tar.gz"
    with tarfile.open(path, "w") as archive:  # an uncompressed tar under a .tar.gz name
        archive.addfile(tarfile.TarInfo("cifar-10-batches-py/readme.html"), io.BytesIO(b""))
    return path


def no_selected_images_archive(folder: Path) -> Path:
    return write_archive(folder / "no_selected.tar.gz", make_batches(classes=(1, 3, 9)))


# (builder, text the message must contain besides the archive path)
BAD_ARCHIVES = {
    "truncated": (truncated_archive, "corrupt"),
    "garbage": (garbage_archive, "corrupt"),
    "not_gzip": (not_gzip_archive, "corrupt"),
    "missing_member": (missing_member_archive, "data_batch_3"),
    "wrong_shape": (wrong_shape_archive, "(30, 3000)"),
    "wrong_dtype": (wrong_dtype_archive, "int64"),
    "label_count": (label_count_archive, "29 labels"),
    "corrupt_member": (corrupt_member_archive, "data_batch_5"),
    "no_selected_images": (no_selected_images_archive, "no train images"),
}


@pytest.mark.parametrize("case", list(BAD_ARCHIVES))
def test_bad_archive_rejected(tmp_path, case):
    build, expected_text = BAD_ARCHIVES[case]
    archive = build(tmp_path)
    output = tmp_path / "out" / "cifar2.npz"

    with pytest.raises(ArchiveError) as raised:
        extract_classes(archive, ["airplane", "bird"], output)

    message = str(raised.value)
    assert str(archive) in message
    assert expected_text in message
    assert not output.exists()
    assert files_in(output.parent) == []


def test_missing_archive_rejected(tmp_path):
    archive = tmp_path / "absent.tar.gz"
    output = tmp_path / "cifar2.npz"

    with pytest.raises(ArchiveError, match="not found") as raised:
        extract_classes(archive, ["airplane", "bird"], output)

    assert str(archive) in str(raised.value)
    assert not output.exists()


def unknown_class_archive(folder: Path) -> Path:
    # The label_names lack "bird", so a requested class is not in this archive.
    names = [name for name in CIFAR10_CLASSES if name != "bird"] + ["kangaroo"]
    meta = {b"num_cases_per_batch": 10000, b"label_names": [name.encode() for name in names],
            b"num_vis": 3072}
    return write_archive(folder / "unknown.tar.gz", make_batches(), meta=meta)


def test_unknown_class_rejected(tmp_path):
    archive = unknown_class_archive(tmp_path)
    output = tmp_path / "out" / "cifar2.npz"

    with pytest.raises(ArchiveError) as raised:
        extract_classes(archive, ["airplane", "bird"], output)

    message = str(raised.value)
    assert "'bird'" in message
    assert "data.classes" in message
    assert files_in(output.parent) == []


def test_unknown_class_names_archive(tmp_path):
    archive = unknown_class_archive(tmp_path)

    with pytest.raises(ArchiveError) as raised:
        extract_classes(archive, ["airplane", "bird"], tmp_path / "cifar2.npz")

    assert str(archive) in str(raised.value)


def test_no_images_of_class_rejected(tmp_path):
    batches = make_batches(classes=(0, 1, 3))
    archive = write_archive(tmp_path / "no_birds.tar.gz", batches)
    output = tmp_path / "out" / "cifar2.npz"

    with pytest.raises(ArchiveError) as raised:
        extract_classes(archive, ["airplane", "bird"], output)

    assert str(archive) in str(raised.value)
    assert files_in(output.parent) == []


class SystemCall:
    """Object whose pickle calls ``os.system(command)`` when loaded by an unrestricted unpickler."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def crafted_archive(folder: Path, marker: Path) -> Path:
    batches = make_batches()
    batches["data_batch_2"] = SystemCall(f"touch {marker}")
    return write_archive(folder / "crafted.tar.gz", batches)


def test_crafted_pickle_rejected(tmp_path):
    marker = tmp_path / "code_ran"
    archive = crafted_archive(tmp_path, marker)
    output = tmp_path / "out" / "cifar2.npz"

    with pytest.raises(ArchiveError, match="system"):
        extract_classes(archive, ["airplane", "bird"], output)

    assert not marker.exists()
    assert files_in(output.parent) == []


def test_crafted_pickle_in_data(tmp_path):
    marker = tmp_path / "code_ran"
    batches = make_batches()
    batches["data_batch_1"][b"labels"] = SystemCall(f"touch {marker}")
    archive = write_archive(tmp_path / "crafted.tar.gz", batches)

    with pytest.raises(ArchiveError):
        extract_classes(archive, ["airplane", "bird"], tmp_path / "cifar2.npz")

    assert not marker.exists()


def test_crafted_pickle_names_archive(tmp_path):
    archive = crafted_archive(tmp_path, tmp_path / "code_ran")

    with pytest.raises(ArchiveError) as raised:
        extract_classes(archive, ["airplane", "bird"], tmp_path / "cifar2.npz")

    assert str(archive) in str(raised.value)


def test_oversized_frame_rejected(tmp_path):
    whole = write_archive(tmp_path / "whole.tar.gz", make_batches())
    # Pickle opcode FRAME (0x95) followed by an 8-byte length of 2**64 - 1.
    archive = rewrite_member(whole, tmp_path / "frame.tar.gz", "data_batch_1", b"\x95" + b"\xff" * 8)

    with pytest.raises(ArchiveError):
        extract_classes(archive, ["airplane", "bird"], tmp_path / "cifar2.npz")


# download() and locate_archive()


@pytest.fixture
def source_archive(tmp_path, tiny_archive) -> Path:
    """The tiny archive in a folder of its own, to serve as the download source."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    return Path(shutil.copy2(tiny_archive, folder / "cifar-10-python.tar.gz"))


def test_download_file_url(tmp_path, source_archive):
    destination = tmp_path / "downloads" / "cifar-10-python.tar.gz"
    md5 = hashlib.md5(source_archive.read_bytes()).hexdigest()

    result = download(source_archive.as_uri(), destination, md5)

    assert result == destination
    assert destination.read_bytes() == source_archive.read_bytes()
    assert files_in(destination.parent) == ["cifar-10-python.tar.gz"]


def test_download_wrong_md5(tmp_path, source_archive):
    destination = tmp_path / "downloads" / "cifar-10-python.tar.gz"
    actual = hashlib.md5(source_archive.read_bytes()).hexdigest()
    expected = "0123456789abcdef0123456789abcdef"

    with pytest.raises(ArchiveError) as raised:
        download(source_archive.as_uri(), destination, expected)

    message = str(raised.value)
    assert actual in message
    assert expected in message
    assert files_in(destination.parent) == []


def test_download_without_md5(tmp_path, source_archive):
    destination = tmp_path / "downloads" / "cifar-10-python.tar.gz"

    download(source_archive.as_uri(), destination, None)

    assert destination.read_bytes() == source_archive.read_bytes()


def test_download_reuses_matching_file(tmp_path, source_archive):
    destination = tmp_path / "downloads" / "cifar-10-python.tar.gz"
    destination.parent.mkdir()
    shutil.copy2(source_archive, destination)
    md5 = file_md5(source_archive)
    absent_url = (tmp_path / "nowhere" / "cifar-10-python.tar.gz").as_uri()  # a download would fail

    result = download(absent_url, destination, md5)

    assert result == destination
    assert destination.read_bytes() == source_archive.read_bytes()


def test_download_replaces_mismatching_file(tmp_path, source_archive):
    destination = tmp_path / "downloads" / "cifar-10-python.tar.gz"
    destination.parent.mkdir()
    destination.write_bytes(b"an interrupted download")

    download(source_archive.as_uri(), destination, file_md5(source_archive))

    assert destination.read_bytes() == source_archive.read_bytes()
    assert files_in(destination.parent) == ["cifar-10-python.tar.gz"]


def test_download_missing_source(tmp_path):
    destination = tmp_path / "downloads" / "cifar-10-python.tar.gz"
    url = (tmp_path / "nowhere" / "cifar-10-python.tar.gz").as_uri()

    with pytest.raises(ArchiveError) as raised:
        download(url, destination, "0123456789abcdef0123456789abcdef")

    message = str(raised.value)
    assert url in message
    assert ARCHIVE_ENV in message
    assert files_in(destination.parent) == []


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class fixes the signature
        pass


@pytest.fixture
def http_mirror(source_archive):
    """Serve the folder of ``source_archive`` on 127.0.0.1 and yield its base URL."""
    handler = functools.partial(QuietHandler, directory=str(source_archive.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_download_over_http(tmp_path, source_archive, http_mirror):
    destination = tmp_path / "downloads" / "cifar-10-python.tar.gz"

    download(f"{http_mirror}/cifar-10-python.tar.gz", destination, file_md5(source_archive))

    assert destination.read_bytes() == source_archive.read_bytes()


def test_download_http_not_found(tmp_path, http_mirror):
    destination = tmp_path / "downloads" / "cifar-10-python.tar.gz"
    url = f"{http_mirror}/absent.tar.gz"

    with pytest.raises(ArchiveError, match="404") as raised:
        download(url, destination, None)

    assert url in str(raised.value)
    assert files_in(destination.parent) == []


def test_locate_uses_environment(tmp_path, monkeypatch, tiny_archive):
    monkeypatch.setenv(ARCHIVE_ENV, str(tiny_archive))
    download_dir = tmp_path / "downloads"
    absent_url = (tmp_path / "nowhere" / "cifar-10-python.tar.gz").as_uri()

    result = locate_archive(absent_url, "0123456789abcdef0123456789abcdef", download_dir)

    assert result == tiny_archive
    assert not download_dir.exists()


def test_locate_environment_missing_file(tmp_path, monkeypatch):
    missing = tmp_path / "absent.tar.gz"
    monkeypatch.setenv(ARCHIVE_ENV, str(missing))

    with pytest.raises(ArchiveError) as raised:
        locate_archive("file:///unused", None, tmp_path / "downloads")

    message = str(raised.value)
    assert ARCHIVE_ENV in message
    assert str(missing) in message


def test_locate_downloads_without_environment(tmp_path, monkeypatch, source_archive):
    monkeypatch.delenv(ARCHIVE_ENV, raising=False)
    download_dir = tmp_path / "downloads"

    result = locate_archive(source_archive.as_uri(), file_md5(source_archive), download_dir)

    assert result == download_dir / "cifar-10-python.tar.gz"
    assert result.read_bytes() == source_archive.read_bytes()


# The download stage as a process


@pytest.mark.parametrize("build", [truncated_archive, missing_member_archive],
                         ids=["truncated", "missing_member"])
def test_download_stage_bad_archive(tmp_path, build):
    project = copy_project(tmp_path / "project")
    archive = build(tmp_path)

    result = run_stage(project, "stages.download", archive)

    output = result.stdout + result.stderr
    error_lines = [line for line in output.splitlines() if " ERROR " in line]
    assert result.returncode == 1
    assert "Traceback" not in output
    assert len(error_lines) == 1
    assert str(archive) in error_lines[0]
    assert output.rstrip().splitlines()[-1] == error_lines[0]
    assert not (project / "data" / "cifar2.npz").exists()
