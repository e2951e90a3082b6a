"""Data for AFM training: datasets, and an endless loader that resumes exactly.

Four sources, each a map-style dataset indexed by an (index, flip) pair, so the horizontal flip is decided by
the loader's seeded generator and not by worker processes:

- CIFAR-10, from the official python archive or its extracted folder         -> ArrayDataset (uint8 3x32x32)
- MNIST and Fashion-MNIST, from the four official IDX files                  -> ArrayDataset (uint8 1xSxS)
- an image folder root/<class>/<image> (ImageNet's train layout), ADM crop   -> ImageFolder (uint8 3xSxS)
- ImageNet latents extracted once by vae.py into one structured .npy file    -> LatentDataset (float32 4xhxw)

make_dataset() picks one from the command line's --data name. Loader deals them out as endless, rank-sharded
minibatches on the training device (pixels scaled to [-1, 1], latents as they are), and its state_dict() is
two integers that make a resumed run see exactly the batches it would have seen. Bad input raises DataError
with one line meant for the user; an unreadable image is skipped with a warning.
"""

import gzip
import hashlib
import math
import os
import pickle
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_BATCH_MD5 = {  # the files of the extracted archive, cifar-10-batches-py/ (torchvision's layout)
    "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
}
# MNIST and Fashion-MNIST: where the four IDX files are published, and the MD5 of each .gz file there.
IDX_SOURCES = {
    # the mirror of yann.lecun.com that torchvision uses
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", {
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310"}),
}
# MD5 of the decompressed bytes, where known: a distribution that re-compresses the files changes the .gz
# checksum but not this one. Read off Debian's dataset-fashion-mnist, whose .gz files carry a 2020
# timestamp in their header.
IDX_CONTENT_MD5 = {
    "fashion-mnist": {"train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                      "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
                      "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
                      "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965"},
}
# Where a dataset is found when --data-path is not given: ./data/<name>, then where Debian's package puts it.
IDX_DEFAULT_DIRS = {"mnist": ["data/mnist"],
                    "fashion-mnist": ["data/fashion-mnist", "/usr/share/datasets/fashion-mnist"]}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")  # lower-case


class DataError(Exception):
    """Bad input (a missing dataset, a corrupt archive, ...). The message is one line for the user."""


def warn(message):
    tqdm.write(f"warning: {message}", file=sys.stderr)  # keeps a progress bar intact


# ------------------------------------------------------------------------------------------------------------
# Downloads


def download(url, path, md5=None, sha256=None, what=None):
    """Download url to path: resumable, verified, atomic.

    Bytes go to path + ".part" (resumed with an HTTP Range request when one is left from an earlier try); only
    a file whose checksum matches is renamed to path, so a partial download is never mistaken for a complete
    one. `what` names the file in the offline message (default: its file name).
    """
    path = os.fspath(path)
    part = path + ".part"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the folder for {path}: {error}") from None
    for attempt in range(3):
        try:
            _fetch(url, part, os.path.basename(path))
            break
        # urllib's URLError and HTTPError, timeouts and socket errors are all OSErrors
        except OSError as error:
            reason = error if isinstance(error, urllib.error.HTTPError) else getattr(error, "reason", error)
            if attempt < 2:
                time.sleep(2**attempt)
    else:
        what = what or os.path.basename(path)
        raise DataError(f"{what} is not in {os.path.dirname(path) or '.'} and could not be downloaded "
                        f"({reason}). Download {url} and put it at {path}")
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if not expected:
            continue
        got = _file_digest(part, algorithm)
        if got != expected.lower():
            os.remove(part)
            name = {"md5": "MD5", "sha256": "SHA-256"}[algorithm]
            raise DataError(f"the download of {url} has {name} {got}, expected {expected}; "
                            f"deleted it, try again")
    os.replace(part, path)


