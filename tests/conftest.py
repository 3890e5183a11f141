"""Test configuration. Triton kernels run on CPU in Triton's interpreter, which must be switched on
before triton is first imported — hence at the very top of the test session."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_images() -> list[pathlib.Path]:
    """The validation photos packaged with fastmlr (6 COCO, then 4 VOC), sorted."""
    from fastmlr.export.validation import find_images

    return find_images()


def requires_cuda(test):  # noqa: ANN001, ANN201 - a test function or class
    """Marks a test ``cuda`` (``pytest -m cuda`` selects the GPU tests: bench/gpu_suite.sh) and skips it
    where torch sees no CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))
