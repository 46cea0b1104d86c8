"""How many CUDA graphs `train.compile: cuda-graphs` records: the distinct shapes of a run's
forward calls, as the batches are and padded to graph shapes (hmcl_cli/modeling/graph_shapes.py).

    python benchmarks/graph_shapes.py [--recipes quickstart,sts-nli-en,trecqa] [--epochs 4] [--set KEY=VALUE ...]

Each compiled layer records a graph per distinct input shape (rows x width): about two eager runs
of the layer each, and memory each. For every recipe this prepares its data, sets a trainer up on
the CPU and goes through ``--epochs`` epochs of its batches without running the model, making
the forward calls a GPU would make (``train.one_forward`` resolved for a CUDA device, padded calls
as cuda-graphs runs them). It reports the forward calls, the distinct shapes as the batches are and
bucketed, how many shapes first appear in each epoch (each a recording in that epoch), and what the
bucketing costs: token slots computed, bucketed over as the batches are.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def calls(trainer, batch: dict) -> list[tuple[int, int]]:
    """The (rows, width) of the step's forward calls, as the trainer makes them on a GPU."""
    (n_q, w_q), (n_c, w_c) = batch["q_input_ids"].shape, batch["c_input_ids"].shape
    if trainer._one_forward(batch):
        return [(n_q + n_c, max(w_q, w_c))]
    return [(n, w) for n, w in ((n_q, w_q), (n_c, w_c)) if n]


def count(recipe_name: str, epochs: int, overrides: list[str], tmp: Path) -> dict:
    from hmcl_cli.data.prepare import prepare
    from hmcl_cli.modeling.graph_shapes import GraphShapes, graph_size
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.training.batching import StepBatches
    from hmcl_cli.training.trainer import HMCLTrainer

    path = ROOT / "recipes" / f"{recipe_name}.yaml"
    recipe = load_recipe(path, overrides=[f"output_dir={tmp / recipe_name}", "train.compile=false", *overrides])
    prepare(recipe, progress=False)
    t = HMCLTrainer(recipe)
    t.setup()
    t.device = torch.device("cuda")  # the GPU's train.one_forward decisions (only the type is read)
    buckets = GraphShapes(t.model)
    seen = {"as is": Counter(), "bucketed": Counter()}
    new = {"as is": [], "bucketed": []}
    slots = {"as is": 0, "bucketed": 0}
    steps = 0
    for epoch in range(epochs):
        fresh = {"as is": 0, "bucketed": 0}
        batches = StepBatches(t.data, t.model, t.plan, epoch, 0, t.cfg.group_size, 0)
        for i in range(len(batches)):
            steps += 1
            for rows, width in calls(t, batches[i]):
                shapes = {"as is": (rows, width), "bucketed": (graph_size(rows), buckets.width(width))}
                for key, shape in shapes.items():
                    fresh[key] += shape not in seen[key]
                    seen[key][shape] += 1
                    slots[key] += shape[0] * shape[1]
        for key in new:
            new[key].append(fresh[key])
    return {"recipe": recipe_name, "epochs": epochs, "steps": steps, "forward_calls": sum(seen["as is"].values()),
            "shapes": {k: len(v) for k, v in seen.items()}, "new_per_epoch": new,
            "token_slots_ratio": round(slots["bucketed"] / slots["as is"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default="quickstart,sts-nli-en,trecqa")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for every recipe (repeatable)")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes.split(","):
            results.append(count(name, args.epochs, args.overrides, Path(tmp)))
    print("\n| recipe | steps | forward calls | shapes as is | shapes bucketed | new shapes per epoch, as is -> bucketed | token slots, bucketed / as is |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['recipe']} | {r['steps']} | {r['forward_calls']} | {r['shapes']['as is']} | {r['shapes']['bucketed']} "
              f"| {r['new_per_epoch']['as is']} -> {r['new_per_epoch']['bucketed']} | {r['token_slots_ratio']:.3f}x |")
    print(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
