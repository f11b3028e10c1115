"""LoRA merge and GGUF LoRA export (``quantmill merge``, ``quantmill convert lora-to-gguf``).

Merge semantics, matched against PEFT's ``merge_and_unload`` in tests/convert/test_merge.py:

- Each adapter module gets W' = W + s·B·A (``s`` = alpha/r, or alpha/√r with rsLoRA; r
  and alpha after ``rank_pattern``/``alpha_pattern``), or DoRA's (m/‖W + s·B·A‖)·(W + s·B·A);
  ``lora_bias`` adds s·b to the bias. Saved full tensors (``modules_to_save``, trained
  biases, resized embeddings) replace the base tensor; a saved copy equal to the base
  changes nothing.
- Several adapters apply in order, each onto the previous result, exactly as loading each
  with PEFT onto the previously merged model and merging it; ``DIR:WEIGHT`` multiplies that
  adapter's scale (PEFT's ``set_scale``), so for plain LoRA the result is W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ.
- Tied input/output embeddings stay tied while every adapter changes both alike; otherwise
  the output embedding is written separately (``tie_word_embeddings: false``), so the merged
  model computes what the adapter model computed.
- Everything is computed in float32 and written in each base tensor's dtype, or ``dtype``.
"""
