"""Shared fixtures: real data is found through SAGAN_DATA (CI: ../shared/data) and tests skip without it."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder of real data (MNIST raw files, CelebA subset); skips the test when it is absent."""
    root = os.environ.get("SAGAN_DATA")
    if not root:
        pytest.skip("SAGAN_DATA is not set: point it at a folder holding MNIST/raw and celeba/ (CI: ../shared/data)")
    path = Path(root)
    if not path.is_dir():
        pytest.skip(f"SAGAN_DATA={root} is not a folder")
    return path


@pytest.fixture(scope="session", autouse=True)
def _evaluation_cache(tmp_path_factory):
    """Reference statistics the tests compute are kept in a folder of the session's (subprocesses inherit it), so
    tests never fill, or read stale files from, the user's ~/.cache/sagan-eval."""
    previous = os.environ.get("SAGAN_CACHE")
    os.environ["SAGAN_CACHE"] = str(tmp_path_factory.mktemp("sagan-eval-cache"))
    yield
    if previous is None:
        del os.environ["SAGAN_CACHE"]
    else:
        os.environ["SAGAN_CACHE"] = previous


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
