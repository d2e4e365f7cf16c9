"""The decoder base: a Llama-family causal language model as a stateless forward over frozen
weights (``forward``), its loading (``base``), chat rendering with loss masks (``chat``) and the
SFT and DPO losses (``losses``). Torch-free names live in ``config``.
"""
