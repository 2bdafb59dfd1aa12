// torch.ops.fastround.woq_linear on CPU tensors: the schema and its CPU implementation over cpp/fastround/infer.
// Few rows (decode) run the core's GEMV on the packed words; more rows dequantize the weight once ([out, in], bf16
// for bf16 activations, else fp32) and multiply with torch's matmul, which measured faster than the GEMV from
// kWoqGemvMaxRows rows on (benchmarks/woq_linear.py). The fake kernel is in python/fastround/infer_ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "fastround/infer/woq_gemm.h"
#include "torch_adapter.h"
#include "woq_rotated.h"

using namespace fastround_torch;
namespace fi = fastround::infer;

namespace {

constexpr const char* kOp = "woq_linear";

// Rows up to which the GEMV path runs: kWoqGemvMaxRows, or FASTROUND_WOQ_GEMV_ROWS (read at each call so the
// benchmark can time both paths at one row count in one process; 0 forces dequantize + matmul).
int64_t gemv_max_rows() {
  const char* v = std::getenv("FASTROUND_WOQ_GEMV_ROWS");
  if (!v || !*v) return fi::kWoqGemvMaxRows;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  return end && *end == '\0' && n >= 0 ? static_cast<int64_t>(n) : fi::kWoqGemvMaxRows;
}

void require_cpu(const char* name, const at::Tensor& t, int dim, std::optional<at::ScalarType> dtype) {
  if (!t.defined()) throw fr::OptionError(arg(kOp, name) + "is None");
  if (!t.device().is_cpu())
    throw fr::OptionError(arg(kOp, name) + "expected a CPU tensor, got one on " + t.device().str());
  if (dim > 0 && t.dim() != dim)
    throw fr::OptionError(arg(kOp, name) + "expected " + std::to_string(dim) + " dimensions, got " +
                          shape_str(t.sizes()));
  if (dtype && t.scalar_type() != *dtype)
    throw fr::OptionError(arg(kOp, name) + "expected " + std::string(c10::toString(*dtype)) + ", got " +
                          std::string(c10::toString(t.scalar_type())));
}

// The dequantized weight's storage, kept per thread and grown as needed: a fresh allocation of a layer-sized
// buffer costs more in page faults than the dequantization itself (17 ms per 32 MiB on the dev machine). It holds
// the largest layer this thread has dequantized (117 MiB in bf16 for Llama-3-8B's MLP).
at::Tensor dequant_buffer(int64_t rows, int64_t cols, at::ScalarType dtype) {
  thread_local at::Tensor buffer;
  const int64_t bytes = rows * cols * static_cast<int64_t>(c10::elementSize(dtype));
  if (!buffer.defined() || buffer.numel() < bytes) buffer = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  // The view keeps the storage alive should a later, larger call on this thread replace the buffer.
  return at::from_blob(buffer.data_ptr(), {rows, cols}, [keep = buffer](void*) {}, at::TensorOptions().dtype(dtype));
}

// y [..., out] in x's dtype = x [..., in] @ dequant(qweight, qzeros, scales)^T + bias.
at::Tensor woq_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                          const at::Tensor& scales, const std::optional<at::Tensor>& bias, int64_t bits,
                          int64_t group_size, c10::string_view layout) {
  return guarded([&]() -> at::Tensor {
    require_cpu("x", x, 0, std::nullopt);
    if (x.dim() < 1) throw fr::OptionError(arg(kOp, "x") + "expected [..., in_features], got a scalar");
    const fr::DType xdt = float_dtype(kOp, "x", x.scalar_type());
    require_cpu("qweight", qweight, 2, at::kInt);
    require_cpu("qzeros", qzeros, 2, at::kInt);
    require_cpu("scales", scales, 2, std::nullopt);
    fi::WoqWeightView w;
    bool tiled = false;
    w.layout = fi::parse_woq_layout(std::string(layout), "fastround.woq_linear", &tiled);
    w.tile = tiled ? fi::kWoqTile : 0;
    w.bits = static_cast<int>(bits);
    w.scale_dtype = float_dtype(kOp, "scales", scales.scalar_type());
    const int64_t qw[2] = {qweight.size(0), qweight.size(1)}, qz[2] = {qzeros.size(0), qzeros.size(1)},
                  sc[2] = {scales.size(0), scales.size(1)};
    fi::woq_resolve(w, x.size(-1), group_size, qw, qz, sc, "fastround.woq_linear");
    at::Tensor b;
    if (bias.has_value() && bias->defined()) {
      require_cpu("bias", *bias, 1, std::nullopt);
      float_dtype(kOp, "bias", bias->scalar_type());
      if (bias->size(0) != w.out)
        throw fr::OptionError(arg(kOp, "bias") + "expected [" + std::to_string(w.out) + "], got " +
                              shape_str(bias->sizes()));
      b = bias->to(at::kFloat).contiguous();
    }
    const at::Tensor qwc = qweight.contiguous(), qzc = qzeros.contiguous(), scc = scales.contiguous();
    w.qweight = qwc.data_ptr<int32_t>();
    w.qzeros = qzc.data_ptr<int32_t>();
    w.scales = scc.data_ptr();

    std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
    out_shape.back() = w.out;
    const at::Tensor x2 = x.reshape({-1, w.in}).contiguous();
    const int64_t m = x2.size(0);
    if (m == 0) return at::empty(out_shape, x.options());
    const fr::Isa isa = fr::active_isa();
    if (m <= gemv_max_rows() && fi::woq_gemv_fast(w, isa)) {
      at::Tensor y = at::empty({m, w.out}, x.options());
      fi::WoqGemvArgs a;
      a.dtype = xdt;
      a.m = m;
      a.x = x2.data_ptr();
      a.bias = b.defined() ? b.data_ptr<float>() : nullptr;
      a.y = y.data_ptr();
      {
        GilFree nogil;
        fi::woq_gemv(w, a, isa);
      }
      return y.reshape(out_shape);
    }
    // bf16 activations multiply a bf16 weight (as the bf16 model would); fp16 and fp32 ones an fp32 weight. The
    // weight comes out [out, in]: oneDNN's bf16 matmul was 15x slower with [in, out] at 8 rows.
    const at::ScalarType wdt = x.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
    at::Tensor wt = dequant_buffer(w.out, w.in, wdt);  // [out, in]
    {
      GilFree nogil;
      fi::woq_dequantize(w, wdt == at::kBFloat16 ? fr::DType::BF16 : fr::DType::F32, wt.data_ptr(), isa);
    }
    const at::Tensor y = at::linear(x2.to(wdt), wt, b.defined() ? std::optional<at::Tensor>(b.to(wdt)) : std::nullopt);
    return y.to(x.scalar_type()).reshape(out_shape);
  });
}

