"""A trained model's folder, written by the trainer or made from one of its checkpoints.

``<run>/model`` is the model training chose (the best dev step, else the last); every
``train.save_steps`` the trainer also writes a checkpoint, ``<run>/checkpoints/step-N``, from
which ``--resume`` goes on. A checkpoint is also a model, the one training had at that step:

    hmcl eval --model runs/sts/checkpoints/step-0000400 --sts stsb-dev.csv   # scored as it is
    hmcl export --model runs/sts/checkpoints/step-0000400                    # a model folder of it

A checkpoint keeps only the weights training changed (``model.pt``: all of them, or a LoRA
adapter and the layers after the pooling), its optimizer state and the recipe it was trained
with (``recipe.yaml``, a local base model by its absolute path). The model is rebuilt as
training built it: the recipe's base model with its model settings (pooling, prompts, lengths,
LoRA), and the checkpoint's weights put in. So the base model must still be where the recipe
says (a folder, the Hugging Face cache, or the hub). A checkpoint written before checkpoints kept
their recipe is rebuilt with its run's ``recipe.resolved.yaml``.

In Python::

    from hmcl_cli.training.saved_model import checkpoint_model
    model = checkpoint_model(Path("runs/sts/checkpoints/step-0000400"))
    model.encode(["a text"])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

from hmcl_cli.errors import ModelNotFoundError
from hmcl_cli.recipe import TRAINED_RECIPE

CHECKPOINT_RECIPE = "recipe.yaml"  # in a checkpoint: the recipe it was trained with
THRESHOLDS = "hmcl_thresholds.json"  # in a model folder: the ordinal classifier's thresholds
MODEL_FILES = ("model.pt", "loss.pt", "trainer_state.json", CHECKPOINT_RECIPE)  # what rebuilding its model reads


def is_checkpoint(folder: Path) -> bool:
    """A training checkpoint (``<run>/checkpoints/step-N``), not a model folder."""
    folder = Path(folder)
    return (folder / "model.pt").is_file() and (folder / "trainer_state.json").is_file()


def checkpoint_recipe_yaml(recipe: Any) -> str:
    """The recipe as a checkpoint keeps it: a base model that is a local folder by its absolute
    path (the recipe names it relative to the recipe file, which the checkpoint does not know)."""
    dump = recipe.model_dump(mode="json")
    name = str(dump["model"]["name_or_path"])
    here = Path(name).expanduser()
    for folder in (here, *([recipe.base_dir / here] if not here.is_absolute() else [])):
        if folder.is_dir():
            dump["model"]["name_or_path"] = str(folder.resolve())
            break
    return yaml.safe_dump(dump, sort_keys=False, allow_unicode=True)


def checkpoints_in(folder: Path) -> list[Path]:
    """The training checkpoints in a run's ``checkpoints`` folder, oldest first: ``step-N`` only
    (not one being written, nor the state a diverged training saved)."""
    return sorted(p for p in Path(folder).glob("step-*") if is_checkpoint(p))


def checkpoint_state(ckpt: Path) -> dict:
    """The checkpoint's trainer_state.json ({} where it cannot be read)."""
    try:
        state = json.loads((Path(ckpt) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def checkpoint_recipe(ckpt: Path, say_differences: bool = True) -> Any:
    """The recipe ``ckpt`` was trained with: its own, else its run's ``recipe.resolved.yaml``
    (checked against the settings the checkpoint recorded: with ``say_differences``, a warning
    where they differ)."""
    from hmcl_cli.console import warn
    from hmcl_cli.errors import RecipeError
    from hmcl_cli.recipe import load_recipe

    ckpt = Path(ckpt)
    own = ckpt / CHECKPOINT_RECIPE
    run_recipe = ckpt.parent.parent / "recipe.resolved.yaml"
    path = own if own.is_file() else run_recipe
    if not path.is_file():
        raise ModelNotFoundError(
            f"checkpoint {ckpt}: no recipe to rebuild its model with (neither {own.name} in it nor {run_recipe})",
            hint=f"a checkpoint is rebuilt from the recipe it was trained with: copy that recipe (with any --set "
            f"options written in) to {run_recipe}")
    try:
        recipe = load_recipe(path)
    except RecipeError as e:
        raise ModelNotFoundError(f"checkpoint {ckpt}: its recipe {path} does not load: {e}", hint=e.hint) from None
    recorded = checkpoint_state(ckpt).get("settings")
    if say_differences and path == run_recipe and isinstance(recorded, dict):
        from hmcl_cli.data.origin import differences, listed
        from hmcl_cli.training.trainer import trajectory_settings

        changed = differences(recorded, trajectory_settings(recipe))
        if changed:
            warn(f"checkpoint {ckpt.name} was trained with other settings than {run_recipe} says now "
                 f"({listed(changed, 4)}); it is rebuilt with that recipe")
    return recipe


def checkpoint_model(ckpt: Path, device_type: Optional[str] = None, merge: bool = True, recipe: Any = None) -> Any:
    """The model of a training checkpoint (an :class:`~hmcl_cli.modeling.encoder.EmbeddingModel`
    on the CPU, in eval mode), in the dtype training loaded it in on ``device_type`` (default: the
    best device here). ``merge``: a LoRA adapter merged into the weights (else the peft model).
    ``recipe``: the checkpoint's (:func:`checkpoint_recipe`), where the caller has read it.

    Raises :class:`ModelNotFoundError` for a checkpoint that is incomplete, or whose weights do
    not fit the model its recipe builds."""
    import torch

    from hmcl_cli.modeling.encoder import EmbeddingModel, best_device, training_dtype
    from hmcl_cli.modeling.lora import apply_lora
    from hmcl_cli.training.trainer import _verify_checkpoint

    ckpt = Path(ckpt)
    unusable = "choose another checkpoint of the run (its checkpoints/ folder lists them)"
    problem = _verify_checkpoint(ckpt, only=MODEL_FILES)
    if problem:
        raise ModelNotFoundError(f"checkpoint {ckpt} is unusable: {problem}", hint=unusable)
    recipe = recipe if recipe is not None else checkpoint_recipe(ckpt)
    try:
        state = torch.load(ckpt / "model.pt", weights_only=True, map_location="cpu")
    except FileNotFoundError:  # checked a moment ago: a running training removed it since
        raise ModelNotFoundError(f"checkpoint {ckpt} was removed while it was read (a running training keeps only "
                                 "its last train.keep_last checkpoints)", hint=unusable) from None
    dtype = training_dtype(recipe.model, device_type or best_device().type)
    base = recipe.model.name_or_path
    try:
        model = EmbeddingModel.from_recipe(recipe.model, recipe.base_dir, dtype=dtype)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"checkpoint {ckpt}: its base model {base} is needed to rebuild it: {e}",
                                 hint=e.hint) from None
    model.settings.matryoshka_dims = list(recipe.loss.matryoshka_dims)  # as the trainer sets them
    model.settings.similarity = "cosine" if model.settings.normalize else "dot"
    if recipe.model.lora.enabled:
        model.backbone = apply_lora(model.backbone, recipe.model.lora, base)
    params = dict(model.named_parameters())
    unknown = [n for n in state if n not in params]
    if unknown:
        raise ModelNotFoundError(
            f"checkpoint {ckpt}: {len(unknown)} of its {len(state)} tensors are not in the model its recipe builds "
            f"from {base} (e.g. {unknown[0]})",
            hint="the base model is not the one it was trained from (another model now at that path?)")
    with torch.no_grad():
        for n, t in state.items():
            if params[n].shape != t.shape:
                raise ModelNotFoundError(
                    f"checkpoint {ckpt}: {n} is {tuple(t.shape)} in it and {tuple(params[n].shape)} in the model its "
                    f"recipe builds from {base}",
                    hint="the base model is not the one it was trained from (another model now at that path?)")
            params[n].copy_(t)
    if merge and recipe.model.lora.enabled:
        model.backbone = model.backbone.merge_and_unload()
    return model.eval()


def checkpoint_thresholds(ckpt: Path, recipe: Any, dim: int) -> Optional[list[float]]:
    """The ordinal classifier's thresholds (weak, pos) at the checkpoint, where it trains one."""
    if not (recipe.loss.classifier == "ordinal" and recipe.loss.classification_weight > 0):
        return None
    import torch

    from hmcl_cli.losses import HMCLLoss

    loss = HMCLLoss(recipe.loss, dim)
    loss.load_state_dict(torch.load(Path(ckpt) / "loss.pt", weights_only=True, map_location="cpu"))
    return loss.classification.thresholds().detach().cpu().tolist()


def write_trained_model(model: Any, folder: Path, recipe: Any, thresholds: Optional[list[float]] = None) -> None:
    """Write the folder of a trained model (``<run>/model``): sentence-transformers files; with
    LoRA the merged weights and the adapter in ``adapter/``; the recipe it was trained with
    (its model card's); the ordinal classifier's ``thresholds`` where given."""
    from hmcl_cli.modeling.encoder import EmbeddingModel
    from hmcl_cli.modeling.lora import is_peft

    folder = Path(folder)
    if is_peft(model.backbone):
        import copy

        model.backbone.save_pretrained(folder / "adapter")
        merged = copy.deepcopy(model.backbone).merge_and_unload()
        EmbeddingModel(merged, model.tokenizer, model.settings, model.head).save(folder)
    else:
        model.save(folder)
    (folder / TRAINED_RECIPE).write_text(recipe.to_yaml(), encoding="utf-8")
    if thresholds is not None:
        (folder / THRESHOLDS).write_text(json.dumps({"weak": thresholds[0], "pos": thresholds[1]}, indent=2))


def save_checkpoint_model(ckpt: Path, folder: Path) -> Path:
    """Write the model of checkpoint ``ckpt`` to ``folder`` as training writes ``<run>/model``
    (:func:`write_trained_model`; weights in the dtype training loaded them in on the CPU)."""
    recipe = checkpoint_recipe(ckpt)
    model = checkpoint_model(ckpt, device_type="cpu", merge=False, recipe=recipe)
    write_trained_model(model, folder, recipe, checkpoint_thresholds(ckpt, recipe, model.dim))
    return Path(folder)
