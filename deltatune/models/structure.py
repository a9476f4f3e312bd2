"""Architecture knowledge for structured compression: where a transformer's blocks, attention
projections and FFN projections are, found by structure (the longest list of identical blocks,
q/k/v linears by their names, the FFN as the linears around the hidden neurons) rather than by
model class; and exact in-place surgery that physically removes attention heads, KV groups, FFN
neurons or whole blocks so that what remains computes exactly what it computed before. It also
describes a model's per-layer shapes (`architecture_shapes`) and resizes a freshly built model to
them (`apply_architecture_shapes`), which is how a pruned folder is loaded back."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from deltatune.errors import ConfigError

# Names of the query/key/value linears inside one attention module (Llama/Mistral/Qwen, BERT/
# RoBERTa, T5-style); a fused qkv projection is not supported.
QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"))
HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads")
KV_COUNT_ATTRIBUTES = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
HEAD_DIM_ATTRIBUTES = ("head_dim", "attention_head_size")
# Where the history of removals is kept on a model between surgery and save_pruned.
PRUNING_LOG_ATTRIBUTE = "_deltatune_pruning_log"
ORIGINAL_SHAPES_ATTRIBUTE = "_deltatune_original_shapes"


@dataclass
class AttentionLayout:
    """One block's attention: the module that owns q/k/v (`core`, whose head-count attributes
    the forward reads), the four projections and the head geometry. Query head h reads KV head
    h // (num_heads // num_kv_heads)."""
    core: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class FfnLayout:
    """One block's feed-forward part: the linears that produce the hidden neurons (Llama: gate
    and up, BERT: intermediate.dense) and the one that reads them (down_proj / output.dense)."""
    inputs: list[nn.Linear]
    output: nn.Linear

    @property
    def num_neurons(self) -> int:
        return self.output.in_features


@dataclass
class BlockLayout:
    index: int
    block: nn.Module
    attention: AttentionLayout
    ffn: FfnLayout


# -- finding the layout -------------------------------------------------------------------------

def block_list(model: nn.Module) -> nn.ModuleList:
    """The longest nn.ModuleList whose members all have one type (the transformer blocks)."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) == 1 and _linear_count(module[0]) >= 2:
                if best is None or len(module) > len(best):
                    best = module
    if best is None:
        raise ConfigError(f"{type(model).__name__} has no list of transformer blocks (an "
                          "nn.ModuleList of identical modules); structured pruning needs one")
    return best


def block_list_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the block list and the attribute name it is stored under."""
    blocks = block_list(model)
    for module in model.modules():
        for name, child in module.named_children():
            if child is blocks:
                return module, name
    raise ConfigError(f"cannot locate the block list of {type(model).__name__}")


def transformer_blocks(model: nn.Module) -> list[BlockLayout]:
    """Every transformer block with its attention and FFN layout, in order."""
    config = getattr(model, "config", None)
    layouts = []
    for index, block in enumerate(block_list(model)):
        attention = _attention_layout(model, block, config)
        layouts.append(BlockLayout(index, block, attention, _ffn_layout(model, block, attention)))
    return layouts


def _linear_count(module: nn.Module) -> int:
    return sum(isinstance(child, nn.Linear) for child in module.modules())


def _attention_layout(model: nn.Module, block: nn.Module, config: Any) -> AttentionLayout:
    for core in block.modules():
        children = dict(core.named_children())
        for names in QKV_NAMES:
            if all(isinstance(children.get(name), nn.Linear) for name in names):
                q, k, v = (children[name] for name in names)
                head_dim = _head_dim(core, config, q)
                o = _attention_output(block, core, q)
                if q.out_features % head_dim or k.out_features % head_dim:
                    break
                num_heads, num_kv = q.out_features // head_dim, k.out_features // head_dim
                if num_kv == 0 or num_heads % num_kv:
                    break
                return AttentionLayout(core, q, k, v, o, num_heads, num_kv, head_dim)
    raise _unrecognised(model, "attention with separate query/key/value linears (q_proj/k_proj/"
                        "v_proj or query/key/value)")


