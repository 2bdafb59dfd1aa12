"""The staged CUDA GEMV's launch planner replayed on the H200 sweep it was fitted to (plain C++, no GPU):
cpp/tests/test_woq_cuda_plan.cpp."""

from cpp_runner import run_cpp_test


def test_woq_cuda_plan_cpp():
    run_cpp_test("fastround-test-woq-cuda-plan", 10)
