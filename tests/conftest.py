import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# tests never write into the user's cache
os.environ["HOOKMOE_CACHE"] = tempfile.mkdtemp(prefix="hookmoe-test-cache-")
torch.set_num_threads(min(2, torch.get_num_threads()))

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe", "granitemoe", "gpt_oss"]


@pytest.fixture(scope="session")
def tiny_models():
    """Loaded tiny models, shared across tests (tests must leave them un-patched)."""
    from hookmoe.hook import load

    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = load(f"tiny:{arch}", device="cpu")
        return cache[arch]

    return get


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(2, 259, (2, 16), generator=g)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (tiny models: threads cost more than they save; results exact)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_cli(argv, capsys):
    """Run ``hookmoe ARGV`` in-process; returns (exit status, stdout, stderr)."""
    from hookmoe.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err
