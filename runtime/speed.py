"""Decode speed, dense vs sparse, in the same loop: ms/token, tokens/s, bytes per step, achieved GB/s
against a copy bandwidth measured in the same run, the predictors' share, and HF eager as baseline.

On CUDA every step is one CUDA-graph replay (the step feeds its own argmax back, so replays run
back to back with no host work) timed with CUDA events; on CPU the same step runs eagerly.
"""

from __future__ import annotations

import statistics
import time

import torch

from dejavu.predictor import PredictorSet
from dejavu.runtime.decode import DecodeModel, GraphedStep

PROMPT_LEN = 16  # default tokens of context before the timed decode (cli: --prompt-len)


def cache_length(prompt_len: int, warmup: int, decode_tokens: int) -> int:
    """Positions the decode loop's cache holds for a timing: the prompt, the warm-up and timed steps,
    and a few spare slots."""
    return prompt_len + warmup + decode_tokens + 8


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (timings start and stop on it); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> float:
    """Device-to-device (or RAM-to-RAM) copy, counting bytes read plus written; median of repeats."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        sync_device(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync_device(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[2:]) / 1e9


def timed_loop(fn, device: torch.device, warmup: int, steps: int, before_timing=None) -> float:
    """Milliseconds per call of fn over `steps` calls after `warmup` calls (then before_timing(), if given)."""
    for _ in range(warmup):
        fn()
    if before_timing is not None:
        before_timing()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / steps


def decode_ms_per_token(dm: DecodeModel, batch: int, sparse: bool, steps: int, warmup: int, seed: int = 0,
                        prompt_len: int = PROMPT_LEN) -> float:
    st = dm.new_state(batch, dense_only=not sparse)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, dm.embed.shape[0], (batch, prompt_len), generator=gen)
    dm.prefill(st, prompt)
    if dm.device.type == "cuda":
        step = GraphedStep(dm, st, sparse)
    else:
        def step():
            return dm.step(st, sparse)
    # score thresholds: count the MLP rows the timed steps keep, not the warm-up's
    return timed_loop(step, dm.device, warmup, steps, before_timing=dm.reset_mlp_tally if sparse else None)


def predictor_ms(dm: DecodeModel, batch: int, steps: int = 20) -> float:
    """Time of all predictors + top-k of one step (on the residual-stream shape of the batch)."""
    if not dm.pred_groups and not any(lw.mlp_quant is not None for lw in dm.layers):
        return 0.0  # thresholds alone: nothing to time (and CUDA warns of an empty graph)
    x = torch.randn(batch, dm.d, device=dm.device, dtype=dm.dtype)
    if dm.device.type == "cuda":
        dm.select_all(x)
        torch.cuda.synchronize(dm.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dm.select_all(x)
        return timed_loop(graph.replay, dm.device, 3, steps)
    return timed_loop(lambda: dm.select_all(x), dm.device, 1, max(2, steps // 5))


@torch.no_grad()
def hf_eager_ms_per_token(model, batch: int, steps: int, device: torch.device, warmup: int = 2,
                          prompt_len: int = PROMPT_LEN) -> float:
    """Hugging Face's own decode (model(..., past_key_values), eager): the baseline users know."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(1, vocab, (batch, prompt_len), device=device)
    out = model(ids, use_cache=True)
    state = {"past": out.past_key_values, "next": out.logits[:, -1].argmax(-1, keepdim=True)}

    def one():
        o = model(state["next"], past_key_values=state["past"], use_cache=True)
        state["past"], state["next"] = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)

    return timed_loop(one, device, warmup, steps)


