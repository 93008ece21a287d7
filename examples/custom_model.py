"""Wrap your own model: a conv net with BatchNorm and a model with an LSTM, unchanged.

fastmeta needs nothing from a model but ``forward``: no functional rewrite, no special
layers. This script meta-trains two ordinary ``nn.Module``s on tiny synthetic tasks and
adapts them, showing the engine each one gets and that ``adapt`` leaves the model
untouched.

Usage:
    python examples/custom_model.py            # 200 meta-iterations each
    python examples/custom_model.py --quick    # 50 meta-iterations each, a few seconds
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

import fastmeta


class SmallConvNet(nn.Module):
    """An image classifier as a user would write it (BatchNorm with running statistics)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2)
        )
        self.classifier = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class SequenceRegressor(nn.Module):
    """Predicts the next value of a sequence with an LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, 16, batch_first=True)
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(x)
        return self.out(hidden[:, -1])


def image_tasks(tasks: int, shots: int, generator: torch.Generator) -> fastmeta.TaskBatch:
    """3-way tasks: each class is a random 6x6 prototype plus noise; labels shuffled."""
    prototypes = torch.randn(tasks, 3, 1, 6, 6, generator=generator)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(3).repeat(n)
        x = prototypes[:, labels] + 0.5 * torch.randn(tasks, 3 * n, 1, 6, 6, generator=generator)
        return x, labels.expand(tasks, -1)

    return fastmeta.TaskBatch(*draw(shots), *draw(5))


def sequence_tasks(tasks: int, shots: int, generator: torch.Generator) -> fastmeta.TaskBatch:
    """Next-value prediction of sine sequences whose frequency is fixed per task."""
    frequency = 0.5 + torch.rand(tasks, 1, 1, generator=generator)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = 6 * torch.rand(tasks, n, 1, generator=generator)
        t = start + 0.3 * torch.arange(9)
        values = torch.sin(frequency * t)
        return values[..., :8, None], values[..., 8:]

    return fastmeta.TaskBatch(*draw(shots), *draw(10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="50 iterations each")
    args = parser.parse_args()
    iterations = 50 if args.quick else args.iterations
    torch.set_num_threads(1)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    runs = [
        ("conv net + BatchNorm", SmallConvNet(), image_tasks, "cross_entropy", 0.5),
        ("LSTM", SequenceRegressor(), sequence_tasks, "mse", 0.1),
    ]
    for name, model, make_tasks, loss, inner_lr in runs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            learner = fastmeta.MAML(model, inner_lr=inner_lr, inner_steps=1, loss_fn=loss)
        reason = f" ({caught[0].message})" if caught else ""
        print(f"{name}: engine {learner.engine!r}{reason}")
        optimizer = torch.optim.Adam(learner.parameters(), lr=3e-3)
        first = last = None
        for _ in range(iterations):
            result = learner.meta_step(make_tasks(8, 5, generator), optimizer)
            first = result.loss if first is None else first
            last = result.loss
        print(f"  meta-loss {first:.3f} -> {last:.3f} after {iterations} meta-iterations")

        test = make_tasks(1, 5, generator)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        adapted = learner.adapt(test.support_x[0], test.support_y[0], steps=3)
        unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        with torch.no_grad():
            prediction = adapted(test.query_x[0])
        print(f"  adapted to a new task: output {tuple(prediction.shape)}; "
              f"model untouched by adapt: {unchanged}")


if __name__ == "__main__":
    main()
