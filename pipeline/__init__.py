"""svhn-mlflow: the SVHN case study as a staged, tracked MLflow Project."""
import os

# MLflow 3.17 unpickles by default: nothing this package loads from a store may run code, whoever
# imports it (our CLI, a script, a Ray worker). Set before MLflow reads it; a value you set is kept.
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