def _fetch(url, part, name):
    """One download attempt: append the rest of url to part, or rewrite part if the server ignores the
    Range."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # "range not satisfiable": the .part already holds the whole file
            return
        raise
    with response:
        if response.status != 206:  # the server (or a file:// URL) sends the whole file: start over
            offset = 0
        size = int(response.headers.get("Content-Length") or 0)
        with open(part, "ab" if offset else "wb") as file, \
                tqdm(total=offset + size or None, initial=offset, unit="B", unit_scale=True,
                     unit_divisor=1024, desc=name, leave=False) as progress:
            while chunk := response.read(1 << 20):
                file.write(chunk)
                progress.update(len(chunk))


def _file_digest(path, algorithm):
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


_download = download  # load_cifar10's `download` flag hides the function's name inside it


# ------------------------------------------------------------------------------------------------------------
# CIFAR-10

try:
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR-10 batches hold (dicts, lists, bytes, ints, numpy arrays): no code can
    run."""

    allowed = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,  # the name in the archive (numpy 1)
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,  # the same function in numpy 2
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return self.allowed[module, name]


_verified_files = set()  # (path, size, mtime): files whose checksum this process has checked


def _check_md5(path, expected, complaint):
    """Raise DataError(complaint) unless the file's MD5 is `expected`; each file is hashed once per
    process."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key in _verified_files:
        return
    got = _file_digest(path, "md5")
    if got != expected:
        raise DataError(complaint.format(got=got))
    _verified_files.add(key)


def load_cifar10(root="./data", train=True, download=True):
    """CIFAR-10 as (images, labels): uint8 (N, 32, 32, 3) RGB and int64 (N,), N = 50000 (train) or 10000
    (test).

    Reads root/cifar-10-batches-py/ (the extracted archive, as torchvision leaves it) when that folder exists,
    each file checked against its official MD5. Otherwise reads the official archive
    root/cifar-10-python.tar.gz (downloaded when missing) without extracting it.
    """
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    folder = os.path.join(root, "cifar-10-batches-py")
    if os.path.isdir(folder):
        batches, source = {name: _read_cifar_batch(folder, name) for name in names}, folder
    else:
        batches = _read_cifar_archive(root, names, download)
        source = os.path.join(root, "cifar-10-python.tar.gz")

    images, labels = [], []
    for name in names:
        batch = batches.get(name)
        data = batch.get(b"data") if isinstance(batch, dict) else None
        batch_labels = np.asarray(batch.get(b"labels", []) if isinstance(batch, dict) else [])
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,)
                and batch_labels.shape == data.shape[:1] and np.isin(batch_labels, range(10)).all()):
            raise DataError(f"{source} is not the CIFAR-10 archive ({name} is missing or malformed)")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # R, G, B planes -> (n, 32, 32, 3)
        labels.append(batch_labels.astype(np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _read_cifar_archive(root, names, download):
    """{name: unpickled batch} for the named members of root/cifar-10-python.tar.gz, read in memory."""
    path = os.path.join(root, "cifar-10-python.tar.gz")
    if not os.path.exists(path):
        if not download:
            raise DataError(f"CIFAR-10 is not in {root}. Download {CIFAR10_URL} and put it at {path}")
        _download(CIFAR10_URL, path, md5=CIFAR10_MD5, what="CIFAR-10")
    _check_md5(path, CIFAR10_MD5,
               f"{path} is not the CIFAR-10 archive (wrong MD5); delete it to download it again")
    batches = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:  # members are read in memory, never extracted to disk
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name in names:
                    batches[name] = _CifarUnpickler(archive.extractfile(member), encoding="bytes").load()
    except Exception as error:  # the archive is untrusted: anything going wrong in it means it is bad
        raise DataError(f"{path} is not a readable CIFAR-10 archive ({error})") from None
    return batches


def _read_cifar_batch(folder, name):
    """One file of the extracted archive, checked against its official MD5 before it is unpickled."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing: a CIFAR-10 folder holds data_batch_1 ... data_batch_5 and "
                        f"test_batch")
    _check_md5(path, CIFAR10_BATCH_MD5[name],
               f"{path} has MD5 {{got}}, not the official {CIFAR10_BATCH_MD5[name]}: the file is damaged or "
               f"not CIFAR-10's")
    try:
        with open(path, "rb") as file:
            return _CifarUnpickler(file, encoding="bytes").load()
    except Exception as error:
        raise DataError(f"{path} is not a readable CIFAR-10 batch ({error})") from None


