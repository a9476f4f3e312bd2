"""Analysis of what fine-tuning changed, read from run directories: the singular-value spectrum
of each layer's weight update ΔW (`delta.py`) and the LoRA adapter a full fine-tune's ΔW
compresses into by truncated SVD (`extract.py`). `deltatune analyze` is the command
(`cli_analyze.py`)."""
