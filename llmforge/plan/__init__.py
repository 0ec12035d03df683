"""`llmforge plan`: what a spec costs before a GPU is rented. No torch anywhere in here.

budget.py   tokens, steps and epochs per stage (manifest, else spec, else an estimate)
catalog.py  the devices `--gpu` names: memory, dense peak FLOP/s, assumed MFU
memory.py   bytes per rank: weights, gradients, optimizer states, activations, logits
cost.py     step time from FLOPs and MFU, pipeline bubble, recompute; checkpoint size
fit.py      does it fit, and the cheapest change that makes it fit
build.py    all of it as one JSON-ready dict; report.py renders that dict with rich
"""
