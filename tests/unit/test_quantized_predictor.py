"""Quantized-weight MLP predictors: the format, what they select, the bundle and the runtime around them."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from dejavu.errors import DejavuError
from dejavu.export.bundle import load_bundle, run_export
from dejavu.quantized_predictor import QuantizedMLPPredictor, dequantize_rows, quantize_mlp, quantize_rows
from dejavu.runtime.apply import SparseRuntime


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_round_trip_is_close_and_codes_are_in_range(bits):
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.05
    codes, scales = quantize_rows(w, bits, 32)
    assert codes.dtype == torch.uint8 and codes.shape == (48, 128 * bits // 8)
    assert scales.dtype == torch.float16 and scales.shape == (48, 4)
    back = dequantize_rows(codes, scales, bits)
    # the error of a symmetric grid of 2^bits levels over each group's (clipped) range
    rel = (back - w).norm() / w.norm()
    assert rel < (0.12 if bits == 4 else 0.01)
    if bits == 4:  # two codes a byte, the even input in the low nibble
        unpacked = torch.stack([codes & 0xF, codes >> 4], -1).reshape(48, 128).float() - 8
        assert torch.equal(unpacked[:, 0] * scales[:, 0].float(), back[:, 0])


def test_clipping_search_never_does_worse_than_absmax():
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    w[:, 0] = 8.0  # one outlier a row: clipping it costs little, rounding everything else to a coarse grid costs more
    codes, scales = quantize_rows(w, 4, 64)
    err = (dequantize_rows(codes, scales, 4) - w).square().sum()
    absmax_scale = (w.abs().amax(-1, keepdim=True) / 7).half().float()
    absmax = torch.clamp(torch.round(w / absmax_scale), -8, 7) * absmax_scale
    assert err <= (absmax - w).square().sum()


def test_scores_follow_the_real_activations(tiny_llama):
    """At 8 bits the predictor's top half is the oracle's top half for nearly every neuron; at 4 bits most."""
    from helpers import load_tiny, random_ids

    model, adapter = load_tiny(tiny_llama)
    layer = adapter.decoder_layers()[1]
    mlp = adapter.mlp_weights(layer)
    captured = {}
    handle = adapter.gate_proj(layer).register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    with torch.no_grad():
        model(random_ids(model, seq=32, batch=2))
    handle.remove()
    x = captured["x"]
    act = torch.nn.functional.silu(x @ mlp.gate.T) * (x @ mlp.up.T)
    k = act.shape[-1] // 2
    oracle = act.abs().topk(k, -1).indices
    for bits, floor in ((8, 0.97), (4, 0.85)):
        pred = QuantizedMLPPredictor(quantize_mlp(mlp, bits, 32), bits, 32, "silu")
        chosen = pred(x).topk(k, -1).indices
        hits = (chosen.unsqueeze(-1) == oracle.unsqueeze(-2)).any(-1).float().mean().item()
        assert hits > floor, (bits, hits)


@pytest.fixture(scope="module")
def quantized_bundle(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "bundle"
    run_export(None, out, config_file="tiny", model_name=str(tiny_llama),
               overrides={"export.mlp_predictor_bits": 8, "export.mlp_predictor_group": 32,
                          "export.mlp_density": 0.4})
    return out


def test_the_speed_report_times_quantized_predictors(quantized_bundle, tiny_llama):
    # they live beside the low-rank predictor groups, whose absence read as "no predictors": 0 ms, share 0
    from dejavu.runtime.decode import DecodeModel
    from dejavu.runtime.speed import predictor_ms

    from helpers import load_tiny

    model, adapter = load_tiny(tiny_llama)
    _, predictors = load_bundle(quantized_bundle)
    dm = DecodeModel(model, adapter, predictors, "cpu", torch.float32, max_len=8)
    assert not dm.pred_groups and predictor_ms(dm, 1, steps=4) > 0.0


def test_bundle_round_trip_and_manifest(quantized_bundle, tiny_llama):
    from dejavu.export.bundle import check_bundle_matches

    from helpers import load_tiny

    manifest, predictors = load_bundle(quantized_bundle)
    assert manifest["mlp_predictor"]["kind"] == "quantized-weights" and manifest["mlp_predictor"]["bits"] == 8
    assert manifest["mlp_pairing"] == "mlp_input" and manifest["head_density"] == 1.0
    assert manifest["mlp_density"] == pytest.approx(0.4)
    # 8 bits: one byte a weight of gate and up, and an fp16 scale per 32 of them
    assert manifest["mlp_predictor"]["share_of_mlp_bytes"] == pytest.approx(2 / 3 * (1 + 2 / 32) / 2)
    assert all(lp.attn is None and isinstance(lp.mlp, QuantizedMLPPredictor) for lp in predictors.layers)
    model, adapter = load_tiny(tiny_llama)
    check_bundle_matches(manifest, adapter)
    for l, layer in enumerate(adapter.decoder_layers()):  # noqa: E741
        w = adapter.mlp_weights(layer)
        got = predictors.layers[l].mlp._weights("up", torch.float32)[0]
        assert (got - w.up).abs().max() < w.up.abs().max() / 100


def test_runtime_selects_on_the_mlp_input_and_gather_equals_mask(quantized_bundle, tiny_llama):
    """The selection is the predictor's top-k of the MLP's own input, and computing only those neurons (gather)
    gives what masking the rest gives."""
    from dejavu.predictor import topk_mask

    from helpers import load_tiny, random_ids

    model, adapter = load_tiny(tiny_llama)
    _, predictors = load_bundle(quantized_bundle)
    ids = random_ids(model, seq=16, batch=2)
    inputs = {}
    handles = [adapter.gate_proj(layer).register_forward_pre_hook(
        lambda m, a, i=i: inputs.setdefault(i, a[0])) for i, layer in enumerate(adapter.decoder_layers())]
    with torch.no_grad(), SparseRuntime(model, adapter, predictors, record=True) as rt:
        masked = model(ids).logits
    for h in handles:
        h.remove()
    for l in range(adapter.num_layers):  # noqa: E741
        expected = topk_mask(predictors.layers[l].mlp(inputs[l]), 0.4)
        assert torch.equal(rt.masks[("mlp", l)].reshape(expected.shape), expected)
    with torch.no_grad(), SparseRuntime(model, adapter, predictors, mode="gather"):
        gathered = model(ids).logits
    torch.testing.assert_close(gathered, masked, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        dense = model(ids).logits
    assert not torch.allclose(dense, masked)


def test_plain_mlps_get_one_quantized_projection(tiny_model_factory, tmp_path):
    """OPT: no gate; the score is |act(up~ x + b)|, and the bias travels with the codes."""
    from helpers import load_tiny, random_ids

    path = tiny_model_factory("opt")
    run_export(None, tmp_path / "b", config_file="tiny", model_name=str(path),
               overrides={"export.mlp_predictor_bits": 4, "export.mlp_predictor_group": 32})
    _, predictors = load_bundle(tmp_path / "b")
    mlp = predictors.layers[0].mlp
    assert not mlp.gated and mlp.up_bias is not None
    model, adapter = load_tiny(path)
    with torch.no_grad(), SparseRuntime(model, adapter, predictors) as rt:
        model(random_ids(model, seq=8, batch=1))
    assert rt.stats.mlp_kept == pytest.approx(0.5)


def _edited(source, tmp_path, edit):
    import shutil

    target = tmp_path / "edited"
    shutil.copytree(source, target)
    path = target / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return target


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["mlp_predictor"].update(bits=3), "mlp_predictor must describe"),
    (lambda m: m["mlp_predictor"].update(group=48), "group"),
    (lambda m: m.update(mlp_pairing="current"), "mlp_pairing must be mlp_input"),
    (lambda m: m["mlp_predictor"].update(activation="nope"), "unknown MLP activation"),
])
def test_an_edited_manifest_is_refused(quantized_bundle, tmp_path, edit, message):
    with pytest.raises(DejavuError, match=message):
        load_bundle(_edited(quantized_bundle, tmp_path, edit))


def test_flags_that_cannot_go_with_it_are_refused(tiny_llama, tmp_path):
    base = {"export.mlp_predictor_bits": 4, "export.mlp_predictor_group": 32}
    with pytest.raises(DejavuError, match="drop --head-density"):
        run_export(None, tmp_path / "a", config_file="tiny", model_name=str(tiny_llama),
                   overrides={**base, "export.head_density": 0.5})
    with pytest.raises(DejavuError, match="not with thresholds"):
        run_export(None, tmp_path / "b", config_file="tiny", model_name=str(tiny_llama),
                   overrides={**base, "export.mlp_keep_input": 0.5})
    with pytest.raises(DejavuError, match="must be a power of two of at least 8 that divides the hidden size"):
        run_export(None, tmp_path / "c", config_file="tiny", model_name=str(tiny_llama),
                   overrides={**base, "export.mlp_predictor_group": 128})  # the tiny model's hidden size is 64
    with pytest.raises(DejavuError, match="must be a power of two of at least 8, got 48"):  # (the kernels' tiles)
        run_export(None, tmp_path / "c", config_file="tiny", model_name=str(tiny_llama),
                   overrides={**base, "export.mlp_predictor_group": 48})
    with pytest.raises(DejavuError, match="must be a power of two of at least 8, got 4"):  # (whole 32-bit words)
        run_export(None, tmp_path / "c", config_file="tiny", model_name=str(tiny_llama),
                   overrides={**base, "export.mlp_predictor_group": 4})
    with pytest.raises(DejavuError, match="must be 4 or 8"):
        run_export(None, tmp_path / "e", config_file="tiny", model_name=str(tiny_llama),
                   overrides={"export.mlp_predictor_bits": 3})
    assert not any((tmp_path / name).exists() for name in "abce")


def test_generate_runs_it_in_the_decode_loop(quantized_bundle, tiny_llama):
    from dejavu.runtime.generate import load_sparse

    sparse = load_sparse(str(tiny_llama), bundle=quantized_bundle, config="tiny", device="cpu")
    assert sparse.engine == "decode-loop"


@pytest.mark.parametrize("model_type", ["llama", "opt", "phi3"])
def test_decode_loop_step_equals_the_hooks(tiny_model_factory, tmp_path, model_type):
    """The decode loop's sparse step (CPU: reference ops; 8 bits: dequantized fp32 copies) gives the logits of the
    hooks with only the new token sparse: same scores, same top-k, same neurons computed."""
    path = tiny_model_factory(model_type)
    # 0.3: below the share of neurons a ReLU (OPT) leaves positive, where ties at 0 would pick arbitrary ones
    run_export(None, tmp_path / "b", config_file="tiny", model_name=str(path),
               overrides={"export.mlp_predictor_bits": 8, "export.mlp_predictor_group": 32,
                          "export.mlp_density": 0.3})
    _, predictors = load_bundle(tmp_path / "b")
    logits, expected, dense, dm = _loop_step_and_hooks(path, predictors)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert (logits - dense).abs().max() > 1e-3
    bytes_sparse = dm.step_bytes(1, 8, sparse=True)
    # what this path reads: on the CPU at 8 bits, the dequantized fp32 copies
    assert bytes_sparse["predictors"] == sum(lw.mlp_quant.nbytes for lw in dm.layers)
    assert bytes_sparse["predictors"] == sum(4 * lp.mlp.n_out * lp.mlp.d_in * len(lp.mlp.parts)
                                             + (4 * lp.mlp.n_out if lp.mlp.up_bias is not None else 0)
                                             for lp in predictors.layers)
    assert bytes_sparse["weights"] < dm.step_bytes(1, 8, sparse=False)["weights"]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter mode)")
def test_the_scores_kernel_in_interpreter():
    """The Triton scores kernel (fp32, as the interpreter's products are exact only there) against the
    reference: 4 and 8 bits, gated or plain with a bias, batches 1 and 3, row counts its programs do not divide."""
    from helpers import run_interpreted

    run_interpreted('''
        from dejavu.quantized_predictor import quantize_rows, tile_rows
        from dejavu.runtime import reference as R
        from dejavu.runtime.kernels import triton_kernels as T
        torch.manual_seed(0)
        for bits in (4, 8):
            for gated in (True, False):
                for n, d, batch in ((96, 64, 1), (100, 192, 3)):
                    uc, us = tile_rows(*quantize_rows(torch.randn(n, d), bits, 32))
                    gc, gs = tile_rows(*quantize_rows(torch.randn(n, d), bits, 32)) if gated else (None, None)
                    bias = None if gated else torch.randn(n).half()
                    x = torch.randn(batch, d)
                    ref = R.quant_scores(x, uc, us, bias, gc, gs, bits, 1 if gated else 3)
                    out = torch.empty(batch, n)
                    T.quant_scores(x, uc, us, bias, gc, gs, bits, 1 if gated else 3, out)
                    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), (bits, gated, n, d, batch)
        print("ok")
    ''')


def test_rules_the_loop_cannot_run_are_refused_up_front(quantized_bundle, tiny_llama):
    """Score thresholds on these predictors run in the hooks only: bench refuses to time them before measuring
    anything, generate falls back to the hooks; rules that refine a low-rank predictor's choice are refused."""
    from dejavu.runtime.bench import run_bench
    from dejavu.runtime.generate import load_sparse

    from helpers import CALIB_TXT, load_tiny

    flags = {"runtime.device": "cpu", "runtime.mlp_selection": "threshold", "data.dataset": str(CALIB_TXT),
             "runtime.calibration_tokens": 256}
    with pytest.raises(DejavuError, match="top-k, not score thresholds.*--no-speed"):
        run_bench(str(tiny_llama), quantized_bundle, config_file="tiny", overrides=flags)
    sparse = load_sparse(str(tiny_llama), bundle=quantized_bundle, config="tiny", device="cpu",
                         mlp_selection="threshold", calibration_tokens=256)
    assert sparse.engine == "hooks"
    model, adapter = load_tiny(tiny_llama)
    _, predictors = load_bundle(quantized_bundle)
    for rule in ({"mlp_up_weight": 0.4}, {"mlp_candidate_density": 0.6}):
        with pytest.raises(DejavuError, match="score every neuron from gate and up already"):
            SparseRuntime(model, adapter, predictors, **rule)


@pytest.mark.parametrize("gated,bias", [(True, False), (False, True), (False, False)])
def test_the_cpu_loop_scores_4_bits_through_torchs_int4_matmul(gated, bias):
    """4-bit copies on the CPU go through PyTorch's int4 matmul (x in bf16): its top half is the reference's."""
    from dejavu.models.adapters import MLPWeights
    from dejavu.predictor import topk_mask, units_for_density
    from dejavu.runtime.decode import QuantizedSelector

    torch.manual_seed(0)
    n, d = 1536, 576
    weights = MLPWeights(up=torch.randn(n, d) * d ** -0.5, down=torch.empty(0),
                         gate=torch.randn(n, d) * d ** -0.5 if gated else None,
                         up_bias=torch.randn(n) * 0.1 if bias else None)
    pred = QuantizedMLPPredictor(quantize_mlp(weights, 4, 64), 4, 64, "silu" if gated else "relu")
    k = units_for_density(0.3, n)
    selector = QuantizedSelector.build(pred, k, "cpu", torch.float32)
    assert selector.int4 is not None and selector.tiles is None
    x = torch.randn(1, d)
    got = set(selector.select(x, 1 if gated else 3).tolist())
    expected = set(topk_mask(pred(x), 0.3)[0].nonzero().squeeze(-1).tolist())
    assert len(got) == k and len(got & expected) > 0.97 * k


def test_review_cases_thresholds_heads_and_activation(quantized_bundle, tiny_llama, tmp_path):
    """Magnitude thresholds rule the MLP in the loop as in the hooks (no quantized selection, no refusal); a head
    density on a bundle without head predictors is refused; an activation edited in the manifest is refused
    against the model."""
    from dejavu.config import load_config
    from dejavu.export.bundle import check_bundle_matches
    from dejavu.runtime.decode import DecodeModel
    from dejavu.runtime.plan import check_flags
    from dejavu.runtime.thresholds import calibrate_on_random_tokens

    from helpers import load_tiny

    model, adapter = load_tiny(tiny_llama)
    _, predictors = load_bundle(quantized_bundle)
    thresholds = calibrate_on_random_tokens(model, adapter, 0.8, 0.5)
    dm = DecodeModel(model, adapter, predictors, "cpu", torch.float32, max_len=8, thresholds=thresholds)
    assert all(lw.mlp_quant is None for lw in dm.layers)
    with pytest.raises(DejavuError, match="holds MLP predictors and no head predictors"):
        check_flags(load_config("tiny", {"runtime.head_density": 0.5}), predictors, "bench")
    for flag in ({"runtime.mlp_up_weight": 0.4}, {"runtime.mlp_candidate_density": 0.8}):  # before the model loads
        with pytest.raises(DejavuError, match="quantized-weight MLP predictors score every neuron .* drop "
                                              "--mlp-candidate-density / --mlp-up-weight"):
            check_flags(load_config("tiny", flag), predictors, "generate")
    edited = _edited(quantized_bundle, tmp_path, lambda m: m["mlp_predictor"].update(activation="relu"))
    with pytest.raises(DejavuError, match="mlp_predictor differs from what export wrote"):
        load_bundle(edited)
    # bundles written before the header's copy of the manifest existed rely on the check against the model
    manifest = json.loads((edited / "manifest.json").read_text())
    with pytest.raises(DejavuError, match="score with activation 'relu', the model's MLP uses 'silu'"):
        check_bundle_matches(manifest, adapter)


def test_a_run_keeps_its_head_predictors_beside_quantized_mlp_predictors(tiny_llama, tmp_path):
    """`export --run RUN --mlp-predictor-bits 4`: the run's trained head predictors, quantized copies for the MLP
    (its trained MLP predictors dropped), and the runtime selects heads by the former and neurons by the latter."""
    from dejavu.predictor import LowRankPredictor

    from helpers import load_tiny, make_predictors_dir, random_ids

    make_predictors_dir(tmp_path / "run", tiny_llama, mlp_density=0.5, head_density=0.5)
    manifest = run_export(tmp_path / "run", tmp_path / "b", overrides={
        "export.mlp_predictor_bits": 4, "export.mlp_predictor_group": 32})
    assert manifest["mlp_pairing"] == "mlp_input" and manifest["head_pairing"] == "lookahead"
    assert manifest["mlp_predictor"]["replaces"] and manifest["head_density"] == 0.5
    assert list(manifest["metrics"]) == ["attn"]  # the dropped MLP predictors' means no longer describe the bundle
    _, predictors = load_bundle(tmp_path / "b")
    assert all(isinstance(lp.mlp, QuantizedMLPPredictor) and isinstance(lp.attn, LowRankPredictor)
               for lp in predictors.layers)
    model, adapter = load_tiny(tiny_llama)
    with torch.no_grad(), SparseRuntime(model, adapter, predictors) as rt:
        model(random_ids(model, seq=8, batch=1))
    assert rt.stats.mlp_kept == pytest.approx(0.5) and rt.stats.head_kept == pytest.approx(0.5)
    with pytest.raises(DejavuError, match="not with thresholds"):
        run_export(tmp_path / "run", tmp_path / "c", overrides={"export.mlp_predictor_bits": 4,
                                                                "export.mlp_predictor_group": 32,
                                                                "export.mlp_selection": "threshold"})
    assert not (tmp_path / "c").exists()


def test_decode_loop_runs_run_heads_beside_quantized_mlp(tiny_llama, tmp_path):
    """A bundle of the run's head predictors and 8-bit MLP copies: the loop's sparse step equals the hooks with only
    the new token sparse (heads chosen on the side as usual, neurons after attention)."""
    from helpers import make_predictors_dir

    make_predictors_dir(tmp_path / "run", tiny_llama, mlp_density=0.3, head_density=0.5)
    run_export(tmp_path / "run", tmp_path / "b", overrides={"export.mlp_predictor_bits": 8,
                                                            "export.mlp_predictor_group": 32})
    _, predictors = load_bundle(tmp_path / "b")
    logits, expected, _, dm = _loop_step_and_hooks(tiny_llama, predictors)
    assert all(lw.mlp_quant is not None and lw.head_pred is not None for lw in dm.layers)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def _loop_step_and_hooks(path, predictors):
    """(the loop's sparse step after a dense prefill, the hooks' logits with only that token sparse, the dense
    logits, the DecodeModel) on the CPU in fp32."""
    from transformers import AutoModelForCausalLM

    from dejavu.models.adapters import adapter_for

    from helpers import decode_one_sparse_step

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    adapter = adapter_for(model)
    logits, ids, dm = decode_one_sparse_step(model, adapter, predictors)
    with torch.no_grad(), SparseRuntime(model, adapter, predictors) as rt:
        rt.token_mask = torch.zeros(ids.shape, dtype=torch.bool)
        rt.token_mask[:, -1] = True
        expected = model(ids).logits[:, -1]
    with torch.no_grad():
        dense = model(ids).logits[:, -1]
    return logits, expected, dense, dm


def test_export_cli_takes_the_model_beside_a_run(tmp_path, tiny_llama):
    """`dejavu export --run RUN --model M --mlp-predictor-bits 4 --mlp-predictor-group 32`: --model names the model
    to quantize (checked against the run's), not a calibration flag to refuse."""
    from typer.testing import CliRunner

    from dejavu.cli.main import app

    from helpers import make_predictors_dir

    make_predictors_dir(tmp_path / "run", tiny_llama)
    result = CliRunner().invoke(app, ["export", "--run", str(tmp_path / "run"), "--model", str(tiny_llama), "--out",
                                      str(tmp_path / "b"), "--mlp-predictor-bits", "4", "--mlp-predictor-group", "32"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["mlp_predictor"]["bits"] == 4


def test_copies_with_groups_under_a_word_still_load_and_select():
    """Bundles written before groups of at least 8 (session 26) load; the loop scores them on the dequantized
    copies, as the CPU does for 8 bits, since the GPU kernel reads whole 32-bit words a group."""
    from dejavu.models.adapters import MLPWeights
    from dejavu.predictor import topk_mask
    from dejavu.quantized_predictor import check_format
    from dejavu.runtime.decode import QuantizedSelector

    with pytest.raises(DejavuError, match="power of two of at least 8"):
        check_format(4, 4, 64)
    torch.manual_seed(0)
    n, d = 96, 64
    weights = MLPWeights(up=torch.randn(n, d), down=torch.empty(0), gate=torch.randn(n, d))
    pred = QuantizedMLPPredictor(quantize_mlp(weights, 4, 4), 4, 4, "silu")
    selector = QuantizedSelector.build(pred, 48, "cpu", torch.float32)
    assert selector.int4 is None and selector.tiles is None
    x = torch.randn(1, d)
    assert set(selector.select(x, 1).tolist()) == set(topk_mask(pred(x), 0.5)[0].nonzero().squeeze(-1).tolist())
