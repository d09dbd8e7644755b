import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if "FXPRUNE_CACHE_DIR" not in os.environ:
    # The KV-cache programs fxprune.generate stores: in a folder of this run, not the user's cache.
    os.environ["FXPRUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxprune-test-programs-")
    atexit.register(shutil.rmtree, os.environ["FXPRUNE_CACHE_DIR"], True)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: a second torch thread per worker (or per CLI subprocess it
    # starts) would only contend for the same cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (small matrices: threads only add overhead and noise);
    modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
