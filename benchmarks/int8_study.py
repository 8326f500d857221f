"""`python -m oncolite.benchmarks.int8_study RUN`: int8 recipes against the float model, pooled over CV folds.

For every fold of RUN (RUN/folds/<i>, or RUN itself), each recipe converts that fold's float
model to a full-integer int8 model (int8 I/O, the export's calibration images from the fold's
training side) and runs it through LiteRT on the fold's validation and test sides; the float
Keras model runs on the same images. With k folds every image of the data set is held out once,
so the test figures pool ~all of it (BUSI: ~760 images instead of ~153 per fold); recipes are
chosen on the pooled *validation* figures. Each (fold, recipe) is saved as it finishes in
RUN/int8_study/<fold>/<recipe>.npz, so a killed study resumes where it stopped.

Recipes (RECIPES, quantize.rounding): ptq (the converter's nearest rounding), ptq_bias (+ empirical
bias correction), gptq (output-reconstructing rounding), gptq_bias (both), gptq_seq (both, layer by
layer on inputs that carry the earlier layers' rounding, reconstructing the float output),
gptq_act (the same on inputs that also carry int8 activations), weights_* (the same weights in the
Keras model with float activations: how much of the error the weights alone cause), and
litert_a8_* / litert_a16_* (the same kernels through litert-quantizer, int8 or int16 activations).
--ablation adds the per-layer ablations: weights (one conv kernel at a time in int8, float
activations) and activations (one op output at a time on its int8 grid, simulated in Keras on
top of the gptq_bias kernels with the converted model's own scales).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .pooled import CONFIDENT
from edge_runtime.atomic import atomic_path, write_json, write_text
from edge_runtime.console import add_output_flags, print_json, result, say
from edge_runtime.errors import EXIT_OK, OncoliteError

# name -> (weight rounding, bias correction, inputs, backend). Inputs the kernels are reconstructed
# on: "float" (the float model's, one pass: export's recipe), "weights" (layer by layer on
# the inputs of the copy whose earlier kernels are rounded) or "int8" (of the copy whose earlier
# kernels and every activation are rounded, on the grids of the fold's gptq_bias model).
# Backends: "converter" (the TF converter's full-integer int8, as export makes int8_ptq), "keras"
# (the Keras model with every conv kernel on its int8 grid and float activations: the share of
# the error that weights alone cause), "litert_a8" / "litert_a16" (litert-quantizer's static
# recipes on the fp32 export of the same kernels: int8 or int16 activations, int8 weights,
# integer I/O; a second quantizer's opinion and the ceiling of what finer activations give).
RECIPES = {"ptq": ("nearest", False, "float", "converter"), "ptq_bias": ("nearest", True, "float", "converter"),
           "gptq": ("gptq", False, "float", "converter"), "gptq_bias": ("gptq", True, "float", "converter"),
           "gptq_seq": ("gptq", True, "weights", "converter"), "gptq_act": ("gptq", True, "int8", "converter"),
           "weights_nearest": ("nearest", False, "float", "keras"),
           "weights_gptq_bias": ("gptq", True, "float", "keras"), "weights_gptq_seq": ("gptq", True, "weights", "keras"),
           "litert_a8_gptq_bias": ("gptq", True, "float", "litert_a8"),
           "litert_a16_gptq_bias": ("gptq", True, "float", "litert_a16")}
SIDES = ("val", "test")


def fold_dirs(run: Path) -> list[Path]:
    """A CV run's fold directories (folds/<i>/) in order, or the run itself."""
    from oncolite.train.rundir import RunDir

    return [fold.path for fold in RunDir(run).folds()] or [run]


