"""Swap sparse kernels into a model wherever they are faster, and only there.

A layer becomes sparse only if it pays: by default each candidate is timed, dense against
sparse, once on a representative input (calibration), and keeps the dense kernel unless
the sparse one is clearly faster. Without calibration a sparsity threshold decides.

Units are decided, not single linears, where fusing pays: attention's query/key/value run
as one shared-input product, and a feed-forward block with exact GELU runs fused. A unit
that does not pay as a whole falls back to deciding its linears one by one; a GELU after
a matrix that stays dense may still become the vectorised `FastGELU`.

Any architecture is safe: what the runtime does not recognise stays as it is. A unit is
fused only where its structure is checked (shared-input linears of one input size, a
feed-forward block with exact GELU whose shapes chain, an add & norm block that computes
``LayerNorm(dense(h) + residual)`` on a probe), plain `nn.Linear` modules are swapped one
by one, and attention goes to the native kernel only in models that call it through
transformers' attention interface; everything kept for such a reason gets a `Decision`
saying why.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsebert.errors import SparseBertError, check_sparsity
from sparsebert.runtime import native
from sparsebert.runtime.activation import FastGELU
from sparsebert.runtime.add_norm import FusedAddNorm, is_output_block
from sparsebert.runtime.attention import supports_attention_interface, use_native_attention
from sparsebert.runtime.fused import GroupSlice, SharedInputGroup, SparseFFN
from sparsebert.runtime.quantized import SparseFFNInt8, SparseLinearInt8
from sparsebert.runtime.sparse_linear import SparseLinear

SPARSE_KERNEL_MIN_SPARSITY = 0.6
"""Without calibration: a unit at least this sparse gets the sparse kernel. On 2 AVX2
cores the sparse kernel breaks even with MKL/oneDNN dense around 50-55% sparsity for
BERT-base/MiniLM shapes."""

CANDIDATE_FLOOR = 0.3
"""With calibration: below this sparsity a layer is not even timed (the sparse kernel
does about half the flops per second of a dense GEMM, so it cannot win there)."""

SHARED_INPUT_NAMES = (
    ("query", "key", "value"),
    ("q_lin", "k_lin", "v_lin"),
    ("q_proj", "k_proj", "v_proj"),
    ("query_proj", "key_proj", "value_proj"),  # DeBERTa
)
"""Sibling linears that attention implementations call on the same hidden states."""

FFN_PATTERNS = (
    ("intermediate.dense", "intermediate.intermediate_act_fn", "output.dense"),  # BERT family
    ("ffn.lin1", "ffn.activation", "ffn.lin2"),  # DistilBERT
)
"""(first linear, activation, second linear) paths of a feed-forward block, per family."""


DTYPES = ("float32", "int8")
"""What `sparsify_for_inference` can make the sparse units compute in."""

SWAP_KINDS = ("gelu", "attention", "add-norm")
"""Decisions that swap dense work for a faster dense kernel, not a sparse one."""


@dataclass
class Decision:
    """What happened to one unit (a linear, a shared-input group, a feed-forward block, or
    the GELU after a feed-forward matrix that stays dense); ``sparse`` = the runtime's
    module was swapped in."""

    name: str
    kind: str
    sparsity: float
    sparse: bool
    reason: str
    dense_ms: float | None = None
    sparse_ms: float | None = None


@dataclass
class SparsifyReport:
    """Decisions of `sparsify_for_inference`, in model order."""

    decisions: list[Decision] = field(default_factory=list)
    dtype: str = "float32"
    """What the sparse units compute in: ``float32``, or ``int8`` (weights per output row,
    activations per token; see `sparsebert.runtime.quantized`)."""

    @property
    def n_sparse(self) -> int:
        """Units running on sparse kernels (not counting GELU / attention swaps)."""
        return sum(d.sparse for d in self.decisions if d.kind not in SWAP_KINDS)

    def summary(self) -> str:
        """One line per unit: name, sparsity, choice and why."""
        lines = []
        for d in self.decisions:
            times = ""
            if d.dense_ms is not None and d.sparse_ms is not None:
                times = f" (dense {d.dense_ms:.2f} ms, sparse {d.sparse_ms:.2f} ms)"
            if d.kind in SWAP_KINDS:
                choices = {"gelu": ("torch GELU", "FastGELU"), "attention": ("torch", "native kernel"),
                           "add-norm": ("torch", "native")}
                choice = choices[d.kind][d.sparse]
                lines.append(f"{d.name} [{d.kind}]: {choice}, {d.reason}{times}")
                continue
            choice = ("sparse int8" if self.dtype == "int8" else "sparse") if d.sparse else "dense"
            lines.append(f"{d.name} [{d.kind}] {d.sparsity:.1%}: {choice}, {d.reason}{times}")
        return "\n".join(lines)


def sparsity_of(linear: nn.Linear) -> float:
    """Fraction of exact zeros in a linear's weight."""
    w = linear.weight
    return float((w == 0).sum()) / max(1, w.numel())


