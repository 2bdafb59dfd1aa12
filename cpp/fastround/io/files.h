// Small filesystem helpers: JSON read/write in Python's json.dump style, atomic replace, tree copy.
#pragma once

#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

namespace fastround {

using ojson = nlohmann::ordered_json;

ojson read_json_file(const std::filesystem::path& path);
// json.dump(obj, indent=2) byte for byte for the values configs hold (ensure_ascii, no trailing newline).
std::string python_json_dumps(const ojson& j, int indent = 2);
// Writes `<path>.tmp` then renames it over `path`.
void write_text_atomic(const std::filesystem::path& path, const std::string& text);
void copy_tree(const std::filesystem::path& from, const std::filesystem::path& to);
// True if `inner` is `outer` or lies below it (both made absolute and normalised, symlinks resolved).
bool path_within(const std::filesystem::path& inner, const std::filesystem::path& outer);

}  // namespace fastround
