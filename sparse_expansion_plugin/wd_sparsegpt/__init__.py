"""WD-aware SparseGPT: stock SparseGPT's zeros, spent away from entangled (high-WD) neurons.

modifier.py    ``WassersteinSparseGPTModifier`` (fields and lifecycle)
allocation.py  how zeros move between rows and layers by a score (WD, or a control)
statistics.py  the streaming per-neuron statistics behind the wd/kurtosis/variance scores
"""
