// The one map from fastround's C++ errors (common/error.h) to Python exceptions, for every extension
// module: fastround._C creates CheckpointError (a ValueError); fastround._torch raises that same class.
#pragma once

#include <pybind11/pybind11.h>

#include <exception>
#include <new>
#include <string>

#include "fastround/common/error.h"

namespace fastround_py {

namespace py = pybind11;

// The Python class of fastround::CheckpointError, owned for the life of the process.
inline PyObject*& checkpoint_error_type() {
  static PyObject* type = nullptr;
  return type;
}

// Messages quote file contents (a corrupt header, a bad JSON token) that need not be UTF-8.
inline void raise_py(PyObject* type, const char* what) {
  PyObject* msg = PyUnicode_DecodeUTF8(what, static_cast<Py_ssize_t>(std::char_traits<char>::length(what)), "replace");
  if (!msg) return;  // the decoder set MemoryError
  PyErr_SetObject(type, msg);
  Py_DECREF(msg);
}

// Any other exception escapes the try and reaches pybind11's own translators (MemoryError, RuntimeError).
inline void translate_error(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const fastround::CheckpointError& e) {
    raise_py(checkpoint_error_type(), e.what());
  } catch (const fastround::MissingPathError& e) {
    raise_py(PyExc_FileNotFoundError, e.what());
  } catch (const fastround::OptionError& e) {
    raise_py(PyExc_ValueError, e.what());
  } catch (const fastround::IoError& e) {
    raise_py(PyExc_OSError, e.what());
  } catch (const fastround::Cancelled& e) {
    raise_py(PyExc_KeyboardInterrupt, e.what());
  }
}

// `checkpoint_error`: the class fastround._C defines; each module registers the translator for itself.
inline void register_error_translator(py::handle checkpoint_error) {
  if (!checkpoint_error_type()) checkpoint_error_type() = checkpoint_error.inc_ref().ptr();
  py::register_local_exception_translator(&translate_error);
}

}  // namespace fastround_py
