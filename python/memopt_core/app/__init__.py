"""The `memopt` application: training loop, built-in models and corpora, `compare`, `train`,
`plan` and `snr`. It uses the library (memopt_core's optimizers) and is never imported by it,
so `import memopt_core` stays free of the app and of its extras (numpy, tqdm; matplotlib for
plots): pip install 'memopt_core[app]'."""
try:
    import numpy  # noqa: F401
    import tqdm  # noqa: F401
except ImportError as e:  # the library installed without the app's extras
    raise ImportError(f"memopt's command-line app needs its extras ({e.name} is missing): "
                      "pip install 'memopt_core[app]'") from e