def _join(parent: str, path: str) -> str:
    return f"{parent}.{path}" if parent else path


def _is_linear(module: object) -> bool:
    """A plain `nn.Linear` (not a subclass: those may compute something else, like LoRA or
    quantised linears, or be read by their parent as a weight, like
    `nn.MultiheadAttention`'s ``out_proj``)."""
    return type(module) is nn.Linear


def _reads_weights(model: nn.Module, path: str) -> str | None:
    """The class of the torch module that holds the linear at ``path`` and reads its
    ``weight`` directly instead of calling it (`nn.TransformerEncoderLayer`'s fast path,
    `nn.MultiheadAttention`), or None."""
    parent_path = path.rpartition(".")[0]
    parent = _get(model, parent_path) if parent_path else model
    if parent is None or isinstance(parent, nn.Sequential | nn.ModuleList | nn.ModuleDict):
        return None
    if type(parent).__module__.startswith("torch.nn."):
        return type(parent).__name__
    return None


def _get(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = _get(root, parent_path) if parent_path else root
    setattr(parent, name, module)


def is_exact_gelu(act: nn.Module | Callable) -> bool:
    """True when ``act`` computes the erf GELU the kernel fuses (checked on a probe)."""
    probe = torch.linspace(-6.0, 6.0, 97)
    try:
        with torch.no_grad():
            return torch.equal(act(probe), torch.nn.functional.gelu(probe))
    except Exception:  # anything that is not a tensor function is "no"
        return False


def _time_pair(dense: Callable, sparse: Callable, x: torch.Tensor, repeats: int) -> tuple:
    """Median milliseconds of two callables on ``x``, interleaved (alternating which goes
    first) so that background noise hits both alike."""
    times: dict[Callable, list[float]] = {dense: [], sparse: []}
    with torch.inference_mode():
        dense(x), sparse(x)  # warm-up: caches, allocator, JIT compilation
        for r in range(repeats):
            for fn in (dense, sparse) if r % 2 == 0 else (sparse, dense):
                start = time.perf_counter()
                fn(x)
                times[fn].append(time.perf_counter() - start)
    return statistics.median(times[dense]) * 1e3, statistics.median(times[sparse]) * 1e3


@dataclass
class _Policy:
    threshold: float
    calibrate: bool
    tokens: int
    repeats: int
    margin: float
    dtype: str = "float32"

    def decide(
        self, name: str, kind: str, sparsity: float, n_in: int, dense: Callable, build: Callable
    ) -> tuple[Decision, nn.Module | None]:
        """Decide one unit; return the decision and the built sparse module if chosen."""
        if sparsity < self.threshold:
            reason = f"below the {self.threshold:.0%} threshold"
            return Decision(name, kind, sparsity, False, reason), None
        module = build()
        if not self.calibrate:
            return Decision(name, kind, sparsity, True, "above threshold, not timed"), module
        x = torch.randn(self.tokens, n_in)
        dense_ms, sparse_ms = _time_pair(dense, module, x, self.repeats)
        faster = sparse_ms <= dense_ms * (1.0 - self.margin)
        reason = "timed faster" if faster else "timed not faster"
        decision = Decision(name, kind, sparsity, faster, reason, dense_ms, sparse_ms)
        return decision, (module if faster else None)


def _linear_kind(policy: _Policy) -> type[SparseLinear] | type[SparseLinearInt8]:
    return SparseLinearInt8 if policy.dtype == "int8" else SparseLinear


def _linear_fn(linear: nn.Linear, act: Callable | None = None) -> Callable:
    if act is None:
        return linear
    return lambda x: act(linear(x))


def _decide_linear(
    model: nn.Module, path: str, policy: _Policy, report: SparsifyReport, act_path: str = ""
) -> None:
    linear = _get(model, path)
    holder = _reads_weights(model, path)
    if holder is not None:
        reason = f"kept: torch's {holder} reads this weight directly"
        report.decisions.append(Decision(path, "linear", sparsity_of(linear), False, reason))
        return
    act = _get(model, act_path) if act_path else None
    fuse_gelu = act is not None and is_exact_gelu(act)
    decision, module = policy.decide(
        path,
        "linear+gelu" if fuse_gelu else "linear",
        sparsity_of(linear),
        linear.in_features,
        _linear_fn(linear, act if fuse_gelu else None),
        lambda: _linear_kind(policy).from_linear(linear, activation="gelu" if fuse_gelu else None),
    )
    report.decisions.append(decision)
    if module is not None:
        _set(model, path, module)
        if fuse_gelu:
            _set(model, act_path, nn.Identity())
    elif fuse_gelu:
        _decide_gelu(model, act_path, linear.out_features, policy, report)


def _decide_gelu(
    model: nn.Module, act_path: str, n_features: int, policy: _Policy, report: SparsifyReport
) -> None:
    """A dense linear followed by exact GELU keeps its matrix but may get `FastGELU`."""
    act, fast = _get(model, act_path), FastGELU()
    if policy.calibrate:
        x = torch.randn(policy.tokens, n_features)
        torch_ms, fast_ms = _time_pair(act, fast, x, policy.repeats)
        chosen = fast_ms <= torch_ms * (1.0 - policy.margin)
        reason = "timed faster" if chosen else "timed not faster"
        decision = Decision(act_path, "gelu", 0.0, chosen, reason, torch_ms, fast_ms)
    else:
        chosen = True
        decision = Decision(act_path, "gelu", 0.0, True, "vectorised exact GELU, not timed")
    report.decisions.append(decision)
    if chosen:
        _set(model, act_path, fast)


def _decide_shared(
    model: nn.Module, parent: str, names: tuple, policy: _Policy, report: SparsifyReport
) -> None:
    paths = [_join(parent, n) for n in names]
    linears = [_get(model, p) for p in paths]
    if len({lin.in_features for lin in linears}) != 1 or _reads_weights(model, paths[0]):
        for path in paths:  # not one input (e.g. cross-attention): each on its own
            _decide_linear(model, path, policy, report)
        return
    total = sum(lin.weight.numel() for lin in linears)
    zeros = sum(float((lin.weight == 0).sum()) for lin in linears)
    worst = min(sparsity_of(lin) for lin in linears)
    if worst >= policy.threshold:
        group_box: list[SharedInputGroup] = []

        def build() -> nn.Module:
            group_box.append(SharedInputGroup(linears, dtype=policy.dtype))
            return group_box[-1].linear

        def dense(x: torch.Tensor) -> None:
            for lin in linears:
                lin(x)

        name = _join(parent, f"{{{','.join(names)}}}")
        decision, module = policy.decide(
            name, "shared-input", zeros / total, linears[0].in_features, dense, build
        )
        if module is not None:
            report.decisions.append(decision)
            for member, path in enumerate(paths):
                _set(model, path, GroupSlice(group_box[-1], member))
            return
    for path in paths:
        _decide_linear(model, path, policy, report)


def _decide_ffn(
    model: nn.Module, parent: str, pattern: tuple, policy: _Policy, report: SparsifyReport
) -> None:
    first_path, act_path, second_path = (_join(parent, p) for p in pattern)
    first, second = _get(model, first_path), _get(model, second_path)
    act = _get(model, act_path)
    # `SparseFFN` computes exact GELU between the two products: any other activation, or
    # shapes that do not chain, and the two linears are decided one by one.
    fusable = (
        is_exact_gelu(act)
        and first.out_features == second.in_features
        and _reads_weights(model, first_path) is None
        and _reads_weights(model, second_path) is None
    )
    if fusable and min(sparsity_of(first), sparsity_of(second)) >= policy.threshold:
        total = first.weight.numel() + second.weight.numel()
        zeros = float((first.weight == 0).sum() + (second.weight == 0).sum())
        decision, module = policy.decide(
            _join(parent, "ffn"),
            "ffn",
            zeros / total,
            first.in_features,
            lambda x: second(act(first(x))),
            lambda: (SparseFFNInt8 if policy.dtype == "int8" else SparseFFN)(first, second),
        )
        if module is not None:
            report.decisions.append(decision)
            # The fused block takes the second linear's place (the first and the activation
            # pass their input through): in a BERT output block it is then the `dense`
            # that `FusedAddNorm` runs together with the residual add and LayerNorm.
            _set(model, first_path, nn.Identity())
            _set(model, act_path, nn.Identity())
            _set(model, second_path, module)
            return
    _decide_linear(model, first_path, policy, report, act_path=act_path)
    _decide_linear(model, second_path, policy, report)



def _decide_attention(model: nn.Module, policy: _Policy, report: SparsifyReport) -> None:
    """Encoder attention through the native kernel (`attention.cpu_attention`) when it times
    faster than torch's sdpa on the calibration shape (sequences of 128)."""
    config = getattr(model, "config", None)
    heads, hidden = getattr(config, "num_attention_heads", 0), getattr(config, "hidden_size", 0)
    if not hasattr(config, "_attn_implementation") or native.library() is None:
        return
    if not supports_attention_interface(model):
        reason = (f"kept: {type(model).__name__} does not call its attention through "
                  "transformers' attention interface")
        report.decisions.append(Decision("attention", "attention", 0.0, False, reason))
        return
    d = hidden // heads if heads and hidden else 0
    if d % 8 or not 0 < d <= 256:
        reason = f"kept: the native kernel needs a head width that is a multiple of 8 up to 256, not {d}"
        report.decisions.append(Decision("attention", "attention", 0.0, False, reason))
        return
    if policy.calibrate:
        seq = 128
        q, k, v = (torch.randn(max(1, policy.tokens // seq), heads, seq, d) for _ in range(3))

        def sdpa(_: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        def fast(_: torch.Tensor) -> torch.Tensor:
            return native.attention(q, k, v, None, d**-0.5, torch.get_num_threads())

        sdpa_ms, native_ms = _time_pair(sdpa, fast, q, policy.repeats)
        chosen = native_ms <= sdpa_ms * (1.0 - policy.margin)
        reason = "timed faster" if chosen else "timed not faster"
        decision = Decision("attention", "attention", 0.0, chosen, reason, sdpa_ms, native_ms)
    else:
        chosen = True
        decision = Decision("attention", "attention", 0.0, True, "native kernel, not timed")
    report.decisions.append(decision)
    if chosen:
        use_native_attention(model)


def _computes_add_norm(module: nn.Module) -> bool:
    """Whether an output block really computes ``LayerNorm(dense(h) + input)``: checked on
    a random probe, so a module that only looks like a BERT output block keeps its own
    forward."""
    n_in, n_out = getattr(module.dense, "in_features", None), module.LayerNorm.normalized_shape[0]
    if not isinstance(n_in, int):
        return False
    gen = torch.Generator().manual_seed(0)
    h, residual = torch.randn(2, 3, n_in, generator=gen), torch.randn(2, 3, n_out, generator=gen)
    try:
        with torch.inference_mode():
            got = module(h, residual)
            want = module.LayerNorm(module.dense(h) + residual)
    except Exception:  # any failure to run it the BERT way means "not an output block"
        return False
    return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


def _fuse_add_norms(model: nn.Module, report: SparsifyReport) -> None:
    """Output blocks (dense -> add residual -> LayerNorm) get the one-pass native add & norm;
    not timed: it reads and writes the activations once instead of twice."""
    if native.library() is None:
        return
    for name, module in list(model.named_modules()):
        if not is_output_block(module):
            continue
        if _computes_add_norm(module):
            _set(model, name, FusedAddNorm(module.dense, module.LayerNorm))
            report.decisions.append(Decision(name, "add-norm", 0.0, True, "one pass, not timed"))
        else:
            reason = "kept: its forward is not LayerNorm(dense(h) + input)"
            report.decisions.append(Decision(name, "add-norm", 0.0, False, reason))


def _check_model(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.device.type != "cpu" or p.dtype != torch.float32:
            raise SparseBertError(
                f"the sparse CPU runtime needs a float32 model on the CPU, but {name} is "
                f"{p.dtype} on {p.device}: call model.float().cpu() first"
            )


def sparsify_for_inference(
    model: nn.Module,
    min_sparsity: float | None = None,
    calibrate: bool = True,
    sample_tokens: int = 16 * 128,
    repeats: int = 7,
    margin: float = 0.05,
    dtype: str = "float32",
) -> SparsifyReport:
    """Replace the linears of ``model`` (in place) by sparse kernels where that is faster.

    min_sparsity: linears (or units) sparser than this are candidates; default
        `CANDIDATE_FLOOR` with calibration, `SPARSE_KERNEL_MIN_SPARSITY` without.
    calibrate: time dense vs sparse once per candidate on ``sample_tokens`` random tokens
        (default batch 16 x seq 128) and keep the sparse kernel only if it is at least
        ``margin`` faster, so no layer becomes slower.
    The model is put in eval mode; the result is for inference under `torch.no_grad()` /
    `torch.inference_mode()` only, with torch's thread count (`torch.set_num_threads`).
    dtype: ``float32`` (exact to rounding), or ``int8``: the sparse units become sparse INT8
        ones (`SparseLinearInt8`, `SparseFFNInt8`: int8 weights per output row, activations
        quantised per token at run time, int32 sums; see `sparsebert.runtime.quantized`);
        attention, layer norms, embeddings and the linears that stay dense stay float32.
    Returns a `SparsifyReport` with one decision per unit.
    """
    _check_model(model)
    if min_sparsity is not None:
        threshold = check_sparsity(min_sparsity, "min_sparsity")
    else:
        threshold = CANDIDATE_FLOOR if calibrate else SPARSE_KERNEL_MIN_SPARSITY
    if sample_tokens < 1 or repeats < 1:
        raise SparseBertError("sample_tokens and repeats must be positive integers")
    if dtype not in DTYPES:
        raise SparseBertError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    policy = _Policy(threshold, calibrate, int(sample_tokens), int(repeats), float(margin), dtype)
    model.eval()
    report = SparsifyReport(dtype=dtype)
    done: set[str] = set()
    for name, module in list(model.named_modules()):
        if any(name == d or name.startswith(d + ".") for d in done):
            continue
        for names in SHARED_INPUT_NAMES:
            if all(_is_linear(getattr(module, n, None)) for n in names):
                _decide_shared(model, name, names, policy, report)
                done.update(_join(name, n) for n in names)
        for pattern in FFN_PATTERNS:
            parts = [_get(module, p) for p in pattern]
            linears = _is_linear(parts[0]) and _is_linear(parts[2])
            if linears and parts[1] is not None:
                _decide_ffn(model, name, pattern, policy, report)
                done.update(_join(name, p) for p in (pattern[0], pattern[2]))
        if _is_linear(module) and name not in done:
            _decide_linear(model, name, policy, report)
            done.add(name)
    _decide_attention(model, policy, report)
    _fuse_add_norms(model, report)
    return report


EVAL_RUNTIMES = ("torch", "sparse", "sparse-int8")
"""What `sparsebert evaluate --runtime` can run a model on: ``torch`` (the model as saved),
``sparse`` (the sparse runtime, float32) and ``sparse-int8`` (the sparse runtime, INT8)."""


def prepare_for_runtime(model: nn.Module, runtime: str) -> dict:
    """Put ``model`` (in place) on the runtime ``runtime`` of `EVAL_RUNTIMES`, as a deployment
    would, and say what that did: ``{"runtime", "kernels", "sparse_units", "dense_units"}``.

    Not calibrated, so that accuracy never depends on timings: every unit at least
    `SPARSE_KERNEL_MIN_SPARSITY` sparse runs on the sparse kernels. A SparseBertError, saying
    why, where the runtime cannot serve this model: an unknown runtime, a model that is not
    float32 on the CPU, or one with no unit sparse enough (nothing would run sparse)."""
    if runtime not in EVAL_RUNTIMES:
        raise SparseBertError(f"unknown runtime {runtime!r}: use one of {', '.join(EVAL_RUNTIMES)}")
    if runtime == "torch":
        return {"runtime": "torch"}
    try:
        dtype = "int8" if runtime == "sparse-int8" else "float32"
        report = sparsify_for_inference(model, calibrate=False, dtype=dtype)
    except SparseBertError as err:
        raise SparseBertError(f"--runtime {runtime} cannot run this model: {err}") from None
    if report.n_sparse == 0:
        raise SparseBertError(
            f"--runtime {runtime}: no linear layer of this {type(model).__name__} is at least "
            f"{SPARSE_KERNEL_MIN_SPARSITY:.0%} sparse, so nothing would run on the sparse kernels; "
            "prune it first, or evaluate it with --runtime torch"
        )
    if runtime == "sparse-int8":
        kernels = native.int8_isa()
    else:
        kernels = native.isa() or "numba"
    units = [d for d in report.decisions if d.kind not in SWAP_KINDS]
    return {"runtime": runtime, "kernels": kernels, "sparse_units": report.n_sparse,
            "dense_units": len(units) - report.n_sparse}  # fmt: skip
