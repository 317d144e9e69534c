"""A PyTorch reference of our MLP, for `make bench-train`'s speed comparison (opt-in).

    make setup-torch     # .venv-torch: torch 2.13.0 (CPU build) + numpy, nothing of TensorFlow

The same network as model/network.py's default, trained the way a PyTorch user would on a
CPU: the whole training set as one in-memory uint8 tensor, a fresh `torch.randperm` each epoch,
batches gathered by index (no DataLoader workers, which cost more than they give here):

    uint8 [B, 28, 28] -> /255 -> [B, 784] -> Linear(800, no bias) -> BatchNorm1d -> ReLU
      -> Dropout(0.2) -> Linear(256, no bias) -> BatchNorm1d -> ReLU -> Dropout(0.2)
      -> Linear(10) -> cross-entropy on the logits
    AdamW (lr 2e-3, decoupled weight decay 1e-4), batch 128, drop_last, He-normal init.

It runs as a worker process in its own environment (`--worker`), driven over stdin/stdout by
model/bench.py, one JSON object a line, so that the benchmark can alternate its epochs with
Keras' epochs in one run (both see the same machine at nearly the same moments):

    <- {"ready": true, "torch": "2.13.0+cpu", "threads": 2, "parameters": 838794, ...}
    -> {"cmd": "epoch"}
    <- {"epoch": 1, "train_seconds": 3.1, "epoch_seconds": 3.2, "cpu_seconds": 6.3,
        "samples": 54912, "val_accuracy": 0.97, "loss": 0.21}
    -> {"cmd": "quit"}

The data comes as an .npz file (uint8 `train_images` [N, 28, 28], `train_labels` [N],
`val_images`, `val_labels`) written by the benchmark, so this file needs only torch and numpy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import contract


def build_reference_mlp(hidden_units=(800, 256), dropout: float = 0.2, num_classes: int = 10):
    """torch.nn.Sequential taking float [B, 784] in [0, 1], returning logits [B, 10]."""
    import torch
    from torch import nn

    layers: list = []
    width = contract.IMAGE_HEIGHT * contract.IMAGE_WIDTH
    for units in hidden_units:
        linear = nn.Linear(width, units, bias=False)  # BatchNorm's beta is the bias
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        layers += [linear, nn.BatchNorm1d(units), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = units
    head = nn.Linear(width, num_classes)
    nn.init.xavier_uniform_(head.weight)
    nn.init.zeros_(head.bias)
    layers.append(head)
    return nn.Sequential(*layers).to(torch.float32)


class ReferenceTrainer:
    """One-epoch-at-a-time trainer over in-memory tensors (see the module docstring)."""

    def __init__(self, arrays, batch_size: int = 128, learning_rate: float = 2e-3,
                 weight_decay: float = 1e-4, seed: int = 1, threads: int = 2):
        import torch

        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.torch = torch
        self.threads = threads
        self.batch_size = batch_size
        self.train_x = torch.from_numpy(arrays["train_images"].reshape(-1, 784).copy())  # uint8 [N, 784]
        self.train_y = torch.from_numpy(arrays["train_labels"].astype("int64"))
        self.val_x = torch.from_numpy(arrays["val_images"].reshape(-1, 784).copy())
        self.val_y = torch.from_numpy(arrays["val_labels"].astype("int64"))
        self.model = build_reference_mlp()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=learning_rate, weight_decay=weight_decay
        )
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def run_epoch(self) -> dict:
        """Train one epoch (full batches only), then evaluate the validation set."""
        torch = self.torch
        start, cpu_start = time.perf_counter(), time.process_time()
        self.model.train()
        n = len(self.train_y)
        steps = n // self.batch_size
        order = torch.randperm(n, generator=self.generator)
        total_loss = torch.zeros(())
        for step in range(steps):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            x = self.train_x[index].to(torch.float32).div_(255.0)  # [B, 784]
            loss = self.loss_fn(self.model(x), self.train_y[index])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total_loss += loss.detach()
        train_seconds = time.perf_counter() - start
        self.model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(self.val_y), 1024):
                x = self.val_x[i:i + 1024].to(torch.float32).div_(255.0)
                correct += int((self.model(x).argmax(1) == self.val_y[i:i + 1024]).sum())
        self.epoch += 1
        return {
            "epoch": self.epoch,
            "train_seconds": train_seconds,
            "epoch_seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start,  # all threads of this process
            "samples": steps * self.batch_size,
            "loss": float(total_loss) / steps,
            "val_accuracy": correct / len(self.val_y),
        }


def worker(data_path: str, threads: int, seed: int, batch_size: int) -> int:
    """The stdin/stdout loop model/bench.py drives (see the module docstring)."""
    import numpy as np
    import torch

    with np.load(data_path) as arrays:
        trainer = ReferenceTrainer(dict(arrays), batch_size=batch_size, seed=seed, threads=threads)

    def reply(payload: dict) -> None:
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()

    reply({
        "ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(), "parameters": trainer.parameters,
        "batch_size": batch_size, "train_images": int(len(trainer.train_y)),
    })
    for line in sys.stdin:
        command = json.loads(line).get("cmd")
        if command == "epoch":
            reply(trainer.run_epoch())
        elif command == "quit":
            break
        else:
            reply({"error": f"unknown command {command!r}"})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.torch_reference", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", required=True, help="serve epochs over stdin/stdout")
    parser.add_argument("--data", required=True, help=".npz with train/val images and labels")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    return worker(args.data, args.threads, args.seed, args.batch_size)


if __name__ == "__main__":
    sys.exit(main())
