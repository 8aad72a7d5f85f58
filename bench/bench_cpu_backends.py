"""Benchmark: how close one fold's CPU forward pass comes to the CPU's limit, and what other runtimes give.

One random-weight ``--model-name`` predictor (ViT-B-32-quickgelu, LoRA, as the app exports it) on
``--nodules`` nodules x 9 planes, CPU, medians of ``--repeats`` after one warm-up:

- the limit: GFLOP/s of a plain fp32 matmul of the model's largest shape (tokens of all planes x
  width @ width x MLP width), and the model's FLOPs counted by ``torch.utils.flop_counter``; the
  model's share of that limit is printed;
- ``torchscript``: the traced module as the deploy app loads it (simple executor), the reference;
- ``torchscript frozen`` (``torch.jit.freeze``) and ``+ optimize_for_inference``;
- ``eager``: the predictor module without TorchScript;
- ``torch.compile`` (inductor, CPU), its compile time apart;
- ``onnxruntime``: when the package is importable (it is not a project requirement), the predictor
  exported to ONNX.

Each line gives the time, the ratio to the reference and the largest |difference| of the malignancy
and semantic probabilities (the project's bar: 1e-4). Usage::

    .venv/bin/python bench/bench_cpu_backends.py [--nodules 5] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import benchlib
import deploy_app  # noqa: F401  (its __init__ puts bundle/ on sys.path for scripts.*)
from deploy_app.inference import use_simple_torchscript_executor
from scripts.export import build_predictor, export_torchscript, load_exported
from scripts.network import SemanticCLIP
from scripts.zero_shot import PromptLayout

Outputs = dict[str, torch.Tensor]


def matmul_gflops(rows: int, inner: int, columns: int, repeats: int) -> float:
    """fp32 GFLOP/s of ``(rows x inner) @ (inner x columns)``: what the CPU gives the model's largest op."""
    a, b = torch.randn(rows, inner), torch.randn(inner, columns)
    seconds, _ = benchlib.median_seconds(lambda: a @ b, repeats)
    return 2.0 * rows * inner * columns / seconds / 1e9


def difference(outputs: Outputs, reference: Outputs) -> float:
    return max(float((outputs[k] - reference[k]).abs().max()) for k in ("malignancy", "semantic"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="ViT-B-32-quickgelu")
    parser.add_argument("--nodules", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_simple_torchscript_executor()

    torch.manual_seed(0)
    network = SemanticCLIP(args.model_name, pretrained=None, tuning="lora").eval()
    planes = torch.rand(args.nodules, 9, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = export_torchscript(network, Path(tmp) / "model.ts")
        scripted = load_exported(path)[0]
    eager = build_predictor(network, None, PromptLayout()).eval()

    def timed(run: Callable[[], Outputs]) -> tuple[float, Outputs]:
        with torch.no_grad():
            return benchlib.median_seconds(run, args.repeats)

    print(
        f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs, {args.threads} threads, torch "
        f"{torch.__version__}; {args.model_name}, {args.nodules} nodules x 9 planes, median of {args.repeats}"
    )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        eager(planes)
    model_flops = counter.get_total_flops()
    width, tokens = 768, 50  # ViT-B/32 at 224: 7 x 7 patches + the class token
    limit = matmul_gflops(args.nodules * 9 * tokens, width, 4 * width, args.repeats)

    reference_seconds, reference = timed(lambda: scripted(planes))
    rows: list[tuple[str, float, float]] = [("torchscript (the app's)", reference_seconds, 0.0)]

    frozen = torch.jit.freeze(scripted.eval())
    seconds, outputs = timed(lambda: frozen(planes))
    rows.append(("torchscript frozen", seconds, difference(outputs, reference)))
    optimized = torch.jit.optimize_for_inference(torch.jit.freeze(load_frozen_source(scripted)))
    seconds, outputs = timed(lambda: optimized(planes))
    rows.append(("frozen + optimize_for_inference", seconds, difference(outputs, reference)))

    seconds, outputs = timed(lambda: eager(planes))
    rows.append(("eager", seconds, difference(outputs, reference)))

    started = time.perf_counter()
    try:
        compiled = torch.compile(eager, backend="inductor")
        with torch.no_grad():
            compiled(planes)
        compile_seconds = time.perf_counter() - started
        seconds, outputs = timed(lambda: compiled(planes))
        rows.append(
            (f"torch.compile (compiled in {compile_seconds:.0f} s)", seconds, difference(outputs, reference))
        )
    except Exception as error:  # a missing compiler on this machine is a result, not a crash
        print(f"  torch.compile: not available ({type(error).__name__}: {str(error)[:120]})")

    onnx_row = onnxruntime_row(eager, planes, reference, timed)
    if onnx_row is not None:
        rows.append(onnx_row)

    print(
        f"  limit: fp32 matmul {limit:.0f} GFLOP/s; the model: {model_flops / 1e9:.0f} GFLOP per fold "
        f"({model_flops / 1e9 / args.nodules / 9:.1f} per plane)"
    )
    for name, seconds, delta in rows:
        achieved = model_flops / seconds / 1e9
        print(
            f"  {name:<44} {seconds:7.3f} s  x{reference_seconds / seconds:4.2f}  "
            f"{achieved:5.0f} GFLOP/s = {100 * achieved / limit:3.0f} % of the matmul limit  "
            f"max |dp| {delta:.1e}"
        )


def load_frozen_source(scripted: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """A fresh copy of the loaded module (freezing works in place on its graph)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "copy.ts"
        torch.jit.save(scripted, str(path))
        return torch.jit.load(str(path)).eval()


def onnxruntime_row(
    eager: torch.nn.Module,
    planes: torch.Tensor,
    reference: Outputs,
    timed: Callable[[Callable[[], Outputs]], tuple[float, Outputs]],
) -> tuple[str, float, float] | None:
    try:
        import onnxruntime
    except ImportError:
        print("  onnxruntime: not installed (pip install onnxruntime to compare it)")
        return None
    names = list(reference)

    class TupleOutputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = eager

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            outputs = self.inner(x)
            return tuple(outputs[name] for name in names)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # its fused attention op has no ONNX form
        try:
            torch.onnx.export(
                TupleOutputs(), (planes,), str(path), input_names=["planes"], output_names=names, dynamo=False
            )
        except Exception as error:
            print(f"  onnxruntime: export failed ({type(error).__name__}: {str(error)[:160]})")
            return None
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"planes": planes.numpy()}

    def run() -> Outputs:
        return {name: torch.from_numpy(v) for name, v in zip(names, session.run(None, feed), strict=True)}

    seconds, outputs = timed(run)
    return (f"onnxruntime {onnxruntime.__version__}", seconds, difference(outputs, reference))


if __name__ == "__main__":
    main()