def study_fold(fold_dir: Path, recipes: list[str], out: Path, say) -> None:
    from oncolite.quantize.export import calibration_items, make_converter, representative_dataset, run_model_bytes
    from oncolite.quantize.rounding import activation_points, reconstruct_weights
    from oncolite.quantize.rundir import open_run
    from oncolite.train.data import load_arrays
    from oncolite.train.model import load_float_model

    run = open_run(fold_dir)
    sides = run.sides()
    out.mkdir(parents=True, exist_ok=True)
    model = load_float_model(run.dir.float_model)
    data = {side: load_arrays(sides[side], run.labels, run.prep, quiet=True) for side in SIDES}
    float_path = out / "float.npz"
    if not float_path.exists():
        with atomic_path(float_path) as tmp:
            np.savez(tmp, **{f"{side}_probs": model.predict(data[side][0], verbose=0) for side in SIDES},
                     **{f"{side}_y": data[side][1] for side in SIDES},
                     **{f"{side}_paths": np.array([str(it["path"]) for it in sides[side]]) for side in SIDES})
    chosen = calibration_items(sides["train"], int(run.config["export"]["calibration_images"]), int(run.config["seed"]))
    calib, _ = load_arrays(chosen, run.labels, run.prep, quiet=True)
    for recipe in recipes:
        path = out / f"{recipe}.npz"
        if path.exists():
            continue
        t0 = time.monotonic()
        method, bias, inputs, backend = RECIPES[recipe]
        points = None
        if inputs == "int8":
            if not (out / "gptq_bias.tflite").exists():
                raise OncoliteError(f"recipe {recipe} rounds activations on the grids of {out / 'gptq_bias.tflite'}: "
                                    "put gptq_bias before it in --recipes")
            points = activation_points(out / "gptq_bias.tflite")
        source, layers = reconstruct_weights(model, [calib[i:i + 16] for i in range(0, len(calib), 16)], method=method,
                                             bias_correction=bias, sequential=inputs != "float", points=points)
        if recipe == "gptq_bias":  # the activation ablation starts from these kernels
            source.save_weights(out / "gptq_bias.weights.h5")
        if backend == "keras":
            probs = {side: source.predict(data[side][0], verbose=0).astype(np.float64) for side in SIDES}
        else:
            if backend == "converter":
                model_bytes = make_converter(source, "int8_ptq", representative_dataset(chosen, run.prep), io="int8").convert()
            else:
                model_bytes = litert_quantize(make_converter(source, "fp32", batch=1).convert(), calib,
                                              activation_bits=16 if backend == "litert_a16" else 8)
            with atomic_path(out / f"{recipe}.tflite") as tmp:
                tmp.write_bytes(model_bytes)
            probs = {side: run_model_bytes(model_bytes, data[side][0]) for side in SIDES}
        with atomic_path(path) as tmp:
            np.savez(tmp, **{f"{side}_probs": probs[side] for side in SIDES}, layers=json.dumps(layers))
        say(f"{fold_dir.name} {recipe}: {time.monotonic() - t0:.0f} s")


def litert_quantize(fp32_model: bytes, calib: np.ndarray, activation_bits: int) -> bytes:
    """litert-quantizer's static recipe (int8 weights per channel, int8 or int16 activations,
    min/max calibration on the same images) applied to an fp32 .tflite."""
    from ai_edge_litert.interpreter import Interpreter
    from litert_quantizer import quantizer, recipe

    signature = Interpreter(model_content=fp32_model).get_signature_list()
    key = next(iter(signature))
    name = signature[key]["inputs"][0]
    q = quantizer.Quantizer(fp32_model, recipe.static_wi8_ai16() if activation_bits == 16 else recipe.static_wi8_ai8())
    ranges = q.calibrate({key: [{name: calib[i:i + 1].astype(np.float32)} for i in range(len(calib))]}, num_threads=2)
    return bytes(q.quantize(ranges, enable_progress_report=False).quantized_model)


# Ablations run each configuration on the images whose float top-1/top-2 margin is below this:
# ~100 configurations per fold cost minutes each on all images here. A configuration can only flip
# an image whose margin it moves by more than that margin; pool_ablation counts the whole-model
# recipe's flips outside the subset and the report states them (BUSI: none for the reconstructed
# weights, 9 of 41 test flips for plain nearest rounding, whose per-layer counts are then lower bounds).
AT_RISK_MARGIN = 0.5


def at_risk_images(run, out: Path) -> tuple[np.ndarray, dict]:
    """The fold's validation and test images whose float margin is below AT_RISK_MARGIN, as one
    array, and their indices per side."""
    from edge_runtime.decision import margins
    from oncolite.train.data import load_arrays

    ref, sides = np.load(out / "float.npz"), run.sides()
    picks = {side: np.flatnonzero(margins(ref[f"{side}_probs"]) < AT_RISK_MARGIN).tolist() for side in SIDES}
    items = [sides[side][i] for side in SIDES for i in picks[side]]
    return load_arrays(items, run.labels, run.prep, quiet=True)[0], picks


