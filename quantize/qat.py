"""`oncolite quantize RUN_DIR`: quantization-aware fine-tuning of a run's float model.

The recipe follows what was measured here (docs/STACK.md, "tfmot quantization-aware training"):
1. flatten the float model (tfmot refuses nested models) and wrap it with `quantize_model`;
2. fold each BatchNorm into its conv, so the fake-quantized kernels are the ones the converter
   will round, and start from kernels already on their int8 grid (quantize.rounding);
3. settle the fake-quant ranges before any weight moves: a fresh QAT model predicts garbage
   until its moving-average ranges have seen data, and with tfmot's fixed EMA decay of 0.999
   that takes thousands of steps. During settling the decay is t/(t+1), so after N batches each
   range is exactly the mean of the N batch extremes (the EMA's own target);
4. fine-tune a few epochs at a low learning rate on the training side, by default distilling the
   float model: loss = KL(float || int8-simulated) on the same augmented batch (optionally mixed
   with the label loss). Plain QAT optimises accuracy and drifts away from the float model;
   the goal here is an int8 model that *agrees* with float;
5. keep the epoch (0 = settled, untrained) with the best validation agreement with float.

Resumable: each epoch writes a TensorFlow checkpoint (weights, ranges, optimizer) and then,
atomically, models/qat_state/state.json naming it; --resume continues from there.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_runtime.atomic import atomic_path, write_json
from edge_runtime.console import add_output_flags, print_json, progress, result
from edge_runtime.errors import EXIT_OK, ModelError, OncoliteError
from edge_runtime.hashing import file_sha256
from .rundir import Run, open_run
from oncolite.train.checkpoints import save_resume_point
from oncolite.train.config import add_set_argument, with_overrides
from oncolite.train.metrics import agreement
from oncolite.train.rundir import RESUME_POINT

if TYPE_CHECKING:
    import tensorflow as tf
    import tf_keras as keras

# The QAT model's structure and starting point; a checkpoint of another recipe cannot resume.
RECIPE = "folded-bn+gptq-start"
# TensorFlow, tf-keras and tfmot are imported inside the functions that use them: `oncolite
# quantize --help` (and the dispatcher building this parser) must not wait seconds for them.


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="run directory holding models/float.keras")
    parser.add_argument("--run", dest="old_run", help=argparse.SUPPRESS)  # the old spelling of RUN_DIR
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (default: config qat.epochs)")
    parser.add_argument("--lr", type=float, help="learning rate (default: config qat.lr)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    again.add_argument("--force", action="store_true",
                       help="run QAT again from scratch (a finished QAT is otherwise left as it is)")
    add_set_argument(parser, "qat")
    add_output_flags(parser)


def qat_settings(config: dict, epochs: int | None = None, lr: float | None = None) -> dict:
    settings = config["qat"]
    if epochs is not None:
        settings["epochs"] = epochs
    if lr is not None:
        settings["lr"] = lr
    if not 0.0 <= settings["distill_weight"] <= 1.0:
        raise OncoliteError(f"config: qat.distill_weight must be in [0, 1], got {settings['distill_weight']}")
    return settings


# --- the quantized model -------------------------------------------------------------------

def quantize_float_model(model: keras.Model, freeze_bn: bool = True) -> keras.Model:
    """tfmot's QAT model of a (possibly nested) float model.

    freeze_bn: BatchNorm statistics stay what the float model learned, and each BatchNorm is
    folded into its conv first (quantize.rounding.fold_batchnorm), so the fake-quantized kernels
    are the ones the converter rounds. Without it, tfmot's own handling: the unfolded kernel is
    fake-quantized and BatchNorm trains (the converter later folds and rounds other numbers)."""
    import tensorflow_model_optimization as tfmot

    from .rounding import fold_batchnorm
    from oncolite.train.model import flatten

    flat = flatten(model)
    if not freeze_bn:
        return tfmot.quantization.keras.quantize_model(flat)
    with conv_relu_kernels_quantized():
        return tfmot.quantization.keras.quantize_model(fold_batchnorm(flat))


@contextlib.contextmanager
def conv_relu_kernels_quantized():
    """Within this block tfmot fake-quantizes every kernel of the BatchNorm-folded model as the
    converter quantizes it: per output channel, conv kernels that a ReLU follows included.

    Two parts of tfmot 0.8.1 part from the converter here. (1) `LayerReLUQuantize` gives a conv
    that a ReLU follows a no-op QuantizeConfig, so that no fake-quant sits between them, which
    also leaves its *kernel* float: harmless when a BatchNorm sits between them (tfmot's conv +
    BatchNorm + ReLU transform comes first), but with BatchNorm folded every expand and depthwise
    kernel of MobileNetV2 trained off its int8 grid and the converter rounded it afterwards (fold
    0: 97.4 % simulated, 94.8 % converted; docs/INT8.md). (2) Its per-axis weight quantizer
    takes the kernel's last axis as the channel axis, which for a DepthwiseConv2D kernel
    (h, w, channels, 1) is the depth multiplier: one scale for the whole kernel, where the
    converter has one per channel (and folded BatchNorm scales differ by orders of magnitude
    between channels). Here such a layer keeps its kernel quantized per channel (a depthwise
    kernel through a per-channel quantizer on the channel axis) and loses only its output
    fake-quant, as tfmot does for conv + BatchNorm + ReLU; an Add followed by a ReLU keeps tfmot's
    handling."""
    import tensorflow as tf
    from tensorflow_model_optimization.python.core.quantization.keras import quantize_aware_activation, quantizers, utils
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_registry as registry, default_8bit_transforms)

    original = default_8bit_transforms.LayerReLUQuantize

    class DepthwiseChannelQuantizer(quantizers.LastValueQuantizer):
        """Per-channel symmetric int8 on axis 2 of a (h, w, channels, 1) depthwise kernel."""

        def __init__(self, **kwargs):
            super().__init__(num_bits=8, per_axis=True, symmetric=True, narrow_range=True)

        def build(self, tensor_shape, name, layer):
            return super().build([*tensor_shape[:2], tensor_shape[3], tensor_shape[2]], name, layer)

        def __call__(self, inputs, training, weights, **kwargs):
            swapped = tf.transpose(inputs, (0, 1, 3, 2))
            return tf.transpose(super().__call__(swapped, training, weights, **kwargs), (0, 1, 3, 2))

    class DepthwiseQuantizeConfig(registry.Default8BitConvQuantizeConfig):
        def get_weights_and_quantizers(self, layer):
            return [(layer.depthwise_kernel, DepthwiseChannelQuantizer())]

    class FoldedLayerReLUQuantize(original):
        def replacement(self, match_layer):
            producer = match_layer.input_layers[0]
            if producer.layer["class_name"] == "Add" or default_8bit_transforms._has_custom_quantize_config(match_layer, producer):
                return super().replacement(match_layer)
            producer.layer["config"]["activation"] = utils.serialize_activation(
                quantize_aware_activation.NoOpActivation(), use_legacy_format=True)
            return match_layer

        def custom_objects(self):
            return {**super().custom_objects(), "NoOpActivation": quantize_aware_activation.NoOpActivation}

    default_8bit_transforms.LayerReLUQuantize = FoldedLayerReLUQuantize
    original_init = registry.Default8BitQuantizeRegistry.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._layer_quantize_map[registry.layers.DepthwiseConv2D] = DepthwiseQuantizeConfig(
            ["depthwise_kernel"], ["activation"], False)

    registry.Default8BitQuantizeRegistry.__init__ = init
    try:
        yield
    finally:
        default_8bit_transforms.LayerReLUQuantize = original
        registry.Default8BitQuantizeRegistry.__init__ = original_init


def trainable_variables(q: keras.Model) -> list:
    """What fine-tuning may change. tfmot's QuantizeWrapper lists its inner layer's weights as
    trainable even when the wrapper is frozen, so frozen wrappers are filtered out here."""
    frozen = {id(w) for layer in q.layers if not layer.trainable for w in layer.weights}
    return [v for v in q.trainable_variables if id(v) not in frozen]


def load_qat_model(path: str | Path, float_model: keras.Model, freeze_bn: bool = True) -> keras.Model:
    """The QAT model saved at `path`, rebuilt from the float model it was made from.

    tfmot 0.8.1 cannot load its own models from .keras archives (QuantizeLayer is built twice
    and expects 5 variables instead of 3; tensorflow/model-optimization PR #1123), but the
    archive's weights load into a freshly quantized copy of the float model.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no QAT model; run `oncolite quantize RUN_DIR` first")
    q = quantize_float_model(float_model, freeze_bn=freeze_bn)
    try:
        q.load_weights(path)
    except ValueError as e:
        raise ModelError(f"{path}: does not match the run's float model ({e}); run `oncolite quantize` again") from None
    return q


@contextlib.contextmanager
def cumulative_range_averages(decay: tf.Variable):
    """Within this block tfmot's moving-average ranges use `decay` instead of their fixed 0.999."""
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

    original = quant_ops.MovingAvgQuantize

    @functools.wraps(original)
    def patched(*args, **kwargs):
        kwargs["ema_decay"] = decay
        return original(*args, **kwargs)

    quant_ops.MovingAvgQuantize = patched
    try:
        yield
    finally:
        quant_ops.MovingAvgQuantize = original


def settle_ranges(q: keras.Model, images, steps: int, quiet: bool = True) -> int:
    """Run `steps` training-mode forward passes (no weight update) so each activation range
    becomes the mean of its per-batch min/max. `images` yields (x, y) batches. Returns steps run."""
    import tensorflow as tf

    decay = tf.Variable(0.0, trainable=False, dtype=tf.float32)
    done = 0
    with cumulative_range_averages(decay):
        forward = tf.function(lambda x: q(x, training=True))
        for x, _ in progress(images.take(steps), total=steps, desc="settling ranges", quiet=quiet, unit="batch"):
            decay.assign(done / (done + 1))
            forward(x)
            done += 1
    return done


# --- the loss ------------------------------------------------------------------------------

def _tempered(probs, temperature: float):
    import tensorflow as tf

    if temperature == 1.0:
        return probs
    logits = tf.math.log(tf.clip_by_value(probs, 1e-7, 1.0)) / temperature
    return tf.nn.softmax(logits)


def distillation_loss(teacher_probs, student_probs, labels, weight: float = 1.0, temperature: float = 1.0):
    """weight x KL(teacher || student) (at `temperature`, scaled by T^2) + (1 - weight) x label CE."""
    import tf_keras as keras

    kl = keras.losses.KLDivergence()(_tempered(teacher_probs, temperature), _tempered(student_probs, temperature))
    loss = weight * kl * temperature ** 2
    if weight < 1.0:
        loss += (1.0 - weight) * keras.losses.SparseCategoricalCrossentropy()(labels, student_probs)
    return loss


def make_train_step(student: keras.Model, teacher: keras.Model, optimizer, settings: dict):
    import tensorflow as tf
    import tf_keras as keras

    label_loss = keras.losses.SparseCategoricalCrossentropy()
    variables = trainable_variables(student)

    @tf.function
    def step(x, y):
        target = teacher(x, training=False) if settings["distill"] else None
        with tf.GradientTape() as tape:
            probs = student(x, training=True)
            if settings["distill"]:
                loss = distillation_loss(target, probs, y, settings["distill_weight"], settings["temperature"])
            else:
                loss = label_loss(y, probs)
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    return step


# --- validation ----------------------------------------------------------------------------

def agreement_scores(student_probs: np.ndarray, teacher_probs: np.ndarray, y: np.ndarray) -> dict:
    """Top-1 agreement with the float model, accuracy, and the mean KL(float || student)."""
    s = np.clip(student_probs, 1e-7, 1.0)
    t = np.clip(teacher_probs, 1e-7, 1.0)
    return {"agreement": agreement(s.argmax(1), t.argmax(1))["value"],
            "accuracy": float(np.mean(s.argmax(1) == y)),
            "kl_to_float": float(np.mean(np.sum(t * np.log(t / s), axis=1)))}


def _better(scores: dict, best: dict | None) -> bool:
    # Agreement first (the goal); the KL breaks ties, which on a small validation side are common.
    return best is None or (scores["agreement"], -scores["kl_to_float"]) > (best["agreement"], -best["kl_to_float"])


# --- the command ---------------------------------------------------------------------------

def start_point(run: Run, teacher: keras.Model, settings: dict) -> keras.Model:
    """Where fine-tuning starts: with folded BatchNorm, the float model with every kernel already
    on the int8 grid that reconstructs its layer's float output (quantize.rounding, on export's
    calibration images): QAT then only has to repair what activation rounding adds."""
    if not settings["freeze_bn"]:
        return teacher
    from .export import calibration_batches, calibration_items
    from .rounding import reconstruct_weights

    chosen = calibration_items(run.sides()["train"], int(run.config["export"]["calibration_images"]), int(run.config["seed"]))
    rounded, _ = reconstruct_weights(teacher, calibration_batches(chosen, run.prep))
    return rounded


def run_qat(run: Run, settings: dict, resume: bool = False, quiet: bool = True) -> dict:
    """Fine-tune, checkpoint every epoch, and write models/qat.keras (atomically) from the best epoch."""
    import tensorflow as tf
    import tf_keras as keras

    from oncolite.train.data import image_errors, load_arrays, make_dataset
    from oncolite.train.model import flatten, load_float_model

    float_path = run.dir.float_model
    state_dir = run.dir.qat_state
    state_path = run.dir.qat_state_file
    source_sha = file_sha256(float_path)
    state = _read_state(state_path, source_sha, settings) if resume else None
    tf.keras.utils.set_random_seed(int(run.config["seed"]))

    teacher = flatten(load_float_model(float_path))
    student = quantize_float_model(start_point(run, teacher, settings), freeze_bn=settings["freeze_bn"])
    optimizer = keras.optimizers.Adam(settings["lr"])
    # Slots exist before the first checkpoint, so every checkpoint has the same structure.
    optimizer.build(trainable_variables(student))
    checkpoint = tf.train.Checkpoint(model=student, optimizer=optimizer)
    best_checkpoint = tf.train.Checkpoint(model=student)

    sides = run.sides()
    batch_size = int(run.config["batch_size"])
    seed = int(run.config["seed"])
    train_ds = make_dataset(sides["train"], run.labels, run.prep, batch_size, augment=run.config["augment"],
                            shuffle=True, seed=seed, cache=run.config["cache"])
    x_val, y_val = load_arrays(sides["val"], run.labels, run.prep, quiet=quiet, desc="validation images")
    teacher_val = teacher.predict(x_val, batch_size=batch_size, verbose=0)

    def validate() -> dict:
        return agreement_scores(student.predict(x_val, batch_size=batch_size, verbose=0), teacher_val, y_val)

    if state is None:
        with image_errors():
            steps = settle_ranges(student, train_ds.repeat(), int(settings["settle_steps"]), quiet=quiet)
        scores = validate()
        state = {"recipe": RECIPE, "source_sha256": source_sha, "settings": settings, "settle_steps": steps, "epoch": 0,
                 "best_epoch": 0, "best": scores, "bad_epochs": 0, "history": [{"epoch": 0, "loss": None, **scores}],
                 "checkpoint": None, "best_checkpoint": None}
        _save(checkpoint, best_checkpoint, state_dir, state, improved=True)
    else:
        checkpoint.read(str(state_dir / state["checkpoint"])).assert_existing_objects_matched()
    resumed_after = state["epoch"] if resume else None

    step = make_train_step(student, teacher, optimizer, settings)
    while state["epoch"] < settings["epochs"] and state["bad_epochs"] < settings["patience"]:
        epoch = state["epoch"] + 1
        started = time.monotonic()
        with image_errors():
            losses = [float(step(x, y)) for x, y in progress(train_ds, desc=f"QAT epoch {epoch}", quiet=quiet, unit="batch")]
        scores = validate()
        improved = _better(scores, state["best"])
        state["history"].append({"epoch": epoch, "loss": float(np.mean(losses)), **scores,
                                 "seconds": round(time.monotonic() - started, 1)})
        state.update(epoch=epoch, bad_epochs=0 if improved else state["bad_epochs"] + 1)
        if improved:
            state.update(best_epoch=epoch, best=scores)
        _save(checkpoint, best_checkpoint, state_dir, state, improved)

    best_checkpoint.read(str(state_dir / state["best_checkpoint"])).assert_existing_objects_matched()
    with atomic_path(run.dir.qat_model) as tmp:
        student.save(tmp)
    summary = {"qat_model": str(run.dir.qat_model), "source_sha256": source_sha,
               "best_epoch": state["best_epoch"], "validation": state["best"], "epochs_run": state["epoch"],
               "stopped_early": state["bad_epochs"] >= settings["patience"], "settings": settings,
               "settle_steps": state["settle_steps"], "resumed_after_epoch": resumed_after, "history": state["history"]}
    write_json(run.dir.qat_report, summary)
    return summary


def _save(checkpoint, best_checkpoint, state_dir: Path, state: dict, improved: bool) -> None:
    """This epoch's checkpoints under new names, then state.json naming them (see train.checkpoints):
    a kill at any moment leaves the previous state pointing at complete checkpoints."""
    state_dir.mkdir(parents=True, exist_ok=True)
    state["checkpoint"] = f"epoch-{state['epoch']}"
    checkpoint.write(str(state_dir / state["checkpoint"]))
    if improved:
        state["best_checkpoint"] = f"best-{state['epoch']}"
        best_checkpoint.write(str(state_dir / state["best_checkpoint"]))
    save_resume_point(state_dir / RESUME_POINT, state, keep={state["checkpoint"], state["best_checkpoint"]})


def _read_state(path: Path, source_sha: str, settings: dict) -> dict:
    if not path.exists():
        raise OncoliteError(f"{path}: nothing to resume; run without --resume")
    state = json.loads(path.read_text(encoding="utf-8"))
    if "checkpoint" not in state or state.get("recipe") != RECIPE:
        raise OncoliteError(f"{path}: written by an older oncolite (another QAT model structure); run without --resume")
    if state["source_sha256"] != source_sha:
        raise OncoliteError(f"{path}: the float model changed since this QAT run started; run without --resume")
    changed = sorted(k for k in ("distill", "distill_weight", "temperature", "freeze_bn", "lr")
                     if state["settings"].get(k) != settings.get(k))
    if changed:
        raise OncoliteError(f"{path}: settings {', '.join(changed)} differ from the interrupted run; "
                            "resume with the same settings or run without --resume")
    return state


def finished_qat(run: Run) -> dict | None:
    """The report of a finished QAT of this float model (models/qat_report.json, written last,
    after models/qat.keras), or None: nothing finished, or the float model changed since."""
    report_path, model_path = run.dir.qat_report, run.dir.qat_model
    if not (report_path.exists() and model_path.exists() and run.dir.float_model.exists()):
        return None
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return report if report.get("source_sha256") == file_sha256(run.dir.float_model) else None


def forget_qat(run: Run) -> None:
    """QAT starts over: its finished mark goes first, then the resume point."""
    run.dir.qat_report.unlink(missing_ok=True)
    run.dir.qat_state_file.unlink(missing_ok=True)


def main(args) -> int:
    from oncolite.train.rundir import given_run

    run = open_run(given_run(args, "quantize"))
    run.config = with_overrides(run.config, args.set, "qat")
    settings = qat_settings(run.config, epochs=args.epochs, lr=args.lr)
    if args.force:
        forget_qat(run)
    else:
        done = finished_qat(run)
        if done is not None:
            changed = sorted(k for k in settings if k in done.get("settings", {}) and done["settings"][k] != settings[k])
            if changed:
                raise OncoliteError(f"{run.dir.qat_model}: QAT finished before with other settings ({', '.join(changed)}); "
                                    "add --force to run it again with these, or drop them to keep it")
            if args.json:
                print_json({**done, "finished_before": True})
            result(args, f"{run.dir.path}: QAT finished before; left as it is (model: {run.dir.qat_model}); add --force "
                         "to run it again, or --resume after an interruption")
            return EXIT_OK
    summary = run_qat(run, settings, resume=args.resume, quiet=args.quiet or args.json)
    if args.json:
        print_json(summary)
    best = summary["validation"]
    result(args, f"{summary['qat_model']}: best epoch {summary['best_epoch']} of {summary['epochs_run']}, agreement with "
                 f"float {best['agreement']:.1%}, accuracy {best['accuracy']:.1%} on the validation side")
    return EXIT_OK
