from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# cryptography is a test dependency (pyproject's `test` extra, installed by .ci/run); the GPU
# machines lack it, and test_auth has no GPU test to lose there.
collect_ignore = [] if importlib.util.find_spec("cryptography") else ["test_auth.py"]

# Tests build their own small models; keep the built-in one out of the user's cache.
os.environ.setdefault(
    "KVRELAY_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "kvrelay")
)
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpus = torch.cuda.device_count()
    for item in items:
        if "multi_gpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs 2+ CUDA GPUs, found {gpus}"))
        elif "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
