# fold.pxi: written by its owner
