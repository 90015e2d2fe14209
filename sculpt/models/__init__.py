"""Model code and tiny offline checkpoints (these modules import torch; `import sculpt` never imports them)."""
