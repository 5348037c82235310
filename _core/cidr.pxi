# cidr.pxi: written by its owner
