"""The embedding graph: token ids (+ visual embeddings) -> the decoder's inputs_embeds.

    inputs   input_ids     int64   [batch, sequence]
             image_embeds  float32 [image_tokens, visual_dim]   (only with project_up)
    output   inputs_embeds float32 [batch, sequence, hidden]

Token embeddings, with the positions where input_ids == image_token_id replaced, in
row-major order, by project_up(image_embeds). The same graph turns a regressed embedding
back into a decoder input while generating an image (input_ids = [[image_token_id]],
image_embeds = that one vector). Text-only steps feed image_embeds with 0 rows: onnxruntime
accepts a zero-sized dimension and NonZero/ScatterND handle an empty set of positions. A
count that differs from the number of image tokens fails in ScatterND instead of silently
misplacing embeddings.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from emu_edge.export.decoder import DecoderDescription, DecoderExportError, GraphBuilder


def build_embed(desc: DecoderDescription, weights, image_token_id: int | None = None,
                project_up: tuple[np.ndarray, np.ndarray] | None = None, spill=None) -> onnx.ModelProto:
    """weights: canonical name -> array (only "embed.weight" is read); spill: see GraphBuilder."""
    if "embed.weight" not in weights:
        raise DecoderExportError("the weights have no token embedding table ('embed.weight', canonical name)")
    table = np.asarray(weights["embed.weight"], dtype=np.float32)
    vocab, hidden = table.shape
    if (vocab, hidden) != (desc.vocab_size, desc.hidden_size):
        raise DecoderExportError(f"the token embedding has shape {table.shape}; the config says "
                                 f"[{desc.vocab_size}, {desc.hidden_size}]")
    if desc.embedding_scale != 1.0:  # scaled embeddings (sqrt(hidden) in some models): fold into the table
        table = table * np.float32(desc.embedding_scale)
    if (project_up is None) != (image_token_id is None):
        raise ValueError("project_up and image_token_id go together: give both or neither")

    g = GraphBuilder("embed", spill)
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    embeds = g.op("Gather", g.initializer("embed_tokens.weight", table), ids, axis=0, name="tokens")
    if project_up is not None:
        weight, bias = project_up
        if weight.shape[0] != hidden:
            raise ValueError(f"project_up weight has shape {weight.shape}; expected [{hidden}, visual_dim]")
        visual_dim = int(weight.shape[1])
        images = g.input("image_embeds", TensorProto.FLOAT, ["image_tokens", visual_dim])
        projected = g.linear(images, weight, bias, "project_up")                         # [N, hidden]
        is_image = g.op("Equal", ids, g.const(image_token_id), name="image_positions")   # [B, S]
        # NonZero lists positions in row-major order: the order images appear in the prompt.
        where = g.op("Transpose", g.op("NonZero", is_image, name="image_nonzero"), perm=[1, 0],
                     name="image_indices")                                             # [N, 2]
        embeds = g.op("ScatterND", embeds, where, projected, name="splice_images")
    g.op("Identity", embeds, outputs=["inputs_embeds"], name="inputs_embeds")
    g.output("inputs_embeds", TensorProto.FLOAT, ["batch", "sequence", hidden])
    return g.model(doc="token embeddings" + (" with visual embeddings spliced in" if project_up else ""))
