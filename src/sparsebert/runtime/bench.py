"""Latency benchmark: dense PyTorch and ONNX Runtime against the sparse runtime.

Why the protocol looks like this:
- every runtime runs in the same process on the same inputs, one repeat of each in turn
  (interleaved), so a burst of background load hits all runtimes alike;
- the score is the median over repeats after warm-up, and each sparse runtime is compared
  with the best dense runtime *of the same run and shape*, never with a remembered number;
- the sparse runtime is calibrated for each shape it is measured at, since whether a
  layer pays off sparse depends on the number of tokens;
- ONNX Runtime gets its best configuration: the graph is optimised with its transformer
  fusions (attention, GELU, skip-layer-norm) when that works, plain otherwise;
- the eager runtimes get a caching allocator's behaviour (`keep_freed_memory`), so page
  faults of memory glibc handed back to the OS do not land in some runs and not others.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsebert.errors import SparseBertError
from sparsebert.runtime.allocator import keep_freed_memory

DENSE_RUNTIMES = ("torch", "onnxruntime")
DENSE_INT8_RUNTIMES = ("torch-int8", "onnxruntime-int8")
"""Dense INT8 baselines: PyTorch's dynamic quantisation of the linears
(`torch.ao.quantization.quantize_dynamic`, qint8) and ONNX Runtime's of the (fused) graph
(`onnxruntime.quantization.quantize_dynamic`: uint8 activations, int8 weights)."""
INT8_RUNTIMES = ("sparse-int8", *DENSE_INT8_RUNTIMES)
"""What ``int8=True`` (``sparsebert bench --int8``) adds."""
ALL_RUNTIMES = ("torch", "sparse", "sparse-avx2", "onnxruntime", "deepsparse", *INT8_RUNTIMES)
"""``sparse`` runs the best native kernels of the CPU (`native.isa`); ``sparse-avx2`` the
same runtime with the AVX2 kernels forced (on an AVX-512 CPU: the two side by side);
``sparse-int8`` the sparse INT8 runtime (`sparsify_for_inference(dtype="int8")`)."""
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni",
              "avx512_bf16", "amx_tile")  # fmt: skip
"""CPU flags recorded with every benchmark (those that matter to the kernels, or to the
dense runtimes' kernels)."""


def default_runtimes() -> tuple[str, ...]:
    """torch, sparse, onnxruntime, and deepsparse when it is installed."""
    extra = ("deepsparse",) if importlib.util.find_spec("deepsparse") else ()
    return ("torch", "sparse", "onnxruntime", *extra)


def machine_info() -> dict[str, Any]:
    """CPU, core count, SIMD flags and library versions, for the record."""
    from sparsebert.runtime import native

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import numba
    import onnxruntime

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "simd": sorted(f for f in flags if f in SIMD_FLAGS),
        "kernel_isa": native.isa() or "numba",
        "kernel_isas_available": native.available_isas(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numba": numba.__version__,
    }


def encoder_sparsity(model: nn.Module) -> float:
    """Fraction of zeros over the encoder linears (the pruned set)."""
    from sparsebert.targets import select_targets

    try:
        params = select_targets(model, "encoder-linears").values()
    except SparseBertError:
        return 0.0
    total = sum(p.numel() for p in params)
    return float(sum(int((p == 0).sum()) for p in params)) / max(1, total)


def _inputs(model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from sparsebert.export import model_input_names

    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 1000))
    gen = torch.Generator().manual_seed(seed)
    low = min(1000, vocab // 2)
    feeds = {
        "input_ids": torch.randint(low, vocab, (batch, seq), generator=gen),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, seq, dtype=torch.long),
    }
    return {n: feeds[n] for n in model_input_names(model)}


