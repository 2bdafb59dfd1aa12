#include "bindings.h"

#include "fastround/common/error.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastround C++ core";
  static py::exception<fastround::CheckpointError> checkpoint_error(m, "CheckpointError", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const fastround::CheckpointError& e) {
      py::set_error(checkpoint_error, e.what());
    } catch (const fastround::MissingPathError& e) {
      py::set_error(PyExc_FileNotFoundError, e.what());
    } catch (const fastround::OptionError& e) {
      py::set_error(PyExc_ValueError, e.what());
    } catch (const fastround::IoError& e) {
      py::set_error(PyExc_OSError, e.what());
    } catch (const fastround::Cancelled& e) {
      py::set_error(PyExc_KeyboardInterrupt, e.what());
    }
  });
  init_quant(m);
  init_encoding(m);
  init_match(m);
  init_model_free(m);
}
