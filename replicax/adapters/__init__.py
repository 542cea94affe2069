"""Adapters from other libraries' language models to replicax's logits.

Each adapter is its own module and imports its library only when called, so that
`import replicax` never needs them:

- `replicax.adapters.transformers`: Hugging Face causal LMs (PyTorch); needs the
    `transformers` extra (`pip install 'replicax[transformers]'`).
"""
