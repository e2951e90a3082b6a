"""Run train.py under torchrun, then let every rank dump its own final state for the test to compare."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402

seen = []
original_next = data.Loader.__next__


def recording_next(self):
    x, y = original_next(self)
    seen.append(y.tolist())
    return x, y


data.Loader.__next__ = recording_next

args = train.parse_args()
nets = train.train(args).nets
rank = int(os.environ["RANK"])
torch.save({"G": nets.G.state_dict(), "D": nets.D.state_dict(), "ema": nets.ema.state_dict(),
            "gradnorm": nets.gradnorm.state_dict(), "data_seen": seen},
           os.path.join(args.out_dir, f"rank{rank}.pt"))
