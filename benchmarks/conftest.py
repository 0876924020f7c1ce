"""pytest-benchmark setup for the kernel benchmarks.

OpenMP threads that spin while waiting distort timings on shared machines, so OMP_WAIT_POLICY is set
to passive before torch (and its OpenMP runtime) is first imported.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}t")
def threads(request):
    """Run the benchmark at 1 and at 2 intra-op threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
