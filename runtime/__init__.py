"""The sparse runtime. `load_sparse` (runtime/generate.py) is the entry point for Python users:

    from dejavu.runtime import load_sparse
    sm = load_sparse("smollm2-135m", bundle="runs/smol/bundle")
    print(sm.generate("The capital of France is", max_new_tokens=32).text)
"""


def __getattr__(name: str):
    # imported on use, so `import dejavu.runtime.<module>` stays as light as that module
    if name in ("load_sparse", "SparseModel", "Generation"):
        from dejavu.runtime import generate

        return getattr(generate, name)
    raise AttributeError(f"module 'dejavu.runtime' has no attribute {name!r}")
