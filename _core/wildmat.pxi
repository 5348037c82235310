# wildmat.pxi: written by its owner
