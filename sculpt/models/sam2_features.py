"""SAM2's image embedding through ``SAM2Base``'s public API; the mask stage and EVF-SAM2 both use it.

``SAM2ImagePredictor.set_image_batch`` computes the same thing, but it reaches the features through the model's
private ``_prepare_backbone_features`` (which flattens the maps to HW×B×C, for the video memory's sake) and keeps
them in its private ``_features``; the mask decoder needs them as the B×C×H×W maps ``forward_image`` returns.
Here they are taken from there directly: the same numbers, in SAM2ImagePredictor's ``_features`` format
(tests/test_private_uses.py compares the two, so that a sam2 release that changes either shows).
"""

from __future__ import annotations


def image_features(sam, images) -> dict:
    """``{"image_embed": B×C×h×w, "high_res_feats": [finer maps, finest first]}`` of a batch of model-ready images
    (B×3×S×S, normalised; ``sam``: a ``sam2`` ``SAM2Base``)."""
    backbone = sam.forward_image(images)  # with the decoder's high-resolution projections, where the model has them
    maps = list(backbone["backbone_fpn"][-sam.num_feature_levels:])
    if sam.directly_add_no_mem_embed:  # an image on its own: the "no memory" embedding, as for a video's first frame
        maps[-1] = maps[-1] + sam.no_mem_embed.view(1, -1, 1, 1)
    return {"image_embed": maps[-1], "high_res_feats": maps[:-1]}
