"""One micro-batch through the model, in any layout: the attention mask and the summed token loss.

A micro-batch from :class:`raylora.data.pipeline.MicroBatchBuilder` is either plain (one record per
padded row: the usual 2D padding mask is enough, any attention backend works) or structured
(several units packed into a row, or a shared image prefix followed by its captions). A structured
row needs a mask that is causal, block-diagonal between units, and lets each caption see the prefix
and itself but never another caption; position ids restart after the prefix for every caption. It is
built on the device from ``segment_ids`` / ``branch_ids``: a ``[rows, 1, L, L]`` boolean mask for
sdpa, an additive float one for eager (a boolean mask would be added as 0/1 there, silently wrong),
a ``BlockMask`` for flex_attention. Padding positions see themselves, so no kernel gets an
all-masked row.

The loss is computed here from the logits, never by the model's built-in shifted loss (which would
let one caption predict the next): only the positions that predict a label get logits
(``logits_to_keep``), and the cross-entropies of every label token are summed. The recipe divides
the sum by the label tokens of the whole optimizer step, so plain, grouped and packed runs of the same
rows make the same update.
"""

from __future__ import annotations

from typing import Any

from raylora.families import Family, family_of_model

# torch is imported inside the functions: the data side imports this package without needing it.

FLEX = "flex_attention"


def allowed_attention(segment_ids: Any, branch_ids: Any) -> Any:
    """``[rows, L, L]`` booleans: may query i attend to key j (the structured-row rule)."""
    import torch

    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same_unit = segment_ids[:, :, None] == segment_ids[:, None, :]
    visible = (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    token = (segment_ids >= 0)[:, :, None]
    mask = causal & same_unit & visible & token
    eye = torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    return mask | (eye & ~token)  # padding sees itself


def block_mask(segment_ids: Any, branch_ids: Any) -> Any:
    """The same rule as a flex_attention ``BlockMask`` (GPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def rule(b: Any, h: Any, q: Any, kv: Any) -> Any:
        token = segment_ids[b, q] >= 0
        same = segment_ids[b, q] == segment_ids[b, kv]
        visible = (branch_ids[b, kv] == 0) | (branch_ids[b, kv] == branch_ids[b, q])
        return ((kv <= q) & same & visible & token) | ((q == kv) & ~token)

    rows, length = segment_ids.shape
    return create_block_mask(rule, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=segment_ids.device)


def attention_mask(batch: dict[str, Any], backend: str, dtype: Any) -> Any:
    """What the model's ``attention_mask`` gets for this micro-batch and text attention backend."""
    import torch

    if not int(batch["structured"]):
        return batch["attention_mask"]
    if backend == FLEX:
        return block_mask(batch["segment_ids"], batch["branch_ids"])
    allowed = allowed_attention(batch["segment_ids"], batch["branch_ids"])[:, None]
    if backend == "eager":
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    return allowed


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_loss(
    model: Any, batch: dict[str, Any], dtype: Any, backend: str = "sdpa", family: Family | None = None
) -> tuple[Any, int]:
    """(sum of the label tokens' cross-entropies, number of label tokens) of one micro-batch.

    ``batch`` holds torch tensors on the model's device; ``backend`` is the text model's attention
    implementation (it decides the mask's form); ``family`` the model's (read from its config when
    not given) turns the image columns and position ids into the forward's inputs.
    """
    import torch.nn.functional as F

    family = family or family_of_model(model)
    kwargs: dict[str, Any] = {
        "input_ids": batch["input_ids"],
        "attention_mask": attention_mask(batch, backend, dtype),
        "logits_to_keep": batch["logit_mask"].bool(),
        **family.model_inputs(batch, dtype),
    }
    if int(batch["structured"]) or family.position_axes > 1:
        kwargs["position_ids"] = family.text_positions(batch)
    logits = model(**kwargs).logits  # (kept positions, vocab)
    loss = F.cross_entropy(logits[batch["target_logits"]].float(), batch["target_ids"], reduction="sum")
    return loss, int(batch["label_tokens"])
