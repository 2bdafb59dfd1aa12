// One pybind11 module (fastround._C); each area registers itself from its own file.
#pragma once

#include <pybind11/pybind11.h>

namespace py = pybind11;

void init_quant(py::module_& m);
void init_encoding(py::module_& m);
void init_match(py::module_& m);
void init_model_free(py::module_& m);
