// The model-free job: JSON in, JSON summary out; progress and logs come back through callbacks.
#include <Python.h>
#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "fastround/common/error.h"
#include "fastround/pipeline/model_free.h"

namespace fr = fastround;

namespace {

// A Python exception raised inside a callback, parked while C++ unwinds without the GIL.
struct PendingPyError {
  PyObject *type = nullptr, *value = nullptr, *trace = nullptr;
  void park() { PyErr_Fetch(&type, &value, &trace); }
  bool parked() const { return type != nullptr; }
  [[noreturn]] void raise() {
    PyErr_Restore(type, value, trace);
    type = value = trace = nullptr;
    throw py::error_already_set();
  }
};

std::string run_model_free_json(const std::string& job_json, py::object progress, py::object log, py::object fetch,
                                py::object release) {
  const fr::ModelFreeJob job = fr::ModelFreeJob::from_json(fr::ojson::parse(job_json));
  PendingPyError pending;
  fr::ModelFreeCallbacks cb;
  if (!progress.is_none())
    cb.progress = [&](const fr::ModelFreeProgress& p) {
      py::gil_scoped_acquire gil;
      if (pending.parked()) return false;
      try {
        py::dict d;
        d["shard_index"] = p.shard_index;
        d["shard_count"] = p.shard_count;
        d["shard_name"] = p.shard_name;
        d["bytes_done"] = p.bytes_done;
        d["bytes_total"] = p.bytes_total;
        py::object r = progress(d);
        return r.is_none() || r.cast<bool>();
      } catch (py::error_already_set& e) {
        e.restore();
        pending.park();
        return false;
      }
    };
  if (!log.is_none())
    cb.log = [&](fr::LogLevel level, const std::string& msg) {
      py::gil_scoped_acquire gil;
      if (pending.parked()) return;
      try {
        log(static_cast<int>(level), msg);
      } catch (py::error_already_set& e) {
        e.restore();
        pending.park();
      }
    };
  // Streaming callbacks run on worker threads; a Python error fails that shard, and is re-raised here.
  if (!fetch.is_none())
    cb.fetch_shard = [&](const std::string& shard, const std::string& dest, const std::vector<std::string>& upcoming) {
      py::gil_scoped_acquire gil;
      try {
        return fetch(shard, dest, upcoming).cast<std::string>();
      } catch (py::error_already_set& e) {
        if (!pending.parked()) {
          e.restore();
          pending.park();
        }
        throw fr::IoError("[model_free] could not fetch shard '" + shard + "'");
      }
    };
  if (!release.is_none())
    cb.release_shard = [&](const std::string& shard) {
      py::gil_scoped_acquire gil;
      try {
        release(shard);
      } catch (py::error_already_set& e) {
        if (!pending.parked()) {
          e.restore();
          pending.park();
        }
      }
    };
  fr::ModelFreeResult result;
  try {
    py::gil_scoped_release release;
    result = fr::run_model_free(job, cb);
  } catch (const std::exception&) {
    if (pending.parked()) pending.raise();
    throw;
  }
  if (pending.parked()) pending.raise();
  fr::ojson r;
  r["output_dir"] = result.output_dir.string();
  r["quantized_layers"] = result.quantized_layers;
  r["ignored_layers"] = result.ignored_layers;
  r["shard_files"] = result.shard_files;
  r["source_bytes"] = result.source_bytes;
  r["output_bytes"] = result.output_bytes;
  r["quantization_config"] = result.quantization_config;
  r["summary"] = result.summary;
  return r.dump();
}

}  // namespace

void init_model_free(py::module_& m) {
  m.def("run_model_free", &run_model_free_json, py::arg("job_json"), py::arg("progress") = py::none(),
        py::arg("log") = py::none(), py::arg("fetch") = py::none(), py::arg("release") = py::none(),
        R"doc(Run a model-free job given as JSON text. progress(dict) is called between tensors (return
False to cancel); log(level, message) receives the core's messages. For a streamed repo,
fetch(shard, dest_dir, upcoming) -> path provides a shard and release(shard) says it is no longer needed;
both are called from worker threads. Returns the summary as JSON text.)doc");
  m.def(
      "resolve_job_scheme",
      [](const std::string& job_json) {
        const auto job = fr::ModelFreeJob::from_json(fr::ojson::parse(job_json));
        return fr::resolve_job_scheme(job).fields.to_json().dump();
      },
      py::arg("job_json"), "The validated default scheme of a job, as JSON text (raises ValueError if unsupported).");
  m.def(
      "indexed_shards", [](const std::string& dir) { return fr::indexed_shards(dir); }, py::arg("source_dir"),
      "Shard files named by the folder's weight index, in first-appearance order (empty without an index).");
  m.def(
      "diffusion_components", [](const std::string& dir) { return fr::diffusion_components(dir); },
      py::arg("source_dir"),
      "The transformer components of a diffusers pipeline folder, in processing order (empty for any other folder).");
  m.def("preset_names", &fr::preset_names);
  m.def(
      "preset",
      [](const std::string& name) -> py::object {
        const fr::SchemeFields* s = fr::find_preset(fr::to_upper(name));
        if (!s) return py::none();
        return py::str(s->to_json().dump());
      },
      py::arg("name"), "Fields of a preset scheme as JSON text, or None if unknown.");
  m.attr("AUTOROUND_COMPAT_VERSION") = fr::kAutoRoundCompatVersion;
}
