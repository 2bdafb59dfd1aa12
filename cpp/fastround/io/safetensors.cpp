#include "fastround/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <nlohmann/json.hpp>

#include "fastround/common/error.h"

namespace fastround {

namespace fs = std::filesystem;

namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // safetensors' own limit

std::string errno_text() { return std::strerror(errno); }

uint64_t page_floor(uint64_t x) {
  static const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  return x / page * page;
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

MappedFile::MappedFile(const fs::path& path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw IoError("[safetensors] cannot open '" + path.string() + "': " + errno_text());
  struct stat st {};
  if (fstat(fd_, &st) != 0) {
    ::close(fd_);
    throw IoError("[safetensors] cannot stat '" + path.string() + "': " + errno_text());
  }
  size_ = static_cast<uint64_t>(st.st_size);
  if (size_ == 0) return;
  void* p = mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd_, 0);
  if (p == MAP_FAILED) {
    ::close(fd_);
    throw IoError("[safetensors] cannot map '" + path.string() + "': " + errno_text());
  }
  data_ = static_cast<const uint8_t*>(p);
}

MappedFile::~MappedFile() {
  if (data_) munmap(const_cast<uint8_t*>(data_), size_);
  if (fd_ >= 0) ::close(fd_);
}

void MappedFile::will_need(uint64_t offset, uint64_t len) const {
  if (!data_ || len == 0) return;
  const uint64_t start = page_floor(offset);
  madvise(const_cast<uint8_t*>(data_) + start, offset + len - start, MADV_WILLNEED);
}

void MappedFile::release(uint64_t offset, uint64_t len) const {
  if (!data_ || len == 0) return;
  const uint64_t start = page_floor(offset);
  madvise(const_cast<uint8_t*>(data_) + start, offset + len - start, MADV_DONTNEED);
}

SafetensorsReader::SafetensorsReader(const fs::path& path) : path_(path) {
  map_ = std::make_unique<MappedFile>(path);
  const std::string where = "[safetensors] " + path.string();
  const uint64_t size = map_->size();
  if (size < 8)
    throw CheckpointError(where + ": file is " + std::to_string(size) +
                          " bytes, too short for the 8-byte header length (truncated?)");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | map_->data()[i];
  if (header_len > kMaxHeaderBytes || header_len > size - 8)
    throw CheckpointError(where + ": header length " + std::to_string(header_len) + " exceeds the file size " +
                          std::to_string(size) + " (truncated or not a safetensors file)");
  data_start_ = 8 + header_len;
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(map_->data() + 8, map_->data() + 8 + header_len);
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(where + ": header is not valid JSON (" + e.what() + ")");
  }
  if (!header.is_object()) throw CheckpointError(where + ": header is not a JSON object");
  const uint64_t data_size = size - data_start_;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    const std::string at = where + ": tensor '" + name + "'";
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") || !entry.contains("data_offsets"))
      throw CheckpointError(at + " lacks dtype, shape or data_offsets");
    const auto& jd = entry["dtype"];
    const auto dt = jd.is_string() ? dtype_from_name(jd.get<std::string>()) : std::nullopt;
    if (!dt) throw CheckpointError(at + " has unknown dtype " + jd.dump());
    TensorInfo t;
    t.name = name;
    t.dtype = *dt;
    const auto& js = entry["shape"];
    if (!js.is_array()) throw CheckpointError(at + " has a shape that is not a list");
    for (const auto& d : js) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) throw CheckpointError(at + " has invalid shape " + js.dump());
      t.shape.push_back(d.get<int64_t>());
    }
    const auto& jo = entry["data_offsets"];
    if (!jo.is_array() || jo.size() != 2 || !jo[0].is_number_unsigned() || !jo[1].is_number_unsigned())
      throw CheckpointError(at + " has invalid data_offsets " + jo.dump());
    t.begin = jo[0].get<uint64_t>();
    t.end = jo[1].get<uint64_t>();
    if (t.begin > t.end) throw CheckpointError(at + " has data_offsets " + jo.dump() + " with begin > end");
    if (t.end > data_size)
      throw CheckpointError(at + " has data_offsets " + jo.dump() + " beyond the " + std::to_string(data_size) +
                            "-byte data area (truncated file?)");
    uint64_t bits = static_cast<uint64_t>(dtype_bits(t.dtype));
    for (int64_t d : t.shape)
      if (d != 0 && __builtin_mul_overflow(bits, static_cast<uint64_t>(d), &bits))
        throw CheckpointError(at + " has shape " + shape_str(t.shape) + " whose byte size overflows 64 bits");
    for (int64_t d : t.shape)
      if (d == 0) bits = 0;
    if ((bits + 7) / 8 != t.nbytes())
      throw CheckpointError(at + " has " + std::to_string(t.nbytes()) + " data bytes, but dtype " +
                            std::string(dtype_name(t.dtype)) + " and shape " + shape_str(t.shape) + " need " +
                            std::to_string((bits + 7) / 8));
    tensors_.push_back(std::move(t));
  }
  std::vector<const TensorInfo*> by_offset;
  for (const auto& t : tensors_) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i)
    if (by_offset[i]->begin < by_offset[i - 1]->end)
      throw CheckpointError(where + ": tensors '" + by_offset[i - 1]->name + "' and '" + by_offset[i]->name +
                            "' have overlapping data_offsets");
  std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });
}

const TensorInfo* SafetensorsReader::find(const std::string& name) const {
  auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                             [](const TensorInfo& t, const std::string& n) { return t.name < n; });
  return (it != tensors_.end() && it->name == name) ? &*it : nullptr;
}

