"""Data for AFM training: datasets, and an endless loader that resumes exactly.

Three sources, each a map-style dataset indexed by an (index, flip) pair, so the horizontal flip is decided by the
loader's seeded generator and not by worker processes:

- CIFAR-10, read straight from the official python archive into memory       -> ArrayDataset (uint8 3x32x32)
- an image folder root/<class>/<image> (ImageNet's train layout), ADM crop   -> ImageFolder (uint8 3xSxS)
- ImageNet latents extracted once by vae.py into one structured .npy file    -> LatentDataset (float32 4xhxw)

make_dataset() picks one from the command line's --data name. Loader deals them out as endless, rank-sharded
minibatches on the training device (pixels scaled to [-1, 1], latents as they are), and its state_dict() is two
integers that make a resumed run see exactly the batches it would have seen. Bad input raises DataError with one line
meant for the user; an unreadable image is skipped with a warning.
"""

import hashlib
import math
import os
import pickle
import sys
import tarfile
import time
import urllib.error
import urllib.request

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # compared lower-case, so .JPEG counts


class DataError(Exception):
    """Bad input (a missing dataset, a corrupt archive, ...). The message is one line for the user."""


def warn(message):
    tqdm.write(f"warning: {message}", file=sys.stderr)  # keeps a progress bar intact


# -----------------------------------------------------------------------------------------------------------------
# Downloads


def download(url, path, md5=None, sha256=None, what=None):
    """Download url to path: resumable, verified, atomic.

    Bytes go to path + ".part" (resumed with an HTTP Range request when one is left from an earlier try); only a file
    whose checksum matches is renamed to path, so a partial download is never mistaken for a complete one. `what`
    names the file in the offline message (default: its file name).
    """
    part = path + ".part"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the folder for {path}: {error}") from None
    for attempt in range(3):
        try:
            _fetch(url, part, os.path.basename(path))
            break
        except OSError as error:  # urllib's URLError and HTTPError, timeouts and socket errors are all OSErrors
            reason = error if isinstance(error, urllib.error.HTTPError) else getattr(error, "reason", error)
            if attempt < 2:
                time.sleep(2**attempt)
    else:
        what = what or os.path.basename(path)
        raise DataError(f"{what} is not in {os.path.dirname(path) or '.'} and could not be downloaded ({reason}). "
                        f"Download {url} and put it at {path}")
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if not expected:
            continue
        got = _file_digest(part, algorithm)
        if got != expected.lower():
            os.remove(part)
            raise DataError(f"the download of {url} has {algorithm.upper()} {got}, expected {expected}; "
                            f"deleted it, try again")
    os.replace(part, path)


def _fetch(url, part, name):
    """One download attempt: append the rest of url to part, or rewrite part if the server ignores the Range."""
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
                tqdm(total=offset + size or None, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=name, leave=False) as progress:
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


# -----------------------------------------------------------------------------------------------------------------
# CIFAR-10

try:
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR-10 batches hold (dicts, lists, bytes, ints, numpy arrays): no code can run."""

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


_verified_archives = set()  # (path, size, mtime): archives whose MD5 this process has checked


def load_cifar10(root="./data", train=True, download=True):
    """CIFAR-10 as (images, labels): uint8 (N, 32, 32, 3) RGB and int64 (N,), N = 50000 (train) or 10000 (test).

    Reads the official archive root/cifar-10-python.tar.gz (downloaded when missing) without extracting it.
    """
    path = os.path.join(root, "cifar-10-python.tar.gz")
    if not os.path.exists(path):
        if not download:
            raise DataError(f"CIFAR-10 is not in {root}. Download {CIFAR10_URL} and put it at {path}")
        _download(CIFAR10_URL, path, md5=CIFAR10_MD5, what="CIFAR-10")
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _verified_archives:
        if _file_digest(path, "md5") != CIFAR10_MD5:
            raise DataError(f"{path} is not the CIFAR-10 archive (wrong MD5); delete it to download it again")
        _verified_archives.add(key)

    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    batches = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:  # members are read in memory, never extracted to disk
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name in names:
                    batches[name] = _CifarUnpickler(archive.extractfile(member), encoding="bytes").load()
    except Exception as error:  # the archive is untrusted: anything going wrong in it means it is bad
        raise DataError(f"{path} is not a readable CIFAR-10 archive ({error})") from None

    images, labels = [], []
    for name in names:
        batch = batches.get(name)
        data = batch.get(b"data") if isinstance(batch, dict) else None
        batch_labels = np.asarray(batch.get(b"labels", []) if isinstance(batch, dict) else [])
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,)
                and batch_labels.shape == data.shape[:1] and np.isin(batch_labels, range(10)).all()):
            raise DataError(f"{path} is not the CIFAR-10 archive ({name} is missing or malformed)")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # R, G, B planes -> (n, 32, 32, 3)
        labels.append(batch_labels.astype(np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


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


# -----------------------------------------------------------------------------------------------------------------
# Image folders


def center_crop_arr(pil_image, image_size):
    """ADM's resize and center crop: PIL image -> uint8 (image_size, image_size, 3).

    Halve with a box filter while the short side is at least twice the target (cheap, alias-free), then bicubic to
    make the short side exactly image_size, then cut the central square.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    array = np.array(pil_image)  # (H, W, 3)
    top, left = (array.shape[0] - image_size) // 2, (array.shape[1] - image_size) // 2
    return array[top:top + image_size, left:left + image_size]


