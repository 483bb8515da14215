"""Shared fixtures of the test suite, and the `slow` marker: whole-capability tests of a minute or more (the shipped
model's accuracy, the Figure 7 pipeline, the notebook, the evaluate command end to end, reconstruction quality,
several processes against one, faults injected into whole runs) run only with `--slow` or `-m slow`."""
import itertools
import os
import signal
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a whole-capability test of a minute or more (runs with --slow or -m slow)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow") or config.getoption("markexpr"):  # -m picks the tests itself
        return
    skip = pytest.mark.skip(reason="slow: run with --slow or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread: the models are tiny, and on a busy 2-core machine several threads of tiny matmuls spin-wait
    and run 10-100× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cpu_graphs(monkeypatch):
    """Runs trainer.StepGraph on the CPU, for the module passed to the returned function (trainer): streams do
    nothing, its --cuda-graph check passes, and the 'capture' returns a graph whose replay runs the step again and
    writes its results into the outputs the capture returned (as a replay rewrites the graph's memory). The
    function returns the list of replays, one entry each (the sum of the batch the step read)."""
    class Stream:
        def wait_stream(self, other):
            pass

    def install(module):
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
        monkeypatch.setattr(module, "check_cuda_graph", lambda args, device: None)
        replays = []

        def capture(self):
            outputs = self.outputs = tuple(torch.full_like(o, float("nan")) for o in self.outputs)

            def replay():
                replays.append(self.inputs[0][0].sum().item())  # the batch the step reads
                torch._foreach_copy_(list(outputs), list(self.step(self.inputs)))
            return SimpleNamespace(replay=replay)
        monkeypatch.setattr(module.StepGraph, "capture", capture)
        return replays
    return install


@pytest.fixture
def signal_on_calls(monkeypatch):
    """send(owner, name, calls, signum): owner.name sends `signum` to this process on the given (0-based) calls, as a
    scheduler's SIGTERM or a Ctrl-C would arrive in the middle of that work."""
    def send(owner, name, calls, signum=signal.SIGTERM):
        original, count = getattr(owner, name), itertools.count()

        def patched(*args, **kwargs):
            if next(count) in calls:
                os.kill(os.getpid(), signum)
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, patched)
    return send


@pytest.fixture
def kill_rank():
    """kill_rank(torchrun, rank): SIGKILLs the worker process of that rank under a running torchrun (a Popen)."""
    if not os.path.exists("/proc/self/environ"):
        pytest.skip("finding a torchrun worker by its RANK needs Linux's /proc")

    def kill(torchrun, rank):
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                env = (stat.parent / "environ").read_bytes().split(b"\0")
            except OSError:  # gone, or not ours
                continue
            if ppid == torchrun.pid and f"RANK={rank}".encode() in env:
                return os.kill(int(stat.parent.name), signal.SIGKILL)
        raise AssertionError(f"no rank {rank} under torchrun {torchrun.pid}")
    return kill
