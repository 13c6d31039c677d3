import json
import sys

import torch
from transformers import AutoTokenizer

from dejavu.config import load_config
from dejavu.runtime.generate import SparseModel
from dejavu.runtime.plan import resolve_plan
from dejavu.runtime.synthetic import build_synthetic

tok = AutoTokenizer.from_pretrained(".device-carry")
model, adapter, preds = build_synthetic("llama-3-8b", None, "cuda", torch.bfloat16, 0.5, 0.5)
plan = resolve_plan(load_config(None, {}), None, preds, model, adapter, tok)
sm = SparseModel(model, tok, adapter, plan, device="cuda", dtype=torch.bfloat16, name="x", engine="decode-loop")
p = "The history of the city begins in the early middle ages, when a small settlement grew"
out = []
for sparse in (True, False, True, False):
    for _ in range(4):
        g = sm.generate(p, 64, sparse=sparse, stop_at_eos=False)
        out.append((sparse, round(g.prefill_ms, 2), round(g.ms_per_token, 3)))
print(json.dumps(out))
json.dump(out, open(sys.argv[1], "w"))
