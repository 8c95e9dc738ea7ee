"""Text: tokenizers, chat templates and assistant-only loss masks.

    from lib.text import Tokenizer, chat
    tok = Tokenizer.from_pretrained("hf_dir")                 # tokenizer.json + tokenizer_config.json
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids, mask = tok.assistant_mask(messages)                  # 1 on assistant tokens (shift for the loss)

:mod:`~lib.text.tokenizer` wraps a ``tokenizers.Tokenizer`` with the HF special tokens, chat
template and save/load; :mod:`~lib.text.chat` renders templates as transformers does and builds
masks by rendering prefixes. The data side (files, packing, batches) is :mod:`lib.data.text`.
"""
from lib.text import chat
from lib.text.chat import (ChatError, EmptyMaskError, MalformedMessagesError, NoAssistantError, TemplateMismatchError,
                           UnknownRoleError, assistant_mask, render)
from lib.text.tokenizer import Tokenizer, TokenizerError, VocabularyMismatchError, byte_tokenizer

__all__ = [
    "ChatError", "EmptyMaskError", "MalformedMessagesError", "NoAssistantError", "TemplateMismatchError", "Tokenizer",
    "TokenizerError", "UnknownRoleError", "VocabularyMismatchError", "assistant_mask", "byte_tokenizer", "chat",
    "render",
]
