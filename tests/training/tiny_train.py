"""A tiny training job for the trainer tests; runs as a script (plain python or torchrun).

usage: tiny_train.py CKPT_DIR OUT_FILE [--steps N] [--sleep S] [--nan-at STEPS] [--max-frames F]
"""

import argparse
import time

import torch
from safetensors.torch import save_file

from asrlab.models.batch import pad_features
from asrlab.training.trainer import TrainConfig, distributed, train


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(80, 32)
        self.drop = torch.nn.Dropout(0.2)
        self.head = torch.nn.Linear(32, 4)

    def forward(self, features, feature_lengths, labels, poison=None):
        mask = (torch.arange(features.shape[-1])[None] < feature_lengths[:, None]).float()
        pooled = (features * mask[:, None]).sum(-1) / feature_lengths[:, None]
        logits = self.head(self.drop(torch.tanh(self.proj(pooled))))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        if poison is not None and bool(poison.any()):
            loss = loss * float("nan")
        return {"loss": loss}


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 100, (n,), generator=g).tolist()
    labels = torch.randint(0, 4, (n,), generator=g)
    feats = [torch.randn(L, 80, generator=g) + labels[i] * 0.3 for i, L in enumerate(lengths)]
    return feats, lengths, labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt_dir")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--nan-at", type=int, nargs="*", default=[])
    ap.add_argument("--max-frames", type=int, default=800)
    ap.add_argument("--max-bad-steps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    feats, lengths, labels = data()
    calls = {"n": 0}

    def collate(idx):
        x, lens = pad_features([feats[i] for i in idx])
        calls["n"] += 1
        poison = torch.tensor([calls["n"] in a.nan_at])
        return {"features": x, "feature_lengths": lens, "labels": labels[idx], "poison": poison}

    torch.manual_seed(0)
    model = TinyClassifier()
    cfg = TrainConfig(max_steps=a.steps, lr=3e-2, warmup_steps=5, max_frames=a.max_frames, ckpt_every=5,
                      seed=1, max_bad_steps=a.max_bad_steps,
                      specaugment={"freq_masks": 1, "freq_width": 8, "time_masks": 1, "time_width": 10})
    result = train(model, lengths, collate, cfg, a.ckpt_dir, on_step=lambda s: time.sleep(a.sleep), desc="tiny")
    rank, _ = distributed()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.out)
        print("RESULT", result)


if __name__ == "__main__":
    main()
