# listmatch.pxi: written by its owner
