"""Weight interventions as pure transforms of state: pruning masks, task vectors, interpolation, adapters.

Every function takes state TensorDicts (from :func:`tdfunc.state`) and returns new ones; the module
and the input states are never written.  Public names are re-exported by :mod:`tdfunc`.
"""
