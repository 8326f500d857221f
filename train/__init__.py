"""Training layer: datasets, audit, splits, model, training, evaluation, Grad-CAM.

tfmot only supports Keras 2, so tf-keras must be the Keras that TensorFlow hands out; that is
decided when TensorFlow is first imported, hence here, before any submodule can import it.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# 3, not 2: without it every command prints "E0000 ... failed call to cuInit" on a machine without a
# GPU (TensorFlow's real errors still come as Python exceptions). The "I0000 ..." lines that
# TensorFlow's libraries print while loading (oneDNN, cudart_stub) come before absl's logging is
# initialized and go to stderr whatever the environment says (ABSL_MIN_LOG_LEVEL, GLOG_minloglevel
# do nothing; TF_ENABLE_ONEDNN_OPTS=0 would hide one line by switching off oneDNN's kernels).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
