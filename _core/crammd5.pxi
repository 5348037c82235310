# crammd5.pxi: written by its owner