def _head_dim(core: nn.Module, config: Any, q: nn.Linear) -> int:
    for name in HEAD_DIM_ATTRIBUTES:
        value = getattr(core, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(config, "head_dim", None)
    if isinstance(value, int) and value > 0:
        return value
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
        return hidden // heads
    raise ConfigError(f"cannot tell the head size of {type(core).__name__}; it has no head_dim "
                      "attribute and the config no head_dim/num_attention_heads")


def _attention_output(block: nn.Module, core: nn.Module, q: nn.Linear) -> nn.Linear:
    """The projection that reads all heads (`in_features` = query width): an o_proj-like child
    of the q/k/v module, else the first such linear registered after that module (BERT's
    attention.output.dense)."""
    for name, child in core.named_children():
        if (name in ("o_proj", "out_proj", "o", "dense") and isinstance(child, nn.Linear)
                and child.in_features == q.out_features):
            return child
    passed_core = False
    for module in block.modules():
        if module is core:
            passed_core = True
        elif (passed_core and isinstance(module, nn.Linear) and not _inside(core, module)
              and module.in_features == q.out_features):
            return module
    raise ConfigError(f"{type(block).__name__} has no attention output projection after its "
                      "query/key/value linears")


def _inside(parent: nn.Module, module: nn.Module) -> bool:
    return any(child is module for child in parent.modules())


def _ffn_layout(model: nn.Module, block: nn.Module, attention: AttentionLayout) -> FfnLayout:
    """The FFN is what remains of the block's linears: its output is the last one writing the
    hidden size, its inputs the others that read the hidden size and produce its width."""
    taken = {id(attention.q), id(attention.k), id(attention.v), id(attention.o)}
    others = [m for m in block.modules() if isinstance(m, nn.Linear) and id(m) not in taken]
    hidden = attention.o.out_features
    outputs = [m for m in others if m.out_features == hidden]
    if outputs:
        output = outputs[-1]
        inputs = [m for m in others if m is not output and m.in_features == hidden
                  and m.out_features == output.in_features]
        if inputs:
            return FfnLayout(inputs, output)
    raise _unrecognised(model, "a feed-forward part (linears hidden -> neurons -> hidden after "
                        "the attention)")


def _unrecognised(model: nn.Module, what: str) -> ConfigError:
    return ConfigError(f"structured pruning does not recognise the layout of "
                       f"{type(model).__name__}: no {what}; prune a Llama- or BERT-style model, "
                       "or use unstructured pruning")


# -- shapes ---------------------------------------------------------------------------------------

def architecture_shapes(model: nn.Module) -> dict[str, Any]:
    """{"num_layers": n, "layers": [{"num_heads", "num_kv_heads", "head_dim",
    "intermediate_size"}, ...]}: everything a fresh model needs to be resized to this one."""
    layers = [{"num_heads": b.attention.num_heads, "num_kv_heads": b.attention.num_kv_heads,
               "head_dim": b.attention.head_dim, "intermediate_size": b.ffn.num_neurons}
              for b in transformer_blocks(model)]
    return {"num_layers": len(layers), "layers": layers}


def shapes_are_uniform(shapes: Mapping[str, Any]) -> bool:
    layers = shapes["layers"]
    return all(layer == layers[0] for layer in layers)


def apply_architecture_shapes(model: nn.Module, shapes: Mapping[str, Any]) -> None:
    """Resizes a freshly built model (same family, at least as large everywhere) to `shapes`,
    keeping the first heads/groups/neurons/layers; the weights are then loaded over it."""
    _check_shapes(shapes)
    blocks = transformer_blocks(model)
    wanted = shapes["layers"]
    if len(blocks) < len(wanted):
        raise ConfigError(f"the config builds {len(blocks)} layers but the pruned shapes list "
                          f"{len(wanted)}; the folder's config.json and pruning file disagree")
    if len(blocks) > len(wanted):
        remove_layers(model, range(len(wanted), len(blocks)), record=False)
    heads_plan, neurons_plan = {}, {}
    for layout, target in zip(transformer_blocks(model), wanted):
        heads_plan[layout.index] = _trailing_heads(layout.attention, target)
        neurons_plan[layout.index] = _trailing_neurons(layout.ffn, target)
    remove_heads(model, {i: h for i, h in heads_plan.items() if h}, record=False)
    remove_neurons(model, {i: n for i, n in neurons_plan.items() if n}, record=False)


def _check_shapes(shapes: Mapping[str, Any]) -> None:
    layers = shapes.get("layers") if isinstance(shapes, Mapping) else None
    keys = ("num_heads", "num_kv_heads", "head_dim", "intermediate_size")
    if (not isinstance(layers, list) or not layers or shapes.get("num_layers") != len(layers)
            or not all(isinstance(layer, Mapping) and all(isinstance(layer.get(key), int)
                                                           and layer[key] > 0 for key in keys)
                       for layer in layers)):
        raise ConfigError(f"malformed pruned shapes {str(shapes)[:200]}; expected num_layers and "
                          f"a list of layers with positive integers {keys}")


def _trailing_heads(attention: AttentionLayout, target: Mapping[str, int]) -> list[int]:
    heads, kv = target["num_heads"], target["num_kv_heads"]
    if target["head_dim"] != attention.head_dim:
        raise ConfigError(f"pruned head size {target['head_dim']} differs from the config's "
                          f"{attention.head_dim}; the folder's config.json does not match its "
                          "weights")
    if heads > attention.num_heads or kv > attention.num_kv_heads or heads % kv:
        raise ConfigError(f"cannot resize attention with {attention.num_heads} heads / "
                          f"{attention.num_kv_heads} KV heads to {heads} / {kv}")
    keep_per_group = heads // kv
    if keep_per_group > attention.group_size:
        raise ConfigError(f"{keep_per_group} query heads per KV group exceed the config's "
                          f"{attention.group_size}")
    removed = []
    for group in range(attention.num_kv_heads):
        first = group * attention.group_size
        keep = keep_per_group if group < kv else 0
        removed.extend(range(first + keep, first + attention.group_size))
    return removed


def _trailing_neurons(ffn: FfnLayout, target: Mapping[str, int]) -> list[int]:
    size = target["intermediate_size"]
    if size > ffn.num_neurons:
        raise ConfigError(f"cannot widen an FFN from {ffn.num_neurons} to {size} neurons")
    return list(range(size, ffn.num_neurons))


# -- surgery: heads --------------------------------------------------------------------------------

def remove_heads(model: nn.Module, heads: Mapping[int, Iterable[int]], record: bool = True) -> None:
    """Physically removes query heads (indices per layer, in the layer's current numbering):
    their q rows and o input columns. A KV head goes with the last query head of its group;
    refused when the remaining query heads per KV group would differ, or a layer would have
    none (remove the layer instead)."""
    plans = _validated_head_plans(model, heads)
    _remember_original(model, record)
    for layout, removed_heads, removed_groups in plans:
        _cut_attention(layout.attention, removed_heads, removed_groups)
    if record and plans:
        _log(model, "heads", {str(layout.index): sorted(removed) for layout, removed, _ in plans})
    _sync_config(model)


def remove_kv_groups(model: nn.Module, groups: Mapping[int, Iterable[int]],
                     record: bool = True) -> None:
    """Removes whole KV heads with all the query heads that read them."""
    blocks = transformer_blocks(model)
    heads = {}
    for layer, layer_groups in groups.items():
        attention = _block(blocks, layer).attention
        chosen = _unique_indices(layer_groups, attention.num_kv_heads, f"layer {layer} KV group")
        heads[layer] = [g * attention.group_size + offset for g in chosen
                        for offset in range(attention.group_size)]
    remove_heads(model, heads, record=record)


def _validated_head_plans(model: nn.Module, heads: Mapping[int, Iterable[int]]
                          ) -> list[tuple[BlockLayout, list[int], list[int]]]:
    """Checks every layer before touching any, so a refused request changes nothing."""
    blocks = transformer_blocks(model)
    plans = []
    for layer, layer_heads in heads.items():
        layout = _block(blocks, layer)
        attention = layout.attention
        removed = _unique_indices(layer_heads, attention.num_heads, f"layer {layer} head")
        if not removed:
            continue
        if len(removed) == attention.num_heads:
            raise ConfigError(f"removing all {attention.num_heads} heads of layer {layer} leaves "
                              "no attention; keep at least one head or remove the layer with "
                              "remove_layers")
        left_per_group = [attention.group_size] * attention.num_kv_heads
        for head in removed:
            left_per_group[head // attention.group_size] -= 1
        remaining = {count for count in left_per_group if count > 0}
        if len(remaining) > 1:
            raise ConfigError(f"layer {layer}: removing heads {removed} leaves {left_per_group} "
                              f"query heads per KV group; remove the same number of heads from "
                              "every group (or whole groups with remove_kv_groups)")
        emptied = [g for g, count in enumerate(left_per_group) if count == 0]
        plans.append((layout, removed, emptied))
    return plans


def _cut_attention(attention: AttentionLayout, removed_heads: list[int],
                   removed_groups: list[int]) -> None:
    dim = attention.head_dim
    kept_heads = [h for h in range(attention.num_heads) if h not in set(removed_heads)]
    kept_groups = [g for g in range(attention.num_kv_heads) if g not in set(removed_groups)]
    head_rows = _head_rows(kept_heads, dim)
    _keep_outputs(attention.q, head_rows)
    _keep_inputs(attention.o, head_rows)
    if removed_groups:
        group_rows = _head_rows(kept_groups, dim)
        _keep_outputs(attention.k, group_rows)
        _keep_outputs(attention.v, group_rows)
    _set_head_attributes(attention.core, len(kept_heads), len(kept_groups), dim)


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)],
                        dtype=torch.long)


