"""Test set-up: kernels run under the Triton interpreter when no GPU is present; `gpu` tests need CUDA."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A fresh, seeded generator per test: random inputs, reproducible failures (a failure's report names
    the seed; NSA_TEST_SEED=N reruns with it)."""
    seed = int(os.environ.get("NSA_TEST_SEED") or int.from_bytes(os.urandom(4), "little") % 2**31)
    request.node.user_properties.append(("rng seed", seed))
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Name the rng fixture's seed in the report of a failed test."""
    report = (yield).get_result()
    seeds = [value for name, value in item.user_properties if name == "rng seed"]
    if report.failed and seeds:
        report.sections.append(("rng seed", f"{seeds[0]} (rerun with NSA_TEST_SEED={seeds[0]})"))


@pytest.fixture
def one_thread():
    """Tiny models and tensors: more threads only add synchronisation (and contention on a shared CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[("llama-g4", "shared"), ("qwen2-tied-g7", "independent")])
def small_converted(request, tmp_path_factory):
    """A tiny Llama (G = 4, shared branch k/v) and Qwen2 (G = 7, tied, independent) converted with SMALL_NSA."""
    import nsa_convert  # not at the top: the kernels must be defined after TRITON_INTERPRET is set
    from nsa_convert.config import NSAConfig
    from tests.models import SMALL_NSA, make_checkpoint

    arch, branch_kv = request.param
    root = tmp_path_factory.mktemp(f"{arch}-{branch_kv}")
    source = make_checkpoint(root / "dense", arch)
    nsa_convert.convert(source, root / "nsa", NSAConfig(**SMALL_NSA, branch_kv=branch_kv))
    return root / "nsa"
