"""Which llama.cpp pre-tokenizer a BPE vocabulary needs (``tokenizer.ggml.pre``).

llama.cpp identifies a BPE pre-tokenizer by the SHA-256 of ``str(token_ids)`` for a
fixed probe text, encoded with special tokens added. The probe text and the hashes
below are facts taken from llama.cpp's ``convert_hf_to_gguf_update.py`` output (the
sdist vendored by llama-cpp-python 0.3.36); the names are the pre-tokenizers that its
``src/llama-vocab.cpp`` implements. This is data: add a row when a model needs one.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333"
    " 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български"
    " ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you"
    " like some tea? We'Ve a'lL"
)

# sha256(str(ids of PROBE_TEXT)) -> llama.cpp pre-tokenizer name, with the model that defined it.
PRE_BY_HASH: dict[str, tuple[str, str]] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": ("llama-bpe", "meta-llama/Meta-Llama-3-8B"),
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": ("smollm", "HuggingFaceTB/SmolLM-135M"),
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": ("gpt-2", "openai-community/gpt2"),
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": ("gpt-2", "evilfreelancer/ruGPT3XL"),
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": ("deepseek-llm", "deepseek-ai/deepseek-llm-7b-base"),
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": ("deepseek-coder", "deepseek-ai/deepseek-coder-6.7b-base"),
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": ("deepseek-v3", "deepseek-ai/DeepSeek-V3"),
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": ("deepseek-r1-qwen", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": ("falcon", "tiiuae/falcon-7b"),
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": ("falcon3", "tiiuae/Falcon3-7B-Base"),
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": ("mpt", "mosaicml/mpt-7b"),
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": ("starcoder", "bigcode/starcoder2-3b"),
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": ("qwen2", "Qwen/Qwen1.5-7B"),
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": ("stablelm2", "stabilityai/stablelm-2-zephyr-1_6b"),
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": ("refact", "smallcloudai/Refact-1_6-base"),
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": ("command-r", "CohereForAI/c4ai-command-r-v01"),
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": ("dbrx", "databricks/dbrx-base"),
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": ("smaug-bpe", "abacusai/Smaug-Llama-3-70B-Instruct"),
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": ("poro-chat", "LumiOpen/Poro-34B-chat"),
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": ("viking", "LumiOpen/Viking-7B"),
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": ("jais", "core42/jais-13b"),
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": ("codeshell", "WisdomShell/CodeShell-7B"),
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": ("tekken", "mistralai/Mistral-Nemo-Base-2407"),
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": ("bloom", "bigscience/bloom"),
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": ("gpt3-finnish", "TurkuNLP/gpt3-finnish-small"),
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": ("exaone", "LGAI-EXAONE/EXAONE-3.0-7.8B-Instruct"),
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": ("phi-2", "microsoft/phi-2"),
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": ("chameleon", "facebook/chameleon-7b"),
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": ("minerva-7b", "sapienzanlp/Minerva-7B-base-v1.0"),
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": ("gpt-4o", "Xenova/gpt-4o"),
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": ("superbpe", "UW/OLMo2-8B-SuperBPE-t180k"),
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": ("trillion", "trillionlabs/Trillion-7B-preview"),
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": ("llama4", "meta-llama/Llama-4-Scout-17B-16E-Instruct"),
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": ("pixtral", "mistral-community/pixtral-12b"),
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": ("seed-coder", "ByteDance-Seed/Seed-Coder-8B-Base"),
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": ("mellum", "JetBrains/Mellum-4b-base"),
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": ("lfm2", "LiquidAI/LFM2.5-350M"),
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": ("midm-2.0", "K-intelligence/Midm-2.0-Base-Instruct"),
}

# Pre-tokenizer names llama.cpp's vocabulary loader accepts (for an explicit override).
KNOWN_PRE_NAMES: frozenset[str] = frozenset(
    {name for name, _ in PRE_BY_HASH.values()}
    | {
        "default", "llama3", "llama-v3", "jina-v5-nano", "spark2_5", "youtu", "jina-es", "jina-de", "gigachat",
        "jina-v2-es", "jina-v2-de", "a.x-4.0", "modern-bert", "jais-2", "gemma4", "sarvam-moe", "jina-v1-en",
        "jina-v2-code", "roberta-bpe", "whitespace", "kormo", "f2llmv2", "qwen35", "olmo", "chatglm-bpe", "glm4",
        "glm5", "exaone4", "exaone-moe", "megrez", "kanana2", "talkie", "tiny_aya", "cohere2moe", "granite-docling",
        "bailingmoe", "bailingmoe2", "llada-moe", "hunyuan", "hunyuan-dense", "hy_v4", "joyai-llm", "kimi-k2",
        "ufakzeka", "grok-2", "afmoe", "laguna", "minimax-m2", "solar-open", "mellum2", "minicpm5",
        "granite-embed-multi-97m", "granite-embed-multi-311m", "falcon-h1",
    }
)


def probe_hash(token_ids: Sequence[int]) -> str:
    """The identifier llama.cpp derives from the probe text's token ids."""
    return hashlib.sha256(str(list(token_ids)).encode()).hexdigest()
