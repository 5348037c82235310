# hashtab.pxi: written by its owner
