"""Small MNIST CNN whose penultimate activations are the features of the MNIST classifier FID.

`python mnist_classifier.py` trains it deterministically on the 60k training digits and caches it
in weights/mnist_classifier.pt (committed, so evaluation never retrains on a fresh clone).
"""
import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data

WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "mnist_classifier.pt"
FEATURE_DIM = 128
TRAIN_SEED = 0
EPOCHS = 4
BATCH_SIZE = 128
REQUIRED_TEST_ACCURACY = 0.99


class MNISTClassifier(nn.Module):
    """Two 5x5 conv + max-pool stages, a 128-d fully connected layer (the features) and a 10-way head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5)
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) in [-1, 1] -> (B, 128) penultimate pre-activations."""
        # Taken before the ReLU: a third of the units are dead on real digits, which would leave the
        # feature covariance singular and carry no information.
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from features()."""
        return self.head(self.dropout(F.relu(features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def mnist_tensors(root: str | Path | None, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All MNIST digits of one split as float (N, 1, 28, 28) in [-1, 1] and int64 labels."""
    digits = data.load_dataset("mnist", root, image_size=28, channels=1, train=train)
    return digits.images, digits.labels


@torch.no_grad()
def accuracy(model: MNISTClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum(
        (model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
        for i in range(0, len(images), batch_size)
    )
    return correct / len(images)


def train_classifier(data_root: str | Path | None = None, *, seed: int = TRAIN_SEED, epochs: int = EPOCHS,
                     path: Path = WEIGHTS_PATH) -> dict:
    """Train on MNIST train with a fixed seed and data order, save to `path`, return the saved record."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        record = _train(data_root, seed, epochs)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    if record["test_accuracy"] < REQUIRED_TEST_ACCURACY:
        raise RuntimeError(f"test accuracy {record['test_accuracy']:.4f} is below {REQUIRED_TEST_ACCURACY}: "
                           f"not saved to {path}, since evaluation would rest on it")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, path)
    return record


def _train(data_root: str | Path | None, seed: int, epochs: int) -> dict:
    torch.manual_seed(seed)
    train_images, train_labels = mnist_tensors(data_root, train=True)
    test_images, test_labels = mnist_tensors(data_root, train=False)
    model = MNISTClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        permutation = torch.randperm(len(train_images), generator=order)
        for i in range(0, len(permutation), BATCH_SIZE):
            batch = permutation[i:i + BATCH_SIZE]
            loss = F.cross_entropy(model(train_images[batch]), train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        print(f"epoch {epoch + 1}/{epochs}: test accuracy {accuracy(model, test_images, test_labels):.4f}")
    return {
        "state_dict": model.state_dict(),
        "test_accuracy": accuracy(model, test_images, test_labels),
        "seed": seed,
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch_version": str(torch.__version__),
        "torch_threads": torch.get_num_threads(),
    }


def load_classifier(path: Path = WEIGHTS_PATH, *, data_root: str | Path | None = None,
                    device: str | torch.device = "cpu") -> MNISTClassifier:
    """The cached classifier in eval mode; trains and caches it first (with a notice) when the file is missing."""
    if not Path(path).is_file():
        print(f"{path} is missing: training the MNIST classifier once (a few minutes on CPU) and caching it there")
        train_classifier(data_root, path=Path(path))
    record = torch.load(path, map_location=device, weights_only=True)
    model = MNISTClassifier().to(device)
    model.load_state_dict(record["state_dict"])
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="folder holding MNIST/raw (default: $SAGAN_DATA, else ./data)")
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    parser.add_argument("--seed", type=int, default=TRAIN_SEED)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args()
    try:
        record = train_classifier(args.data_root, seed=args.seed, epochs=args.epochs, path=args.out)
    except (FileNotFoundError, RuntimeError) as error:
        raise SystemExit(f"error: {error}")
    print(f"test accuracy {record['test_accuracy']:.4f} after {record['train_seconds']} s; saved {args.out}")


if __name__ == "__main__":
    main()
