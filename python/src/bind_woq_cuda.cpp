// fastround::woq_linear on CUDA tensors (the schema is declared with the CPU kernel in bind_woq_torch.cpp), over
// cpp/fastround/infer/woq_cuda.cu. Batches of up to 8 rows run the GEMV, which reads the packed weight once; larger
// ones dequantize into an x-dtype workspace [in, out] and multiply with cuBLAS (at::matmul / at::addmm), where the
// weight read is amortized over the rows. Kernels are enqueued on the device's current torch stream and nothing
// waits or allocates outside torch's caching allocator, so the op can be captured in a CUDA graph. Built only when
// torch and the toolchain have CUDA (FASTROUND_WITH_CUDA).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "fastround/infer/woq_cuda.h"
#include "torch_adapter.h"
#include "woq_rotated.h"

using namespace fastround_torch;
namespace fi = fastround::infer::gpu;

namespace {

constexpr const char* kOp = "woq_linear";

// FASTROUND_WOQ_CUDA_VARIANT (benchmarks/woq_cuda_bench.py --sweep) picks the GEMV and its knobs (woq_cuda.h
// WoqGemvTuning), 0 for the built-in choice: "U" or "U,S" the rows kernel with U loads in flight and cluster split
// S (the original sweep's spelling); "rows" or "rows:U,S" the same; "staged" or "staged:U,S,T[,P]" the staged
// kernel with U rows per chunk, split S, T lanes per row worker and prefetch P (1 off, 2 on); "half2" or
// "half2:U,S,T" the staged kernel's half2 variant (woq_cuda.h); "mma" or "mma:U,S" the tensor-core GEMV with U
// steps in flight per warp and split S (woq_cuda.h WoqGemvKernel::Mma); unset or empty: the built-in choice. Read at
// every call so that a sweep can change it between calls of one process; a CUDA graph keeps what was read at capture.
fi::WoqGemvTuning tuning_from_env() {
  fi::WoqGemvTuning t;
  const char* v = std::getenv("FASTROUND_WOQ_CUDA_VARIANT");
  if (!v || !*v) return t;
  const std::string spec(v);
  auto fail = [&]() -> fr::OptionError {
    return fr::OptionError("[woq_linear] FASTROUND_WOQ_CUDA_VARIANT must be 'U,S', 'rows[:U,S]' or "
                           "'staged[:U,S,T[,P]]', 'half2[:U,S,T]' or 'mma[:U,S]', got '" + spec + "'");
  };
  const char* p = v;
  int max_fields = 2;
  if (spec.rfind("mma", 0) == 0) {
    t.kernel = fi::WoqGemvKernel::Mma;
    p += 3;
  } else if (spec.rfind("half2", 0) == 0) {
    t.kernel = fi::WoqGemvKernel::StagedHalf2;
    p += 5;
    max_fields = 3;
  } else if (spec.rfind("staged", 0) == 0) {
    t.kernel = fi::WoqGemvKernel::Staged;
    p += 6;
    max_fields = 4;
  } else if (spec.rfind("rows", 0) == 0) {
    t.kernel = fi::WoqGemvKernel::Rows;
    p += 4;
  } else {
    t.kernel = fi::WoqGemvKernel::Rows;
  }
  if (t.kernel != fi::WoqGemvKernel::Rows || p != v) {  // a named kernel: nothing more, or ':' and numbers
    if (*p == '\0') return t;
    if (*p != ':') throw fail();
    ++p;
  }
  int* fields[4] = {&t.unroll, &t.split, &t.tx, &t.prefetch};
  for (int i = 0; i < max_fields; ++i) {
    char* end = nullptr;
    *fields[i] = static_cast<int>(std::strtol(p, &end, 10));
    if (end == p) throw fail();
    p = end;
    if (*p == '\0') return t;
    if (*p != ',' || i + 1 == max_fields) throw fail();
    ++p;
  }
  throw fail();
}

fi::WoqLayout layout_named(c10::string_view layout) {
  if (layout == "gptq") return fi::WoqLayout::Gptq;
  if (layout == "gptq_v2") return fi::WoqLayout::GptqV2;
  if (layout == "awq") return fi::WoqLayout::Awq;
  throw fr::OptionError(arg(kOp, "layout") + "must be 'gptq', 'gptq_v2' or 'awq', got '" + std::string(layout) +
                        "'");
}

void require_int32_2d(const char* name, const at::Tensor& t, const at::Device& device) {
  require_2d_on(kOp, name, t, device);
  if (t.scalar_type() != at::kInt)
    throw fr::OptionError(arg(kOp, name) + "dtype must be int32, got " + std::string(c10::toString(t.scalar_type())));
}

void require_shape(const char* name, const at::Tensor& t, int64_t rows, int64_t cols, const char* why) {
  if (t.size(0) != rows || t.size(1) != cols)
    throw fr::OptionError(arg(kOp, name) + "expected shape [" + std::to_string(rows) + ", " + std::to_string(cols) +
                          "] (" + why + "), got " + shape_str(t.sizes()));
}

// One call's checked operands: the weight view over contiguous device tensors (kept alive here), x as [m, in].
struct WoqCall {
  fi::WoqWeights w;
  fr::DType x_dt;
  at::Tensor qw, qz, sc, b;  // b: the bias, contiguous, or undefined
  at::Tensor x2;             // [m, in], contiguous
  std::vector<int64_t> out_shape;
  void* stream;
};

// The CPU op's checks (infer/woq_layout.cpp woq_resolve) on CUDA tensors; the caller then guards x's device.
WoqCall resolve_call(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                     const at::Tensor& scales, const std::optional<at::Tensor>& bias, int64_t bits,
                     int64_t group_size, c10::string_view layout) {
  WoqCall call;
  fi::WoqWeights& w = call.w;
  w.layout = layout_named(layout);
  w.bits = static_cast<int>(bits);
  if (!x.defined() || !x.is_cuda() || x.dim() < 1)
    throw fr::OptionError(arg(kOp, "x") + "expected a CUDA tensor [..., in_features], got " +
                          (x.defined() ? shape_str(x.sizes()) + " on " + x.device().str() : std::string("None")));
  const at::Device dev = x.device();
  call.x_dt = float_dtype(kOp, "x", x.scalar_type());
  require_int32_2d("qweight", qweight, dev);
  require_int32_2d("qzeros", qzeros, dev);
  require_2d_on(kOp, "scales", scales, dev);
  w.scale_dtype = float_dtype(kOp, "scales", scales.scalar_type());
  if (bits != 2 && bits != 4 && bits != 8)
    throw fr::OptionError(arg(kOp, "bits") + "must be 2, 4 or 8, got " + std::to_string(bits));
  if (w.layout == fi::WoqLayout::Awq && bits != 4)
    throw fr::OptionError(arg(kOp, "bits") + "layout awq packs 4 bits only, got " + std::to_string(bits));
  const int64_t pf = 32 / bits;
  w.in = x.size(-1);
  if (w.in <= 0) throw fr::OptionError(arg(kOp, "x") + "the last dimension (in_features) must be positive");
  // The CPU op's rules (infer/woq_layout.cpp woq_resolve): gptq qweight [>= ceil(in/pf), out] (inputs padded to
  // whole groups are tolerated), awq qweight [in, out/8]; groups = ceil(in / group), a partial last group;
  // qzeros [groups, ceil(out/pf)].
  w.out = w.layout == fi::WoqLayout::Awq ? qweight.size(1) * 8 : qweight.size(1);
  if (group_size != -1 && group_size <= 0)
    throw fr::OptionError(arg(kOp, "group_size") + "expected -1 (per channel) or a positive count, got " +
                          std::to_string(group_size));
  w.group = group_size == -1 || group_size > w.in ? w.in : group_size;
  const int64_t groups = w.groups();
  if (w.layout == fi::WoqLayout::Awq) {
    require_shape("qweight", qweight, w.in, qweight.size(1), "[in_features, out_features/8]");
  } else if (qweight.size(0) < (w.in + pf - 1) / pf) {
    throw fr::OptionError(arg(kOp, "qweight") + "expected at least " + std::to_string((w.in + pf - 1) / pf) +
                          " rows (" + std::to_string(w.in) + " inputs / " + std::to_string(pf) +
                          " per int32), got " + shape_str(qweight.sizes()));
  }
  require_shape("qzeros", qzeros, groups, (w.out + pf - 1) / pf, "[groups, ceil(out_features*bits/32)]");
  require_shape("scales", scales, groups, w.out, "[groups, out_features]");
  at::Tensor& b = call.b;
  if (bias.has_value() && bias->defined()) {
    if (bias->dim() != 1 || bias->size(0) != w.out || bias->device() != dev)
      throw fr::OptionError(arg(kOp, "bias") + "expected a 1-D tensor of " + std::to_string(w.out) + " on " +
                            dev.str() + ", got " + shape_str(bias->sizes()) + " on " + bias->device().str());
    float_dtype(kOp, "bias", bias->scalar_type());
    b = bias->contiguous();
  }

  call.stream = static_cast<void*>(c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  call.qw = qweight.contiguous();
  call.qz = qzeros.contiguous();
  call.sc = scales.contiguous();
  w.qweight = call.qw.data_ptr<int32_t>();
  w.qzeros = call.qz.data_ptr<int32_t>();
  w.scales = call.sc.data_ptr();
  fi::woq_check(w, "woq_linear");
  call.out_shape.assign(x.sizes().begin(), x.sizes().end());
  call.out_shape.back() = w.out;
  call.x2 = x.reshape({-1, w.in}).contiguous();
  return call;
}

// The GEMV (woq_gemv_supported), rotating x on the way where `rot` is given. The GEMV adds an fp32 bias as it is
// (as the CPU GEMV does), any other in x's dtype.
at::Tensor run_gemv(WoqCall& call, const fi::WoqInputHadamard* rot, const fi::WoqGemvTuning& tune) {
  at::Tensor& b = call.b;
  const at::ScalarType x_type = call.x2.scalar_type();
  if (b.defined() && b.scalar_type() != at::kFloat && b.scalar_type() != x_type) b = b.to(x_type);
  const int64_t m = call.x2.size(0);
  at::Tensor out = at::empty({m, call.w.out}, call.x2.options());
  fi::woq_gemv_cuda(call.w, call.x_dt, call.x2.data_ptr(), m, b.defined() ? b.data_ptr() : nullptr,
                    b.defined() ? float_dtype(kOp, "bias", b.scalar_type()) : call.x_dt, out.data_ptr(), call.stream,
                    tune, rot);
  return out.view(call.out_shape);
}

at::Tensor woq_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                           const at::Tensor& scales, const std::optional<at::Tensor>& bias, int64_t bits,
                           int64_t group_size, c10::string_view layout) {
  return guarded([&]() -> at::Tensor {
    WoqCall call = resolve_call(x, qweight, qzeros, scales, bias, bits, group_size, layout);
    c10::cuda::CUDAGuard guard(x.device());
    const fi::WoqWeights& w = call.w;
    const at::Tensor& x2 = call.x2;  // [m, in]
    const at::Tensor& b = call.b;
    const int64_t m = x2.size(0);
    if (m == 0) return at::empty(call.out_shape, x.options());
    if (fi::woq_gemv_supported(w, call.x_dt, m, x2.data_ptr())) return run_gemv(call, nullptr, tuning_from_env());
    void* stream = call.stream;
    const std::vector<int64_t>& out_shape = call.out_shape;
    // cuBLAS in x's dtype with fp32 accumulation, the bias in x's dtype (as F.linear on the dequantized weight).
    at::Tensor weight = at::empty({w.in, w.out}, x.options());  // dequantized [in, out]
    fi::woq_dequantize_cuda(w, call.x_dt, weight.data_ptr(), stream);
    at::Tensor out = b.defined() ? at::addmm(b.to(x.scalar_type()), x2, weight) : at::matmul(x2, weight);
    return out.view(out_shape);
  });
}

// FASTROUND_WOQ_FUSE_ROTATION=0 turns the fused rotation off (read per call, so a benchmark can time both paths in
// one process; a CUDA graph keeps what was read at capture).
bool fuse_rotation_enabled() {
  const char* v = std::getenv("FASTROUND_WOQ_FUSE_ROTATION");
  return !(v && std::string(v) == "0");
}

// woq_linear_rotated on CUDA: a plain power-of-two block Hadamard (no hadamard_k; signs on x's device, if any)
// whose GEMV is the staged kernel is applied by that kernel as it stages x (woq_gemv_fuses_hadamard): one launch,
// no rotated copy of x, the bits of the two ops. Everything else runs the two ops.
at::Tensor woq_linear_rotated_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                                   const at::Tensor& scales, const std::optional<at::Tensor>& bias, int64_t bits,
                                   int64_t group_size, c10::string_view layout, int64_t block_size,
                                   const std::optional<at::Tensor>& hadamard_k, const std::optional<at::Tensor>& signs,
                                   bool transpose, bool signs_first) {
  auto two_ops = [&] {
    return woq_linear_rotated_two_ops(x, qweight, qzeros, scales, bias, bits, group_size, layout, block_size,
                                      hadamard_k, signs, transpose, signs_first);
  };
  const bool has_k = hadamard_k.has_value() && hadamard_k->defined();
  const bool has_signs = signs.has_value() && signs->defined();
  if (!fuse_rotation_enabled() || has_k || !x.defined() || !x.is_cuda() || x.dim() < 1 ||
      (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16))
    return two_ops();
  const int64_t n = block_size == -1 ? x.size(-1) : block_size;
  // Signs the rotation op would copy over or reject (on the CPU, another shape) keep its checks and messages.
  if (has_signs && (signs->device() != x.device() || signs->dim() != 1 || signs->size(0) != n)) return two_ops();
  return guarded([&]() -> at::Tensor {
    WoqCall call = resolve_call(x, qweight, qzeros, scales, bias, bits, group_size, layout);
    c10::cuda::CUDAGuard guard(x.device());
    const int64_t m = call.x2.size(0);
    fi::WoqInputHadamard rot;
    rot.n = n;
    rot.signs_first = signs_first;
    at::Tensor sg;
    if (has_signs) {
      // Each entry by its sign (> 0: +1), as hadamard_transform takes a device sign vector.
      sg = signs->scalar_type() == at::kChar ? signs->contiguous() : signs->to(at::kChar).contiguous();
      rot.signs = sg.data_ptr<int8_t>();
    }
    const fi::WoqGemvTuning tune = tuning_from_env();
    if (m == 0 || !fi::woq_gemv_fuses_hadamard(call.w, call.x_dt, m, call.x2.data_ptr(), rot, tune)) return two_ops();
    return run_gemv(call, &rot, tune);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastround, CUDA, m) {
  m.impl("woq_linear", TORCH_FN(woq_linear_cuda));
  m.impl("woq_linear_rotated", TORCH_FN(woq_linear_rotated_cuda));
}
