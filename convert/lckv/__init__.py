"""LCKV (Layer-Condensed KV cache, whyNLP) checkpoints, read as data.

``model_type: lckv-llama`` checkpoints are llama models in which layer i attends to the
keys and values of layer ``layer_types[i]``; only the layers some layer attends to compute
KV (the others have no ``k_proj``/``v_proj``). :mod:`.config` parses and validates the
configuration and names its GGUF keys; :mod:`.model` is quantmill's torch reference
forward (no runtime implements LCKV), used by ``verify`` and by GPTQ.
"""
