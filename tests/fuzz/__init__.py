"""Coverage-guided fuzzing of the sans-I/O protocol code (see tests/fuzz/README.md).

Nothing is imported here: the fuzzing child process must import ``relay`` only inside
``atheris.instrument_imports()``.
"""