def _onnx_session(model: nn.Module, path: Path, threads: int) -> tuple[Any, str]:
    """An ONNX Runtime session on the best graph we can make; returns (session, graph kind)."""
    import onnxruntime as ort

    from sparsebert.export import export_onnx

    export_onnx(model, {"batch": 2, "seq": 16}, path)
    graph, kind = path, "plain"
    config = getattr(model, "config", None)
    if getattr(config, "model_type", "") in ("bert", "roberta", "distilbert", "electra"):
        try:
            from onnxruntime.transformers import optimizer

            opt = optimizer.optimize_model(
                str(path),
                model_type="bert",
                num_heads=int(config.num_attention_heads),
                hidden_size=int(config.hidden_size),
                opt_level=1,
            )
            graph = path.with_name(path.stem + "_fused.onnx")
            opt.save_model_to_file(str(graph))
            kind = "transformer-fused"
        except Exception:  # the optimiser is best effort: fall back to the plain graph
            graph, kind = path, "plain"
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    return session, kind


def _onnx_int8_session(graph: Path, threads: int) -> Any:
    """An ONNX Runtime session on the dynamically quantised (INT8) copy of ``graph``."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = graph.with_name(graph.stem + "_int8.onnx")
    # the fused graph's contrib ops (Attention, SkipLayerNormalization) defeat shape inference:
    # their outputs are float32
    quantize_dynamic(str(graph), str(target), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])


def _torch_int8(model: nn.Module) -> nn.Module:
    """PyTorch's dynamic INT8 quantisation of every `nn.Linear` (a copy)."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8).eval()


def _deepsparse_runner(onnx_path: Path, feeds: dict, threads: int) -> Callable[[], Any]:
    from deepsparse import compile_model

    names = list(feeds)
    arrays = [feeds[n].numpy() for n in names]
    engine = compile_model(
        str(onnx_path),
        batch_size=arrays[0].shape[0],
        num_cores=threads,
        input_shapes=[list(a.shape) for a in arrays],
    )
    return lambda: engine.run(arrays)


def _load(model_dir_or_model: str | os.PathLike | nn.Module) -> nn.Module:
    if isinstance(model_dir_or_model, nn.Module):
        return model_dir_or_model.eval()
    from sparsebert.export import load_pretrained

    return load_pretrained(model_dir_or_model)


