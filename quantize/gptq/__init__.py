"""quantmill's own GPTQ engine; branches in the AutoGPTQ / GPTQModel "v1" or the compressed-tensors format.

* ``branches``   branch specs (``4bit-128g-actorder``) <-> release names (``gptq-4bit-128g-actorder_True``)
* ``grid``       per-group scale / zero choice (float16-exact scales, v1-storable zeros)
* ``algorithm``  GPTQ on one matrix: damping with escalation, act-order, groups, lazy batch updates
* ``hessian``    XᵀX accumulated on its lower block triangle
* ``flows``      how a decoder layer is walked group by group (true-sequential)
* ``engine``     the streaming driver: one layer in memory, all branches side by side, atomic output
* ``packing``    qweight / qzeros / scales / g_idx packing and unpacking
* ``compressed_tensors``  the same codes as pack-quantized weight_packed / weight_scale / ... (vLLM, llm-compressor)
* ``formats``    one record per checkpoint format (packer, quantization_config), chosen by the branch's ``format``
* ``checkpoint`` safetensors + quantize_config.json + config.json of one branch
* ``dequant``    reading a branch back as a float model (verify's GPTQ backend)
* ``api`` / ``cli``  ``quantmill quantize gptq``
"""
