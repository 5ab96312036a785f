"""Only where pyfunc models logged before components/ had subpackages find their class.

MLflow pickles a model's `python_model` by class path: models registered before the
reorganisation name `components.serving.GenclsClassifier`. In a fresh process (`mlflow models
serve`) they import it from their own logged code (code_paths), but in a process that has
already imported this components/ package (the champion gate scoring the current champion,
`gencls predict-file`) the class path resolves here. New models name
`components.ops.serving.GenclsClassifier`; nothing in the code base imports this module.
"""
from components.ops.serving import GenclsClassifier  # noqa: F401
