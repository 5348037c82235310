# wildmat.pxi: in progress