def split_probs(probs: np.ndarray, picks: dict) -> dict:
    """Probabilities (4 decimals: enough for decisions and mean |Δp|, small on disk) per side."""
    probs, cut = np.round(probs.astype(np.float64), 4), len(picks[SIDES[0]])
    return {SIDES[0]: probs[:cut].tolist(), SIDES[1]: probs[cut:].tolist()}


def weight_ablation(fold_dir: Path, out: Path, say) -> None:
    """Per conv layer, the probabilities on the fold's at-risk validation and test images when only that
    layer's kernel is rounded to its int8 grid (the converter's nearest rounding, BatchNorm
    folded) and when every kernel but that one is; activations stay float. Saved as
    out/ablation.json (resumes per fold)."""
    from oncolite.train.int8_grid import folded_kernel, grid_step, round_nearest, weight_layers, write_kernel
    from oncolite.quantize.rundir import open_run
    from oncolite.train.model import load_float_model

    path = out / "ablation.json"
    if path.exists():
        return
    t0 = time.monotonic()
    run = open_run(fold_dir)
    x, picks = at_risk_images(run, out)
    model = load_float_model(run.dir.float_model)
    pairs = weight_layers(model)
    original, rounded = {}, {}
    for layer, bn in pairs:
        original[layer.name] = layer.get_weights()
        rows = folded_kernel(layer, bn)
        step = grid_step(rows)
        write_kernel(layer, bn, (round_nearest(rows, step) * step[:, None]).astype(np.float32))
        rounded[layer.name] = layer.get_weights()
        layer.set_weights(original[layer.name])

    def decide() -> dict:
        return split_probs(model.predict(x, batch_size=32, verbose=0), picks)

    result = {"at_risk": picks, "layers": [layer.name for layer, _ in pairs], "only": {}, "all_but": {}}
    for layer, _ in pairs:
        layer.set_weights(rounded[layer.name])
        result["only"][layer.name] = decide()
        layer.set_weights(original[layer.name])
    for layer, _ in pairs:
        layer.set_weights(rounded[layer.name])
    result["all"] = decide()
    for layer, _ in pairs:
        layer.set_weights(original[layer.name])
        result["all_but"][layer.name] = decide()
        layer.set_weights(rounded[layer.name])
    write_json(path, result)
    say(f"{fold_dir.name} ablation: {time.monotonic() - t0:.0f} s")


def activation_ablation(fold_dir: Path, out: Path, say) -> None:
    """Per activation the converter rounds, the probabilities on the fold's at-risk validation
    and test images of the reconstructed-weights model (recipe gptq_bias's Keras weights)
    when only that activation is rounded to the converted model's int8 grid, and when all but
    that one are.
    The grids are read from the fold's gptq_bias.tflite; "all" is checked against that file's
    own decisions. Saved as out/activation_ablation.json (resumes per fold)."""
    from oncolite.quantize.export import calibration_items
    from oncolite.quantize.rounding import activation_points, reconstruct_weights, simulate_activations
    from oncolite.quantize.rundir import open_run
    from oncolite.train.data import load_arrays
    from oncolite.train.model import load_float_model

    path, tflite = out / "activation_ablation.json", out / "gptq_bias.tflite"
    if path.exists():
        return
    t0 = time.monotonic()
    run = open_run(fold_dir)
    x, picks = at_risk_images(run, out)
    weights = load_float_model(run.dir.float_model)
    if (out / "gptq_bias.weights.h5").exists():
        weights.load_weights(out / "gptq_bias.weights.h5")
    else:  # a study made before the weights were kept: the same deterministic reconstruction
        chosen = calibration_items(run.sides()["train"], int(run.config["export"]["calibration_images"]), int(run.config["seed"]))
        calib, _ = load_arrays(chosen, run.labels, run.prep, quiet=True)
        weights, _ = reconstruct_weights(weights, [calib[i:i + 16] for i in range(0, len(calib), 16)])
    points = activation_points(tflite)
    model, switches = simulate_activations(weights, points)

    def decide() -> dict:
        return split_probs(model.predict(x, batch_size=32, verbose=0), picks)

    def set_all(value: float) -> None:
        for switch in switches.values():
            switch.assign(value)

    result = {"at_risk": picks, "points": {name: {"scale": s, "zero_point": z} for name, (s, z) in points.items()},
              "none": decide(), "only": {}, "all_but": {}}
    for name, switch in switches.items():
        switch.assign(1.0)
        result["only"][name] = decide()
        switch.assign(0.0)
    set_all(1.0)
    result["all"] = decide()
    for name, switch in switches.items():
        switch.assign(0.0)
        result["all_but"][name] = decide()
        switch.assign(1.0)
    write_json(path, result)
    say(f"{fold_dir.name} activation ablation: {time.monotonic() - t0:.0f} s")


