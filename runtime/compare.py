"""`dejavu compare`: several `dejavu bench` reports side by side, one line per sparse rule.

Each bench run measures one rule against dense; choosing a rule means reading several reports at once
(quality and speed for the bytes each reads). The table says when the reports were not measured alike
(another model, evaluation text or device), since their figures then do not compare.
"""

from __future__ import annotations

import json
import numbers
import sys
from pathlib import Path

from dejavu.errors import DejavuError

# what every bench report holds (CONTRACT.md's keys)
REQUIRED_KEYS = ("model", "device", "mlp_density", "head_density", "dense", "sparse", "speedup")
# the figures the table prints; null is shown as "-"
NULLABLE_NUMBERS = ("dense.ppl", "dense.ms_per_token", "sparse.ppl", "sparse.ms_per_token", "speedup",
                    "top1_agreement", "kl", "quality.computed.mlp_weight_share", "mlp_up_weight",
                    "mlp_candidate_density", "thresholds.keep_attn_input", "thresholds.allocation.layer_bytes")
OBJECTS = ("dense", "sparse", "quality", "quality.computed", "thresholds", "thresholds.allocation")


def read_report(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DejavuError(f"no bench report at {path}")
    try:
        report = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DejavuError(f"{path} is not a JSON bench report ({exc})") from exc
    missing = [k for k in REQUIRED_KEYS if not isinstance(report, dict) or k not in report]
    if missing:
        raise DejavuError(f"{path} is not a `dejavu bench` report: it lacks {', '.join(missing)}")
    check_values(path, report)
    return report


def _lookup(report: dict, key: str):
    value = report
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # JSON true is not a figure


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_values(path: Path, report: dict) -> None:
    """Refuse a report whose figures are not numbers: printing would fail half-way through the table."""
    for key in OBJECTS:
        value = _lookup(report, key)
        if value is not None and not isinstance(value, dict):
            raise DejavuError(f"{path}: {key} is not an object (got {_shown(value)})")
    thresholds = report.get("thresholds")
    by_layer_bytes = bool(thresholds) and _lookup(report, "thresholds.allocation.layer_bytes") is not None
    required = ["head_density"]
    if not thresholds:
        required.append("mlp_density")  # a threshold rule's label does not name an MLP density
    elif not by_layer_bytes:
        required += ["thresholds.keep_input", "thresholds.keep_down_input"]
    for key in (*required, *NULLABLE_NUMBERS, *(("mlp_density",) if thresholds else ())):
        value = _lookup(report, key)
        if key in required and value is None:
            raise DejavuError(f"{path}: {key} is missing or null; compare needs a number")
        if value is not None and not _is_number(value):
            raise DejavuError(f"{path}: {key} is not a number (got {_shown(value)})")
    if report.get("selection") is not None and not isinstance(report["selection"], str):
        raise DejavuError(f"{path}: selection is not a string (got {_shown(report['selection'])})")


def rule_label(report: dict) -> str:
    """The sparse rule in a few words."""
    t = report.get("thresholds")
    heads = f"heads {report['head_density']:g}"
    if t and (t.get("allocation") or {}).get("layer_bytes") is not None:
        return f"thresholds, {t['allocation']['layer_bytes']:g} of each layer's bytes (greedy split)"
    if t:
        attn = f" / attention {t['keep_attn_input']:g}" if t.get("keep_attn_input") is not None else f", {heads}"
        return f"thresholds {t['keep_input']:g} / {t['keep_down_input']:g}{attn}"
    mlp = f"MLP {report['mlp_density']:g}"
    tuned = " (tuned)" if report.get("tuned") else ""
    if report.get("mlp_up_weight") is not None:
        return f"exact-up {report['mlp_up_weight']:g}{tuned}, {mlp}, {heads}"
    scored = " (score thresholds)" if report.get("mlp_selection") == "threshold" else ""
    if report.get("mlp_candidate_density"):
        return f"two-stage {report['mlp_candidate_density']:g} -> {report['mlp_density']:g}{scored}{tuned}, {heads}"
    quantized = report.get("mlp_predictor")
    if isinstance(quantized, dict) and report.get("selection") == "predictor":
        # their bytes are read every token and are not in the table's MLP bytes: the label says how many
        return (f"{quantized.get('bits')}-bit gate/up predictors (+{quantized.get('share_of_mlp_bytes', 0):.3f} "
                f"MLP bytes), {mlp}{scored}, {heads}")
    return f"{report.get('selection', 'predictor')}{tuned}, {mlp}{scored}, {heads}"


def comparison_row(path: Path, report: dict) -> dict:
    q = report.get("quality") or {}
    computed = q.get("computed") or {}
    dense, sparse = report.get("dense") or {}, report.get("sparse") or {}
    change = (sparse["ppl"] / dense["ppl"] - 1) if dense.get("ppl") and sparse.get("ppl") else None
    return {"report": str(path), "rule": rule_label(report), "mlp_bytes": computed.get("mlp_weight_share"),
            "dense_ppl": dense.get("ppl"), "sparse_ppl": sparse.get("ppl"), "ppl_change": change,
            "top1_agreement": report.get("top1_agreement"), "kl": report.get("kl"),
            "dense_ms_per_token": dense.get("ms_per_token"), "sparse_ms_per_token": sparse.get("ms_per_token"),
            "speedup": report.get("speedup")}


def _differences(reports: list[dict]) -> list[str]:
    """What the reports were not measured alike in."""
    def evaluation(r: dict):
        q = r.get("quality") or {}
        return (q.get("dataset"), q.get("window"), q.get("stride"), q.get("scored_tokens")) if q else None

    checks = {"model": lambda r: r["model"], "device": lambda r: (r["device"], r.get("dtype")),
              # a synthetic preset shares its name with the real model, and --layers keeps a part of it
              "synthetic (random weights) or real": lambda r: bool(r.get("synthetic")),
              "layers kept (--layers)": lambda r: (r.get("layers") or "all") if r.get("synthetic") else None,
              "evaluation text or windows": evaluation, "batch size": lambda r: r.get("batch_size")}
    notes = []
    for name, key in checks.items():
        values = {json.dumps(key(r), default=str) for r in reports if key(r) is not None}
        if len(values) > 1:
            notes.append(name)
    return notes


def _cell(value, spec: str, width: int) -> str:
    return (format(value, spec) if value is not None else "-").rjust(width)


def print_comparison(rows: list[dict], differences: list[str], out=None) -> None:
    out = out or sys.stdout
    label = max(len("rule"), *(len(r["rule"]) for r in rows))
    head = (f"{'rule'.ljust(label)} | {'MLP bytes':>9} | {'ppl dense':>9} {'sparse':>9} {'change':>9} | "
            f"{'top-1':>6} {'KL':>6} | {'ms/token dense':>14} {'sparse':>7} {'speedup':>7}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        change = f"{r['ppl_change'] * 100:+.1f} %" if r["ppl_change"] is not None else "-"
        print(f"{r['rule'].ljust(label)} | {_cell(r['mlp_bytes'], '.3f', 9)} | {_cell(r['dense_ppl'], '.3f', 9)} "
              f"{_cell(r['sparse_ppl'], '.3f', 9)} {change:>9} | {_cell(r['top1_agreement'], '.3f', 6)} "
              f"{_cell(r['kl'], '.3f', 6)} | {_cell(r['dense_ms_per_token'], '.2f', 14)} "
              f"{_cell(r['sparse_ms_per_token'], '.2f', 7)} "
              f"{(format(r['speedup'], '.2f') + 'x') if r['speedup'] is not None else '-':>7}", file=out)
    print("MLP bytes: the share of the MLP's weight bytes read per token (predictors not counted); speed at "
          "batch 1 unless the reports say otherwise.", file=out)
    if differences:
        print(f"note: these reports differ in {', '.join(differences)}: their figures do not compare directly.",
              file=out)


def run_compare(paths: list[Path], json_out: Path | None = None) -> dict:
    if not paths:
        raise DejavuError("give one or more bench reports (the JSON written by `dejavu bench --json`)")
    if json_out is not None:
        from dejavu.artifacts import check_report_path

        check_report_path(json_out, inputs=paths)
    reports = [read_report(p) for p in paths]
    rows = [comparison_row(p, r) for p, r in zip(paths, reports, strict=True)]
    differences = _differences(reports)
    print_comparison(rows, differences)
    result = {"rows": rows, "differences": differences}
    if json_out is not None:
        from dejavu.artifacts import atomic_write_json

        atomic_write_json(json_out, result)
    return result
