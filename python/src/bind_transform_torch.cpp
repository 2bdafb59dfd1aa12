// The Hadamard transform ops on CPU tensors over cpp/fastround/transform: torch.ops.fastround.hadamard_transform and
// the fused hadamard_mxfp4_act (rotation + MXFP4 activation qdq). Fake kernels and typed wrappers live in
// python/fastround/transform_ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "fastround/transform/fwht.h"
#include "fastround/transform/hadamard_mxfp4_act.h"
#include "torch_adapter.h"

using namespace fastround_torch;
namespace tf = fastround::transform;

namespace {

constexpr const char* kOp = "hadamard_transform";
constexpr const char* kActOp = "hadamard_mxfp4_act";

fr::DType transform_dtype(const at::Tensor& x) {
  if (x.scalar_type() == at::kDouble) return fr::DType::F64;
  return float_dtype(kOp, "x", x.scalar_type());
}

// A ±1 operand (K matrix, sign vector) as contiguous int8 on the CPU, its shape checked.
at::Tensor pm1_int8(const char* name, const at::Tensor& t, at::IntArrayRef shape, const char* op = kOp) {
  if (!t.device().is_cpu())
    throw fr::OptionError(arg(op, name) + "expected a CPU tensor, got one on " + t.device().str());
  if (t.sizes() != shape)
    throw fr::OptionError(arg(op, name) + "expected shape " + shape_str(shape) + ", got " + shape_str(t.sizes()));
  // Exact for ±1 in any dtype; fwht_check rejects anything else that survives the cast.
  return t.to(at::kChar).contiguous();
}


// x [..., cols] -> a new tensor of x's dtype with every block_size-long block of the last dimension transformed
// (fwht.h: S_after · T · S_before, T = (H_K ⊗ H_{2^m})/sqrt(n), or T^T).
at::Tensor hadamard_transform(const at::Tensor& x, int64_t block_size, const std::optional<at::Tensor>& hadamard_k,
                              const std::optional<at::Tensor>& signs, bool transpose, bool signs_first,
                              bool normalize) {
  return guarded([&] {
    if (!x.device().is_cpu())
      throw fr::OptionError(arg(kOp, "x") + "expected a CPU tensor, got one on " + x.device().str());
    if (x.dim() < 1) throw fr::OptionError(arg(kOp, "x") + "needs at least one dimension");
    const fr::DType dt = transform_dtype(x);
    const int64_t cols = x.size(-1);
    const int64_t n = block_size == -1 ? cols : block_size;
    at::Tensor out = x.contiguous().clone();
    at::Tensor hk, sg;
    tf::FwhtSpec spec;
    spec.n = n;
    if (hadamard_k.has_value() && hadamard_k->defined()) {
      const int64_t k = hadamard_k->size(0);
      hk = pm1_int8("hadamard_k", *hadamard_k, {k, k});
      spec.k = k;
      spec.hadk = hk.data_ptr<int8_t>();
    }
    if (signs.has_value() && signs->defined()) {
      sg = pm1_int8("signs", *signs, {n});
      spec.signs = sg.data_ptr<int8_t>();
    }
    spec.transpose = transpose;
    spec.signs_first = signs_first;
    spec.normalize = normalize;
    const int64_t rows = cols == 0 ? 0 : out.numel() / cols;
    tf::fwht_check(dt, out.data_ptr(), rows, cols, spec, kOp);
    {
      GilFree nogil;
      tf::fwht_rows(dt, out.data_ptr(), rows, cols, spec);
    }
    return out;
  });
}

// x [..., cols] (fp32 / fp16 / bf16) -> a new tensor of x's dtype: each block_size-long block rotated as
// hadamard_transform does (the 1/sqrt(n) rounded to x's dtype) and each 32-group quantize-dequantized to MXFP4 with
// FP-Quant's scale (hadamard_mxfp4_act.h). Stays in the rotated space.
at::Tensor hadamard_mxfp4_act(const at::Tensor& x, int64_t block_size, const std::optional<at::Tensor>& hadamard_k,
                              const std::optional<at::Tensor>& signs, bool transpose, bool signs_first) {
  return guarded([&] {
    if (!x.device().is_cpu())
      throw fr::OptionError(arg(kActOp, "x") + "expected a CPU tensor, got one on " + x.device().str());
    if (x.dim() < 1) throw fr::OptionError(arg(kActOp, "x") + "needs at least one dimension");
    const fr::DType dt = float_dtype(kActOp, "x", x.scalar_type());
    const int64_t cols = x.size(-1);
    const at::Tensor xc = x.contiguous();
    at::Tensor out = at::empty_like(xc);
    at::Tensor hk, sg;
    tf::FwhtSpec spec;
    spec.n = block_size;
    if (hadamard_k.has_value() && hadamard_k->defined()) {
      const int64_t k = hadamard_k->size(0);
      hk = pm1_int8("hadamard_k", *hadamard_k, {k, k}, kActOp);
      spec.k = k;
      spec.hadk = hk.data_ptr<int8_t>();
    }
    if (signs.has_value() && signs->defined()) {
      sg = pm1_int8("signs", *signs, {block_size}, kActOp);
      spec.signs = sg.data_ptr<int8_t>();
    }
    spec.transpose = transpose;
    spec.signs_first = signs_first;
    const int64_t rows = cols == 0 ? 0 : xc.numel() / cols;
    tf::hadamard_mxfp4_act_check(dt, xc.data_ptr(), out.data_ptr(), rows, cols, spec, kActOp);
    {
      GilFree nogil;
      tf::hadamard_mxfp4_act_rows(dt, xc.data_ptr(), out.data_ptr(), rows, cols, spec);
    }
    return out;
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastround, m) {
  m.def("hadamard_transform(Tensor x, int block_size, Tensor? hadamard_k=None, Tensor? signs=None, "
        "bool transpose=False, bool signs_first=False, bool normalize=True) -> Tensor");
  m.def("hadamard_mxfp4_act(Tensor x, int block_size, Tensor? hadamard_k=None, Tensor? signs=None, "
        "bool transpose=False, bool signs_first=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastround, CPU, m) {
  m.impl("hadamard_transform", &hadamard_transform);
  m.impl("hadamard_mxfp4_act", &hadamard_mxfp4_act);
}
