"""Model code and tiny offline checkpoints (these modules import torch; `import sculpt` never imports them)."""

# The real model of each `models` config key (Hugging Face ids); a local directory works wherever an id does.
DEFAULT_MODELS = {
    "vlm": "OpenGVLab/InternVL3-8B-hf",  # caption and refer, through vLLM
    "ground": "florence-community/Florence-2-large",
    "mask": "facebook/sam2.1-hiera-large",
    "verify": "YxZhang/evf-sam2",
    "instances": "facebook/sam3",  # every instance of a kind (SAM 3 through transformers)
}
