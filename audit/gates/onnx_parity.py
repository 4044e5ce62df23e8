"""ONNX gate: the candidate exports with the dynamo exporter (dynamic batch dimension) and
onnxruntime reproduces its PyTorch logits.

The exported file is the artifact the flow logs beside the registered model, so it is written
as one self-contained file (no external-data side file).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from audit.gates.report import GateResult
from audit.training import predict_logits

EXPORT_BATCH = 2  # torch.export specialises batch sizes 0 and 1, so the example batch has 2 rows
PARITY_BATCH = 256  # rows checked with onnxruntime; must differ from EXPORT_BATCH
INPUT_NAME, OUTPUT_NAME = "inputs", "logits"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def export_onnx(model: nn.Module, example: torch.Tensor, onnx_path: Path) -> None:
    """Write `model` (in eval mode) to `onnx_path` with `torch.onnx.export(dynamo=True)`; input
    `inputs` [batch, *example.shape[1:]], output `logits` [batch, classes]. The model's
    train/eval mode is restored; its parameters are not touched. Raises what the exporter raises."""
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    # A stale file from an earlier attempt must not pass for this model's export.
    onnx_path.unlink(missing_ok=True)
    was_training = model.training
    model.eval()
    try:
        torch.onnx.export(
            model, (example,), str(onnx_path), dynamo=True, external_data=False, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    finally:
        model.train(was_training)


def run_onnx(onnx_path: Path, inputs: torch.Tensor) -> np.ndarray:
    """Logits [B, classes] from onnxruntime's CPU provider, using as many threads as torch."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: inputs.numpy()})[0]


def onnx_parity_gate(model: nn.Module, inputs: torch.Tensor, onnx_path: Path, rtol: float, atol: float) -> GateResult:
    """Export `model` to `onnx_path`, run up to PARITY_BATCH rows of `inputs` [N, ...] (N > 0)
    through onnxruntime and compare with PyTorch's logits element-wise as np.allclose(onnx,
    torch, rtol, atol). Metric `onnx_max_abs_diff`: max |onnx - torch|, NaN when export or run
    failed; an exporter or onnxruntime error becomes a failed gate whose reason summarises it."""
    example = _rows(inputs, EXPORT_BATCH)
    # A batch size other than the export example's proves the batch dimension is really dynamic.
    checked = _rows(inputs, min(len(inputs), PARITY_BATCH))
    if len(checked) == EXPORT_BATCH:
        checked = _rows(inputs, EXPORT_BATCH + 1)
    try:
        export_onnx(model, example, onnx_path)
    except Exception as error:  # any exporter failure is a verdict on the model, not a crash
        return _failed(f"the model does not export to ONNX: {_summary(error)}", atol)
    try:
        onnx_logits = run_onnx(onnx_path, checked)
    except Exception as error:  # the file exists but onnxruntime cannot load or run it
        return _failed(f"onnxruntime cannot run the exported model: {_summary(error)}", atol)
    torch_logits = predict_logits(model, checked).numpy()
    if onnx_logits.shape != torch_logits.shape:
        return _failed(
            f"onnxruntime returned logits of shape {onnx_logits.shape} where PyTorch gives {torch_logits.shape}", atol
        )
    diff = float(np.max(np.abs(onnx_logits.astype(np.float64) - torch_logits.astype(np.float64))))
    passed = bool(np.allclose(onnx_logits, torch_logits, rtol=rtol, atol=atol, equal_nan=False))
    verdict = "within" if passed else "not within"
    reason = (
        f"onnxruntime logits on a batch of {len(checked)} (exported with batch {EXPORT_BATCH}) differ from PyTorch "
        f"by at most {diff:.3g}, {verdict} rtol {rtol:g} / atol {atol:g}"
    )
    return GateResult("onnx_parity", "onnx_max_abs_diff", None, diff, atol, passed, reason)


def _rows(inputs: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows of `inputs`, cycling when there are fewer."""
    index = torch.arange(count) % len(inputs)
    return inputs[index].contiguous()


def _failed(reason: str, atol: float) -> GateResult:
    return GateResult("onnx_parity", "onnx_max_abs_diff", None, math.nan, atol, False, reason)


def _summary(error: BaseException) -> str:
    """`Type: first line` of the error and of its root cause, without terminal colour codes."""
    def line(e: BaseException) -> str:
        lines = _ANSI.sub("", str(e)).strip().splitlines()
        # The exporter's first line runs on into advice ("This is step 1/3 ... Next steps:").
        first = " ".join(lines[0].split(". ")[0].split()).rstrip(".:") if lines else "(no message)"
        return f"{type(e).__name__}: {first}"

    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    return line(error) if root is error else f"{line(error)} (caused by {line(root)})"
