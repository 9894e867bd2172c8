"""``clipcurate eval``: what a curation recipe buys, measured by the model it trains (DataComp-style).

A small CLIP is trained with open_clip's own trainer on an output's shards for a fixed number of
samples seen, then evaluated on held-out sets: zero-shot classification (``zeroshot.py``) and
image-text retrieval (``retrieval.py``). ``run.evaluate`` writes ``OUTPUT/eval.json``.
Submodules are imported where used, so that ``clipcurate --help`` stays light.
"""
