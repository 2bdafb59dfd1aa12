#include "bindings.h"
#include "errors.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastround C++ core";
  static py::exception<fastround::CheckpointError> checkpoint_error(m, "CheckpointError", PyExc_ValueError);
  fastround_py::register_error_translator(checkpoint_error);
  init_quant(m);
  init_encoding(m);
  init_match(m);
  init_model_free(m);
}
