// safetensors files: a validating mmap reader and a positional writer that lays tensors out the way
// the Python safetensors package does (sorted by dtype rank descending, then name), so outputs are
// byte-identical and every offset is known before any data is produced.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "fastround/common/dtype.h"
#include "fastround/io/tensor_sink.h"

namespace fastround {

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range relative to the data area
  int64_t numel() const;
  uint64_t nbytes() const { return end - begin; }
};

std::string shape_str(const std::vector<int64_t>& shape);

class MappedFile {
 public:
  explicit MappedFile(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  // Hints the kernel to read [offset, offset+len) ahead / to drop it from this process's memory.
  void will_need(uint64_t offset, uint64_t len) const;
  void release(uint64_t offset, uint64_t len) const;

 private:
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  int fd_ = -1;
};

class SafetensorsReader {
 public:
  // Maps and validates the whole header; throws CheckpointError naming the file and tensor at fault.
  explicit SafetensorsReader(const std::filesystem::path& path);
  const std::filesystem::path& path() const { return path_; }
  // Tensors sorted by name (byte order), as safetensors' keys() lists them.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(const std::string& name) const;
  const uint8_t* data(const TensorInfo& t) const { return map_->data() + data_start_ + t.begin; }
  void will_need(const TensorInfo& t) const { map_->will_need(data_start_ + t.begin, t.nbytes()); }
  void release(const TensorInfo& t) const { map_->release(data_start_ + t.begin, t.nbytes()); }
  // The same for `len` bytes at byte `at` inside tensor t (one expert of a fused tensor).
  void will_need(const TensorInfo& t, uint64_t at, uint64_t len) const { map_->will_need(data_start_ + t.begin + at, len); }
  void release(const TensorInfo& t, uint64_t at, uint64_t len) const { map_->release(data_start_ + t.begin + at, len); }
  uint64_t data_bytes() const { return map_->size() - data_start_; }

 private:
  std::filesystem::path path_;
  std::unique_ptr<MappedFile> map_;
  uint64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
};

// Writes `<final>.tmp`, renamed to `final` by commit(); destroyed uncommitted, it removes the temp file.
class SafetensorsWriter : public TensorSink {
 public:
  SafetensorsWriter(std::filesystem::path final_path, std::vector<OutputTensor> tensors);
  ~SafetensorsWriter() override;
  static SinkFactory factory();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // Index of a tensor by name; throws if absent.
  size_t index_of(const std::string& name) const override;
  const std::vector<OutputTensor>& tensors() const { return tensors_; }
  // Writes `len` bytes of tensor `idx` at byte `at` within it. Thread-safe for disjoint ranges.
  void write(size_t idx, const void* data, uint64_t len, uint64_t at = 0) override;
  // Checks every byte was written, syncs, renames into place.
  void commit() override;
  const std::filesystem::path& final_path() const { return final_path_; }

 private:
  std::filesystem::path final_path_, tmp_path_;
  std::vector<OutputTensor> tensors_;  // in file order
  std::vector<uint64_t> offsets_;      // absolute file offsets
  std::unordered_map<std::string, size_t> index_;
  std::unique_ptr<std::atomic<uint64_t>[]> written_;
  int fd_ = -1;
  bool committed_ = false;
};

}  // namespace fastround