def best_dense_ms(dm: DecodeModel, batch: int, decode_tokens: int, warmup: int,
                  prompt_len: int = PROMPT_LEN) -> tuple[float, dict]:
    """Dense ms/token with cuBLAS projections and with the Triton row kernels over all rows (CUDA);
    leaves dm.dense_impl at the faster one, which the sparse step then also uses for its dense parts."""
    impls = ("cublas", "triton") if dm.device.type == "cuda" else ("cublas",)
    times = {}
    for impl in impls:
        dm.dense_impl = impl
        times[impl] = decode_ms_per_token(dm, batch, False, decode_tokens, warmup, prompt_len=prompt_len)
    dm.dense_impl = min(times, key=times.get)
    return times[dm.dense_impl], times


def batch_figures(dm: DecodeModel, batch: int, decode_tokens: int, warmup: int, copy_gbps: float,
                  dense_ms: float | None = None, with_sparse: bool = True, prompt_len: int = PROMPT_LEN) -> dict:
    """One batch size: dense (unless given) and sparse timings, bytes and ratios."""
    context = prompt_len + warmup + decode_tokens // 2
    if dense_ms is None:
        dense_ms = best_dense_ms(dm, batch, decode_tokens, warmup, prompt_len)[0]
    dense_bytes = dm.step_bytes(batch, context, sparse=False)["total"]
    row = {
        "dense_ms_per_token": dense_ms,
        "dense_tokens_per_s": 1e3 * batch / dense_ms,
        "dense_bytes_per_step": dense_bytes,
        "dense_gbps": dense_bytes / dense_ms / 1e6,
        "dense_floor_ms": dense_bytes / copy_gbps / 1e6,
    }
    row["dense_over_floor"] = dense_ms / row["dense_floor_ms"]
    if with_sparse and (dm.predictors is not None or dm.thresholds is not None):
        sparse_ms = decode_ms_per_token(dm, batch, True, decode_tokens, warmup, prompt_len=prompt_len)
        sb = dm.step_bytes(batch, context, sparse=True)
        share = dm.mlp_share_read()  # (score thresholds) the timed steps' mean, which the bytes above count
        if share is not None:
            row["sparse_mlp_share_read"] = share
        down = dm.mlp_down_share_read()  # (down thresholds) likewise, the down^T rows
        if down is not None:
            row["sparse_mlp_down_share_read"] = down
        pred = predictor_ms(dm, batch)
        row.update({
            "sparse_ms_per_token": sparse_ms,
            "speedup": dense_ms / sparse_ms,
            "sparse_tokens_per_s": 1e3 * batch / sparse_ms,
            "sparse_bytes_per_step": sb["total"],
            "sparse_predictor_bytes": sb["predictors"],
            "sparse_weight_bytes": sb["weights"],
            "sparse_gbps": sb["total"] / sparse_ms / 1e6,
            "predictor_ms": pred,
            "predictor_share": pred / sparse_ms,
            "bound_speedup": dense_bytes / sb["total"],
        })
        row["fraction_of_bound"] = row["speedup"] / row["bound_speedup"]
    else:
        row.update({k: None for k in ("sparse_ms_per_token", "speedup", "sparse_tokens_per_s",
                                      "sparse_bytes_per_step", "sparse_gbps", "predictor_share", "bound_speedup")})
    return row


def _mean_density(predictors: PredictorSet | None, attr: str) -> float:
    if predictors is None:
        return 1.0
    return sum(getattr(lp, attr) for lp in predictors.layers) / len(predictors.layers)