# ------------------------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST


def find_idx_folder(name, data_path):
    """The folder that holds `name`'s IDX files: --data-path, else the first default folder that has them."""
    if data_path:
        return data_path
    for folder in IDX_DEFAULT_DIRS[name]:
        if all(os.path.exists(os.path.join(folder, f)) or os.path.exists(os.path.join(folder, f + ".gz"))
               for f in IDX_SOURCES[name][1]):
            return folder
    return IDX_DEFAULT_DIRS[name][0]


def load_idx_dataset(name, root, train=True, download=True):
    """MNIST or Fashion-MNIST as (images, labels): uint8 (N, 28, 28) and int64 (N,), N = 60000 or 10000.

    Reads the official IDX files from root, gzipped (train-images-idx3-ubyte.gz, ...) or not, downloading the
    missing ones. A .gz file must match its official MD5 or, re-compressed, the MD5 of the official contents.
    """
    prefix = "train" if train else "t10k"
    images = _read_idx(name, root, f"{prefix}-images-idx3-ubyte", download)
    labels = _read_idx(name, root, f"{prefix}-labels-idx1-ubyte", download)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise DataError(f"the {name} files in {root} do not match: images {images.shape}, "
                        f"labels {labels.shape}")
    if labels.max() > 9:
        raise DataError(f"{root}/{prefix}-labels-idx1-ubyte has labels above 9: not {name}")
    return images, labels.astype(np.int64)


