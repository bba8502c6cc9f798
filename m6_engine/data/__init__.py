"""The data path: cleaning, tokenizer, indexed datasets, image patch features, pretraining tasks.

Modules are imported on their own (``from m6_engine.data.tokenizer import ...``); this file stays
empty so importing one of them never pulls in the others.
"""
