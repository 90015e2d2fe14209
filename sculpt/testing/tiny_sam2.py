"""A tiny random-weight SAM 2.1 in the sam2 package's own format: a Hydra config (yaml) + ``{"model": state_dict}``.

``write(directory)`` saves ``sam2.1_hiera_tiny-random.yaml`` and ``sam2.1_hiera_tiny-random.pt``; the pair loads with
``sam2.build_sam.build_sam2`` (see ``actors.mask.build_sam2_model`` for a config outside sam2's own package).
The architecture is SAM 2.1's (Hiera trunk, FPN neck, prompt encoder, mask decoder, memory modules) with tiny widths
and one block per stage. ``image_size`` stays 1024 because ``SAM2ImagePredictor`` hard-codes the 256/128/64 feature
map sizes of a 1024 input; the widths keep it small (about 1.7 MB) and fast on a CPU.
"""

from __future__ import annotations

NAME = "sam2.1_hiera_tiny-random"

CONFIG = """\
# @package _global_

# SAM 2.1 (layout of configs/sam2.1/sam2.1_hiera_t.yaml) with tiny widths, for offline tests.
model:
  _target_: sam2.modeling.sam2_base.SAM2Base
  image_encoder:
    _target_: sam2.modeling.backbones.image_encoder.ImageEncoder
    scalp: 1
    trunk:
      _target_: sam2.modeling.backbones.hieradet.Hiera
      embed_dim: 8
      num_heads: 1
      stages: [1, 1, 1, 2]
      global_att_blocks: [4]
      window_pos_embed_bkg_spatial_size: [7, 7]
    neck:
      _target_: sam2.modeling.backbones.image_encoder.FpnNeck
      position_encoding:
        _target_: sam2.modeling.position_encoding.PositionEmbeddingSine
        num_pos_feats: 32
        normalize: true
        scale: null
        temperature: 10000
      d_model: 32
      backbone_channel_list: [64, 32, 16, 8]
      fpn_top_down_levels: [2, 3]
      fpn_interp_model: nearest

  memory_attention:
    _target_: sam2.modeling.memory_attention.MemoryAttention
    d_model: 32
    pos_enc_at_input: true
    layer:
      _target_: sam2.modeling.memory_attention.MemoryAttentionLayer
      activation: relu
      dim_feedforward: 64
      dropout: 0.1
      pos_enc_at_attn: false
      self_attention:
        _target_: sam2.modeling.sam.transformer.RoPEAttention
        rope_theta: 10000.0
        feat_sizes: [64, 64]
        embedding_dim: 32
        num_heads: 1
        downsample_rate: 1
        dropout: 0.1
      d_model: 32
      pos_enc_at_cross_attn_keys: true
      pos_enc_at_cross_attn_queries: false
      cross_attention:
        _target_: sam2.modeling.sam.transformer.RoPEAttention
        rope_theta: 10000.0
        feat_sizes: [64, 64]
        rope_k_repeat: True
        embedding_dim: 32
        num_heads: 1
        downsample_rate: 1
        dropout: 0.1
        kv_in_dim: 16
    num_layers: 1

  memory_encoder:
    _target_: sam2.modeling.memory_encoder.MemoryEncoder
    out_dim: 16
    in_dim: 32
    position_encoding:
      _target_: sam2.modeling.position_encoding.PositionEmbeddingSine
      num_pos_feats: 16
      normalize: true
      scale: null
      temperature: 10000
    mask_downsampler:
      _target_: sam2.modeling.memory_encoder.MaskDownSampler
      embed_dim: 32
      kernel_size: 3
      stride: 2
      padding: 1
    fuser:
      _target_: sam2.modeling.memory_encoder.Fuser
      layer:
        _target_: sam2.modeling.memory_encoder.CXBlock
        dim: 32
        kernel_size: 7
        padding: 3
        layer_scale_init_value: 1e-6
        use_dwconv: True
      num_layers: 1

  num_maskmem: 7
  image_size: 1024
  sigmoid_scale_for_mem_enc: 20.0
  sigmoid_bias_for_mem_enc: -10.0
  use_mask_input_as_output_without_sam: true
  directly_add_no_mem_embed: true
  no_obj_embed_spatial: true
  use_high_res_features_in_sam: true
  multimask_output_in_sam: true
  iou_prediction_use_sigmoid: True
  use_obj_ptrs_in_encoder: true
  add_tpos_enc_to_obj_ptrs: true
  proj_tpos_enc_in_obj_ptrs: true
  use_signed_tpos_enc_to_obj_ptrs: true
  only_obj_ptrs_in_the_past_for_eval: true
  pred_obj_scores: true
  pred_obj_scores_mlp: true
  fixed_no_obj_ptr: true
  multimask_output_for_tracking: true
  use_multimask_token_for_obj_ptr: true
  multimask_min_pt_num: 0
  multimask_max_pt_num: 1
  use_mlp_for_obj_ptr_proj: true
  compile_image_encoder: False
"""


def write(directory: str, seed: int = 0) -> str:
    """Write ``<NAME>.yaml`` and ``<NAME>.pt`` into ``directory`` (created if needed); returns the directory."""
    import os

    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    os.makedirs(directory, exist_ok=True)
    config_path = os.path.join(directory, NAME + ".yaml")
    with open(config_path, "w") as f:
        f.write(CONFIG)
    torch.manual_seed(seed)
    model = instantiate(OmegaConf.load(config_path).model, _recursive_=True)
    torch.save({"model": model.state_dict()}, os.path.join(directory, NAME + ".pt"))
    return directory
