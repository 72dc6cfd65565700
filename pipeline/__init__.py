"""svhn-mlflow: the SVHN case study as a staged, tracked MLflow Project."""