class ImageFolder(Dataset):
    """Images in root/<class>/<file>; item (index, flip) -> (uint8 (3, S, S), label), S = image_size.

    Classes are the sorted subfolder names (.classes); label i is .classes[i]. An unreadable image is skipped: the item
    is the next readable one, and a warning names the bad file once.
    """

    def __init__(self, root, image_size):
        if not os.path.isdir(root):
            raise DataError(f"image folder {root} does not exist")
        self.root, self.image_size = root, image_size
        self.classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        if not self.classes:
            raise DataError(f"{root} has no class folders (expected {root}/<class>/<image>)")
        self.samples = []  # (path, label)
        for label, name in enumerate(self.classes):
            files = sorted(f for f in os.listdir(os.path.join(root, name)) if f.lower().endswith(IMAGE_EXTENSIONS))
            self.samples += [(os.path.join(root, name, f), label) for f in files]
        if not self.samples:
            raise DataError(f"no image files in the class folders of {root}")
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

        skipped lists (path, reason) for the unreadable files passed over, so that Loader can report them from the main
        process when this runs in a worker.
        """
        skipped = []
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with Image.open(path) as file:
                    image = file.convert("RGB")  # decodes; PIL raises OSError, SyntaxError, ... on broken files
            except Exception as error:
                skipped.append((path, str(error).splitlines()[0] if str(error) else type(error).__name__))
                continue
            array = center_crop_arr(image, self.image_size)  # (S, S, 3)
            if flip:
                array = array[:, ::-1]
            return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), label, tuple(skipped)
        raise DataError(f"no readable image in {self.root}")


# -----------------------------------------------------------------------------------------------------------------
# Latents


class LatentDataset(Dataset):
    """Latents extracted by vae.py: one .npy of records ("latent", "<f2", (2, C, h, w)), ("label", "<i8").

    latent[0] encodes the image, latent[1] its mirror image, both already scaled by 0.18215. The file is memory-mapped.
    Item (index, flip) -> (float32 (C, h, w), label).
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

    # Worker processes started with "spawn" (macOS, Windows) receive the path and map the file themselves, rather
    # than a pickled copy of the whole array.
    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def make_dataset(name, data_path, image_size):
    """--data name -> (dataset, num_classes, in_channels, image_size) as the model sees them."""
    if name == "cifar10":
        images, labels = load_cifar10(data_path or "./data")
        return ArrayDataset(images, labels), 10, 3, 32
    if name not in ("folder", "imagenet"):
        raise DataError(f"unknown dataset {name!r} (choose cifar10, folder or imagenet)")
    if not data_path:
        raise DataError(f"dataset {name} needs a data path: a folder of class folders"
                        + (" or a latent .npy file" if name == "imagenet" else ""))
    if name == "folder":
        dataset = ImageFolder(data_path, image_size)
        return dataset, len(dataset.classes), 3, image_size
    if data_path.endswith(".npy"):
        dataset = LatentDataset(data_path)
        channels, size, _ = dataset.latent_shape
        return dataset, 1000, channels, size
    return ImageFolder(data_path, 256), 1000, 3, 256  # pixels: the caller encodes them with the VAE


# -----------------------------------------------------------------------------------------------------------------
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
    """The batch sampler: the batches of (index, flip) keys left in the current epoch, swapped in by Loader."""

    def __init__(self):
        self.batches = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class Loader:
    """Endless minibatches of (x, y) on device, sharded over ranks, resumable to the exact batch.

    Epoch e shuffles with a generator seeded by (seed, e), so every rank (same seed) draws the same permutation and
    flips. The permutation is padded by wrap-around to a multiple of world_size and rank r takes positions r, r + W,
    ... (DistributedSampler's split); batches are consecutive chunks of batch_size (per rank) and the incomplete last
    chunk is dropped. x is float32, uint8 pixels mapped to [-1, 1]; latents pass unchanged. y is int64.
    """

    def __init__(self, dataset, batch_size, rank=0, world_size=1, seed=0, num_workers=0, device="cpu", flip=True):
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
        self._warned = set()  # unreadable files already reported
        self._skipped = set()  # unreadable files met in this epoch

    def _epoch_keys(self, epoch):
        """This rank's (index, flip) keys for one epoch, in order."""
        n = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        order = torch.randperm(n, generator=generator)
        padded = self.per_rank * self.world_size  # wrap around to a multiple of world_size
        order = order.repeat(math.ceil(padded / n))[:padded]
        flips = torch.randint(2, (len(order),), generator=generator).bool() & self.flip
        return list(zip(order[self.rank::self.world_size].tolist(), flips[self.rank::self.world_size].tolist()))

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
            if path not in self._warned:
                self._warned.add(path)
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
        if self.batch >= self.batches_per_epoch:  # saved by a run with longer epochs (fewer ranks, smaller batches)
            self.epoch, self.batch = self.epoch + 1, 0
        self._iterator, self._skipped = None, set()