def benchmark_model(
    model_dir_or_model: str | os.PathLike | nn.Module,
    batches: Iterable[int] = (1, 16),
    seqs: Iterable[int] = (128,),
    threads: int = 2,
    repeats: int = 10,
    warmup: int = 2,
    runtimes: Iterable[str] | None = None,
    settle_s: float = 0.05,
    progress: Callable[[str], None] | None = None,
    int8: bool = False,
) -> dict[str, Any]:
    """Median latency and throughput of each runtime at each (batch, seq).

    model_dir_or_model: a transformers model directory (dense or `export_model`'s
        compressed format) or a loaded model; it is not modified.
    runtimes: any of ``torch`` (eager, dense), ``sparse`` (`sparsify_for_inference`,
        calibrated per shape), ``onnxruntime`` (dense ONNX), ``deepsparse`` (if
        installed); default `default_runtimes`.
    settle_s: idle time before each timed run, so no runtime's spinning threads linger.
    int8: also run `INT8_RUNTIMES`: the sparse INT8 runtime and the dense INT8 baselines;
        rows then also get speedup_vs_best_dense_int8.
    Returns ``{"rows": [...], "machine", "settings", "sparse_plans", "sparse_time_share"}``;
    each row has batch, seq, runtime, median_ms, throughput (sequences/s), dense (bool)
    and speedup_vs_best_dense (best dense median of that shape / this median). The plans
    list the per-unit decisions of `sparsify_for_inference`; `sparse_time_share` splits
    the sparse model's time into sparse kernels and the rest.
    """
    from sparsebert.runtime import native
    from sparsebert.runtime.sparsify import sparsify_for_inference

    runtimes = tuple(default_runtimes() if runtimes is None else runtimes)
    if int8:
        runtimes += tuple(r for r in INT8_RUNTIMES if r not in runtimes)
    unknown = [r for r in runtimes if r not in ALL_RUNTIMES]
    if unknown or not runtimes:
        raise SparseBertError(
            f"unknown runtime(s) {unknown or '(none given)'}: choose from {', '.join(ALL_RUNTIMES)}"
        )
    if "deepsparse" in runtimes and not importlib.util.find_spec("deepsparse"):
        raise SparseBertError("runtime 'deepsparse' requested but deepsparse is not installed")
    if "sparse-avx2" in runtimes and "avx2" not in native.available_isas():
        raise SparseBertError("runtime 'sparse-avx2' requested but the AVX2 kernels cannot run here")
    if threads < 1 or repeats < 1 or warmup < 0:
        raise SparseBertError("threads and repeats must be >= 1, warmup >= 0")
    say = progress or (lambda _msg: None)
    model = _load(model_dir_or_model)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    plans: dict[str, list] = {}
    shares: dict[str, dict] = {}
    settings: dict[str, Any] = {"threads": threads, "repeats": repeats, "warmup": warmup,
                                "settle_s": settle_s, "runtimes": list(runtimes),
                                "malloc": keep_freed_memory()}  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="sparsebert-bench-") as tmp:
            session = None
            if any(r in runtimes for r in ("onnxruntime", "deepsparse", "onnxruntime-int8")):
                say("exporting ONNX")
                session, kind = _onnx_session(model, Path(tmp) / "model.onnx", threads)
                settings["onnxruntime_graph"] = kind
            session_int8 = None
            if "onnxruntime-int8" in runtimes:
                say("quantising the ONNX graph (dynamic INT8)")
                fused = Path(tmp) / "model_fused.onnx"
                graph = fused if fused.exists() else Path(tmp) / "model.onnx"
                session_int8 = _onnx_int8_session(graph, threads)
            torch_int8 = _torch_int8(model) if "torch-int8" in runtimes else None
            for seq in seqs:
                for batch in batches:
                    feeds = _inputs(model, batch, seq)
                    runners: dict[str, Callable[[], Any]] = {}
                    if "torch" in runtimes:
                        runners["torch"] = lambda f=feeds: model(**f)
                    if torch_int8 is not None:
                        runners["torch-int8"] = lambda f=feeds: torch_int8(**f)
                    sparse_kinds = (("sparse", native.isa(), "float32"), ("sparse-avx2", "avx2", "float32"),
                                    ("sparse-int8", native.isa(), "int8"))  # fmt: skip
                    for name, isa, dtype in sparse_kinds:
                        if name not in runtimes:
                            continue
                        say(f"calibrating the {name} runtime for batch {batch} x seq {seq}")
                        sparse_model = copy.deepcopy(model)
                        with native.using_isa(isa):  # calibrated with the kernels it runs
                            plan = sparsify_for_inference(sparse_model, sample_tokens=batch * seq,
                                                          dtype=dtype)  # fmt: skip
                        key = f"{batch}x{seq}" if name == "sparse" else f"{batch}x{seq}/{name}"
                        plans[key] = [asdict(d) for d in plan.decisions]
                        runners[name] = _runner_with_isa(sparse_model, feeds, isa)
                        if name == "sparse":
                            timed_sparse = sparse_model
                        if name == "sparse-int8":
                            timed_int8 = sparse_model
                    np_feeds = {k: v.numpy() for k, v in feeds.items()}
                    if "onnxruntime" in runtimes:
                        runners["onnxruntime"] = lambda f=np_feeds: session.run(None, f)
                    if session_int8 is not None:
                        runners["onnxruntime-int8"] = lambda f=np_feeds: session_int8.run(None, f)
                    if "deepsparse" in runtimes:
                        path = Path(tmp) / "model.onnx"
                        runners["deepsparse"] = _deepsparse_runner(path, feeds, threads)
                    say(f"timing batch {batch} x seq {seq}: {', '.join(runners)}")
                    rows.extend(_time_shape(runners, batch, seq, repeats, warmup, settle_s))
                    if "sparse" in runtimes:
                        with native.using_isa(native.isa()):
                            shares[f"{batch}x{seq}"] = sparse_time_share(timed_sparse, feeds)
                    if "sparse-int8" in runtimes:
                        with native.using_isa(native.isa()):
                            shares[f"{batch}x{seq}/sparse-int8"] = sparse_time_share(timed_int8, feeds)
    finally:
        torch.set_num_threads(old_threads)
    _add_ratios(rows)
    return {
        "model": _describe(model_dir_or_model, model),
        "encoder_sparsity": encoder_sparsity(model),
        "machine": machine_info(),
        "settings": settings,
        "rows": rows,
        "sparse_plans": plans,
        "sparse_time_share": shares,
    }


