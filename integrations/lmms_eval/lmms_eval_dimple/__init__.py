"""lmms-eval plugin for Dimple: registers the model id `dimple` through lmms-eval's `lmms_eval.models` entry points.

Installing this package (`pip install -e integrations/lmms_eval`) is the whole set-up; lmms-eval itself is not
patched. The model class lives in `lmms_eval_dimple.model` and is imported only when `--model dimple` is used.
"""


def manifest():
    """The entry point's payload. A function, so that importing this package does not import lmms-eval's model
    registry, which loads the entry points itself (importing it from here would be circular)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="dimple", simple_class_path="lmms_eval_dimple.model.Dimple")
