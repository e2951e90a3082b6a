"""Tests for data.py, on small data written in the real on-disk formats."""

import gzip
import hashlib
import io
import os
import pickle
import re
import struct
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import ArrayDataset, DataError, ImageFolder, LatentDataset, Loader


# ------------------------------------------------------------------------------------------------------------
# CIFAR-10 archives as the official one is made: Python 2 cPickle (protocol 2, str -> BINSTRING) in a tar.gz


def py2_pickle(obj):
    """Pickle bytes/int/None/tuple/list/dict and uint8 arrays the way Python 2 with numpy 1 wrote
    the CIFAR files."""
    out = bytearray(pickle.PROTO + b"\x02")

    def save(value):
        if isinstance(value, bytes):  # a Python 2 str
            head = pickle.SHORT_BINSTRING + bytes([len(value)]) if len(value) < 256 else \
                pickle.BINSTRING + struct.pack("<i", len(value))
            out.extend(head + value)
        elif isinstance(value, bool):
            out.extend(pickle.NEWTRUE if value else pickle.NEWFALSE)
        elif isinstance(value, int):
            out.extend(pickle.BININT + struct.pack("<i", value))
        elif value is None:
            out.extend(pickle.NONE)
        elif isinstance(value, tuple):
            out.extend(pickle.MARK)
            for v in value:
                save(v)
            out.extend(pickle.TUPLE)
        elif isinstance(value, list):
            out.extend(pickle.EMPTY_LIST + pickle.MARK)
            for v in value:
                save(v)
            out.extend(pickle.APPENDS)
        elif isinstance(value, dict):
            out.extend(pickle.EMPTY_DICT + pickle.MARK)
            for k, v in value.items():
                save(k)
                save(v)
            out.extend(pickle.SETITEMS)
        elif isinstance(value, np.ndarray):
            # _reconstruct(ndarray, (0,), 'b') then BUILD (1, shape, dtype, F, raw)
            assert value.dtype == np.uint8
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            save((0,))
            save(b"b")
            out.extend(pickle.TUPLE3 + pickle.REDUCE + pickle.MARK)
            save(1)
            save(value.shape)
            out.extend(b"cnumpy\ndtype\n")
            save((b"u1", 0, 1))
            out.extend(pickle.REDUCE)
            save((3, b"|", None, None, None, -1, -1, 0))
            out.extend(pickle.BUILD)
            save(False)
            save(value.tobytes())
            out.extend(pickle.TUPLE + pickle.BUILD)
        else:
            raise TypeError(type(value))

    save(obj)
    out.extend(pickle.STOP)
    return bytes(out)


def cifar_batch(first, n):
    """n images numbered first..: R plane = row, G plane = column, B plane = number; label = number % 10."""
    numbers = np.arange(first, first + n)
    rows, cols = np.mgrid[0:32, 0:32]
    planes = [np.broadcast_to(rows, (n, 32, 32)), np.broadcast_to(cols, (n, 32, 32)),
              np.broadcast_to(numbers[:, None, None], (n, 32, 32))]
    pixels = np.stack(planes, axis=1).reshape(n, 3072).astype(np.uint8)  # R, G, B planes, row-major
    return {b"batch_label": b"training batch", b"labels": [int(k % 10) for k in numbers], b"data": pixels,
            b"filenames": [b"img_%d.png" % k for k in numbers]}


def write_tar(path, members):
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def write_cifar(root, per_batch=4, replace=None):
    """A CIFAR-10 archive at root/cifar-10-python.tar.gz with 5 x per_batch train and per_batch
    test images."""
    members = {f"data_batch_{i}": py2_pickle(cifar_batch((i - 1) * per_batch, per_batch))
               for i in range(1, 6)}
    members["test_batch"] = py2_pickle(cifar_batch(100, per_batch))
    members["batches.meta"] = py2_pickle({b"label_names": [b"airplane", b"automobile"], b"num_vis": 3072})
    members.update(replace or {})
    os.makedirs(root, exist_ok=True)
    return write_tar(os.path.join(root, "cifar-10-python.tar.gz"), members)


@pytest.fixture
def no_sleep(monkeypatch):
    monkeypatch.setattr(data.time, "sleep", lambda seconds: None)


def test_py2_pickle_is_what_plain_pickle_reads():
    batch = pickle.loads(py2_pickle(cifar_batch(0, 2)), encoding="bytes")
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (2, 3072)
    assert batch[b"labels"] == [0, 1] and batch[b"batch_label"] == b"training batch"


