"""Rewrites of a Dynamo FX graph, none of which changes what a call returns.

* `row_rewrites`: rows picked from the end, and the token count used as a
  value, read the real count from the device, so that the graph stays
  paddable (`split.py` applies them where `analyse/padding_rule` asks);
* `attention_keys`: marks `pcg::attention` nodes whose keys are the call's
  own rows, so that a padded call keeps real queries off padded keys
  (`split.py`, first);
* `schedule`: moves nodes so that the graph falls into fewer, larger pieces
  (`split.py`, before it cuts);
* `skinny_routing`: sends few-row linear layers of captured pieces to
  `pcg::skinny_linear` (`backend.py`, for each captured piece).
"""
