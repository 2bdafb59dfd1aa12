#include "fastround/io/files.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "fastround/common/error.h"

namespace fastround {

namespace fs = std::filesystem;

ojson read_json_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw MissingPathError("[json] cannot read '" + path.string() + "'");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return ojson::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError("[json] '" + path.string() + "' is not valid JSON: " + e.what());
  }
}

std::string python_json_dumps(const ojson& j, int indent) { return j.dump(indent, ' ', true); }

void write_text_atomic(const fs::path& path, const std::string& text) {
  fs::path tmp = path;
  tmp += ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw IoError("[files] cannot create '" + tmp.string() + "': " + std::strerror(errno));
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const std::string msg = std::strerror(errno);
      ::close(fd);
      fs::remove(tmp);
      throw IoError("[files] writing '" + tmp.string() + "' failed: " + msg);
    }
    done += static_cast<size_t>(n);
  }
  ::fsync(fd);
  ::close(fd);
  fs::rename(tmp, path);
}

void copy_tree(const fs::path& from, const fs::path& to) {
  std::error_code ec;
  if (fs::is_directory(from)) {
    fs::copy(from, to, fs::copy_options::recursive, ec);
  } else {
    fs::copy_file(from, to, fs::copy_options::overwrite_existing, ec);
  }
  if (ec) throw IoError("[files] copying '" + from.string() + "' to '" + to.string() + "' failed: " + ec.message());
}

bool path_within(const fs::path& inner, const fs::path& outer) {
  const fs::path a = fs::weakly_canonical(fs::absolute(inner));
  const fs::path b = fs::weakly_canonical(fs::absolute(outer));
  auto ai = a.begin();
  for (auto bi = b.begin(); bi != b.end(); ++bi, ++ai) {
    if (bi->empty()) continue;  // trailing separator
    if (ai == a.end() || *ai != *bi) return false;
  }
  return true;
}

}  // namespace fastround