# name -> (file in each fold's study folder, what is rounded, what stays float, the whole-model
# recipe whose flips must all fall among the at-risk images)
ABLATIONS = {"weights": ("ablation.json", "conv kernel rounded to its int8 grid (nearest, BatchNorm folded, as the converter "
                         "does)", "float activations, float kernels elsewhere", "weights_nearest"),
             "activations": ("activation_ablation.json", "op output rounded to the converted gptq_bias model's int8 grid",
                             "reconstructed (gptq_bias) int8 kernels everywhere", "gptq_bias")}


def pool_ablation(run: Path, kind: str, dirs: list[Path]) -> dict:
    """Per ablated layer (or activation) and side, pooled over the folds `dirs`: flips against the float
    model and mean |Δp| on the at-risk images with only that one rounded, and with all but that
    one; and how many flips of the whole-model recipe fall outside the at-risk images (0 when
    the subset is wide enough)."""
    from edge_runtime.decision import margins

    name, _, _, check_recipe = ABLATIONS[kind]
    rows = {}
    total = {side: {"none": 0, "all": 0, "n": 0, "at_risk": 0, "none_dp": 0.0, "all_dp": 0.0, "missed": 0} for side in SIDES}
    folds, cells = 0, {side: 0 for side in SIDES}
    for d in dirs:
        f = run / "int8_study" / d.name
        if not (f / name).exists():
            continue
        folds += 1
        ab, ref = json.loads((f / name).read_text()), np.load(f / "float.npz")
        for side in SIDES:
            p_all = ref[f"{side}_probs"].astype(np.float64)
            at_risk = margins(p_all) < AT_RISK_MARGIN
            picks = np.array(ab["at_risk"][side] if "at_risk" in ab else np.flatnonzero(at_risk), dtype=int)
            p_ref = p_all[picks]

            def on_picks(probs) -> np.ndarray:  # a study made on every image: keep the at-risk ones
                probs = np.asarray(probs, np.float64)
                return probs[picks] if len(probs) == len(p_all) and len(picks) != len(p_all) else probs

            def flips_and_dp(probs) -> tuple[int, float]:
                probs = on_picks(probs)
                return int((probs.argmax(1) != p_ref.argmax(1)).sum()), float(np.abs(probs - p_ref).sum())

            t = total[side]
            t["n"] += len(p_all)
            t["at_risk"] += len(picks)
            cells[side] += p_ref.size
            if (f / f"{check_recipe}.npz").exists():
                whole = np.load(f / f"{check_recipe}.npz")[f"{side}_probs"]
                t["missed"] += int(((whole.argmax(1) != p_all.argmax(1)) & ~at_risk).sum())
            for key in ("none", "all"):
                if key in ab:
                    flips, dp = flips_and_dp(ab[key][side])
                    t[key] += flips
                    t[f"{key}_dp"] += dp
            for layer in ab["only"]:
                row = rows.setdefault(layer, {s: {"only": 0, "all_but": 0, "only_dp": 0.0, "all_but_dp": 0.0} for s in SIDES})
                for key in ("only", "all_but"):
                    flips, dp = flips_and_dp(ab[key][layer][side])
                    row[side][key] += flips
                    row[side][f"{key}_dp"] += dp
    for side in SIDES:  # sums of |Δp| over images and classes -> mean per probability
        n = max(cells[side], 1)
        for key in ("none_dp", "all_dp"):
            total[side][key] /= n
        for row in rows.values():
            for key in ("only_dp", "all_but_dp"):
                row[side][key] /= n
    return {"kind": kind, "folds": folds, "at_risk_margin": AT_RISK_MARGIN, "check_recipe": check_recipe,
            "layers": rows, "total": total}


