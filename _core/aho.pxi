# aho.pxi: written by its owner
