"""pytest plugin for bench/gpu_check.sh's cuda_tests step (`-p cuda_tests_only`, with bench/ on
PYTHONPATH): keep only the tests that exercise CUDA, so a GPU machine's few minutes go to them.

A test is a CUDA test when its id names cuda (tests/test_*_cuda.py, cases parametrised over
devices: `[cuda...]`), or when it carries a skipif whose reason names CUDA or a GPU (the
`requires_cuda` marks of tests/conftest.py, tests/test_build.py's "CPU-only build"). The SIMT harness tests run on the CPU whatever their
names say, and are left out.
"""

import re

_GPU_REASON = re.compile(r"cuda|gpu|cpu-only build", re.IGNORECASE)


def is_cuda_test(item):
    if "test_simt_" in item.nodeid:
        return False
    if "cuda" in item.nodeid.lower():
        return True
    return any(
        _GPU_REASON.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif")
    )


def pytest_collection_modifyitems(config, items):
    keep = [it for it in items if is_cuda_test(it)]
    drop = [it for it in items if not is_cuda_test(it)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
