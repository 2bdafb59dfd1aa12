// Exceptions of the fastround core. Each names its site and the file, tensor or option at fault;
// the Python binding maps each class to a Python exception type.
#pragma once

#include <stdexcept>
#include <string>

namespace fastround {

// Input on disk is malformed: truncated shard, bad header, offsets out of range. -> ValueError
struct CheckpointError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A path that should exist does not (model folder, shards). -> FileNotFoundError
struct MissingPathError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An option or scheme the caller passed is invalid or unsupported. -> ValueError
struct OptionError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Reading or writing files failed at the OS level. -> OSError
struct IoError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The run was cancelled through the progress callback (e.g. KeyboardInterrupt). -> KeyboardInterrupt
struct Cancelled : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace fastround