def ablation_markdown(ablation: dict) -> list[str]:
    total, (_, rounded, rest, check) = ablation["total"], ABLATIONS[ablation["kind"]]
    base = "float weights and activations" if ablation["kind"] == "weights" else rest
    v, t = total["val"], total["test"]
    lines = [f"## Per-layer ablation: {ablation['kind']} ({ablation['folds']} folds)", "",
             f"Flips against the float Keras model and mean |Δp| (per probability), pooled over folds, with only one "
             f"{rounded} ({rest}), and with every one but that one rounded. Counted on the at-risk images: float "
             f"top-1/top-2 margin below {ablation['at_risk_margin']} ({v['at_risk']} of {v['n']} validation, {t['at_risk']} "
             f"of {t['n']} test images); flips of the whole-model `{check}` recipe outside them: {v['missed']} / "
             f"{t['missed']} (val / test). Nothing rounded ({base}): {v['none']} / {t['none']} flips, mean |Δp| "
             f"{t['none_dp']:.4f} on the at-risk test images; everything "
             f"rounded: {v['all']} / {t['all']} flips, mean |Δp| {t['all_dp']:.4f} on the at-risk test images.", "",
             "| layer | only this: flips val / test | mean abs Δp test | all but this: flips val / test | mean abs Δp test |",
             "| --- | --- | --- | --- | --- |"]
    for layer, row in ablation["layers"].items():
        rv, rt = row["val"], row["test"]
        lines.append(f"| {layer} | {rv['only']} / {rt['only']} | {rt['only_dp']:.4f} | {rv['all_but']} / {rt['all_but']} | "
                     f"{rt['all_but_dp']:.4f} |")
    return lines + [""]


# The row of what export would ship: per fold, the recipe its rule picks on validation.
CHOSEN = "chosen per fold"


def choose_per_fold(run: Path, recipes: list[str], labels: list[str], dirs: list[Path]) -> dict:
    """Per fold, the recipe `oncolite export` would ship as `int8` if these (deployable) recipes
    were its candidates: quantize.export.choose_int8's rule on the fold's validation side
    (highest agreement with float, then smallest mean |Δp|, then the order given), with the
    study's top-1 decisions."""
    from oncolite.quantize.export import choose_int8, fidelity

    candidates = tuple(r for r in recipes if RECIPES[r][3] != "keras")
    chosen = {}
    for d in dirs:
        f = run / "int8_study" / d.name
        if not (f / "float.npz").exists():
            continue
        ref = np.load(f / "float.npz")["val_probs"].astype(np.float64)
        found = {r: fidelity(np.load(f / f"{r}.npz")["val_probs"], ref, None, labels)
                 for r in candidates if (f / f"{r}.npz").exists()}
        if found:
            chosen[d.name] = choose_int8(found, order=candidates)
    return chosen


def pool(run: Path, recipes: list[str], labels: list[str], dirs: list[Path], chosen: dict | None = None) -> dict:
    """Per recipe and side: pooled over the folds `dirs` (benchmarks.pooled's comparison), and each
    fold's agreement; with `chosen` (fold -> recipe, choose_per_fold) also the CHOSEN row."""
    from .pooled import compare_pooled
    from edge_runtime.decision import margins

    folds = [run / "int8_study" / d.name for d in dirs]
    result = {}
    for recipe in recipes + ([CHOSEN] if chosen else []):
        entry = {}
        for side in SIDES:
            ys, refs, others, per_fold, flipped = [], [], [], [], []
            for f in folds:
                source = chosen.get(f.name) if recipe == CHOSEN else recipe
                if source is None or not (f / f"{source}.npz").exists():
                    continue
                ref, other = np.load(f / "float.npz"), np.load(f / f"{source}.npz")
                y, p_ref, p = ref[f"{side}_y"], ref[f"{side}_probs"].astype(np.float64), other[f"{side}_probs"]
                ys.append(y), refs.append(p_ref), others.append(p)
                per_fold.append(float(np.mean(p_ref.argmax(1) == p.argmax(1))))
                for i in np.flatnonzero(p_ref.argmax(1) != p.argmax(1)):
                    flipped.append({"fold": f.name, "image": Path(str(ref[f"{side}_paths"][i])).name,
                                    "label": labels[int(y[i])], "float": [round(float(v), 4) for v in p_ref[i]],
                                    "int8": [round(float(v), 4) for v in p[i]],
                                    "float_margin": round(float(margins(p_ref[i:i + 1])[0]), 4)})
            if not ys:
                continue
            pooled = compare_pooled(np.concatenate(ys), np.concatenate(refs), np.concatenate(others), labels, bootstrap=0)
            entry[side] = {**pooled, "folds": len(per_fold), "agreement_per_fold": per_fold,
                           "agreement_mean": float(np.mean(per_fold)), "agreement_sd": float(np.std(per_fold)),
                           "flipped": flipped}
        if entry:
            result[recipe] = entry
    if chosen and CHOSEN in result:
        result[CHOSEN]["recipe_per_fold"] = chosen
    return result