uint64_t OutputTensor::nbytes() const {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return (n * static_cast<uint64_t>(dtype_bits(dtype)) + 7) / 8;
}

SafetensorsWriter::SafetensorsWriter(fs::path final_path, std::vector<OutputTensor> tensors)
    : final_path_(std::move(final_path)), tensors_(std::move(tensors)) {
  tmp_path_ = final_path_;
  tmp_path_ += ".tmp";
  std::sort(tensors_.begin(), tensors_.end(), [](const OutputTensor& a, const OutputTensor& b) {
    if (a.dtype != b.dtype) return dtype_rank(a.dtype) > dtype_rank(b.dtype);
    return a.name < b.name;
  });
  for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  for (size_t i = 1; i < tensors_.size(); ++i)
    if (tensors_[i].name == tensors_[i - 1].name)
      throw OptionError("[safetensors] " + final_path_.string() + ": tensor '" + tensors_[i].name +
                        "' would be written twice");
  // Header: compact JSON in file order, no __metadata__, space-padded to 8 bytes.
  std::string header = "{";
  uint64_t pos = 0;
  std::vector<uint64_t> rel;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const auto& t = tensors_[i];
    const uint64_t n = t.nbytes();
    if (i) header += ",";
    header += nlohmann::json(t.name).dump() + ":{\"dtype\":\"" + std::string(dtype_name(t.dtype)) + "\",\"shape\":[";
    for (size_t d = 0; d < t.shape.size(); ++d) header += (d ? "," : "") + std::to_string(t.shape[d]);
    header += "],\"data_offsets\":[" + std::to_string(pos) + "," + std::to_string(pos + n) + "]}";
    rel.push_back(pos);
    pos += n;
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  const uint64_t data_start = 8 + header.size();
  for (uint64_t r : rel) offsets_.push_back(data_start + r);
  written_ = std::make_unique<std::atomic<uint64_t>[]>(tensors_.size());
  for (size_t i = 0; i < tensors_.size(); ++i) written_[i] = 0;

  fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) throw IoError("[safetensors] cannot create '" + tmp_path_.string() + "': " + errno_text());
  uint8_t len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<uint8_t>(static_cast<uint64_t>(header.size()) >> (8 * i));
  std::string prefix(reinterpret_cast<const char*>(len_bytes), 8);
  prefix += header;
  if (::pwrite(fd_, prefix.data(), prefix.size(), 0) != static_cast<ssize_t>(prefix.size()) ||
      ::ftruncate(fd_, static_cast<off_t>(data_start + pos)) != 0) {
    const std::string msg = errno_text();
    ::close(fd_);
    fd_ = -1;
    fs::remove(tmp_path_);
    throw IoError("[safetensors] cannot write '" + tmp_path_.string() + "': " + msg);
  }
}

SinkFactory SafetensorsWriter::factory() {
  return [](const std::filesystem::path& final_path, std::vector<OutputTensor> tensors) -> std::unique_ptr<TensorSink> {
    return std::make_unique<SafetensorsWriter>(final_path, std::move(tensors));
  };
}

SafetensorsWriter::~SafetensorsWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) {
    std::error_code ec;
    fs::remove(tmp_path_, ec);
  }
}

size_t SafetensorsWriter::index_of(const std::string& name) const {
  auto it = index_.find(name);
  if (it != index_.end()) return it->second;
  throw OptionError("[safetensors] " + final_path_.string() + ": no output tensor '" + name + "'");
}

constexpr uint64_t kWritebackMin = 4ull << 20;  // smaller writes ride along with the next large one or fsync

void SafetensorsWriter::write(size_t idx, const void* data, uint64_t len, uint64_t at) {
  if (at + len > tensors_[idx].nbytes())
    throw OptionError("[safetensors] " + final_path_.string() + ": write past the end of tensor '" +
                      tensors_[idx].name + "'");
  const auto* p = static_cast<const uint8_t*>(data);
  uint64_t done = 0;
  while (done < len) {
    const ssize_t n = ::pwrite(fd_, p + done, len - done, static_cast<off_t>(offsets_[idx] + at + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw IoError("[safetensors] writing tensor '" + tensors_[idx].name + "' to '" + tmp_path_.string() +
                    "' failed: " + errno_text());
    }
    done += static_cast<uint64_t>(n);
  }
  written_[idx] += len;
#ifdef __linux__
  // Start writing large ranges back now, so the disk works while the next tensors are quantized and
  // commit()'s fsync finds little left to do. Best effort: fsync still decides durability.
  if (len >= kWritebackMin)
    ::sync_file_range(fd_, static_cast<off64_t>(offsets_[idx] + at), static_cast<off64_t>(len), SYNC_FILE_RANGE_WRITE);
#endif
}

void SafetensorsWriter::commit() {
  for (size_t i = 0; i < tensors_.size(); ++i)
    if (written_[i] != tensors_[i].nbytes())
      throw OptionError("[safetensors] " + final_path_.string() + ": tensor '" + tensors_[i].name + "' got " +
                        std::to_string(written_[i].load()) + " of " + std::to_string(tensors_[i].nbytes()) + " bytes");
  if (::fsync(fd_) != 0) throw IoError("[safetensors] fsync of '" + tmp_path_.string() + "' failed: " + errno_text());
  ::close(fd_);
  fd_ = -1;
  fs::rename(tmp_path_, final_path_);
  committed_ = true;
}

}  // namespace fastround