def test_load_cifar10_layout_and_labels(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CIFAR10_MD5", write_cifar(tmp_path))
    images, labels = data.load_cifar10(str(tmp_path), train=True, download=False)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8 and images.flags.c_contiguous
    assert labels.dtype == np.int64 and labels.tolist() == [k % 10 for k in range(20)]
    rows, cols = np.mgrid[0:32, 0:32]
    assert (images[..., 0] == rows).all()  # R plane -> channel 0, row-major
    assert (images[..., 1] == cols).all()  # G plane -> channel 1
    assert (images[..., 2] == np.arange(20)[:, None, None]).all()  # B plane; batches 1..5 in order
    test_images, test_labels = data.load_cifar10(str(tmp_path), train=False, download=False)
    assert test_images.shape == (4, 32, 32, 3)
    assert (test_images[..., 2] == np.arange(100, 104)[:, None, None]).all()
    assert test_labels.tolist() == [0, 1, 2, 3]


def test_load_cifar10_rejects_wrong_md5(tmp_path):
    write_cifar(tmp_path)  # a valid layout, but not the official archive's MD5
    with pytest.raises(DataError, match="wrong MD5"):
        data.load_cifar10(str(tmp_path), download=False)


def test_load_cifar10_missing_and_offline(tmp_path, monkeypatch, no_sleep):
    path = str(tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(DataError, match=re.escape("put it at " + path)):
        data.load_cifar10(str(tmp_path), download=False)

    def offline(request, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as raised:
        data.load_cifar10(str(tmp_path))
    message = str(raised.value)
    assert message.startswith(f"CIFAR-10 is not in {tmp_path} and could not be downloaded (Name or service")
    assert message.endswith(f"Download {data.CIFAR10_URL} and put it at {path}") and "\n" not in message
    assert not os.path.exists(path)


def test_load_cifar10_downloads_and_verifies(tmp_path, monkeypatch):
    md5 = write_cifar(tmp_path / "mirror")
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    monkeypatch.setattr(data, "CIFAR10_URL", (tmp_path / "mirror" / "cifar-10-python.tar.gz").as_uri())
    images, labels = data.load_cifar10(str(tmp_path / "data"))
    assert images.shape == (20, 32, 32, 3) and len(labels) == 20
    assert os.listdir(tmp_path / "data") == ["cifar-10-python.tar.gz"]  # no .part left behind


def test_load_cifar10_refuses_malicious_pickle(tmp_path, monkeypatch):
    class Exploit:  # unpickling it would call open(marker, "w"), creating the marker file
        def __init__(self, marker):
            self.marker = marker

        def __reduce__(self):
            return open, (self.marker, "w")

    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Exploit(str(control)), protocol=2)).close()
    assert control.exists()  # the payload works on an unguarded unpickler

    marker = tmp_path / "pwned"
    payload = pickle.dumps(Exploit(str(marker)), protocol=2)
    md5 = write_cifar(tmp_path / "data", replace={"data_batch_1": payload})
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    with pytest.raises(DataError, match="refusing to unpickle"):
        data.load_cifar10(str(tmp_path / "data"), download=False)
    assert not marker.exists()


def test_load_cifar10_rejects_malformed_batch(tmp_path, monkeypatch):
    bad = cifar_batch(0, 4)
    bad[b"labels"] = [0, 1, 2]  # one label short
    monkeypatch.setattr(data, "CIFAR10_MD5", write_cifar(tmp_path, replace={"data_batch_3": py2_pickle(bad)}))
    with pytest.raises(DataError, match="data_batch_3"):
        data.load_cifar10(str(tmp_path), download=False)


def write_cifar_folder(root, per_batch=4, replace=None):
    """The extracted archive, root/cifar-10-batches-py/ (torchvision's layout) -> {file: its MD5}."""
    folder = root / "cifar-10-batches-py"
    os.makedirs(folder, exist_ok=True)
    members = {f"data_batch_{i}": py2_pickle(cifar_batch((i - 1) * per_batch, per_batch))
               for i in range(1, 6)}
    members["test_batch"] = py2_pickle(cifar_batch(100, per_batch))
    members.update(replace or {})
    for name, payload in members.items():
        (folder / name).write_bytes(payload)
    return {name: hashlib.md5(payload).hexdigest() for name, payload in members.items()}


def test_load_cifar10_extracted_folder_matches_the_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CIFAR10_MD5", write_cifar(tmp_path / "archive"))
    monkeypatch.setattr(data, "CIFAR10_BATCH_MD5", write_cifar_folder(tmp_path / "extracted"))
    for train in (True, False):
        from_archive = data.load_cifar10(str(tmp_path / "archive"), train=train, download=False)
        from_folder = data.load_cifar10(str(tmp_path / "extracted"), train=train, download=False)
        assert all(np.array_equal(a, b) for a, b in zip(from_archive, from_folder))


def test_load_cifar10_extracted_folder_names_the_bad_file(tmp_path, monkeypatch):
    md5 = write_cifar_folder(tmp_path)
    monkeypatch.setattr(data, "CIFAR10_BATCH_MD5", dict(md5, data_batch_4="0" * 32))
    with pytest.raises(DataError) as raised:
        data.load_cifar10(str(tmp_path), download=False)
    message = str(raised.value)
    assert message.startswith(str(tmp_path / "cifar-10-batches-py" / "data_batch_4") + " has MD5 "
                              + md5["data_batch_4"])
    assert "not the official " + "0" * 32 in message and "\n" not in message
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    monkeypatch.setattr(data, "CIFAR10_BATCH_MD5", md5)
    with pytest.raises(DataError, match="test_batch is missing"):
        data.load_cifar10(str(tmp_path), train=False, download=False)


def test_load_cifar10_extracted_folder_with_the_official_checksums_rejects_our_files(tmp_path):
    write_cifar_folder(tmp_path)  # the real table of official MD5s: synthetic files must fail it
    with pytest.raises(DataError,
                       match="data_batch_1 has MD5 .* not the official c99cafc152244af753f735de768cd75f"):
        data.load_cifar10(str(tmp_path), download=False)


# ------------------------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: the IDX format


def idx_bytes(array):
    """The IDX format: 0, 0, type 0x08 (uint8), number of dimensions, big-endian int32 sizes,
    then the bytes."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def write_idx_set(root, n_train=12, n_test=6, compress=True):
    """Four IDX files like the official ones: image i has value i everywhere; label i % 10. -> {file: MD5}."""
    os.makedirs(root, exist_ok=True)
    md5 = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28)).copy()
        for kind, array in (("images-idx3", images), ("labels-idx1", (np.arange(n) % 10).astype(np.uint8))):
            name = f"{prefix}-{kind}-ubyte"
            payload = gzip.compress(idx_bytes(array), mtime=0) if compress else idx_bytes(array)
            (root / (name + (".gz" if compress else ""))).write_bytes(payload)
            md5[name] = hashlib.md5(payload).hexdigest()
    return md5


def test_load_idx_dataset_reads_the_official_format(tmp_path, monkeypatch):
    url, _ = data.IDX_SOURCES["mnist"]
    monkeypatch.setitem(data.IDX_SOURCES, "mnist", (url, write_idx_set(tmp_path)))
    images, labels = data.load_idx_dataset("mnist", str(tmp_path), download=False)
    assert images.shape == (12, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert (images == np.arange(12)[:, None, None]).all() and labels.tolist() == [i % 10 for i in range(12)]
    test_images, test_labels = data.load_idx_dataset("mnist", str(tmp_path), train=False, download=False)
    assert test_images.shape == (6, 28, 28) and test_labels.tolist() == list(range(6))


def test_load_idx_dataset_accepts_recompressed_files_by_their_contents(tmp_path, monkeypatch):
    contents = write_idx_set(tmp_path / "raw", compress=False)  # MD5s of the uncompressed bytes
    write_idx_set(tmp_path / "gz")
    url, _ = data.IDX_SOURCES["fashion-mnist"]
    monkeypatch.setitem(data.IDX_SOURCES, "fashion-mnist", (url, {name: "0" * 32 for name in contents}))
    monkeypatch.setitem(data.IDX_CONTENT_MD5, "fashion-mnist", contents)
    for folder in ("raw", "gz"):  # uncompressed files, and a .gz whose own MD5 is not the official one
        images, labels = data.load_idx_dataset("fashion-mnist", str(tmp_path / folder), download=False)
        assert images.shape == (12, 28, 28) and len(labels) == 12


def test_load_idx_dataset_bad_files(tmp_path, monkeypatch, no_sleep):
    md5 = write_idx_set(tmp_path)
    url, _ = data.IDX_SOURCES["mnist"]
    with pytest.raises(DataError) as raised:  # the real table of official MD5s: our files must fail it
        data.load_idx_dataset("mnist", str(tmp_path), download=False)
    message = str(raised.value)
    assert message.startswith(f"{tmp_path}/train-images-idx3-ubyte.gz has MD5 "
                              f"{md5['train-images-idx3-ubyte']}, not the official "
                              f"f68b3c2dcbeaaa9fbdd348bbdeb94873")

    monkeypatch.setitem(data.IDX_SOURCES, "mnist", (url, md5))
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.full(12, 11, np.uint8)), mtime=0))
    monkeypatch.setitem(data.IDX_SOURCES, "mnist", (url, dict(md5, **{"train-labels-idx1-ubyte": hashlib.md5(
        labels.read_bytes()).hexdigest()})))
    with pytest.raises(DataError, match="labels above 9"):
        data.load_idx_dataset("mnist", str(tmp_path), download=False)

    truncated = gzip.compress(idx_bytes(np.zeros((12, 28, 28), np.uint8))[:-5], mtime=0)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(truncated)
    monkeypatch.setitem(data.IDX_SOURCES, "mnist", (url, dict(md5, **{"train-images-idx3-ubyte": hashlib.md5(
        truncated).hexdigest()})))
    with pytest.raises(DataError, match="truncated"):
        data.load_idx_dataset("mnist", str(tmp_path), download=False)

    def offline(request, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as raised:
        data.load_idx_dataset("mnist", str(tmp_path / "empty"))
    message = str(raised.value)
    assert message.startswith(f"train-images-idx3-ubyte.gz of mnist is not in {tmp_path / 'empty'} "
                              f"and could not be downloaded")
    assert message.endswith(f"Download {url}train-images-idx3-ubyte.gz and put it at "
                            f"{tmp_path / 'empty'}/train-images-idx3-ubyte.gz")


def test_fit_to_size_pads_with_black_and_box_resizes():
    images = np.full((2, 28, 28), 200, np.uint8)
    padded = data.fit_to_size(images, 32)
    assert padded.shape == (2, 32, 32) and (padded[:, 2:30, 2:30] == 200).all()
    assert padded.sum() == 2 * 28 * 28 * 200
    assert data.fit_to_size(images, 28) is images or np.array_equal(data.fit_to_size(images, 28), images)
    assert (data.fit_to_size(images, 14) == 200).all() and data.fit_to_size(images, 14).shape == (2, 14, 14)


FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="the real Fashion-MNIST files are not installed "
                    "(apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_passes_its_checksums():
    images, labels = data.load_idx_dataset("fashion-mnist", FASHION_MNIST, download=False)
    assert images.shape == (60000, 28, 28) and np.bincount(labels).tolist() == [6000] * 10
    # found without --data-path
    dataset, classes, channels, size = data.make_dataset("fashion-mnist", None, 32)
    assert len(dataset) == 60000 and (classes, channels, size) == (10, 1, 32)
    assert dataset[(0, False)][0].shape == (1, 32, 32) and labels[0] == dataset[(0, False)][1] == 9


# ------------------------------------------------------------------------------------------------------------
# download


class FakeResponse(io.BytesIO):
    def __init__(self, body, status):
        super().__init__(body)
        self.status, self.headers = status, {"Content-Length": str(len(body))}


def test_download_resumes_with_range(tmp_path, monkeypatch):
    content = bytes(range(256)) * 40
    ranges = []

    def server(request, timeout=None):  # honours Range like an HTTP server
        ranges.append(request.get_header("Range"))
        start = int(ranges[-1][len("bytes="):-1]) if ranges[-1] else 0
        return FakeResponse(content[start:], 206 if start else 200)

    monkeypatch.setattr(data.urllib.request, "urlopen", server)
    path = str(tmp_path / "file.bin")
    Path(path + ".part").write_bytes(content[:1234])
    data.download("https://example.com/file.bin", path, sha256=hashlib.sha256(content).hexdigest())
    assert ranges == ["bytes=1234-"]
    assert Path(path).read_bytes() == content and not os.path.exists(path + ".part")


def test_download_complete_part_gets_416(tmp_path, monkeypatch):
    content = b"all of it"

    def server(request, timeout=None):
        raise urllib.error.HTTPError(request.full_url, 416, "Range Not Satisfiable", {}, None)

    monkeypatch.setattr(data.urllib.request, "urlopen", server)
    path = str(tmp_path / "file.bin")
    Path(path + ".part").write_bytes(content)
    data.download("https://example.com/file.bin", path, md5=hashlib.md5(content).hexdigest())
    assert Path(path).read_bytes() == content


def test_download_restarts_when_range_is_ignored(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(3000))
    path = str(tmp_path / "out" / "copy.bin")
    os.makedirs(tmp_path / "out")
    Path(path + ".part").write_bytes(b"garbage")  # file:// ignores Range: must not be kept as a prefix
    data.download(source.as_uri(), path, md5=hashlib.md5(source.read_bytes()).hexdigest())
    assert Path(path).read_bytes() == source.read_bytes() and not os.path.exists(path + ".part")


def test_download_checksum_mismatch_leaves_nothing(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload")
    path = str(tmp_path / "copy.bin")
    with pytest.raises(DataError, match="MD5"):
        data.download(source.as_uri(), path, md5="0" * 32)
    assert not os.path.exists(path) and not os.path.exists(path + ".part")


def test_download_network_failure_retries_then_explains(tmp_path, monkeypatch, no_sleep):
    calls = []

    def offline(request, timeout=None):
        calls.append(request.full_url)
        raise urllib.error.URLError("timed out")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    path = str(tmp_path / "weights.pth")
    expected = re.escape(f"Download https://example.com/w.pth and put it at {path}") + "$"
    with pytest.raises(DataError, match=expected):
        data.download("https://example.com/w.pth", path)
    assert len(calls) == 3 and not os.path.exists(path)


# ------------------------------------------------------------------------------------------------------------
# Image folders


def save_image(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def noise(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_center_crop_arr_box_path_is_exact():
    small = noise(16, 16, 0)
    big = Image.fromarray(small).resize((64, 64), Image.NEAREST)  # constant 4x4 blocks: box halving is exact
    assert np.array_equal(data.center_crop_arr(big, 16), small)


def test_center_crop_arr_non_square_keeps_the_center():
    tall = np.zeros((90, 30, 3), np.uint8)
    tall[:30, :, 0] = tall[30:60, :, 1] = tall[60:, :, 2] = 255  # red, green, blue thirds
    crop = data.center_crop_arr(Image.fromarray(tall), 8)
    assert crop.shape == (8, 8, 3) and crop.dtype == np.uint8
    assert (crop[2:6, :, 1] == 255).all() and (crop[2:6, :, [0, 2]] == 0).all()  # the green middle
    wide = data.center_crop_arr(Image.fromarray(noise(21, 50, 1)), 16)  # no box step, bicubic up
    assert wide.shape == (16, 16, 3)


@pytest.fixture
def folder(tmp_path):
    """root/b_cats: 2 good; root/a_dogs: good, random bytes, truncated PNG; root/c_empty: nothing;
    plus a .txt"""
    root = tmp_path / "images"
    save_image(root / "a_dogs" / "0.png", noise(40, 60, 2))
    (root / "a_dogs" / "1.png").write_bytes(os.urandom(500))
    buffer = io.BytesIO()
    Image.fromarray(noise(64, 64, 3)).save(buffer, format="PNG")
    (root / "a_dogs" / "2.png").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    save_image(root / "b_cats" / "x.JPEG", noise(30, 20, 4))
    save_image(root / "b_cats" / "y.bmp", noise(24, 24, 5))
    (root / "b_cats" / "notes.txt").write_text("not an image")
    os.makedirs(root / "c_empty")
    return root


def test_image_folder_classes_files_crop_and_flip(folder):
    dataset = ImageFolder(str(folder), 16)
    assert dataset.classes == ["a_dogs", "b_cats", "c_empty"]
    assert [(os.path.basename(p), label) for p, label in dataset.samples] == \
        [("0.png", 0), ("1.png", 0), ("2.png", 0), ("x.JPEG", 1), ("y.bmp", 1)]
    image, label = dataset[(0, False)]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 0
    expected = data.center_crop_arr(Image.open(folder / "a_dogs" / "0.png").convert("RGB"), 16)
    assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))
    flipped, _ = dataset[(0, True)]
    assert torch.equal(flipped, image.flip(-1)) and not torch.equal(flipped, image)
    assert dataset[(3, False)][0].shape == (3, 16, 16)  # 20x30 portrait JPEG


def test_image_folder_of_grayscale_images_has_one_channel(tmp_path):
    for label in ("0", "1"):
        Image.fromarray(noise(28, 28, int(label))[..., 0]).save(tmp_path / f"digit{label}.png")  # mode L
        os.makedirs(tmp_path / "digits" / label)
        os.replace(tmp_path / f"digit{label}.png", tmp_path / "digits" / label / "a.png")
    dataset, classes, channels, size = data.make_dataset("folder", str(tmp_path / "digits"), 32)
    image, _ = dataset[(1, False)]
    assert (classes, channels, size) == (2, 1, 32) and image.shape == (1, 32, 32)
    expected = data.center_crop_arr(Image.open(tmp_path / "digits" / "1" / "a.png"), 32)
    assert torch.equal(image[0], torch.from_numpy(expected))


def write_digit_folder(root, save):
    """Two classes of three 28-px grayscale noise images each, written by save(gray uint8 (28, 28), path)."""
    for label in range(2):
        os.makedirs(root / str(label))
        for i in range(3):
            save(noise(28, 28, 10 * label + i)[..., 0], root / str(label) / f"{i}.png")


def test_image_folder_of_grayscale_saved_as_rgb_reads_one_channel(tmp_path):
    write_digit_folder(tmp_path / "gray", lambda gray, path: Image.fromarray(gray).save(path))
    write_digit_folder(tmp_path / "rgb", lambda gray, path: Image.fromarray(gray).convert("RGB").save(path))
    assert Image.open(tmp_path / "rgb" / "1" / "2.png").mode == "RGB"
    gray, rgb = ImageFolder(str(tmp_path / "gray"), 32), ImageFolder(str(tmp_path / "rgb"), 32)
    assert gray.channels == rgb.channels == 1
    for index in range(6):  # the same pixels, however the files were saved
        assert torch.equal(gray[(index, True)][0], rgb[(index, True)][0])
    assert ImageFolder(str(tmp_path / "rgb"), 32, channels=3)[(0, False)][0].shape == (3, 32, 32)


def test_image_folder_with_one_colour_image_reads_rgb(tmp_path):
    write_digit_folder(tmp_path, lambda gray, path: Image.fromarray(gray).convert("RGB").save(path))
    tinted = np.asarray(Image.open(tmp_path / "1" / "2.png")).copy()
    tinted[5, 5, 0] = tinted[5, 5, 1] ^ 0x80  # one pixel of one image off gray
    Image.fromarray(tinted).save(tmp_path / "1" / "2.png")
    assert ImageFolder(str(tmp_path), 32).channels == 3


def write_colour(path):
    Image.fromarray(noise(8, 8, 4)).save(path)
    return path


def test_grayscale_jpeg_saved_as_rgb_counts_as_grayscale(tmp_path):
    path = tmp_path / "a.jpg"
    Image.fromarray(noise(28, 28, 3)[..., 0]).convert("RGB").save(path, quality=75)
    assert Image.open(path).mode == "RGB" and data.all_grayscale([path])
    assert not data.all_grayscale([path, tmp_path / "missing.png", write_colour(tmp_path / "c.png")])
    assert not data.all_grayscale([tmp_path / "missing.png"])  # nothing readable: read as RGB


def test_loader_processes_only_for_folders_of_large_images(tmp_path):
    write_digit_folder(tmp_path / "digits", lambda gray, path: Image.fromarray(gray).save(path))
    digits = ImageFolder(str(tmp_path / "digits"), 32)
    assert digits.largest_side == 28 and data.default_workers(digits) == 0
    Image.fromarray(noise(65, 40, 1)).save(tmp_path / "digits" / "1" / "photo.png")  # 40 wide, 65 high
    photos = ImageFolder(str(tmp_path / "digits"), 32)
    assert photos.largest_side == 65 and data.default_workers(photos) == 1
    in_memory = ArrayDataset(np.zeros((4, 28, 28, 1), np.uint8), np.zeros(4, np.int64))
    assert data.default_workers(in_memory) == 0
    assert data.largest_side([tmp_path / "missing.png"]) == 0


def test_image_folder_skips_unreadable_images_with_one_warning(folder, capsys):
    dataset = ImageFolder(str(folder), 8)
    with pytest.raises(OSError):  # the truncated file really is unreadable, yet opens (PIL decodes lazily)
        Image.open(folder / "a_dogs" / "2.png").convert("RGB")
    image, label = dataset[(1, False)]  # 1.png and 2.png are bad: the next readable one is b_cats/x.JPEG
    assert torch.equal(image, dataset[(3, False)][0]) and label == 1
    err = capsys.readouterr().err
    for bad in ("1.png", "2.png"):
        assert f"warning: skipping unreadable image {folder / 'a_dogs' / bad}: " in err
    dataset[(2, True)]
    assert capsys.readouterr().err == ""  # once per file


def test_image_folder_wraps_around_to_the_first_readable(tmp_path):
    root = tmp_path / "images"
    save_image(root / "a" / "0.png", noise(8, 8, 6))
    (root / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    dataset = ImageFolder(str(root), 8)
    assert torch.equal(dataset[(1, False)][0], dataset[(0, False)][0])


def test_image_folder_bad_roots(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nowhere'} does not exist")):
        ImageFolder(str(tmp_path / "nowhere"), 8)
    os.makedirs(tmp_path / "flat")
    save_image(tmp_path / "flat" / "0.png", noise(8, 8, 7))  # images but no class folders
    with pytest.raises(DataError, match="no class folders"):
        ImageFolder(str(tmp_path / "flat"), 8)
    os.makedirs(tmp_path / "empty" / "cls")
    (tmp_path / "empty" / "cls" / "readme.md").write_text("x")
    with pytest.raises(DataError, match="no image files .*" + re.escape(str(tmp_path / "empty"))):
        ImageFolder(str(tmp_path / "empty"), 8)


def test_image_folder_all_unreadable(tmp_path):
    root = tmp_path / "broken"
    for i in range(3):
        os.makedirs(root / "cls", exist_ok=True)
        (root / "cls" / f"{i}.jpg").write_bytes(os.urandom(100))
    dataset = ImageFolder(str(root), 8)
    with pytest.raises(DataError, match=re.escape(f"no readable image in {root}")):
        dataset[(0, False)]
    with pytest.raises(DataError) as raised:  # raised in a worker process: still one clean line
        next(Loader(dataset, batch_size=1, num_workers=1))
    assert str(raised.value) == f"no readable image in {root}"


# ------------------------------------------------------------------------------------------------------------
# Latents


def write_latents(path, n=6, h=2, w=3):
    dtype = np.dtype([("latent", "<f2", (2, 4, h, w)), ("label", "<i8")])
    records = np.zeros(n, dtype)
    records["latent"] = np.random.default_rng(0).standard_normal((n, 2, 4, h, w))
    records["label"] = np.arange(n) * 7
    np.save(path, records)
    return records


def test_latent_dataset_round_trip(tmp_path):
    records = write_latents(tmp_path / "latents.npy")
    dataset = LatentDataset(str(tmp_path / "latents.npy"))
    assert len(dataset) == 6 and dataset.latent_shape == (4, 2, 3)
    for index in range(6):
        for flip in (False, True):
            latent, label = dataset[(index, flip)]
            assert latent.dtype == torch.float32 and label == 7 * index
            expected = records["latent"][index, int(flip)].astype(np.float32)
            assert torch.equal(latent, torch.from_numpy(expected))
    copy = pickle.dumps(dataset)  # what a "spawn" worker receives: the path, not the data
    assert len(copy) < 500 and torch.equal(pickle.loads(copy)[(5, True)][0], dataset[(5, True)][0])
    x, y = next(Loader(dataset, batch_size=6, flip=False))  # latents are not rescaled
    assert torch.equal(x, torch.stack([dataset[(int(i) // 7, False)][0] for i in y]))


def test_latent_dataset_bad_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        LatentDataset(str(tmp_path / "missing.npy"))
    np.save(tmp_path / "plain.npy", np.zeros((3, 4), np.float16))
    with pytest.raises(DataError, match="does not hold latents"):
        LatentDataset(str(tmp_path / "plain.npy"))
    (tmp_path / "junk.npy").write_bytes(os.urandom(200))
    with pytest.raises(DataError, match="not a latent .npy file"):
        LatentDataset(str(tmp_path / "junk.npy"))


# ------------------------------------------------------------------------------------------------------------
# make_dataset


def test_make_dataset(tmp_path, monkeypatch, folder):
    monkeypatch.setattr(data, "CIFAR10_MD5", write_cifar(tmp_path / "cifar"))
    dataset, classes, channels, size = data.make_dataset("cifar10", str(tmp_path / "cifar"), 32)
    assert isinstance(dataset, ArrayDataset) and len(dataset) == 20
    assert (classes, channels, size) == (10, 3, 32)
    dataset, classes, channels, size = data.make_dataset("folder", str(folder), 16)
    assert isinstance(dataset, ImageFolder) and (classes, channels, size) == (3, 3, 16)
    write_latents(tmp_path / "latents.npy", h=4, w=4)
    dataset, classes, channels, size = data.make_dataset("imagenet", str(tmp_path / "latents.npy"), 256)
    assert isinstance(dataset, LatentDataset) and (classes, channels, size) == (1000, 4, 4)
    dataset, classes, channels, size = data.make_dataset("imagenet", str(folder), 32)
    assert (classes, channels, size) == (1000, 3, 256) and dataset[(0, False)][0].shape == (3, 256, 256)
    for name in ("folder", "imagenet"):
        with pytest.raises(DataError, match="needs a data path"):
            data.make_dataset(name, None, 32)
    with pytest.raises(DataError, match="unknown dataset 'svhn'"):
        data.make_dataset("svhn", None, 32)


# ------------------------------------------------------------------------------------------------------------
# Loader


def numbered(n):
    """Image i: pixel values i at column 0 rising to i + 7 at column 7 (so a flip shows); label i."""
    images = (np.arange(n)[:, None, None, None] + np.arange(8)[None, None, :, None]).astype(np.uint8)
    return ArrayDataset(np.ascontiguousarray(np.broadcast_to(images, (n, 4, 8, 3))), np.arange(n))


def take(loader, count):
    return [next(loader) for _ in range(count)]


def test_loader_batches_scaling_and_flips():
    dataset = numbered(64)
    x, y = next(Loader(dataset, batch_size=64, seed=3))
    assert x.shape == (64, 3, 4, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sorted(y.tolist()) == list(range(64))  # one epoch is a permutation
    flipped = x[:, 0, 0, 0] > x[:, 0, 0, -1]
    assert 10 < flipped.sum() < 54  # about half, seeded
    for i in range(64):
        expected = dataset[(int(y[i]), bool(flipped[i]))][0].float() / 127.5 - 1
        assert torch.equal(x[i], expected)
    x, _ = next(Loader(dataset, batch_size=64, seed=3, flip=False))
    assert not (x[:, 0, 0, 0] > x[:, 0, 0, -1]).any()


def test_loader_ranks_partition_the_epoch():
    dataset = numbered(10)
    ranks = [next(Loader(dataset, batch_size=5, rank=r, world_size=2, seed=1))[1].tolist() for r in range(2)]
    assert set(ranks[0]).isdisjoint(ranks[1]) and set(ranks[0]) | set(ranks[1]) == set(range(10))
    dataset = numbered(11)  # padded by wrap-around to 12: every sample is seen, one twice
    loaders = [Loader(dataset, batch_size=3, rank=r, world_size=2, seed=1) for r in range(2)]
    assert loaders[0].batches_per_epoch == 2
    seen = [label for loader in loaders for _, y in take(loader, 2) for label in y.tolist()]
    assert len(seen) == 12 and set(seen) == set(range(11))


def test_loader_epochs_reshuffle_and_drop_the_last_partial_batch():
    loader = Loader(numbered(10), batch_size=4, seed=0)
    epoch0, epoch1 = take(loader, 2), take(loader, 2)
    assert loader.state_dict() == {"epoch": 2, "batch": 0}
    order0 = torch.cat([y for _, y in epoch0]).tolist()
    order1 = torch.cat([y for _, y in epoch1]).tolist()
    assert len(set(order0)) == 8 and order0 != order1


@pytest.mark.parametrize("stop", [5, 3])  # mid-epoch and exactly at an epoch boundary
def test_loader_resumes_exactly(stop):
    dataset = numbered(10)
    reference = take(Loader(dataset, batch_size=3, seed=7), stop + 3)
    loader = Loader(dataset, batch_size=3, seed=7)
    take(loader, stop)
    state = loader.state_dict()
    assert state == {"epoch": stop // 3, "batch": stop % 3}
    resumed = Loader(dataset, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    for (x, y), (x_ref, y_ref) in zip(take(resumed, 3), reference[stop:]):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_loader_workers_match_and_count_unreadable_images(folder, capsys):
    dataset = ImageFolder(str(folder), 8)
    serial = take(Loader(dataset, batch_size=2, seed=5, num_workers=0), 4)
    capsys.readouterr()
    loader = Loader(dataset, batch_size=1, seed=5, num_workers=2)
    parallel = take(loader, 5)  # one whole epoch, every file
    err = capsys.readouterr().err
    for bad in ("1.png", "2.png"):
        assert err.count(f"skipping unreadable image {folder / 'a_dogs' / bad}") == 1  # from the main process
    assert "warning: skipped 2 unreadable images in epoch 0" in err
    workers = Loader(dataset, batch_size=2, seed=5, num_workers=2)
    for (x, y), (x_ref, y_ref) in zip(take(workers, 4), serial):  # two epochs, across the boundary
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    workers.load_state_dict({"epoch": 0, "batch": 1})  # a reset with persistent workers mid-epoch
    assert torch.equal(next(workers)[0], serial[1][0])
    assert len(parallel) == 5


def test_loader_rejects_empty_and_oversized():
    with pytest.raises(DataError, match="empty"):
        Loader(ArrayDataset(np.zeros((0, 4, 4, 3), np.uint8), np.zeros(0)), batch_size=1)
    with pytest.raises(DataError, match="batch size 6 is larger than the 5 samples"):
        Loader(numbered(10), batch_size=6, world_size=2)
