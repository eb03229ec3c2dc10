"""Small real models shared by the tests (trained in seconds on scikit-learn's digits)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


def digits_data() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """load_digits as (x_train, y_train, x_test, y_test); images 1x8x8 scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    return x[:1437], y[:1437], x[1437:], y[1437:]


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU-MaxPool-Conv-ReLU-Flatten-Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.pool(self.relu1(self.bn1(self.conv1(x))))
        return self.fc(self.flatten(self.relu2(self.conv2(x))))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 8,
          lr: float = 1e-2, seed: int = 0) -> nn.Module:
    """Adam, batch 64, seeded; returns the model in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    return (model(x).argmax(1) == y).float().mean().item()


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn, plus the input, relu (``+`` in forward)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + x)


class ResidualNet(nn.Module):
    """A small ResNet-like net for 3x32x32 inputs."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.layer1 = nn.Sequential(ResidualBlock(width), ResidualBlock(width))
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.layer2 = ResidualBlock(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.layer2(self.down(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm (``model`` itself included) clearly non-trivial statistics and
    affine parameters: means and biases in [-1, 1], variances in [0.2, 3], scales in [0.5, 2]."""
    g = torch.Generator().manual_seed(seed)

    def uniform(n: int, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=g) * (hi - lo) + lo

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(uniform(n, -1, 1))
                m.running_var.copy_(uniform(n, 0.2, 3))
                m.weight.copy_(uniform(n, 0.5, 2))
                m.bias.copy_(uniform(n, -1, 1))
    return model


def transformer_block(d_model: int = 32, nhead: int = 4) -> nn.Module:
    """A torch TransformerEncoderLayer (batch_first) in eval mode."""
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=64, dropout=0.0,
                                      batch_first=True).eval()


class DictInputNet(nn.Module):
    """Takes one dict and reads its keys, as aimet-torch's tests' models do:
    ``conv(image) * mask`` -> relu -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, 5)

    def forward(self, inputs: dict) -> torch.Tensor:  # noqa: D102
        x = self.relu(self.conv(inputs["image"]) * inputs["mask"])
        return self.fc(self.flatten(self.pool(x)))


class KeywordNet(nn.Module):
    """A Hugging Face-style encoder: named inputs, an optional mask (called with keywords)."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.dense = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.head = nn.Linear(dim, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor = None,
                scale: float = 1.0) -> torch.Tensor:  # noqa: D102
        h = self.act(self.dense(self.embed(input_ids))) * scale
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return self.head(h)


class NestedOutputNet(nn.Module):
    """Returns ``{'logits': .., 'features': (hidden, (aux, gate))}``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.relu = nn.ReLU()
        self.logits = nn.Linear(12, 3)
        self.aux = nn.Linear(12, 2)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> dict:  # noqa: D102
        h = self.relu(self.fc1(x))
        aux = self.aux(h)
        return {"logits": self.logits(h), "features": (h, (aux, self.gate(aux)))}


class SharedBlockNet(nn.Module):
    """One Linear reachable under two names: ``self.block`` and ``self.body[0]``.

    ``twice=True`` also calls it through ``self.block`` after ``self.body`` (two calls per
    forward); otherwise only ``self.body`` runs it."""

    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        self.twice = twice
        self.block = nn.Linear(8, 8)
        self.body = nn.Sequential(self.block, nn.Tanh())  # no supergroup: block's output counts
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        h = self.body(x)
        return self.head(self.block(h) if self.twice else h)


class DuplicateReLU(nn.Module):
    """One ReLU module after conv1, conv2 and fc1; ``.relu()`` after fc2 (input 3x32x32): the
    shape of aimet's ``ModelWithDuplicateReLU``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.pool1(self.relu(self.conv1(x)))
        x = self.pool2(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(torch.flatten(x, 1)))
        x = self.fc2(x).relu()
        return self.fc3(x)
