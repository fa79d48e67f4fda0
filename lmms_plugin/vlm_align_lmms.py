"""lmms-eval's entry point for vlm-align: the manifest naming lmms_adapter.VLMAlign as the model "vlm_align".

The project is flat modules, not a package, so the adapter is imported from the repository this file sits in:
install this folder editable (pip install --no-deps --no-build-isolation -e lmms_plugin), and the repository's
folder joins sys.path when lmms-eval loads its models."""
import os
import sys

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def manifest():
    """Called by lmms-eval's model registry (lmms_eval.models.registry_v2) when it starts."""
    from lmms_eval.models.registry_v2 import ModelManifest
    if not os.path.exists(os.path.join(REPOSITORY, "lmms_adapter.py")):
        raise FileNotFoundError(f"no lmms_adapter.py in {REPOSITORY}: install lmms_plugin editable (pip install -e) "
                                "from the vlm-align repository, so that it finds the adapter there")
    if REPOSITORY not in sys.path:
        sys.path.append(REPOSITORY)  # after site-packages: the repository's flat modules (model, data...) are found
    return ModelManifest(model_id="vlm_align", simple_class_path="lmms_adapter.VLMAlign")
