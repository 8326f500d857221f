"""benchmarks.int8_study's pooling: the row of what export would ship, chosen fold by fold on validation."""

import json

import numpy as np

from oncolite.benchmarks import int8_study

LABELS = ["benign", "malignant", "normal"]


def _fold(root, fold, float_probs, recipes):
    """A fold's study folder: the float model's probabilities and each recipe's."""
    folder = root / "int8_study" / str(fold)
    folder.mkdir(parents=True)
    y = {side: probs.argmax(1) for side, probs in float_probs.items()}
    paths = {side: np.array([f"{side}-{fold}-{i}.png" for i in range(len(p))]) for side, p in float_probs.items()}
    np.savez(folder / "float.npz", **{f"{s}_probs": p for s, p in float_probs.items()}, **{f"{s}_y": y[s] for s in y},
             **{f"{s}_paths": paths[s] for s in paths})
    for recipe, probs in recipes.items():
        np.savez(folder / f"{recipe}.npz", **{f"{s}_probs": p for s, p in probs.items()}, layers=json.dumps([]))
    return root / "folds" / str(fold)


def test_chosen_row_follows_exports_rule_on_each_folds_validation_side(tmp_path):
    rng = np.random.default_rng(0)

    def probs(n):
        p = rng.dirichlet(np.ones(3) * 2, n)
        return p

    def flipped(p, k):  # the first k images' top-1 moved to another class
        q = p.copy()
        q[:k] = np.roll(q[:k], 1, axis=1)
        return q

    dirs = []
    for fold, (ptq_val_flips, gptq_val_flips) in enumerate(((3, 1), (0, 2))):
        ref = {"val": probs(20), "test": probs(30)}
        recipes = {"ptq": {"val": flipped(ref["val"], ptq_val_flips), "test": flipped(ref["test"], 5)},
                   "gptq_bias": {"val": flipped(ref["val"], gptq_val_flips), "test": flipped(ref["test"], 1)},
                   # float activations: not deployable, never chosen however faithful
                   "weights_gptq_bias": {"val": ref["val"], "test": ref["test"]}}
        dirs.append(_fold(tmp_path, fold, ref, recipes))
    recipes = ["ptq", "gptq_bias", "weights_gptq_bias"]
    chosen = int8_study.choose_per_fold(tmp_path, recipes, LABELS, dirs)
    assert chosen == {"0": "gptq_bias", "1": "ptq"}  # fewer validation flips wins, fold by fold
    results = int8_study.pool(tmp_path, recipes, LABELS, dirs, chosen)
    row = results[int8_study.CHOSEN]
    assert row["recipe_per_fold"] == chosen
    # Pooled test flips of the chosen row: fold 0's gptq_bias (1) and fold 1's ptq (5).
    assert row["test"]["flips"] == 6 and row["test"]["n"] == 60
    assert row["val"]["flips"] == 1 + 0
    assert "0: gptq_bias, 1: ptq" in int8_study.markdown(results, "cmd")