def _runner_with_isa(
    model: nn.Module, feeds: Mapping[str, torch.Tensor], isa: str | None
) -> Callable[[], Any]:
    """A forward pass of ``model`` with ``isa``'s native kernels (the choice is per process,
    and another runner of the same run may have switched it)."""
    from sparsebert.runtime import native

    def run() -> Any:
        with native.using_isa(isa):
            return model(**feeds)

    return run


def _is_sparse_unit(module: nn.Module) -> bool:
    """A sparse module (`SparseLinear`, `GroupSlice`, `SparseFFN`), or an add & norm block
    around one (`FusedAddNorm` runs its sparse `dense` and the add & norm as one kernel,
    bypassing the inner module's hooks)."""
    from sparsebert.runtime.add_norm import FusedAddNorm
    from sparsebert.runtime.fused import GroupSlice, SparseFFN
    from sparsebert.runtime.quantized import SparseFFNInt8, SparseLinearInt8
    from sparsebert.runtime.sparse_linear import SparseLinear

    sparse = (SparseLinear, GroupSlice, SparseFFN, SparseLinearInt8, SparseFFNInt8)
    return isinstance(module, sparse) or (
        isinstance(module, FusedAddNorm) and isinstance(module.dense, sparse)
    )


def sparse_time_share(model: nn.Module, feeds: Mapping[str, torch.Tensor], runs: int = 7) -> dict:
    """Where a sparsified model's time goes: its sparse kernels vs everything else.

    Forward hooks time the sparse units (`_is_sparse_unit`: sparse modules, and add & norm
    blocks fused with one: their residual add + LayerNorm is counted with the kernel it runs in; nested
    units count once) during ``runs`` forward passes in a row (steady state); the rest
    (attention, other layer norms, embeddings, dense layers) is what sparsity cannot speed
    up. Returns the medians over the passes, in milliseconds per forward pass (medians: one
    pass disturbed by other load on a shared machine does not skew the split).
    """
    spent, depth, started = [0.0], [0], [0.0]

    def before(_module: nn.Module, _inputs: Any) -> None:
        if depth[0] == 0:
            started[0] = time.perf_counter()
        depth[0] += 1

    def after(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0:
            spent[0] += time.perf_counter() - started[0]

    handles = []
    for module in model.modules():
        if _is_sparse_unit(module):
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
    totals, kernels = [], []
    try:
        with torch.inference_mode():
            model(**feeds)
            for _ in range(max(1, runs)):
                spent[0] = 0.0
                start = time.perf_counter()
                model(**feeds)
                totals.append(time.perf_counter() - start)
                kernels.append(spent[0])
    finally:
        for h in handles:
            h.remove()
    total, kernel = statistics.median(totals), statistics.median(kernels)
    return {"total_ms": total * 1e3, "sparse_kernels_ms": kernel * 1e3,
            "rest_ms": (total - kernel) * 1e3}  # fmt: skip


def _describe(source: Any, model: nn.Module) -> str:
    if isinstance(source, nn.Module):
        return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return str(source)


def _time_shape(
    runners: Mapping[str, Callable[[], Any]],
    batch: int,
    seq: int,
    repeats: int,
    warmup: int,
    settle_s: float,
) -> list[dict[str, Any]]:
    """Interleaved timing: each repeat runs every runtime once, in rotating order.

    Each timed run is preceded by an idle ``settle_s`` seconds and one untimed run of the
    same runtime: thread pools (OpenMP, ONNX Runtime) spin-wait after their work and
    would steal the cores from the next runtime (measured: PyTorch 2x slower right after
    ORT), and the other runtimes' runs evict caches and churn the allocator (the sparse
    model ran 40% slower cold than in steady state). So every runtime is timed in its
    steady state, while background noise still hits all of them alike.
    """
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                runners[n]()
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in order:
                time.sleep(settle_s)
                runners[n]()
                start = time.perf_counter()
                runners[n]()
                times[n].append(time.perf_counter() - start)
    rows = []
    for n in names:
        median_s = statistics.median(times[n])
        rows.append(
            {
                "batch": batch,
                "seq": seq,
                "runtime": n,
                "dense": n in DENSE_RUNTIMES,
                "dense_int8": n in DENSE_INT8_RUNTIMES,
                "median_ms": median_s * 1e3,
                "min_ms": min(times[n]) * 1e3,
                "throughput": batch / median_s,
            }
        )
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_best_dense (best dense float32 runtime of the shape / this one), and where
    the run has dense INT8 rows, speedup_vs_best_dense_int8."""
    int8 = any(r.get("dense_int8") for r in rows)
    for row in rows:
        shape = (row["batch"], row["seq"])
        dense = [r["median_ms"] for r in rows if r["dense"] and (r["batch"], r["seq"]) == shape]
        row["speedup_vs_best_dense"] = (min(dense) / row["median_ms"]) if dense else None
        if int8:
            dense8 = [r["median_ms"] for r in rows
                      if r.get("dense_int8") and (r["batch"], r["seq"]) == shape]  # fmt: skip
            row["speedup_vs_best_dense_int8"] = (min(dense8) / row["median_ms"]) if dense8 else None


def write_json(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a benchmark result as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def markdown_table(rows: Iterable[Mapping[str, Any]], extra: Iterable[str] = ()) -> str:
    """A markdown table of benchmark rows (``extra``: more row keys to show first)."""
    extra, rows = list(extra), list(rows)
    int8 = any("speedup_vs_best_dense_int8" in r for r in rows)
    head = [*extra, "batch", "seq", "runtime", "median ms", "seq/s", "vs best dense"]
    head += ["vs best dense int8"] if int8 else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = r.get("speedup_vs_best_dense")
        cells = [_fmt(r.get(k)) for k in extra] + [
            str(r["batch"]),
            str(r["seq"]),
            r["runtime"],
            f"{r['median_ms']:.1f}",
            f"{r.get('throughput', r['batch'] * 1e3 / r['median_ms']):.1f}",
            "-" if ratio is None else f"{ratio:.2f}x",
        ]
        if int8:
            ratio8 = r.get("speedup_vs_best_dense_int8")
            cells.append("-" if ratio8 is None else f"{ratio8:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.0%}" if 0.0 <= value <= 1.0 else f"{value:.3g}"
    return str(value)


def write_markdown(result: Mapping[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """Write a benchmark result as a markdown table with the machine and settings."""
    machine = result.get("machine", {})
    settings = result.get("settings", {})
    text = [f"# {title or 'Sparse runtime benchmark'}", ""]
    if "model" in result:
        text.append(f"Model: `{result['model']}`, encoder sparsity "
                    f"{result.get('encoder_sparsity', 0.0):.1%}.")  # fmt: skip
    text += [
        f"Machine: {machine.get('cpu', '?')}, {machine.get('logical_cpus', '?')} logical CPUs, "
        f"{', '.join(machine.get('simd', []))}; torch {machine.get('torch', '?')}, "
        f"onnxruntime {machine.get('onnxruntime', '?')}, numba {machine.get('numba', '?')}.",
        f"Threads {settings.get('threads', '?')}, median of {settings.get('repeats', '?')} "
        "interleaved repeats after warm-up.",
        "",
        markdown_table(result["rows"]),
        "",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))
    return path
