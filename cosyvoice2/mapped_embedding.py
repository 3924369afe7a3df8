"""An embedding table read from its safetensors file row by row, never held in memory.

Why: the speech LM's text embedding (Qwen2's `embed_tokens`, 151,936 rows of 896) is the
largest single tensor of the model (545 MB in float32, 145 MB in 8 bits), yet a call reads
only the rows of its few dozen text tokens, once, at prefill. Mapping the file and copying
those rows out costs a few pages of resident memory instead of the whole table.

`MappedEmbedding` is a drop-in for `nn.Embedding` and `nn.QuantizedEmbedding` as a lookup
(`__call__`): the same rows, the same dtype; a quantised table is dequantised row by row with
`mx.dequantize`, as `nn.QuantizedEmbedding` does. It has no parameters (the table is not part
of the module tree: it is neither cast, quantised nor saved with the model).

The file is untrusted: `header` must be the one `cosyvoice2.model_dir.check_safetensors`
returned for it (dtype, shape and a byte range inside the file for every tensor), and token
ids are checked against the table's rows before any row is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from cosyvoice2.errors import InputError

# safetensors dtype -> (numpy dtype of the stored bits, the MLX dtype they are)
_DTYPES: dict[str, tuple[Any, mx.Dtype]] = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
    "U32": (np.uint32, mx.uint32),
}


def _map(file: Path, header: dict[str, Any], name: str) -> tuple[np.ndarray, mx.Dtype]:
    """A read-only memory map of tensor `name` of a checked safetensors file."""
    info = header[name]
    if info["dtype"] not in _DTYPES:
        raise ValueError(f"tensor {name}: dtype {info['dtype']} cannot be mapped")
    np_dtype, mx_dtype = _DTYPES[info["dtype"]]
    with open(file, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")  # the data follow the header
    begin, _ = info["data_offsets"]
    shape = tuple(info["shape"])
    table = np.memmap(file, dtype=np_dtype, mode="r", offset=start + begin, shape=shape)
    return table, mx_dtype


class MappedEmbedding(nn.Module):
    """Rows of `prefix.weight` (and of `prefix.scales`/`prefix.biases` for a table quantised with
    `group_size` and `bits`) of a checked safetensors file, looked up as an embedding."""

    def __init__(
        self,
        file: Path,
        header: dict[str, Any],
        prefix: str,
        group_size: int | None = None,
        bits: int | None = None,
    ):
        super().__init__()
        self._file = str(file)
        self._weight, self._dtype = _map(file, header, f"{prefix}.weight")
        self._quantized = f"{prefix}.scales" in header
        if self._quantized:
            if group_size is None or bits is None:
                raise ValueError(f"{prefix}: a quantised table needs its group size and bits")
            self._scales, self._sdtype = _map(file, header, f"{prefix}.scales")
            self._biases, _ = _map(file, header, f"{prefix}.biases")
            if not (self._scales.shape[0] == self._biases.shape[0] == self._weight.shape[0]):
                raise ValueError(f"{prefix}: scales and biases do not match the weight's rows")
        self.group_size, self.bits = group_size, bits
        self.num_embeddings = self._weight.shape[0]
        width = self._weight.shape[1]  # 32-bit words of `bits`-bit values when quantised
        self.dims = width * 32 // bits if self._quantized else width

    def _rows(self, table: np.ndarray, dtype: mx.Dtype, ids: np.ndarray) -> mx.array:
        rows = mx.array(np.ascontiguousarray(table[ids]))
        return rows.view(dtype) if dtype == mx.bfloat16 else rows

    def __call__(self, x: mx.array) -> mx.array:
        ids = np.asarray(x).astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_embeddings):
            raise InputError(
                f"token ids must lie in [0, {self.num_embeddings}); got {ids.min()}..{ids.max()}"
            )
        flat = ids.reshape(-1)
        if not self._quantized:
            out = self._rows(self._weight, self._dtype, flat)
        else:
            out = mx.dequantize(
                self._rows(self._weight, self._dtype, flat),
                scales=self._rows(self._scales, self._sdtype, flat),
                biases=self._rows(self._biases, self._sdtype, flat),
                group_size=self.group_size,
                bits=self.bits,
            )
        return out.reshape(*ids.shape, out.shape[-1])

    def _extra_repr(self) -> str:
        return f"{self._file}, rows={self.num_embeddings}, quantized={self._quantized}"
