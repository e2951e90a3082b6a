"""A small class-structured image dataset, written in the real CIFAR-10 archive format.

Class k is a disc of a class-specific colour at a class-specific position on a dark background, with random
jitter in position, radius and brightness and a little pixel noise. Simple enough that a tiny model learns it
in minutes on a CPU, structured enough that per-class statistics show whether it did.

    python tests/synthetic.py DIR [--per-class N]   # writes DIR/cifar-10-python.tar.gz and prints its MD5
"""

import argparse
import hashlib
import io
import os
import pickle
import sys
import tarfile

import numpy as np

COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]],
                   np.float32)
CENTRES = [(8 + 16 * (k % 2), 5 + 5.5 * (k // 2)) for k in range(10)]  # (x, y), a 2 x 5 layout


def make_images(per_class, seed=0, size=32):
    """-> images uint8 (10 * per_class, size, size, 3), labels int64, shuffled."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images, labels = [], []
    for k in range(10):
        for _ in range(per_class):
            cx, cy = np.array(CENTRES[k]) * size / 32 + rng.uniform(-2, 2, 2)
            radius = rng.uniform(4, 6) * size / 32
            inside = np.clip(radius - np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) + 0.5, 0, 1)[..., None]
            image = (20 + inside * (COLOURS[k] * rng.uniform(0.8, 1.0) - 20)
                     + rng.normal(0, 4, (size, size, 3)))
            images.append(np.clip(image, 0, 255).round().astype(np.uint8))
            labels.append(k)
    order = rng.permutation(len(labels))
    return np.stack(images)[order], np.array(labels, np.int64)[order]


def write_cifar_archive(path, images, labels, test_images=None, test_labels=None):
    """Write images (N, 32, 32, 3) uint8 as CIFAR-10's python archive: 5 training batches + test_batch."""
    def batch(imgs, labs):  # planes R, G, B, each row-major, as CIFAR stores them
        return {b"data": imgs.transpose(0, 3, 1, 2).reshape(len(imgs), -1),
                b"labels": [int(label) for label in labs]}

    files = {f"cifar-10-batches-py/data_batch_{i + 1}": batch(imgs, labs)
             for i, (imgs, labs) in enumerate(zip(np.array_split(images, 5), np.array_split(labels, 5)))}
    test_images = images[:10] if test_images is None else test_images
    test_labels = labels[:10] if test_labels is None else test_labels
    files["cifar-10-batches-py/test_batch"] = batch(test_images, test_labels)
    files["cifar-10-batches-py/batches.meta"] = {b"label_names": [f"class{k}".encode() for k in range(10)]}
    with tarfile.open(path, "w:gz") as archive:
        for name, content in files.items():
            payload = pickle.dumps(content, protocol=4)  # bytes stay bytes (py2 str in the real file)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    imgs, labs = make_images(args.per_class, args.seed)
    md5 = write_cifar_archive(os.path.join(args.out_dir, "cifar-10-python.tar.gz"), imgs, labs)
    print(md5)
    sys.exit(0)