def markdown(results: dict, command: str) -> str:
    lines = ["# int8 recipes against the float model, pooled over the CV folds", "",
             f"Made by: `{command}`", "",
             f"Agreement: same top-1 class as the float Keras model. Confident flip: a flip of an image whose "
             f"float top-1/top-2 margin is >= {CONFIDENT}. Δ: int8 minus float, pooled. Every recipe is full-integer "
             "int8 with int8 I/O, calibrated on the fold's training side.", ""]
    for side in SIDES:
        lines += [f"## {side} sides, pooled", "",
                  "| recipe | folds | images | agreement [95 % CI] | per fold mean ± sd | flips | confident | Δacc (pt) | ΔMCC | ΔROC-AUC | mean abs Δp |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for recipe, entry in results.items():
            e = entry.get(side)
            if not e:
                continue
            lo, hi = e["agreement_ci"]
            lines.append(f"| {recipe} | {e['folds']} | {e['n']} | {e['agreement']:.1%} [{lo:.1%}, {hi:.1%}] | "
                         f"{e['agreement_mean']:.1%} ± {e['agreement_sd']:.1%} | {e['flips']} | {e['confident_flips']} | "
                         f"{100 * e['delta_accuracy']:+.2f} | {e['delta_mcc']:+.4f} | {e['delta_roc_auc']:+.4f} | "
                         f"{e['mean_abs_prob_diff']:.4f} |")
        lines.append("")
    if CHOSEN in results:
        picks = ", ".join(f"{fold}: {recipe}" for fold, recipe in results[CHOSEN]["recipe_per_fold"].items())
        lines += [f"`{CHOSEN}`: on each fold, the recipe export's rule (`choose_int8`: highest validation agreement "
                  f"with float, then smallest validation mean |Δp|, then the order given) would ship, among the "
                  f"deployable recipes studied: {picks}.", ""]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("run", help="a run directory (a CV run with folds/<i>/, or one fold)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {', '.join(RECIPES)}")
    parser.add_argument("--folds", help="comma-separated fold numbers (default: all)")
    parser.add_argument("--out", help="report folder (default: RUN/int8_study)")
    parser.add_argument("--ablation", action="store_true",
                        help="also the per-layer weight and activation ablations (needs recipe gptq_bias; ~10 min per fold here)")
    add_output_flags(parser)


def main(args) -> int:
    run = Path(args.run)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise OncoliteError(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    if args.ablation and "gptq_bias" not in recipes:
        raise OncoliteError("--ablation reads the activation grids from recipe gptq_bias's model: add gptq_bias to --recipes")
    if not run.is_dir():
        raise OncoliteError(f"{run}: no such run directory; give a trained run (a CV run with folds/<i>/, or one fold)")
    dirs = fold_dirs(run)
    if args.folds:
        wanted = {s.strip() for s in args.folds.split(",")}
        dirs = [d for d in dirs if d.name in wanted]
    quiet = args.quiet or args.json
    progress_line = lambda line: quiet or print(line, file=sys.stderr, flush=True)  # noqa: E731
    for d in dirs:
        study_fold(d, recipes, run / "int8_study" / d.name, progress_line)
        if args.ablation:
            weight_ablation(d, run / "int8_study" / d.name, progress_line)
            activation_ablation(d, run / "int8_study" / d.name, progress_line)
    from oncolite.quantize.rundir import open_run

    labels = open_run(dirs[0]).labels
    results = pool(run, recipes, labels, dirs, choose_per_fold(run, recipes, labels, dirs))
    out = Path(args.out or run / "int8_study")
    ablations = [pool_ablation(run, kind, dirs) for kind in ABLATIONS] if args.ablation else []
    write_json(out / "report.json", {"command": args.command_line, "recipes": results, "ablations": ablations})
    md = markdown(results, args.command_line) + "".join("\n".join(ablation_markdown(a)) for a in ablations)
    write_text(out / "report.md", md)
    if args.json:
        print_json({"recipes": results, "ablations": ablations})
    else:
        say(args, md)
        result(args, f"report: {out / 'report.md'}: {len(recipes)} recipes over {len(dirs)} fold(s)")
    return EXIT_OK


if __name__ == "__main__":
    from edge_runtime.cli import run_module

    raise SystemExit(run_module(__spec__.name))
