"""Parameter count and FLOPs of M6 under the prefix-LM mask (for MFU and the planner).

Notation: L layers, d hidden, f FFN hidden, V vocabulary, F patch feature dim. One sample has
prefix length P (patches + masked text), valid length T (no trailing pad), N loss tokens and
I image patches. A multiply-add is 2 FLOPs; norms, softmax, GeLU, dropout and embedding
lookups are not counted (Megatron / PaLM convention).

*Model* FLOPs (what the sample needs: only valid tokens and allowed query-key pairs):

    linear per layer      2 T (4 d^2 + 2 d f)          QKV 3d^2, out d^2, FC1 + FC2 2 d f
    attention per layer   4 d A                        q k^T and p v over A allowed pairs
    A = P^2 + sum_{i=P}^{T-1} (i + 1) = P^2 + (T - P)(T + P + 1) / 2
                          (a prefix query sees the P prefix keys; complete-text query i sees
                          keys 0..i; pad queries see nothing)
    head                  2 N d V                      logits of the loss tokens only
    patch projection      2 I F d
    forward = L (linear + attention) + head + patch;  training = 3 x forward (backward = 2 x)

Bidirectional (P = T): A = T^2; causal (P = 0): A = T (T + 1) / 2.

*Executed* FLOPs (``dense=True``: what this implementation's matmuls compute for a padded
micro-batch of length S): every position runs the linears (2 S (4 d^2 + 2 d f)), attention is
S x S (4 d S^2), the head uses the padded vocabulary, and the patch projection runs on all
``num_patches`` slots of every sample of a batch that carries patches. Recomputation adds
executed work (one more forward of what is recomputed) but never model FLOPs, so
MFU = model FLOPs / (time x peak).
"""

from m6_engine.config import ModelConfig
from m6_engine.data.batch import MicroBatch


def parameter_count(config: ModelConfig, *, tp: int = 1) -> int:
    """Parameters of the whole model (one copy of the tied embedding), with the vocabulary padded
    for ``tp`` as the model pads it (padding rows included: they exist in memory)."""
    d, f = config.hidden_size, config.ffn_size
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    embedding = config.padded_vocab_size(tp) * d + config.max_text_positions * d
    embedding += config.num_segments * d
    if config.num_patches:
        embedding += config.patch_feature_dim * d + d
    matching_head = 2 * d + 2 if config.itm_head else 0  # m6_engine.model.heads: Linear(d, 2)
    return config.num_layers * per_layer + embedding + 2 * d + matching_head


def allowed_pairs(prefix_len: int, valid_len: int) -> int:
    """Query-key pairs the prefix-LM mask allows in one sample (A in the module docstring)."""
    if not 0 <= prefix_len <= valid_len:
        raise ValueError(f"need 0 <= prefix_len <= valid_len, got {prefix_len}, {valid_len}")
    p, t = prefix_len, valid_len
    return p * p + (t - p) * (t + p + 1) // 2


def forward_flops(config: ModelConfig, *, prefix_len: int, valid_len: int, loss_tokens: int,
                  image_patches: int) -> int:
    """Model FLOPs of one sample's forward (module docstring); training is 3x this."""
    d, f = config.hidden_size, config.ffn_size
    linear = 2 * valid_len * (4 * d * d + 2 * d * f)
    attention = 4 * d * allowed_pairs(prefix_len, valid_len)
    head = 2 * loss_tokens * d * config.vocab_size
    patch = 2 * image_patches * config.patch_feature_dim * d
    return config.num_layers * (linear + attention) + head + patch


def batch_forward_flops(config: ModelConfig, batch: MicroBatch, *, dense: bool = False, tp: int = 1) -> int:
    """Forward FLOPs of a collated micro-batch, summed over the whole model (all tp ranks and
    stages): model FLOPs, or with ``dense`` the FLOPs the matmuls execute (vocabulary padded for
    ``tp``). Reads prefix_len, valid_len, loss_mask and num_image_patches (if present)."""
    b, s = batch.loss_mask.shape
    loss_tokens = batch.loss_mask.ne(0).sum(dim=1).tolist()
    if dense:
        d, f = config.hidden_size, config.ffn_size
        per_layer = 2 * b * s * (4 * d * d + 2 * d * f) + 4 * d * b * s * s
        head = 2 * sum(loss_tokens) * d * config.padded_vocab_size(tp)
        patch = 2 * b * config.num_patches * config.patch_feature_dim * d if batch.patches is not None else 0
        return config.num_layers * per_layer + head + patch
    images = batch.num_image_patches.tolist() if batch.num_image_patches is not None else [0] * b
    return sum(forward_flops(config, prefix_len=p, valid_len=t, loss_tokens=n, image_patches=i)
               for p, t, n, i in zip(batch.prefix_len.tolist(), batch.valid_len.tolist(),
                                     loss_tokens, images))