def _read_idx(name, root, file, download):
    """One IDX file -> numpy array. Format: 2 zero bytes, a type byte (0x08: uint8), the number of dimensions,
    then each dimension as a big-endian int32, then the values."""
    base_url, gz_md5 = IDX_SOURCES[name]
    content_md5 = IDX_CONTENT_MD5.get(name, {}).get(file)
    path = os.path.join(root, file)
    if not os.path.exists(path + ".gz") and not os.path.exists(path):
        if not download:
            raise DataError(f"{file}.gz of {name} is not in {root}. Download {base_url}{file}.gz and put it "
                            f"there")
        _download(base_url + file + ".gz", path + ".gz", md5=gz_md5[file], what=f"{file}.gz of {name}")
    compressed = os.path.exists(path + ".gz")  # the .gz when both are there: its checksum is always known
    path = path + ".gz" if compressed else path
    with open(path, "rb") as f:
        raw = f.read()
    try:
        content = gzip.decompress(raw) if compressed else raw
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is not a readable gzip file ({error})") from None
    official = ((compressed and hashlib.md5(raw).hexdigest() == gz_md5[file])
                or (content_md5 is not None and hashlib.md5(content).hexdigest() == content_md5))
    if not official:
        expected = f"the official {gz_md5[file]}" + (f" (contents: {content_md5})" if content_md5 else "")
        raise DataError(f"{path} has MD5 {hashlib.md5(raw).hexdigest()}, not {expected}: the file is damaged "
                        f"or not {name}'s {file}")
    if len(content) < 4 or content[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not an IDX file of bytes")
    ndim = content[3]
    shape = tuple(int(d) for d in np.frombuffer(content, dtype=">i4", count=ndim, offset=4))
    if len(content) != 4 + 4 * ndim + math.prod(shape):
        raise DataError(f"{path} is truncated: its header says {shape}")
    return np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fit_to_size(images, size):
    """uint8 (N, 28, 28) -> (N, size, size): padded with black to a larger size, box-resized to a smaller
    one."""
    height = images.shape[1]
    if size >= height:
        before = (size - height) // 2
        return np.pad(images, ((0, 0), (before, size - height - before), (before, size - height - before)))
    return np.stack([np.array(Image.fromarray(image).resize((size, size), Image.BOX)) for image in images])


class ArrayDataset(Dataset):
    """In-memory uint8 images (N, H, W, C) and labels (N,); item (index, flip) -> (uint8 (C, H, W), label)."""

    def __init__(self, images, labels):
        assert images.dtype == np.uint8 and images.ndim == 4 and len(images) == len(labels)
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        index, flip = key
        image = self.images[index]  # (H, W, C)
        if flip:
            image = image[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), int(self.labels[index])


# ------------------------------------------------------------------------------------------------------------
# Image folders


def center_crop_arr(pil_image, image_size):
    """ADM's resize and center crop: PIL image -> uint8 (image_size, image_size[, 3]).

    Halve with a box filter while the short side is at least twice the target (cheap, alias-free), then
    bicubic to make the short side exactly image_size, then cut the central square.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    array = np.array(pil_image)  # (H, W, 3)
    top, left = (array.shape[0] - image_size) // 2, (array.shape[1] - image_size) // 2
    return array[top:top + image_size, left:left + image_size]


GRAYSCALE_MODES = ("1", "L", "I", "I;16")


def all_grayscale(paths, tolerance=2):
    """True when every readable image among paths is grayscale: a grayscale mode, or RGB whose three channels
    differ by at most tolerance levels anywhere (grayscale saved as RGB, JPEG's rounding allowed). Digits
    saved as RGB then train as one channel, as they would saved as grayscale: a G that has to learn to keep
    three channels equal gives D an easy cue that has nothing to do with the digit."""
    readable = 0
    for path in paths:
        try:
            with Image.open(path) as file:
                if file.mode not in GRAYSCALE_MODES:
                    rgb = np.asarray(file.convert("RGB"), dtype=np.int16)  # (H, W, 3)
                    if np.abs(rgb - rgb[..., :1]).max() > tolerance:
                        return False
        except Exception:  # unreadable: ImageFolder skips it with a warning when it is drawn
            continue
        readable += 1
    return readable > 0


def largest_side(paths):
    """The longest side, in pixels, among the readable images of paths (0 if none). Reads headers only."""
    sides = [0]
    for path in paths:
        try:
            with Image.open(path) as file:
                sides.append(max(file.size))
        except Exception:
            continue
    return max(sides)


SMALL_IMAGE_SIDE = 64  # pixels: folders of images up to this size get no loader process


def default_workers(dataset, small_side=SMALL_IMAGE_SIDE):
    """Loader processes when --num-workers is not given. Decoding pays for a process only on large images (a
    500 x 375 JPEG takes 2-3.6 ms to decode and shrink to 32 px, about as long as a laptop's training step
    takes for its 64 images); arrays in memory and folders of images up to small_side pixels (a 28-px PNG
    decodes in 0.1 ms) are read in the training process, where a worker would only compete for the cores."""
    return 1 if isinstance(dataset, ImageFolder) and dataset.largest_side > small_side else 0


class ImageFolder(Dataset):
    """Images in root/<class>/<file>; item (index, flip) -> (uint8 (C, S, S), label), S = image_size.

    C is 1 when the folder holds grayscale images, whether saved as grayscale (PIL modes 1, L, I, I;16) or as
    RGB with equal channels (judged on up to 64 images spread over the folder): every image is then read as
    grayscale. Otherwise C = 3 and every image is read as RGB. channels=3 forces RGB (the VAE's input).
    .largest_side is the longest side among those images (default_workers reads it).

    Classes are the sorted subfolder names (.classes); label i is .classes[i]. An unreadable image is skipped:
    the item is the next readable one, and a warning names the bad file once.
    """

    def __init__(self, root, image_size, channels=None):
        if not os.path.isdir(root):
            raise DataError(f"image folder {root} does not exist")
        self.root, self.image_size = root, image_size
        self.classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        if not self.classes:
            raise DataError(f"{root} has no class folders (expected {root}/<class>/<image>)")
        self.samples = []  # (path, label)
        for label, name in enumerate(self.classes):
            files = sorted(f for f in os.listdir(os.path.join(root, name))
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            self.samples += [(os.path.join(root, name, f), label) for f in files]
        if not self.samples:
            raise DataError(f"no image files in the class folders of {root}")
        stride = -(-len(self.samples) // 64)  # up to 64 images spread evenly over the folder
        spread = [path for path, _ in self.samples[::stride]]
        if channels is None:
            channels = 1 if all_grayscale(spread) else 3
        self.channels = channels
        self.largest_side = largest_side(spread)
        self._warned = set()  # unreadable files already reported by __getitem__

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        image, label, skipped = self._load(*key)
        for path, reason in skipped:
            if path not in self._warned:
                self._warned.add(path)
                warn(f"skipping unreadable image {path}: {reason}")
        return image, label

    def _load(self, index, flip):
        """(image, label, skipped): the sample at index, or the first readable one after it (wrapping around).

        skipped lists (path, reason) for the unreadable files passed over, so that Loader can report them from
        the main process when this runs in a worker.
        """
        skipped = []
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with Image.open(path) as file:
                    # decodes the file, and raises if it is broken
                    image = file.convert("L" if self.channels == 1 else "RGB")
            except Exception as error:
                skipped.append((path, str(error).splitlines()[0] if str(error) else type(error).__name__))
                continue
            size = self.image_size
            array = center_crop_arr(image, size).reshape(size, size, -1)  # (S, S, C)
            if flip:
                array = array[:, ::-1]
            return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), label, tuple(skipped)
        raise DataError(f"no readable image in {self.root}")


# ------------------------------------------------------------------------------------------------------------
# Latents


class LatentDataset(Dataset):
    """Latents extracted by vae.py: one .npy of records ("latent", "<f2", (2, C, h, w)), ("label", "<i8").

    latent[0] encodes the image, latent[1] its mirror image, both already scaled by 0.18215. The file is
    memory-mapped. Item (index, flip) -> (float32 (C, h, w), label).
    """

    def __init__(self, path):
        self.path = path
        try:
            self.records = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise DataError(f"latent file {path} does not exist") from None
        except (OSError, ValueError) as error:
            raise DataError(f"{path} is not a latent .npy file ({error})") from None
        dtype = self.records.dtype
        if not (self.records.ndim == 1 and dtype.names == ("latent", "label") and dtype["latent"].ndim == 4
                and dtype["latent"].shape[0] == 2 and dtype["latent"].base.kind == "f"
                and dtype["label"].kind in "iu"):
            raise DataError(f"{path} does not hold latents: its dtype is {dtype}, expected "
                            f"[('latent', '<f2', (2, 4, h, w)), ('label', '<i8')]")
        self.latent_shape = dtype["latent"].shape[1:]  # (C, h, w)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        index, flip = key
        record = self.records[index]
        return torch.from_numpy(record["latent"][int(flip)].astype(np.float32)), int(record["label"])

    # Worker processes started with "spawn" (macOS, Windows) receive the path and map the file themselves,
    # rather than a pickled copy of the whole array.
    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def make_dataset(name, data_path, image_size):
    """--data name -> (dataset, num_classes, in_channels, image_size) as the model sees them."""
    if name == "cifar10":
        images, labels = load_cifar10(data_path or "./data")
        return ArrayDataset(images, labels), 10, 3, 32
    if name in IDX_SOURCES:  # 28-px grayscale, fitted to the model's size
        images, labels = load_idx_dataset(name, find_idx_folder(name, data_path))
        return ArrayDataset(fit_to_size(images, image_size)[..., None], labels), 10, 1, image_size
    if name not in ("folder", "imagenet"):
        raise DataError(f"unknown dataset {name!r} (choose cifar10, mnist, fashion-mnist, folder or "
                        f"imagenet)")
    if not data_path:
        raise DataError(f"dataset {name} needs a data path: a folder of class folders"
                        + (" or a latent .npy file" if name == "imagenet" else ""))
    if name == "folder":
        dataset = ImageFolder(data_path, image_size)
        return dataset, len(dataset.classes), dataset.channels, image_size
    if data_path.endswith(".npy"):
        dataset = LatentDataset(data_path)
        channels, size, _ = dataset.latent_shape
        return dataset, 1000, channels, size
    return ImageFolder(data_path, 256, channels=3), 1000, 3, 256  # RGB pixels: the caller encodes them


# ------------------------------------------------------------------------------------------------------------
# Loader


class _Reader(Dataset):
    """What the workers run: key (index, flip) -> (sample, label, unreadable files skipped)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key):
        if isinstance(self.dataset, ImageFolder):
            return self.dataset._load(*key)
        sample, label = self.dataset[key]
        return sample, label, ()


def _collate(items):
    samples, labels, skipped = zip(*items)
    return torch.stack(samples), torch.tensor(labels, dtype=torch.int64), sum(skipped, ())


class _EpochBatches:
    """The batch sampler: the batches of (index, flip) keys left in the current epoch, swapped in by
    Loader."""

    def __init__(self):
        self.batches = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class Loader:
    """Endless minibatches of (x, y) on device, sharded over ranks, resumable to the exact batch.

    Epoch e shuffles with a generator seeded by (seed, e), so every rank (same seed) draws the same
    permutation and flips. The permutation is padded by wrap-around to a multiple of world_size and rank r
    takes positions r, r + W, ... (DistributedSampler's split); batches are consecutive chunks of batch_size
    (per rank) and the incomplete last chunk is dropped. x is float32, uint8 pixels mapped to [-1, 1]; latents
    pass unchanged. y is int64.
    """

    def __init__(self, dataset, batch_size, rank=0, world_size=1, seed=0, num_workers=0, device="cpu",
                 flip=True, reported=None):
        if len(dataset) == 0:
            raise DataError("the dataset is empty")
        self.per_rank = math.ceil(len(dataset) / world_size)  # samples each rank gets per epoch
        if batch_size > self.per_rank:
            raise DataError(f"batch size {batch_size} is larger than the {self.per_rank} samples each of the "
                            f"{world_size} processes gets per epoch")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.seed, self.device, self.flip = seed, torch.device(device), flip
        self.batches_per_epoch = self.per_rank // batch_size
        self.epoch, self.batch = 0, 0  # position of the next batch
        self._batches = _EpochBatches()
        self._loader = DataLoader(_Reader(dataset), batch_sampler=self._batches, collate_fn=_collate,
                                  num_workers=num_workers, persistent_workers=num_workers > 0,
                                  pin_memory=self.device.type == "cuda",
                                  generator=torch.Generator())  # worker seeds must not consume the global RNG
        self._iterator = None  # over the current epoch, from self.batch on; None: start it at the next call
        # unreadable files already reported: pass another loader's set so that a file is named once in all
        self.reported = set() if reported is None else reported
        self._skipped = set()  # unreadable files met in this epoch

    def _epoch_keys(self, epoch):
        """This rank's (index, flip) keys for one epoch, in order."""
        n = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        order = torch.randperm(n, generator=generator)
        padded = self.per_rank * self.world_size  # wrap around to a multiple of world_size
        order = order.repeat(math.ceil(padded / n))[:padded]
        flips = torch.randint(2, (len(order),), generator=generator).bool() & self.flip
        this_rank = slice(self.rank, None, self.world_size)  # positions rank, rank + W, ...
        return list(zip(order[this_rank].tolist(), flips[this_rank].tolist()))

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            keys = self._epoch_keys(self.epoch)
            self._batches.batches = [keys[b * self.batch_size:(b + 1) * self.batch_size]
                                     for b in range(self.batch, self.batches_per_epoch)]
            self._iterator = iter(self._loader)
        try:
            x, y, skipped = next(self._iterator)
        except DataError as error:  # from a worker, with its traceback in the message: keep the user's line
            raise DataError(str(error).splitlines()[-1].split("DataError: ", 1)[-1]) from None
        for path, reason in skipped:
            self._skipped.add(path)
            if path not in self.reported:
                self.reported.add(path)
                warn(f"skipping unreadable image {path}: {reason}")
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            if self._skipped:
                warn(f"skipped {len(self._skipped)} unreadable images in epoch {self.epoch}")
            self.epoch, self.batch, self._iterator, self._skipped = self.epoch + 1, 0, None, set()
        x = x.to(self.device, non_blocking=True)  # uint8 travels 4x lighter than float32
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
        return x, y.to(self.device, non_blocking=True)

    def state_dict(self):
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state):
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        # saved by a run with longer epochs (fewer ranks, smaller batches)
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        self._iterator, self._skipped = None, set()
