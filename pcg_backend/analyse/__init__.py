"""Analyses of a Dynamo FX graph: they read the graph and change nothing.

`split.py` runs them before it cuts the graph:

* `fx_facts`: what each node reads, writes and aliases, the facts the others rely on;
* `token_dim`: which symbol is the token count, and which symbols key a capture;
* `padding_rule`: whether the graph may be padded along the token dim, and what must be rewritten for that;
* `node_kinds`: the kind of each node (split op, captured, eager or host work).

The rewrites that act on their answers are in `rewrite/`.
"""
