import os

import pytest
import torch

pytest_plugins = ["ci_rules"]  # under CI a skipped test fails

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# Computation tests take the ``device`` fixture: they run on every device this machine has
# (the CPU, and CUDA where present). GPU-only tests carry the ``gpu`` marker.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def embedded_model():
    from clt_lens.models import load_model

    return load_model("embedded")


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory, embedded_model):
    """A 16k-token activation cache of the embedded model (4 shards), shared by training tests."""
    from clt_lens.cache import CacheConfig, generate_cache

    out = tmp_path_factory.mktemp("small_cache") / "cache"
    generate_cache(CacheConfig(out_dir=str(out), n_tokens=16384, shard_tokens=4096,
                               progress=False), model=embedded_model)  # fmt: skip
    return out
