"""smolgpt: a small GPT-2-style language model to train on your own text and sample from.

Modules, in the order data flows through them:
config -> tokenizer -> data -> model -> training -> checkpoint -> sampling, with cli on top.
"""

__version__ = "0.4.0"
