"""Tiny replicas of causal-LM families whose modelling code is not in transformers
(they ship as trust_remote_code), written from their published architectures."""
from .baichuan import BaichuanConfig, BaichuanForCausalLM, alibi_slopes, tiny_baichuan7b, tiny_baichuan13b
from .chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration, tiny_chatglm

REPLICAS = {"baichuan7b": tiny_baichuan7b, "baichuan13b": tiny_baichuan13b, "chatglm": tiny_chatglm}

__all__ = ["BaichuanConfig", "BaichuanForCausalLM", "ChatGLMConfig", "ChatGLMForConditionalGeneration",
           "REPLICAS", "alibi_slopes", "tiny_baichuan7b", "tiny_baichuan13b", "tiny_chatglm"]