def _set_head_attributes(core: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    """The attributes an attention forward reads instead of the weight shapes."""
    for name in HEAD_COUNT_ATTRIBUTES:
        _set_if_int(core, name, heads)
    for name in KV_COUNT_ATTRIBUTES:
        _set_if_int(core, name, kv_heads)
    _set_if_int(core, "num_key_value_groups", heads // kv_heads)
    _set_if_int(core, "all_head_size", heads * head_dim)
    _set_if_int(core, "inner_dim", heads * head_dim)


def _set_if_int(module: nn.Module, name: str, value: int) -> None:
    if isinstance(getattr(module, name, None), int) and not isinstance(getattr(module, name), bool):
        setattr(module, name, value)


# -- surgery: neurons ------------------------------------------------------------------------------

def remove_neurons(model: nn.Module, neurons: Mapping[int, Iterable[int]],
                   record: bool = True) -> None:
    """Physically removes FFN hidden neurons (per layer): rows of the input linears, columns
    of the output linear. A layer keeps at least one neuron."""
    blocks = transformer_blocks(model)
    plans = []
    for layer, layer_neurons in neurons.items():
        layout = _block(blocks, layer)
        width = layout.ffn.num_neurons
        removed = _unique_indices(layer_neurons, width, f"layer {layer} neuron")
        if len(removed) == width:
            raise ConfigError(f"removing all {width} FFN neurons of layer {layer} is not "
                              "supported; keep at least one or remove the layer")
        if removed:
            plans.append((layout, removed))
    _remember_original(model, record)
    for layout, removed in plans:
        gone = set(removed)
        kept = torch.tensor([n for n in range(layout.ffn.num_neurons) if n not in gone],
                            dtype=torch.long)
        for linear in layout.ffn.inputs:
            _keep_outputs(linear, kept)
        _keep_inputs(layout.ffn.output, kept)
    if record and plans:
        _log(model, "neurons", {str(layout.index): removed for layout, removed in plans})
    _sync_config(model)


# -- surgery: layers -------------------------------------------------------------------------------

def remove_layers(model: nn.Module, layers: Iterable[int], record: bool = True) -> None:
    """Removes whole blocks, renumbers the `layer_idx` the KV cache is indexed by, and updates
    config.num_hidden_layers (Llama's forward runs only that many) and config.layer_types."""
    owner, attribute = block_list_owner(model)
    blocks = getattr(owner, attribute)
    removed = _unique_indices(layers, len(blocks), "layer")
    if len(removed) == len(blocks):
        raise ConfigError(f"cannot remove all {len(blocks)} layers; keep at least one")
    if not removed:
        return
    _remember_original(model, record)
    gone = set(removed)
    kept = [block for index, block in enumerate(blocks) if index not in gone]
    setattr(owner, attribute, nn.ModuleList(kept))
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = getattr(model, "config", None)
    if config is not None:
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == len(blocks):
            config.layer_types = [kind for i, kind in enumerate(layer_types) if i not in gone]
        config.num_hidden_layers = len(kept)
    if record:
        _log(model, "layers", removed)
    _sync_config(model)


# -- shared helpers --------------------------------------------------------------------------------

def _block(blocks: list[BlockLayout], layer: int) -> BlockLayout:
    if not isinstance(layer, int) or not 0 <= layer < len(blocks):
        raise ConfigError(f"layer {layer!r} does not exist; the model has layers "
                          f"0..{len(blocks) - 1}")
    return blocks[layer]


def _unique_indices(indices: Iterable[int], size: int, what: str) -> list[int]:
    chosen = sorted({int(i) for i in indices})
    bad = [i for i in chosen if not 0 <= i < size]
    if bad:
        raise ConfigError(f"{what} index {bad[0]} is out of range; valid indices are 0..{size - 1}")
    return chosen


@torch.no_grad()
def _keep_outputs(linear: nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.index_select(0, rows).clone(),
                                 requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.index_select(0, rows).clone(),
                                   requires_grad=linear.bias.requires_grad)
    linear.out_features = len(rows)


@torch.no_grad()
def _keep_inputs(linear: nn.Linear, columns: torch.Tensor) -> None:
    columns = columns.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.index_select(1, columns).clone(),
                                 requires_grad=linear.weight.requires_grad)
    linear.in_features = len(columns)


def _sync_config(model: nn.Module) -> None:
    """Writes the shapes into the config where they are uniform and a fresh model built from
    the config would get them: heads only where the config has an explicit head_dim (Llama; in
    BERT the head size is hidden_size / num_attention_heads, so the count must stay)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    layers = architecture_shapes(model)["layers"]
    config.num_hidden_layers = len(layers)
    if all(layer["intermediate_size"] == layers[0]["intermediate_size"] for layer in layers):
        if isinstance(getattr(config, "intermediate_size", None), int):
            config.intermediate_size = layers[0]["intermediate_size"]
    same_heads = all((layer["num_heads"], layer["num_kv_heads"])
                     == (layers[0]["num_heads"], layers[0]["num_kv_heads"]) for layer in layers)
    if same_heads and isinstance(getattr(config, "head_dim", None), int):
        config.head_dim = layers[0]["head_dim"]
        config.num_attention_heads = layers[0]["num_heads"]
        if isinstance(getattr(config, "num_key_value_heads", None), int):
            config.num_key_value_heads = layers[0]["num_kv_heads"]


def _remember_original(model: nn.Module, record: bool) -> None:
    if record and not hasattr(model, ORIGINAL_SHAPES_ATTRIBUTE):
        shapes = copy.deepcopy(architecture_shapes(model))
        object.__setattr__(model, ORIGINAL_SHAPES_ATTRIBUTE, shapes)


def _log(model: nn.Module, kind: str, removed: Any) -> None:
    log = getattr(model, PRUNING_LOG_ATTRIBUTE, None)
    if log is None:
        log = []
        object.__setattr__(model, PRUNING_LOG_ATTRIBUTE, log)
    log.append({"removed": kind, "indices": removed})


def pruning_history(model: nn.Module) -> dict[str, Any]:
    """What surgery did to this model object so far: the shapes before the first removal and
    each removal in order (indices in the numbering of the moment)."""
    return {"original_shapes": getattr(model, ORIGINAL_SHAPES_ATTRIBUTE, None),
            "steps": list(getattr(model, PRUNING_LOG_ATTRIBUTE, []))}
