// torch.ops.fastround.hadamard_transform and hadamard_mxfp4_act on CUDA tensors (the schemas are declared with the
// CPU kernels in bind_transform_torch.cpp), over cpp/fastround/transform/fwht_cuda.cu and hadamard_mxfp4_act_cuda.cu:
// the same operators and the same results bit for bit. The output is allocated through torch's caching allocator and the kernel enqueued on the device's current
// torch stream; nothing waits, so the op can be captured in a CUDA graph when hadamard_k and signs already sit on
// x's device. Built only when torch and the toolchain have CUDA (FASTROUND_WITH_CUDA).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>

#include "fastround/transform/fwht_cuda.h"
#include "fastround/transform/hadamard_mxfp4_act_cuda.h"
#include "torch_adapter.h"

using namespace fastround_torch;
namespace tf = fastround::transform;

namespace {

constexpr const char* kOp = "hadamard_transform";
constexpr const char* kActOp = "hadamard_mxfp4_act";

// A ±1 operand (K matrix, sign vector) as contiguous int8 on `device`, its shape checked. A CPU operand has its
// entries checked here and is copied over (not capturable: pass device tensors inside a CUDA graph); a device
// operand is taken as is, each entry by its sign (> 0: +1), since reading it back would synchronise every call.
at::Tensor pm1_int8_on(const char* name, const at::Tensor& t, at::IntArrayRef shape, const at::Device& device,
                       const char* op = kOp) {
  if (t.sizes() != shape)
    throw fr::OptionError(arg(op, name) + "expected shape " + shape_str(shape) + ", got " + shape_str(t.sizes()));
  if (t.device().is_cpu()) {
    const at::Tensor c = t.to(at::kChar).contiguous();
    if (!at::equal(t.to(at::kDouble).abs(), at::ones(shape, t.options().dtype(at::kDouble))))
      throw fr::OptionError(arg(op, name) + "entries must be +1 or -1");
    return c.to(device);
  }
  if (t.device() != device)
    throw fr::OptionError(arg(op, name) + "expected a tensor on " + device.str() + " or the CPU, got one on " +
                          t.device().str());
  return t.scalar_type() == at::kChar ? t.contiguous() : t.to(at::kChar).contiguous();
}

at::Tensor hadamard_transform_cuda(const at::Tensor& x, int64_t block_size, const std::optional<at::Tensor>& hadamard_k,
                                   const std::optional<at::Tensor>& signs, bool transpose, bool signs_first,
                                   bool normalize) {
  return guarded([&] {
    if (!x.is_cuda()) throw fr::OptionError(arg(kOp, "x") + "expected a CUDA tensor, got one on " + x.device().str());
    if (x.dim() < 1) throw fr::OptionError(arg(kOp, "x") + "needs at least one dimension");
    const at::Device dev = x.device();
    c10::cuda::CUDAGuard guard(dev);
    const fr::DType dt = x.scalar_type() == at::kDouble ? fr::DType::F64 : float_dtype(kOp, "x", x.scalar_type());
    const int64_t cols = x.size(-1);
    const int64_t n = block_size == -1 ? cols : block_size;
    const at::Tensor xc = x.contiguous();
    at::Tensor out = at::empty_like(xc, at::MemoryFormat::Contiguous);
    at::Tensor hk, sg;
    tf::FwhtSpec spec;
    spec.n = n;
    if (hadamard_k.has_value() && hadamard_k->defined()) {
      if (hadamard_k->dim() != 2)
        throw fr::OptionError(arg(kOp, "hadamard_k") + "expected a [K, K] matrix, got " +
                              shape_str(hadamard_k->sizes()));
      const int64_t k = hadamard_k->size(0);
      hk = pm1_int8_on("hadamard_k", *hadamard_k, {k, k}, dev);
      spec.k = k;
      spec.hadk = hk.data_ptr<int8_t>();
    }
    if (signs.has_value() && signs->defined()) {
      if (n <= 0) throw fr::OptionError(arg(kOp, "block_size") + "must be positive, got " + std::to_string(n));
      sg = pm1_int8_on("signs", *signs, {n}, dev);
      spec.signs = sg.data_ptr<int8_t>();
    }
    spec.transpose = transpose;
    spec.signs_first = signs_first;
    spec.normalize = normalize;
    const int64_t rows = cols == 0 ? 0 : xc.numel() / cols;
    void* stream = static_cast<void*>(c10::cuda::getCurrentCUDAStream(dev.index()).stream());
    // The split plan's scratch (few rows, K > 1: a decode step's R4 row), from the caching allocator;
    // FASTROUND_FWHT_SPLIT=0 keeps the one-kernel plan (read per call, so a benchmark can time both in one process)
    const char* split_env = std::getenv("FASTROUND_FWHT_SPLIT");
    const bool split_off = split_env && std::string(split_env) == "0";
    const int64_t scratch_bytes = split_off ? 0 : tf::gpu::fwht_cuda_scratch_bytes(dt, rows, cols, spec);
    at::Tensor scratch;
    if (scratch_bytes > 0) scratch = at::empty({scratch_bytes}, xc.options().dtype(at::kByte));
    tf::gpu::fwht_rows_cuda(dt, xc.data_ptr(), out.data_ptr(), rows, cols, spec, stream, kOp,
                            scratch_bytes > 0 ? scratch.data_ptr() : nullptr);
    return out;
  });
}

// The fused rotation + MXFP4 activation qdq (hadamard_mxfp4_act.h). Blocks the warp kernel does not take (over 32)
// are refused, naming block_size: rotation.py runs those through the CPU op.
at::Tensor hadamard_mxfp4_act_cuda(const at::Tensor& x, int64_t block_size, const std::optional<at::Tensor>& hadamard_k,
                                   const std::optional<at::Tensor>& signs, bool transpose, bool signs_first) {
  return guarded([&] {
    if (!x.is_cuda())
      throw fr::OptionError(arg(kActOp, "x") + "expected a CUDA tensor, got one on " + x.device().str());
    if (x.dim() < 1) throw fr::OptionError(arg(kActOp, "x") + "needs at least one dimension");
    const at::Device dev = x.device();
    c10::cuda::CUDAGuard guard(dev);
    const fr::DType dt = float_dtype(kActOp, "x", x.scalar_type());
    const int64_t cols = x.size(-1);
    const at::Tensor xc = x.contiguous();
    at::Tensor out = at::empty_like(xc, at::MemoryFormat::Contiguous);
    at::Tensor hk, sg;
    tf::FwhtSpec spec;
    spec.n = block_size;
    if (hadamard_k.has_value() && hadamard_k->defined()) {
      if (hadamard_k->dim() != 2)
        throw fr::OptionError(arg(kActOp, "hadamard_k") + "expected a [K, K] matrix, got " +
                              shape_str(hadamard_k->sizes()));
      const int64_t k = hadamard_k->size(0);
      hk = pm1_int8_on("hadamard_k", *hadamard_k, {k, k}, dev, kActOp);
      spec.k = k;
      spec.hadk = hk.data_ptr<int8_t>();
    }
    if (signs.has_value() && signs->defined()) {
      if (block_size <= 0)
        throw fr::OptionError(arg(kActOp, "block_size") + "must be positive, got " + std::to_string(block_size));
      sg = pm1_int8_on("signs", *signs, {block_size}, dev, kActOp);
      spec.signs = sg.data_ptr<int8_t>();
    }
    spec.transpose = transpose;
    spec.signs_first = signs_first;
    const int64_t rows = cols == 0 ? 0 : xc.numel() / cols;
    void* stream = static_cast<void*>(c10::cuda::getCurrentCUDAStream(dev.index()).stream());
    tf::gpu::hadamard_mxfp4_act_rows_cuda(dt, xc.data_ptr(), out.data_ptr(), rows, cols, spec, stream, kActOp);
    return out;
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastround, CUDA, m) {
  m.impl("hadamard_transform", &hadamard_transform_cuda);
  m.impl("hadamard_mxfp4_act", &hadamard_mxfp4_act_cuda);
}
