// Where one output shard's tensors go, every name, dtype and shape declared before the first byte. A
// safetensors file is today's sink; a single-file format (GGUF) is another implementation of this
// interface, not another pipeline.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "fastround/common/dtype.h"

namespace fastround {

struct OutputTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t nbytes() const;
};

class TensorSink {
 public:
  virtual ~TensorSink() = default;
  // Index of a declared tensor by name; throws if absent.
  virtual size_t index_of(const std::string& name) const = 0;
  // Writes `len` bytes of tensor `idx` at byte `at` within it. Thread-safe for disjoint ranges.
  virtual void write(size_t idx, const void* data, uint64_t len, uint64_t at = 0) = 0;
  // Checks every byte was written and makes the result durable under its final name; a sink destroyed
  // before commit() leaves nothing that looks finished.
  virtual void commit() = 0;
};

// Opens a sink for `final_path` holding `tensors` (in write order).
using SinkFactory = std::function<std::unique_ptr<TensorSink>(const std::filesystem::path& final_path,
                                                              std::vector<OutputTensor> tensors)>;

}  // namespace fastround
