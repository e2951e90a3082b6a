"""Sample quality a laptop can afford: a small classifier trained on the real images judges the samples.

FID needs an Inception network at 299 px (about 1.5 images/s on one CPU core), so it is an end-of-run number.
While training on small datasets (MNIST, Fashion-MNIST, CIFAR-10, small folders) we watch cheaper ones,
computed on class-balanced samples of the EMA generator:

    accuracy   the share of samples that the judge labels as their conditioning class. Read it against A_real,
               the judge's accuracy on real held-out images: accuracy / A_real = 1 means the generator draws
               the requested class as recognizably as the data does. Chance is 1 / num_classes.
    fd         the Frechet distance (the FID formula) between the judge's 128-d penultimate features of the
               samples and of real training images. It falls as samples look more like the data; fd_ratio
               divides it by the distance of the untrained generator, whose samples are all mid-gray (G's head
               starts at zero).

    precision  improved precision and recall (Kynkaanniemi et al. 2019, k = 3) in the same features, against
    recall     1,000 real held-out images. Each point of a set owns a ball reaching its k-th nearest neighbour
               in that set; precision is the share of samples inside some real image's ball (are the samples
               realistic?), recall the share of real images inside some sample's ball (is every kind of image
               drawn?). A generator that draws one image per class has recall near 0, however good that
               image is. The judge file holds the real features and the ceiling: the precision and recall of
               another 1,000 real held-out images.

None of these numbers is comparable with published FIDs: the feature space is a 20k-parameter CNN trained
here, and the sample count is small (the FD of a finite sample is biased upwards; compare runs at the same
count).

    python quality.py --data fashion-mnist --out judge.pt              # train a judge once (60 s on one core)
    python quality.py --judge judge.pt --ckpt out/ckpt.pt              # judge a checkpoint's EMA generator
    python quality.py --judge judge.pt --ckpt fm/ckpt.pt --nfe 1,2,4   # ... at several step counts
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import data
import fid
import prior
import runtime
from model import Generator
from sample import SampleError, sample, sampling_steps

FEATURE_DIM = 128


class Judge(nn.Module):
    """(N, C, S, S) images in [-1, 1] -> (logits (N, classes), features (N, 128)).
    Two conv stages and an MLP."""

    def __init__(self, in_channels, image_size, num_classes):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes

        def stage(c_in, c_out):  # (N, c_in, S, S) -> (N, c_out, S/2, S/2)
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.convs = nn.Sequential(stage(in_channels, 16), stage(16, 32))
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(32 * (image_size // 4) ** 2, FEATURE_DIM),
                                      nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, x):
        features = self.features(self.convs(x))
        return self.head(features), features


def to_input(images):
    """uint8 (N, S, S, C) numpy -> float (N, C, S, S) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def real_splits(name, data_path, image_size, seed=0):
    """-> (train_images, train_labels, test_images, test_labels), uint8 (N, S, S, C) and int64 (N,).

    The official test sets of MNIST, Fashion-MNIST and CIFAR-10; an image folder holds out a random tenth."""
    if name in data.IDX_SOURCES:
        folder = data.find_idx_folder(name, data_path)
        (x, y), (x_test, y_test) = (data.load_idx_dataset(name, folder, train) for train in (True, False))
        x, x_test = (data.fit_to_size(images, image_size)[..., None] for images in (x, x_test))
        return x, y, x_test, y_test
    if name == "cifar10":
        (x, y), (x_test, y_test) = (data.load_cifar10(data_path or "./data", train)
                                    for train in (True, False))
        return x, y, x_test, y_test
    if name != "folder":
        raise data.DataError("the judge needs small images: --data cifar10, mnist, fashion-mnist or folder")
    folder = data.ImageFolder(data_path, image_size)
    items = [folder[(i, False)] for i in range(len(folder))]
    x = np.stack([image.permute(1, 2, 0).numpy() for image, _ in items])
    y = np.array([label for _, label in items], dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[:len(x) // 10], order[len(x) // 10:]
    return x[train], y[train], x[test], y[test]


@torch.no_grad()
def accuracy_and_features(judge, images, labels, batch_size=500):
    """Judge a float (N, C, S, S) batch in chunks -> (accuracy, features (N, 128))."""
    correct, features = 0, []
    for start in range(0, len(images), batch_size):
        logits, feats = judge(images[start:start + batch_size])
        correct += (logits.argmax(1) == labels[start:start + batch_size]).sum().item()
        features.append(feats)
    return correct / len(images), torch.cat(features)


def statistics(features):
    """(N, D) -> mu (D,), sigma (D, D), float64 numpy."""
    stats = fid.FeatureStatistics(dim=features.shape[1])
    stats.update(features)
    return stats.mean_and_covariance()


def ball_radii(features, k=3):
    """(N, D) -> (N,): each point's distance to its k-th nearest neighbour among the others."""
    distances = torch.cdist(features, features)  # (N, N), zero on the diagonal
    return distances.kthvalue(k + 1, dim=1).values  # the point itself is the first of the k + 1


def share_covered(points, centres, radii):
    """The share of points (M, D) that lie in at least one ball (centres (N, D), radii (N,))."""
    inside = torch.cdist(points, centres) <= radii[None]  # (M, N)
    return inside.any(dim=1).double().mean().item()


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019) of fake features (M, D) against real (N, D):
    -> (share of fakes inside the real manifold, share of reals inside the fake manifold)."""
    real, fake = real.double(), fake.double()
    return share_covered(fake, real, ball_radii(real, k)), share_covered(real, fake, ball_radii(fake, k))


PR_IMAGES = 1000  # real held-out images in the reference of precision and recall, and as many in the ceiling


def train_judge(name, data_path, image_size, steps=1500, batch_size=64, lr=2e-3, seed=0, log=print):
    """Train a judge on the real training set -> its file's contents:
    weights, A_real and the real statistics."""
    x, y, x_test, y_test = real_splits(name, data_path, image_size, seed)
    generator = torch.Generator().manual_seed(seed)
    judge = Judge(x.shape[-1], image_size, int(max(y.max(), y_test.max())) + 1)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    tic = time.time()
    for step in range(steps):
        batch = torch.randint(len(x), (batch_size,), generator=generator)
        logits, _ = judge(to_input(x[batch.numpy()]))
        loss = F.cross_entropy(logits, torch.from_numpy(y[batch.numpy()]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 500 == 0:
            log(f"judge step {step + 1}/{steps}: loss {loss.item():.3f} ({time.time() - tic:.0f} s)")
    judge.eval()
    real_accuracy, _ = accuracy_and_features(judge, to_input(x_test), torch.from_numpy(y_test))
    reference = np.random.default_rng(seed).permutation(len(x))[:10_000]
    _, features = accuracy_and_features(judge, to_input(x[reference]), torch.from_numpy(y[reference]))
    mu, sigma = statistics(features)
    log(f"judge: accuracy on {len(x_test)} real held-out images A_real = {real_accuracy:.4f}")
    # precision and recall: a reference of held-out images, and the score of as many others against it
    held_out = np.random.default_rng(seed).permutation(len(x_test))
    n = min(PR_IMAGES, len(x_test) // 2)
    _, pr_features = accuracy_and_features(judge, to_input(x_test[held_out[:2 * n]]),
                                           torch.from_numpy(y_test[held_out[:2 * n]]))
    ceiling = precision_recall(pr_features[:n], pr_features[n:])
    log(f"judge: {n} real held-out images against {n} others: precision {ceiling[0]:.3f}, "
        f"recall {ceiling[1]:.3f}")
    return {"kwargs": dict(in_channels=judge.in_channels, image_size=image_size,
                           num_classes=judge.num_classes),
            "state_dict": judge.state_dict(), "real_accuracy": real_accuracy, "mu": torch.from_numpy(mu),
            "sigma": torch.from_numpy(sigma), "data": name, "pr_features": pr_features[:n],
            "pr_ceiling": torch.tensor(ceiling)}


def load_judge(path):
    """-> (judge in eval mode, its file's contents)."""
    state = checkpoint.load(path)
    if not isinstance(state, dict) or not {"kwargs", "state_dict", "mu", "sigma"} <= set(state):
        raise checkpoint.CheckpointError(f"{path} is not a judge file from `python quality.py --out`")
    judge = Judge(**state["kwargs"])
    checkpoint.load_weights(judge, state["state_dict"], what=path)
    return judge.eval(), state


def judge_or_train(path, name, data_path, image_size, log=print):
    """Load the judge at path, or train one and save it there first. Checks it fits the data."""
    if not os.path.exists(path):
        log(f"training a judge of sample quality on the real {name} images, once: {path}")
        checkpoint.save(train_judge(name, data_path, image_size, log=log), path)
    judge, state = load_judge(path)
    if state.get("data") != name:
        raise checkpoint.CheckpointError(f"{path} judges {state.get('data')} samples, not {name}: delete it "
                                         f"or pass another --judge")
    if state["kwargs"]["image_size"] != image_size:
        raise checkpoint.CheckpointError(f"{path} judges {state['kwargs']['image_size']}-px images, not "
                                         f"{image_size}-px: delete it or pass another --judge")
    return judge, state


class SampleJudge:
    """Judges a generator on fixed, class-balanced noise:
    the same samples are compared at every evaluation."""

    def __init__(self, judge, state, shape, num_samples=1000, seed=0):
        self.judge, self.real_accuracy = judge, state["real_accuracy"]
        self.mu, self.sigma = state["mu"].numpy(), state["sigma"].numpy()
        generator = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(num_samples, *shape, generator=generator)       # (N, C, S, S)
        self.labels = torch.arange(num_samples) % judge.num_classes                # (N,)
        self.untrained_fd = None
        self.pr_features = state.get("pr_features")  # (n, 128); absent from judge files of older versions

    @torch.no_grad()
    def __call__(self, generator, nfe=1, pred="x", prior=None, batch_size=250):
        """-> dict(accuracy, accuracy_ratio, fd, fd_ratio, precision, recall) of the generator's samples
        (precision and recall where the judge file holds real features). prior: the run's noise (prior.py),
        through which the fixed standard normals pass; None: N(0, I)."""
        device = next(generator.parameters()).device
        source = (lambda eps: eps) if prior is None else prior  # on the generator's device
        images = torch.cat([sample(generator, source(self.noise[i:i + batch_size].to(device)),
                                   self.labels[i:i + batch_size].to(device),
                                   nfe, pred).float().cpu().clamp(-1, 1)
                            for i in range(0, len(self.noise), batch_size)])
        accuracy, features = accuracy_and_features(self.judge, images, self.labels)
        fd = fid.frechet_distance(*statistics(features), self.mu, self.sigma)
        if self.untrained_fd is None:  # mid-gray images: what G draws before its first step
            _, flat = accuracy_and_features(self.judge, torch.zeros_like(images[:2]), self.labels[:2])
            flat_mu = flat[0].double().numpy()
            self.untrained_fd = fid.frechet_distance(flat_mu, np.zeros_like(self.sigma), self.mu, self.sigma)
        result = dict(accuracy=accuracy, accuracy_ratio=accuracy / self.real_accuracy, fd=fd,
                      fd_ratio=fd / self.untrained_fd)
        if self.pr_features is not None:
            result["precision"], result["recall"] = precision_recall(self.pr_features, features)
        return result


def describe(result, real_accuracy):
    """One line for a judgement."""
    line = (f"accuracy {result['accuracy']:.4f} ({result['accuracy_ratio']:.3f} of A_real "
            f"{real_accuracy:.4f}); Frechet distance {result['fd']:.3f} ({result['fd_ratio']:.4f} of the "
            f"untrained generator's)")
    if "recall" in result:
        line += f"; precision {result['precision']:.3f}, recall {result['recall']:.3f}"
    return line


def judge_for_run(args, source):
    """The judge of a training run (--judge, or OUT_DIR/judge.pt trained there on first use) over fixed,
    class-balanced noise of the run's shape."""
    path = args.judge or os.path.join(args.out_dir, "judge.pt")
    shape = (source.in_channels, source.input_size, source.input_size)
    judge = judge_or_train(path, args.data, args.data_path, source.input_size)
    return SampleJudge(*judge, shape, args.judge_samples, args.seed)


def judge_checkpoint(judge_path, ckpt_path, num_samples, step_counts=None):
    """Print how the judge rates the EMA generator of a train.py or flow_matching.py checkpoint, at each of
    step_counts (default: the steps it was trained or judged with)."""
    judge, state = load_judge(judge_path)
    run = checkpoint.load(ckpt_path)
    generator = Generator(**run["generator_kwargs"])
    checkpoint.load_weights(generator, run["ema"], what=f"{ckpt_path} [ema]")
    noise_prior = prior.from_state(run.get("prior"))
    shape = (generator.in_channels, generator.input_size, generator.input_size)
    sample_judge = SampleJudge(judge, state, shape, num_samples)
    if "pr_ceiling" in state:
        precision, recall = state["pr_ceiling"].tolist()
        print(f"real held-out images against others: precision {precision:.3f}, recall {recall:.3f}")
    for requested in step_counts or [None]:
        nfe = sampling_steps(run, requested, ckpt_path)
        result = sample_judge(generator.eval(), nfe, run["config"]["pred"], noise_prior)
        print(f"nfe {nfe}: " + describe(result, state["real_accuracy"]))


def main(argv=None):
    p = argparse.ArgumentParser(description="Train a judge of sample quality on real images, or judge a "
                                            "checkpoint's EMA generator with one.")
    p.add_argument("--data", default="fashion-mnist", choices=["mnist", "fashion-mnist", "cifar10", "folder"])
    p.add_argument("--data-path", default=None)
    p.add_argument("--image-size", type=int, default=None,
                   help="as train.py's preset: 28 for the MNISTs, else 32")
    p.add_argument("--out", default=None, help="train a judge and write it here")
    p.add_argument("--judge", default=None, help="a judge file, to judge --ckpt")
    p.add_argument("--ckpt", default=None,
                   help="a train.py or flow_matching.py checkpoint: its EMA generator is judged")
    p.add_argument("--nfe", default=None, help="sampling steps, or several: 1,2,4 (default: the "
                   "checkpoint's; a K-step AFM generator samples with K steps only)")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = p.parse_args(argv)
    if not args.out and not (args.judge and args.ckpt):
        p.error("give --out JUDGE.pt to train a judge, or --judge JUDGE.pt and --ckpt CKPT.pt to use one")
    image_size = args.image_size or (28 if args.data in data.IDX_SOURCES else 32)
    try:
        step_counts = [int(k) for k in args.nfe.split(",")] if args.nfe else None
    except ValueError:
        p.error(f"--nfe takes step counts separated by commas, e.g. 1,2,4; got {args.nfe!r}")

    def body():
        if args.out:
            checkpoint.save(train_judge(args.data, args.data_path, image_size), args.out)
        if args.judge and args.ckpt:
            judge_checkpoint(args.judge, args.ckpt, args.samples, step_counts)

    sys.exit(runtime.run(body, args.debug, {(data.DataError, checkpoint.CheckpointError, SampleError): 2}))


if __name__ == "__main__":
    main()
