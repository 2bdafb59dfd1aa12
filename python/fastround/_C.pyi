# Type stub of the fastround._C extension (pybind11-stubgen output from the built module, checked against it by
# tests/test_cpp_core.py::test_stub_lists_the_module). Regenerate after changing a binding.
"""
fastround C++ core
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
import typing_extensions
__all__: list[str] = ['AUTOROUND_COMPAT_VERSION', 'CheckpointError', 'Encoding', 'IgnoreMatcher', 'build_ignore_patterns', 'count_nonfinite', 'dequant_fp8_scaled', 'dequantize_int_gptq', 'dequantize_mxfp', 'dequantize_nvfp4_e5m3', 'diffusion_components', 'encoding_for', 'encodings', 'fake_quantize_nvfp4_e5m3', 'ignore_pattern_to_regex', 'indexed_shards', 'is_always_skipped', 'isa', 'isa_supported', 'max_threads', 'parse_ignore_layers', 'pattern_to_regex', 'predefined_ignore_layers', 'preset', 'preset_names', 'quantize_int_gptq', 'quantize_mxfp', 'quantize_nvfp4_e5m3', 'resolve_job_scheme', 'resolve_layer_scheme', 'run_model_free', 'set_isa', 'set_num_threads']
class CheckpointError(ValueError):
    pass
class Encoding:
    """
    One row of the C++ encoding table (read-only).
    """
    def __repr__(self) -> str:
        ...
    def packing_format(self, sym: bool) -> str:
        ...
    def tensors(self, rows: typing.SupportsInt | typing.SupportsIndex, cols: typing.SupportsInt | typing.SupportsIndex, bits: typing.SupportsInt | typing.SupportsIndex, group_size: typing.SupportsInt | typing.SupportsIndex = 128, sym: bool = True) -> list[tuple[str, str, list[int]]]:
        """
        (suffix, dtype, shape) of each tensor a [rows, cols] weight is written as.
        """
    @property
    def bits(self) -> list[int]:
        ...
    @property
    def data_type(self) -> str:
        ...
    @property
    def fixed_group(self) -> int:
        ...
    @property
    def model_free_formats(self) -> list[str]:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def pads_partial_groups(self) -> bool:
        ...
    @property
    def routed_formats(self) -> list[str]:
        ...
class IgnoreMatcher:
    def __init__(self, patterns: collections.abc.Sequence[str]) -> None:
        ...
    def matches(self, layer: str) -> bool:
        ...
    @property
    def patterns(self) -> list[str]:
        ...
def _parallel_for_probe(n: typing.SupportsInt | typing.SupportsIndex, throw_from: typing.SupportsInt | typing.SupportsIndex, error: str) -> int:
    """
    Test hook: parallel_for over n iterations that throw `error` from index throw_from on; returns the number of iterations that ran.
    """
def build_ignore_patterns(ignore_layers: str, quant_lm_head: bool, quant_nontext_module: bool, detected: collections.abc.Sequence[str], predefined: collections.abc.Sequence[str], layer_config_json: str = '{}', scheme_name: str = '') -> list[str]:
    ...
def count_nonfinite(data: typing_extensions.Buffer, dtype: str, reference: bool = False) -> int:
    """
    Number of NaN/Inf elements in a raw buffer of F32, F16 or BF16 elements.
    """
def dequant_fp8_scaled(weight: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], rows: typing.SupportsInt | typing.SupportsIndex, cols: typing.SupportsInt | typing.SupportsIndex, scale: typing_extensions.Buffer, scale_dtype: str, scale_shape: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], block_rows: typing.SupportsInt | typing.SupportsIndex = 0, block_cols: typing.SupportsInt | typing.SupportsIndex = 0, e8m0: bool = False, reference: bool = False) -> numpy.typing.NDArray[numpy.uint16]:
    """
    Dequantize an FP8 E4M3 weight with its weight_scale_inv to bf16 bits [rows, cols].
    """
def dequantize_int_gptq(qweight: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], qzeros: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], scales: typing.Annotated[numpy.typing.ArrayLike, numpy.uint16], rows: typing.SupportsInt | typing.SupportsIndex, cols: typing.SupportsInt | typing.SupportsIndex, bits: typing.SupportsInt | typing.SupportsIndex, group_size: typing.SupportsInt | typing.SupportsIndex, sym: bool, zero_offset: typing.SupportsInt | typing.SupportsIndex = 1) -> numpy.typing.NDArray[numpy.float32]:
    """
    Dequantize auto_gptq-packed tensors to float32 [rows, cols].
    """
def dequantize_mxfp(weight: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], scale: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], rows: typing.SupportsInt | typing.SupportsIndex, cols: typing.SupportsInt | typing.SupportsIndex, bits: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.float32]:
    """
    Dequantize MXFP tensors to float32 [rows, cols].
    """
def dequantize_nvfp4_e5m3(packed: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], scale: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], rows: typing.SupportsInt | typing.SupportsIndex, cols: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.float32]:
    """
    Dequantize NVFP4_E5M3 tensors to float32 [rows, cols].
    """
def diffusion_components(source_dir: str) -> list[str]:
    """
    The transformer components of a diffusers pipeline folder, in processing order (empty for any other folder).
    """
def encoding_for(bits: typing.SupportsInt | typing.SupportsIndex, data_type: str = 'int', format: str = 'auto_round') -> Encoding:
    """
    The encoding a layer of these bits and data_type is written in under `format`; None for full precision.
    """
def encodings() -> list[Encoding]:
    """
    Every row of the encoding table.
    """
def fake_quantize_nvfp4_e5m3(weight: typing_extensions.Buffer, dtype: str, rows: typing.SupportsInt | typing.SupportsIndex, cols: typing.SupportsInt | typing.SupportsIndex, opt_rtn: bool = True) -> numpy.ndarray:
    """
    NVFP4_E5M3 quantize-dequantize, as raw bytes of the source dtype [rows, cols*itemsize].
    """
def ignore_pattern_to_regex(pattern: str) -> str:
    ...
def indexed_shards(source_dir: str) -> list[str]:
    """
    Shard files named by the folder's weight index, in first-appearance order (empty without an index).
    """
def is_always_skipped(tensor_name: str) -> bool:
    ...
def isa() -> str:
    """
    Instruction set the kernels use now (scalar, avx2 or avx512).
    """
def isa_supported(name: str) -> bool:
    """
    Whether this CPU can run the kernels of that instruction set.
    """
def max_threads() -> int:
    ...
def parse_ignore_layers(csv: str) -> list[str]:
    ...
def pattern_to_regex(pattern: str) -> str:
    ...
def predefined_ignore_layers(config_json: str) -> list[str]:
    ...
def preset(name: str) -> typing.Any:
    """
    Fields of a preset scheme as JSON text, or None if unknown.
    """
def preset_names() -> list[str]:
    ...
def quantize_int_gptq(weight: typing_extensions.Buffer, dtype: str, rows: typing.SupportsInt | typing.SupportsIndex, cols: typing.SupportsInt | typing.SupportsIndex, bits: typing.SupportsInt | typing.SupportsIndex, group_size: typing.SupportsInt | typing.SupportsIndex, sym: bool, zero_offset: typing.SupportsInt | typing.SupportsIndex = 1, reference: bool = False) -> tuple:
    """
    RTN-quantize a [rows, cols] weight (raw buffer of F32, F16 or BF16 elements) and pack it as
    auto_gptq: returns (qweight [in_p/pf, out] int32, qzeros [groups, out_p/pf] int32, scales [groups, out]
    as uint16 fp16 bits). reference=True runs the scalar reference instead of the fused kernel.
    """
def quantize_mxfp(weight: typing_extensions.Buffer, dtype: str, rows: typing.SupportsInt | typing.SupportsIndex, cols: typing.SupportsInt | typing.SupportsIndex, bits: typing.SupportsInt | typing.SupportsIndex, opt_rtn: bool = True, reference: bool = False) -> tuple:
    """
    MXFP4/MXFP8-quantize a [rows, cols] weight: returns (weight_packed u8 [rows, cols/2] or float8 bytes [rows, cols], weight_scale u8 E8M0 [rows, cols/32]).
    """
def quantize_nvfp4_e5m3(weight: typing_extensions.Buffer, dtype: str, rows: typing.SupportsInt | typing.SupportsIndex, cols: typing.SupportsInt | typing.SupportsIndex, opt_rtn: bool = True, reference: bool = False) -> tuple:
    """
    NVFP4_E5M3-quantize: returns (weight_packed u8 [rows, cols/2], weight_scale u8 UE5M3 [rows, cols/16]).
    """
def resolve_job_scheme(job_json: str) -> str:
    """
    The validated default scheme of a job, as JSON text (raises ValueError if unsupported).
    """
def resolve_layer_scheme(layer_config_json: str, scheme_name: str, default_scheme_json: str, layer: str) -> typing.Any:
    """
    Effective scheme of `layer` as JSON text, or None when it stays in full precision.
    """
def run_model_free(job_json: str, progress: typing.Any = None, log: typing.Any = None, fetch: typing.Any = None, release: typing.Any = None) -> str:
    """
    Run a model-free job given as JSON text. progress(dict) is called between tensors (return
    False to cancel); log(level, message) receives the core's messages. For a streamed repo,
    fetch(shard, dest_dir, upcoming) -> path provides a shard and release(shard) says it is no longer needed;
    both are called from worker threads. Returns the summary as JSON text.
    """
def set_isa(name: str) -> None:
    """
    Use the kernels of this instruction set; ValueError if unknown or this CPU lacks it.
    """
def set_num_threads(n: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Threads used by the C++ kernels.
    """
AUTOROUND_COMPAT_VERSION: str = '0.16.1'
