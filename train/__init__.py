"""Training layer: datasets, audit, splits, model, training, evaluation, Grad-CAM.

tfmot only supports Keras 2, so tf-keras must be the Keras that TensorFlow hands out; that is
decided when TensorFlow is first imported, hence here, before any submodule can import it.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
