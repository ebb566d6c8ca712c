"""Integrations with other libraries, one module each, imported only on request.

triton_xent.integrations.hf: Hugging Face transformers causal LMs train with
triton_xent.linear_cross_entropy (no logits). It needs transformers, an optional extra
(pip install "triton_xent[hf]"); nothing here imports it until that module is imported.
"""
