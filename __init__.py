"""dejavu: contextual sparsity (Deja Vu) for any Hugging Face causal LM.

Pipeline: collect -> train-predictors -> export -> runtime / bench. Each stage reads only the
previous stage's on-disk artifacts (see artifacts.py and docs/FORMATS.md).
"""

__version__ = "0.1.0"