def speed_report(model, adapter, predictors: PredictorSet | None, *, device: torch.device, dtype: torch.dtype,
                 batch_sizes: list[int], decode_tokens: int, warmup: int, hf_eager_tokens: int | None = None,
                 cpu_threads: int | None = None, mlp_candidate_density: float | None = None,
                 mlp_up_weight: float | None = None, skip_kv: bool = False, thresholds=None,
                 prompt_len: int = PROMPT_LEN) -> dict:
    """Dense vs sparse decode speed of `model` in the graph-captured loop (see module docstring), each
    timed step reading a KV cache of prompt_len + warmup + (up to) decode_tokens positions.

    cpu_threads: torch threads while timing on CPU (restored after). On the shared 2-core VM here one
    thread was faster for dense and sparse alike (OpenMP barriers wait on a busy second core).
    mlp_candidate_density: two-stage MLP selection (see runtime.decode); None: one-stage.
    mlp_up_weight: exact-up MLP selection (see runtime.decode); None: the predictor selects.
    skip_kv: the sparse step computes k/v only for the KV groups its heads read (see runtime.decode).
    thresholds: per-layer magnitude thresholds (runtime.thresholds) instead of predictors, for the MLP
    and, when they cover it, attention."""
    device = torch.device(device)
    previous_threads = torch.get_num_threads()
    if device.type == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    try:
        report = _speed_report(model, adapter, predictors, device, dtype, batch_sizes, decode_tokens, warmup,
                               hf_eager_tokens, mlp_candidate_density, mlp_up_weight, skip_kv, thresholds,
                               prompt_len)
    finally:
        torch.set_num_threads(previous_threads)
    report["cpu_threads"] = torch.get_num_threads() if device.type != "cpu" or not cpu_threads else cpu_threads
    return report


def _speed_report(model, adapter, predictors, device, dtype, batch_sizes, decode_tokens, warmup,
                  hf_eager_tokens, mlp_candidate_density=None, mlp_up_weight=None, skip_kv=False,
                  thresholds=None, prompt_len: int = PROMPT_LEN) -> dict:
    max_len = cache_length(prompt_len, warmup, decode_tokens)
    dm = DecodeModel(model, adapter, predictors, device, dtype, max_len,
                     mlp_candidate_density=mlp_candidate_density if predictors is not None else None,
                     mlp_up_weight=mlp_up_weight if predictors is not None else None, skip_kv=skip_kv,
                     thresholds=thresholds)
    copy_gbps = copy_bandwidth_gbps(device)
    hf_steps = hf_eager_tokens or min(decode_tokens, 16 if device.type == "cuda" else 4)
    hf_ms = hf_eager_ms_per_token(model, 1, hf_steps, device, prompt_len=prompt_len)
    batches = {str(b): batch_figures(dm, b, decode_tokens, warmup, copy_gbps, prompt_len=prompt_len)
               for b in batch_sizes}
    first = batches[str(batch_sizes[0])]
    return {
        "batches": batches,
        "copy_bandwidth_gbps": copy_gbps,
        "hf_eager_ms_per_token": hf_ms,
        "hf_eager_batch": 1,
        "speedup_vs_hf_eager_dense": hf_ms / first["dense_ms_per_token"] if batch_sizes[0] == 1 else None,
        "speedup_vs_hf_eager_sparse": (hf_ms / first["sparse_ms_per_token"]
                                       if batch_sizes[0] == 1 and first["sparse_ms_per_token"] else None),
        "mlp_density": thresholds.keep_h if thresholds is not None else _mean_density(predictors, "mlp_density"),
        "thresholds": None if thresholds is None else thresholds.describe(),
        "head_density": _mean_density(predictors, "head_density"),
        "mlp_candidate_density": dm.mlp_candidate_density,
        "mlp_up_weight": dm.mlp_up_weight,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "runtime": "cuda-graph" if device.type == "cuda" else "eager",
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
        "warmup": warmup,
        "batch_selection": "top-k of the per-unit max score over the batch (fixed k per layer)"
        if not dm.score_thresholds_on else
        "MLP at batch 1: the units scored above the layer's threshold (the count varies per step: "
        "sparse_mlp_share_read is its mean over the timed steps); MLP at batch > 1 and heads: top-k of the "
        "per-unit max score over the batch"
        + ("; down^T rows only where |act*up| is above the layer's down threshold for some sequence "
           "(sparse_mlp_down_share_read: their mean share)" if dm.down_tally is not None and any(
               lw.down_cut is not None for lw in dm.layers) else ""),
        "kv_for_all_heads": not skip_kv,
    }