// GPTQ qweight [rows, out] to the "_tiled" layouts' word order (same shape and size) or, with untile, back.
at::Tensor woq_tile_qweight_cpu(const at::Tensor& qweight, bool untile) {
  return guarded([&]() -> at::Tensor {
    const char* op = "woq_tile_qweight";
    if (!qweight.defined() || !qweight.device().is_cpu() || qweight.dim() != 2 || qweight.scalar_type() != at::kInt)
      throw fr::OptionError(arg(op, "qweight") + "expected a 2-D int32 CPU tensor");
    if (qweight.size(1) % fi::kWoqTile != 0)
      throw fr::OptionError(arg(op, "qweight") + "out_features (dim 1) must be a multiple of " +
                            std::to_string(fi::kWoqTile) + ", got " + shape_str(qweight.sizes()));
    const at::Tensor src = qweight.contiguous();
    at::Tensor dst = at::empty_like(src);
    const int64_t rows = src.size(0), out = src.size(1);
    if (untile) fi::woq_untile_qweight(src.data_ptr<int32_t>(), rows, out, dst.data_ptr<int32_t>());
    else fi::woq_tile_qweight(src.data_ptr<int32_t>(), rows, out, dst.data_ptr<int32_t>());
    return dst;
  });
}

}  // namespace

// woq_linear(hadamard_transform(x, ...), ...): a rotated checkpoint's online input rotation and its linear in one
// op call. The two kernels are the ops' own (same bits as the two calls), reached through C++ dispatcher handles:
// the Python call, its argument parsing and the module hook around it are what a batch-1 decode step paid per layer.
// Registered CompositeExplicitAutograd (below autograd, any device whose kernels the two ops have); CUDA has its own
// kernel (bind_woq_cuda.cpp), which fuses the rotation into the GEMV where it can and calls this elsewhere.
at::Tensor fastround_torch::woq_linear_rotated_two_ops(
    const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
    const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, c10::string_view layout,
    int64_t block_size, const std::optional<at::Tensor>& hadamard_k, const std::optional<at::Tensor>& signs,
    bool transpose, bool signs_first) {
  return guarded([&]() -> at::Tensor {
    static const auto rotate =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fastround::hadamard_transform", "")
            .typed<at::Tensor(const at::Tensor&, int64_t, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&, bool, bool, bool)>();
    static const auto linear =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fastround::woq_linear", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, int64_t, int64_t, c10::string_view)>();
    // Below autograd for both calls: neither op differentiates the linear, and hadamard_transform's autograd kernel
    // is Python (register_autograd), which a call from here would otherwise enter under no_grad too (generate())
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor xr = rotate.call(x, block_size, hadamard_k, signs, transpose, signs_first, true);
    return linear.call(xr, qweight, qzeros, scales, bias, bits, group_size, layout);
  });
}

TORCH_LIBRARY_FRAGMENT(fastround, m) {
  m.def("woq_linear_rotated(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, Tensor? bias, int bits, "
        "int group_size, str layout, int block_size, Tensor? hadamard_k=None, Tensor? signs=None, "
        "bool transpose=False, bool signs_first=False) -> Tensor");
  m.def("woq_linear(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, Tensor? bias, int bits, int group_size, "
        "str layout) -> Tensor");
  m.def("woq_tile_qweight(Tensor qweight, bool untile=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastround, CompositeExplicitAutograd, m) {
  m.impl("woq_linear_rotated", TORCH_FN(woq_linear_rotated_two_ops));
}

TORCH_LIBRARY_IMPL(fastround, CPU, m) {
  m.impl("woq_linear", TORCH_FN(woq_linear_cpu));
  m.impl("woq_tile_qweight", TORCH_FN(woq_tile_qweight_cpu));
}
