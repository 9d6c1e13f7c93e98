// The parts of ATen herd's CPU kernels use: the tensor, dtype dispatch, parallel_for and the two factory ops.
// Not <torch/extension.h>, which brings the whole C++ frontend and pybind11: parsing it took ~50 s of the ~55 s
// each kernel file took to compile on a 2-vCPU machine, these ~11-14 s (only bindings.cpp needs pybind11).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
