"""Self-replay for any Hugging Face causal LM (transformers, peft, datasets).

    model     an AutoModelForCausalLM seen as the losses see a model (hidden states, head); π0
    data      text packed to the sequence length, chat conversations with assistant-only masks
    chat      where a chat template's turns begin and end, in tokens
    sampling  replay samples with a KV cache: from BOS, or inside the chat template
    pool      replay batches: drawn on the fly, or read from a pre-generated pool directory
    trainer   a transformers.Trainer that adds the replay term
    scores    lm-eval benchmark scores before and after finetuning (lm-eval optional)
    export    a selfreplay-pretrained model written as a transformers model directory
"""
