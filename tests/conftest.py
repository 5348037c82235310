import os
import sys

# make `tests.support.oracles` importable as `oracles`
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "support"))
