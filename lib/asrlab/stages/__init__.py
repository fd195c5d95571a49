"""Pipeline stages: each ``run(params)`` reads its params section and writes the files dvc.yaml declares."""
