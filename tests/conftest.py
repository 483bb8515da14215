"""Shared fixtures of the test suite."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: its models are tiny, and on a busy 2-core machine several threads of tiny
    matmuls spin-wait and run 10-100× slower. Modules that train or serve models use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
