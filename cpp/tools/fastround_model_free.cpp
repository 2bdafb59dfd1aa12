// fastround-model-free JOB.json: the model-free pipeline without Python (same job format as the API).
#include <cstdio>
#include <iostream>

#include "fastround/io/files.h"
#include "fastround/pipeline/model_free.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s JOB.json\n", argv[0]);
    return 2;
  }
  try {
    const auto job = fastround::ModelFreeJob::from_json(fastround::read_json_file(argv[1]));
    fastround::ModelFreeCallbacks cb;
    int last_pct = -1;
    cb.progress = [&](const fastround::ModelFreeProgress& p) {
      const int pct = p.bytes_total ? static_cast<int>(100 * p.bytes_done / p.bytes_total) : 100;
      if (pct != last_pct) std::fprintf(stderr, "\r%3d%% shard %d/%d", pct, p.shard_index, p.shard_count);
      last_pct = pct;
      return true;
    };
    cb.log = [](fastround::LogLevel, const std::string& msg) { std::fprintf(stderr, "\n%s", msg.c_str()); };
    const auto result = fastround::run_model_free(job, cb);
    std::fprintf(stderr, "\n");
    std::cout << result.quantization_config.dump(2) << std::endl;
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\nerror: %s\n", e.what());
    return 1;
  }
}
