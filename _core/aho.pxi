# aho.pxi: in progress
